# optserver in one image: the server (default command), and the `create-session`, `worker` and
# `evaluate` commands of the demo, with the Python client.
#
#   docker build -t optserver .
#   docker run --rm -p 127.0.0.1:8000:8000 -e OPTSERVER_ADMIN_KEY=change-me optserver
#   docker compose up            # server + 3 training workers, see docker-compose.yml
#
# Offline builds: the build argument PIP_INSTALL_ARGS is handed to `pip install` as is. Empty by
# default, so pip installs from the package index as usual. The test stack
# (compose/compose.test.yml, used by `make compose-test`) sets it to
# "--no-index --find-links /src/compose/.wheels", after scripts/compose_test.sh has put the
# wheels of every dependency into compose/.wheels (a git-ignored folder in the build context).
# Only the build stage sees them: the final image gets the installed virtualenv alone.

FROM python:3.11-slim AS build
ARG PIP_INSTALL_ARGS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY . .
# The client is a distribution of its own (./client); the server with its `demo` extra brings
# what the training demo needs.
RUN python -m venv /opt/optserver \
 && /opt/optserver/bin/pip install --no-cache-dir $PIP_INSTALL_ARGS ./client ".[demo]"

FROM python:3.11-slim
# /data: the server's data directory (OPTSERVER_DATA_DIR); /shared: the session file that the
# demo's trainer writes for the workers. Both are owned by the service user, so named volumes
# mounted there start out writable.
RUN groupadd --system --gid 10001 optserver \
 && useradd --system --uid 10001 --gid optserver --home-dir /home/optserver --create-home \
        --shell /usr/sbin/nologin optserver \
 && mkdir -p /data /shared \
 && chown optserver:optserver /data /shared
COPY --from=build /opt/optserver /opt/optserver
# numba compiles the optimizer kernels on first use and caches them on disk: the installed
# package is read-only for the service user, so the cache goes to a folder it owns.
ENV PATH=/opt/optserver/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NUMBA_CACHE_DIR=/home/optserver/.cache/numba
USER optserver
WORKDIR /home/optserver
# Compile every numba kernel once, here, as the service user and into NUMBA_CACHE_DIR (numba
# reads a cache directory only if it may also write to it: the one the user owns). A new
# container then loads them (the server's background warm-up at start, well under a second)
# instead of compiling them (~25 s of CPU, and ~0.3 s on the first step that needs one). The
# cache matches this CPU model only: on another, the warm-up compiles them again at start.
RUN python -c "from optserver import idempotency; from optserver.optim import warm_up; \
idempotency.warm_up(); warm_up()"
EXPOSE 8000
# No curl in slim images: the check uses Python's urllib.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["optserver", "serve", "--host", "0.0.0.0", "--port", "8000"]
