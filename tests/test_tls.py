"""The server over TLS: the same protocol (buffered reads, direct bodies, one-write answers)
under asyncio's TLS layer, with a certificate made for the test by the openssl command."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import safetensors.numpy as stn

from optserver.api.direct import DIRECT_MIN_BYTES
from optserver.embedded import free_port

ST = "application/octet-stream"


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ssl.SSLContext]]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    env = {**os.environ, "OPTSERVER_PORT": str(port), "OPTSERVER_LOG_LEVEL": "warning"}
    env["OPTSERVER_WARM_UP"] = "false"
    process = subprocess.Popen(
        [sys.executable, "-m", "optserver", "serve", "--ssl-certfile", str(cert),
         "--ssl-keyfile", str(key)],
        env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"https://127.0.0.1:{port}"
    trusted = ssl.create_default_context(cafile=cert)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/healthz", verify=trusted, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
            time.sleep(0.1)
        yield url, trusted
    finally:
        process.terminate()
        process.wait(10)


def test_small_and_large_steps_over_tls(tls_server: tuple[str, ssl.SSLContext]) -> None:
    url, trusted = tls_server
    n = DIRECT_MIN_BYTES // 4 + 1000  # a body read directly, and a small one
    with httpx.Client(base_url=url, verify=trusted, timeout=30) as client:
        created = client.post("/v1/sessions", json={"optimizer": {"name": "sgd", "lr": 0.5}})
        assert created.status_code == 201, created.text
        s = created.json()
        auth = {"Authorization": f"Bearer {s['token']}"}
        path = f"/v1/sessions/{s['id']}"
        weights = {"w": np.zeros(n, np.float32), "b": np.zeros(3, np.float32)}
        put = client.put(
            path + "/params", content=stn.save(weights), headers={**auth, "Content-Type": ST}
        )
        assert put.status_code == 200, put.text
        for step, grads in enumerate(
            ({"w": np.ones(n, np.float32)}, {"b": np.ones(3, np.float32)}), start=1
        ):
            r = client.post(
                path + "/step",
                content=stn.save(grads),
                headers={**auth, "Content-Type": ST, "Accept": ST},
            )
            assert r.status_code == 200, r.text
            assert r.headers["optserver-version"] == str(step)
            (name,) = grads
            np.testing.assert_array_equal(stn.load(r.content)[name], -0.5 * grads[name])
