#!/usr/bin/env bash
# `make swarm-test`: the Swarm stack (deploy/swarm/stack.yml) for real, on a one-node swarm of a
# Docker engine of its own, and a shard killed in the middle of the training. As root, on Debian
# (see scripts/containers_lib.sh: the engine, the local base image and the offline wheels, shared
# with `make compose-test` and its cache); no standard input needed.
#
#  1. the engine, the base image python:3.11-slim and the wheels (scripts/containers_lib.sh);
#  2. `docker compose config -q` of the stack file, and the image optserver:local built as the
#     compose test builds it (docker-compose.yml with compose/compose.test.yml: offline);
#  3. `docker swarm init --advertise-addr 127.0.0.1`, the node labelled for both shards, and
#     `docker stack deploy` with a fresh admin key and session token;
#  4. waits until both shards hold the session `train` at a version of at least
#     $SWARM_TEST_KILL_AT_VERSION (the workers are training), then `docker kill`s the container
#     of shard1's task: Swarm starts a new one on the same volume, and the workers keep pushing
#     their step to it until it answers;
#  5. waits for the three workers to exit 0, then checks from outside, in shard0's container:
#     both shards describe the session as sharded over 2, at the same version; that version is
#     the sum of the steps the workers report (in async mode every acknowledged step raises each
#     shard's version by exactly 1: equal means no acknowledged step lost and none applied
#     twice); `optserver evaluate` over both shards reaches the target test accuracy;
#  6. always, also on failure or interruption: shows the tasks and logs when something failed,
#     `docker stack rm`, removes the stack's volumes, `docker swarm leave --force`, stops dockerd
#     by its PID, removes what it staged.
#
# Settings (environment): SWARM_TEST_TIMEOUT (seconds the workers may take, default 600),
# SWARM_TEST_MIN_ACCURACY (default 0.9), SWARM_TEST_KILL_AT_VERSION (default 100), and those of
# scripts/containers_lib.sh (COMPOSE_TEST_CACHE, DEBIAN_MIRROR, VENV).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
LOG_NAME=swarm-test
# shellcheck source=scripts/containers_lib.sh
source scripts/containers_lib.sh

TIMEOUT=${SWARM_TEST_TIMEOUT:-600}
MIN_ACCURACY=${SWARM_TEST_MIN_ACCURACY:-0.9}
KILL_AT_VERSION=${SWARM_TEST_KILL_AT_VERSION:-100}
STACK=optserver-swarm-test
STACK_FILE=deploy/swarm/stack.yml
SESSION=train
URLS=http://shard0:8000,http://shard1:8000
WORKERS=3
SWARM_UP=
STACK_UP=

# Containers of one of the stack's services ($1: shard0, shard1 or worker); more arguments are
# more `docker ps` filters.
containers_of() {
    local service=$1
    shift
    docker ps -a -q --no-trunc --filter "label=com.docker.swarm.service.name=${STACK}_$service" "$@"
}

# The running, healthy container of a shard ($1), or nothing.
healthy_shard() {
    local id
    for id in $(containers_of "$1" --filter status=running); do
        if [ "$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id")" = healthy ]; then
            echo "$id"
            return 0
        fi
    done
}

# Every shard's description of the session, as JSON {url: {version, sharding} or {error}},
# asked from inside shard0's container (the stack's network). With a threshold ($4) and a
# deadline ($5 seconds): asked every 20 ms until every shard is at a version >= $4 (exit 1,
# with the last descriptions, at the deadline).
SHARDS_SCRIPT='
import json, sys, time, urllib.request
sid, token, urls = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
threshold = int(sys.argv[4]) if len(sys.argv) > 4 else None
deadline = time.monotonic() + (float(sys.argv[5]) if len(sys.argv) > 5 else 0.0)
while True:
    out = {}
    for url in urls:
        request = urllib.request.Request(
            f"{url}/v1/sessions/{sid}", headers={"Authorization": f"Bearer {token}"}
        )
        try:
            info = json.load(urllib.request.urlopen(request, timeout=5))
            out[url] = {"version": info["version"], "sharding": info.get("sharding")}
        except Exception as error:
            out[url] = {"error": f"{type(error).__name__}: {error}"}
    if threshold is None or min(s.get("version", -1) for s in out.values()) >= threshold:
        break
    if time.monotonic() > deadline:
        print(json.dumps(out))
        sys.exit(1)
    time.sleep(0.02)
print(json.dumps(out))
'
shards_info() {
    local shard0
    shard0=$(healthy_shard shard0)
    [ -n "$shard0" ] || return 1
    docker exec "$shard0" python -c "$SHARDS_SCRIPT" "$SESSION" "$OPTSERVER_SESSION_TOKEN" "${1:-$URLS}"
}

# The smallest version of the session over both shards (-1 while a shard does not have it).
min_version() {
    "$PY" -c '
import json, sys
shards = json.loads(sys.argv[1])
print(min(s.get("version", -1) for s in shards.values()))' "$1"
}

show_state() {
    log "--- docker stack ps"
    timeout 30 docker stack ps --no-trunc --format '{{.Name}} {{.CurrentState}} {{.Error}}' \
        "$STACK" >&2 || true
    # The containers' own logs (`docker service logs` can hang on a service with failed tasks).
    local id name
    for id in $(docker ps -a -q --filter "label=com.docker.stack.namespace=$STACK"); do
        name=$(docker inspect -f '{{.Name}} ({{.State.Status}} {{.State.ExitCode}})' "$id")
        log "--- ${name#/}, last 40 lines"
        timeout 30 docker logs --tail 40 "$id" 2>&1 | sed 's/^/  /' >&2 || true
    done
}

# "STATUS EXITCODE" of every worker container, one a line.
worker_states() {
    local ids
    mapfile -t ids < <(containers_of worker)
    [ ${#ids[@]} = 0 ] || docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "${ids[@]}" 2>/dev/null || true
}

remove_stack() {
    log "docker stack rm $STACK"
    docker stack rm "$STACK" >&2
    local _
    for _ in $(seq 60); do
        [ -z "$(docker ps -a -q --filter "label=com.docker.stack.namespace=$STACK")" ] && break
        sleep 1
    done
    for _ in $(seq 30); do
        [ -z "$(docker network ls -q --filter "label=com.docker.stack.namespace=$STACK")" ] && break
        sleep 1
    done
    STACK_UP=
}

# The stack's volumes, also those of an earlier run that was killed.
remove_volumes() {
    local volumes
    mapfile -t volumes < <(
        {
            docker volume ls -q --filter "label=com.docker.stack.namespace=$STACK"
            docker volume ls -q --filter "name=${STACK}_"
        } | sort -u
    )
    if [ ${#volumes[@]} -gt 0 ]; then
        # Containers that outlived their service (a killed run) would hold the volumes.
        docker ps -a -q --filter "label=com.docker.stack.namespace=$STACK" | xargs -r docker rm -f >/dev/null
        log "removing the volumes ${volumes[*]}"
        docker volume rm -f "${volumes[@]}" >/dev/null
    fi
}

leave_swarm() {
    log "docker swarm leave --force"
    docker swarm leave --force >&2
    # The bridge that the swarm made for its containers' outside traffic.
    docker network rm docker_gwbridge >/dev/null 2>&1 || true
    SWARM_UP=
}

# Called by containers_lib.sh on exit, with the exit status.
teardown() {
    if [ -n "$STACK_UP" ]; then
        [ "$1" = 0 ] || show_state
        remove_stack
    fi
    if [ -n "$SWARM_UP" ]; then
        remove_volumes
        leave_swarm
    fi
    log "pruning old builds from the cache"
    docker image prune -f >/dev/null 2>&1
    docker builder prune -f --keep-storage 2GB >/dev/null 2>&1
}

containers_setup
install_tools
start_dockerd
build_base_image
stage_wheels

# --- 2. the stack file and the image --------------------------------------------------------
OPTSERVER_ADMIN_KEY=swarm-test-$("$PY" -c 'import secrets; print(secrets.token_hex(8))')
OPTSERVER_SESSION_TOKEN=$("$PY" -c 'import secrets; print(secrets.token_urlsafe(32))')
OPTSERVER_IMAGE=optserver:local
OPTSERVER_LOG_LEVEL=warning
export OPTSERVER_ADMIN_KEY OPTSERVER_SESSION_TOKEN OPTSERVER_IMAGE OPTSERVER_LOG_LEVEL

log "docker compose -f $STACK_FILE config -q"
# (Compose v2 warns about the version line, which older stack clients need.)
docker compose -f "$STACK_FILE" config -q 2>"$RUNDIR/config.log" ||
    { cat "$RUNDIR/config.log" >&2; die "$STACK_FILE is not a valid compose file"; }
grep -v 'attribute .version. is obsolete' "$RUNDIR/config.log" >&2 || true
log "building $OPTSERVER_IMAGE (docker-compose.yml with compose/compose.test.yml)"
docker compose -p "$STACK-build" -f docker-compose.yml -f compose/compose.test.yml build server

# --- 3. the swarm and the stack -------------------------------------------------------------
if [ "$(docker info --format '{{.Swarm.LocalNodeState}}')" != inactive ]; then
    log "the engine is still in the swarm of an earlier run: leaving it"
    SWARM_UP=1
    leave_swarm
fi
log "docker swarm init --advertise-addr 127.0.0.1"
SWARM_UP=1
docker swarm init --advertise-addr 127.0.0.1 --listen-addr 127.0.0.1:2377 >/dev/null
remove_volumes # leftovers of a killed run would hold an old session
node=$(docker info --format '{{.Swarm.NodeID}}')
# One node carries both shards here; on a real swarm each label goes to the node with its data.
docker node update --label-add optserver.shard0=true --label-add optserver.shard1=true "$node" >/dev/null
log "docker stack deploy -c $STACK_FILE $STACK"
STACK_UP=1
docker stack deploy --resolve-image never --prune -c "$STACK_FILE" "$STACK" >&2

# --- 4. training, and a shard killed mid-run ------------------------------------------------
log "waiting for both shards to be healthy"
deadline=$((SECONDS + 180))
until [ -n "$(healthy_shard shard0)" ] && [ -n "$(healthy_shard shard1)" ]; do
    [ $SECONDS -lt $deadline ] || die "the shards are not healthy after 180 s"
    sleep 1
done
log "shards healthy; waiting for the workers to train (version >= $KILL_AT_VERSION on both shards)"
# The demo trains fast (a few hundred steps a second): shard0's container watches both shards
# every 20 ms and returns as soon as they are past the threshold, so that the kill comes early.
shard0=$(healthy_shard shard0)
killed=$(healthy_shard shard1)
[ -n "$shard0" ] && [ -n "$killed" ] || die "a shard is not healthy any more"
deadline=$((SECONDS + 300))
until info=$(docker exec "$shard0" python -c "$SHARDS_SCRIPT" "$SESSION" "$OPTSERVER_SESSION_TOKEN" \
    "$URLS" "$KILL_AT_VERSION" 10); do
    failed=$(grep -c '^exited [1-9]' <<<"$(worker_states)" || true)
    [ "$failed" = 0 ] || die "$failed worker container(s) failed before the shards reached version $KILL_AT_VERSION"
    [ $SECONDS -lt $deadline ] || die "the workers did not train within 300 s: $info"
    log "  $info"
done
docker kill "$killed" >/dev/null
killed_at=$SECONDS
KILL_VERSION=$(min_version "$info")
log "killed shard1's container ${killed:0:12} (docker kill) just after both shards were at version >= $KILL_VERSION: $info"
# shard0 alone: shard1's name does not resolve until its new task runs.
log "shard0 right after the kill: $(shards_info http://shard0:8000 || true)"
deadline=$((SECONDS + 180))
while :; do
    back=$(healthy_shard shard1)
    [ -n "$back" ] && [ "$back" != "$killed" ] && break
    [ $SECONDS -lt $deadline ] || die "shard1 did not come back within 180 s"
    sleep 1
done
volume_of() { docker inspect -f '{{range .Mounts}}{{if eq .Destination "/data"}}{{.Name}}{{end}}{{end}}' "$1"; }
[ "$(volume_of "$back")" = "$(volume_of "$killed")" ] || die "the new shard1 has another volume"
log "shard1 is back after $((SECONDS - killed_at)) s in container ${back:0:12}, on volume $(volume_of "$back")"

# --- 5. the workers' end, and the checks ----------------------------------------------------
log "waiting for the $WORKERS workers to finish (at most ${TIMEOUT} s)"
deadline=$((SECONDS + TIMEOUT))
while :; do
    states=$(worker_states)
    failed=$(grep -c '^exited [1-9]' <<<"$states" || true)
    [ "$failed" = 0 ] || die "$failed worker container(s) failed: $(tr '\n' ';' <<<"$states")"
    done_ok=$(grep -c '^exited 0$' <<<"$states" || true)
    [ "$done_ok" -ge "$WORKERS" ] && break
    [ $SECONDS -lt $deadline ] || die "workers still running after ${TIMEOUT} s: $(tr '\n' ';' <<<"$states")"
    sleep 3
done
mapfile -t ids < <(containers_of worker)
[ ${#ids[@]} = "$WORKERS" ] || die "expected $WORKERS worker containers, found ${#ids[@]}"
log "all $WORKERS workers exited 0; their last lines:"
total_steps=0
for id in "${ids[@]}"; do
    name=$(docker inspect -f '{{.Config.Hostname}}' "$id")
    docker logs --tail 2 "$id" 2>&1 | sed "s|^|  $name: |" >&2
    steps=$(docker logs "$id" 2>&1 | sed -n 's/^worker .* done after \([0-9][0-9]*\) steps in .*final test_accuracy=.*/\1/p' | tail -n 1)
    [ -n "$steps" ] || die "$name did not log its steps and final test_accuracy"
    total_steps=$((total_steps + steps))
done
log "the workers report $total_steps steps in all"
shard1_containers=$(containers_of shard1 | wc -l)
[ "$shard1_containers" -ge 2 ] || die "shard1 was not restarted (${shard1_containers} container(s))"

shard0=$(healthy_shard shard0)
[ -n "$shard0" ] || die "shard0 is not healthy"
[ "$(docker exec "$shard0" id -u)" != 0 ] || die "the shards run as root"
docker exec "$shard0" python -c "$SHARDS_SCRIPT" "$SESSION" "$OPTSERVER_SESSION_TOKEN" "$URLS" \
    >"$RUNDIR/shards.json" || die "the shards' descriptions of the session"
docker exec "$shard0" optserver evaluate --url "$URLS" --session "$SESSION" \
    --token "$OPTSERVER_SESSION_TOKEN" --json >"$RUNDIR/evaluate.json" || die "optserver evaluate"
"$PY" - "$RUNDIR/shards.json" "$RUNDIR/evaluate.json" "$total_steps" "$KILL_VERSION" \
    "$MIN_ACCURACY" <<'EOF' || die "the checks of the session failed"
import json, sys
shards = json.load(open(sys.argv[1]))
evaluation = json.load(open(sys.argv[2]))
steps, kill_version, target = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
ok = True
def check(condition, text):
    global ok
    ok &= bool(condition)
    print(f"  {'ok  ' if condition else 'FAIL'} {text}", file=sys.stderr)
versions = []
for index, (url, info) in enumerate(shards.items()):
    sharding = info.get("sharding") or {}
    check("version" in info, f"{url}: {info}")
    check(sharding.get("count") == 2 and sharding.get("index") == index,
          f"{url}: shard {sharding.get('index')} of {sharding.get('count')}")
    versions.append(info.get("version"))
check(len(set(versions)) == 1, f"both shards at the same version: {versions}")
check(versions[0] == steps, f"version {versions[0]} == {steps} steps the workers report")
check(0 < kill_version < steps, f"shard1 was killed mid-run, at version {kill_version}")
accuracy = float(evaluation["test_accuracy"])
check(evaluation["version"] == steps, f"evaluated at version {evaluation['version']}")
check(accuracy >= target, f"test_accuracy {accuracy:.4f} >= {target}")
sys.exit(0 if ok else 1)
EOF
log "shards at version $total_steps = the workers' $total_steps steps; shard1 killed at version $KILL_VERSION; $(cat "$RUNDIR/evaluate.json")"
remove_stack
remove_volumes
leave_swarm
