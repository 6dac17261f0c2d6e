"""Clients generated from the server's own ``/openapi.json`` import and work.

- Python: openapi-python-client (kept apart from the project's environment, in ``<venv>/tools``,
  because it pins its own typer) turns the live server's description into a package; every
  module of it must import, its functions must be named after the operationIds, and it must
  drive a real session: create, step, put weights as safetensors, pull, delete.
- TypeScript: openapi-typescript writes the types, openapi-fetch makes the calls
  (``scripts/typescript-client``); tsc checks a program against the types, and node runs it
  against the live server.
"""

from __future__ import annotations

import importlib
import io
import os
import pkgutil
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest
from optserver_client.safetensors_io import encode

from tests.live import LiveServer, live_server

#: The operationIds are part of the protocol: generated clients name their functions after them.
OPERATION_IDS = {
    ("post", "/v1/sessions"): "createSession",
    ("get", "/v1/sessions"): "listSessions",
    ("get", "/v1/sessions/{session_id}"): "getSession",
    ("patch", "/v1/sessions/{session_id}"): "updateSession",
    ("delete", "/v1/sessions/{session_id}"): "deleteSession",
    ("put", "/v1/sessions/{session_id}/params"): "putParams",
    ("get", "/v1/sessions/{session_id}/params"): "pullParams",
    ("post", "/v1/sessions/{session_id}/step"): "step",
    ("get", "/v1/sessions/{session_id}/state"): "exportState",
    ("post", "/v1/sessions/import"): "importSession",
    ("get", "/healthz"): "health",
    ("get", "/readyz"): "ready",
    ("get", "/metrics"): "metrics",
}
SDK = "optserver_client"
LR = 0.1
GENERATE_TIMEOUT_S = 120
TYPESCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "typescript-client"


@dataclass
class Generated:
    """The generated package, imported, and the description it was generated from."""

    name: str
    directory: Path
    schema: dict[str, object]
    modules: dict[str, ModuleType]

    def module(self, relative: str) -> ModuleType:
        return self.modules[f"{self.name}.{relative}"]


def _snake(operation_id: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", operation_id).lower()


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=GENERATE_TIMEOUT_S
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)}:\n{output}"
    return output


def _generate(schema_path: Path, workdir: Path) -> None:
    tools = Path(sys.prefix) / "tools"
    if not (tools / "openapi_python_client").is_dir():
        pytest.fail(
            f"openapi-python-client is not installed in {tools}: `make test` installs it there "
            "(it is kept out of the project's environment: it pins its own typer)"
        )
    # No post hooks: the package is imported exactly as the generator wrote it, whatever
    # formatters happen to be on PATH.
    config = workdir / "generator.yaml"
    config.write_text("post_hooks: []\n")
    path = [str(tools), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    generate = [sys.executable, "-m", "openapi_python_client", "generate"]
    options = ["--path", str(schema_path), "--meta", "none", "--config", str(config)]
    output = _run(generate + options, workdir, env)
    assert "Warning" not in output, output  # "Client was generated, but some pieces may be missing"


@pytest.fixture(scope="module")
def admin_key() -> str:
    return secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def api(admin_key: str) -> Iterator[LiveServer]:
    """A server with an admin key: the generated client authenticates every call."""
    with live_server(admin_key=admin_key) as s:
        yield s


@pytest.fixture(scope="module")
def generated(api: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Generated]:
    workdir = tmp_path_factory.mktemp("generated")
    answer = httpx.get(api.url + "/openapi.json", timeout=10)
    assert answer.status_code == 200
    schema_path = workdir / "schema.json"
    schema_path.write_bytes(answer.content)
    _generate(schema_path, workdir)
    packages = [p for p in workdir.iterdir() if p.is_dir() and (p / "__init__.py").is_file()]
    assert len(packages) == 1, packages
    directory = packages[0]
    name = directory.name
    before = set(sys.modules)
    sys.path.insert(0, str(workdir))
    try:
        package = importlib.import_module(name)
        assert package.__file__ is not None
        assert Path(package.__file__).parent == directory  # not some installed package
        failures: list[str] = []
        for info in pkgutil.walk_packages(package.__path__, name + ".", onerror=failures.append):
            try:
                importlib.import_module(info.name)
            except Exception as exc:
                failures.append(f"{info.name}: {exc!r}")
        assert not failures, "\n".join(failures)
        modules = {n: m for n, m in sys.modules.items() if n == name or n.startswith(name + ".")}
        yield Generated(name, directory, answer.json(), modules)
    finally:
        sys.path.remove(str(workdir))
        for module in set(sys.modules) - before:
            if module == name or module.startswith(name + "."):
                del sys.modules[module]


def test_every_generated_module_imports(generated: Generated) -> None:
    files = {
        ".".join(
            (generated.name, *p.relative_to(generated.directory).with_suffix("").parts)
        ).removesuffix(".__init__")
        for p in generated.directory.rglob("*.py")
    }
    assert set(generated.modules) == files  # every file was imported, and nothing else


def test_generated_package_does_not_shadow_the_sdk(generated: Generated) -> None:
    assert generated.name != SDK
    sdk = importlib.import_module(SDK)
    assert sdk.__file__ is not None
    assert generated.directory not in Path(sdk.__file__).parents
    assert hasattr(sdk, "Client")


def test_operation_ids_name_the_generated_functions(generated: Generated) -> None:
    paths = generated.schema["paths"]
    assert isinstance(paths, dict)
    found = {
        (method, path): operation["operationId"]
        for path, operations in paths.items()
        for method, operation in operations.items()
    }
    assert found == OPERATION_IDS
    for (method, path), operation_id in OPERATION_IDS.items():
        tag = paths[path][method]["tags"][0]
        module = generated.module(f"api.{tag}.{_snake(operation_id)}")
        for function in ("sync", "sync_detailed", "asyncio", "asyncio_detailed"):
            assert callable(getattr(module, function)), (operation_id, function)


def _floats(tensor: object) -> np.ndarray:
    return np.asarray(tensor, dtype=np.float64)


def test_generated_client_trains_a_session(
    generated: Generated, api: LiveServer, admin_key: str
) -> None:
    client = generated.module("client")
    models = generated.module("models")
    types = generated.module("types")
    create_session = generated.module("api.sessions.create_session")
    get_session = generated.module("api.sessions.get_session")
    delete_session = generated.module("api.sessions.delete_session")
    step = generated.module("api.tensors.step")
    put_params = generated.module("api.tensors.put_params")
    pull_params = generated.module("api.tensors.pull_params")

    rng = np.random.default_rng(7)
    w0 = rng.standard_normal((2, 3)).astype(np.float32)
    b0 = np.float32(0.5)
    lr = np.float32(LR)

    admin = client.AuthenticatedClient(base_url=api.url, token=admin_key)
    request = models.CreateSessionRequest.from_dict(
        {"optimizer": {"name": "sgd", "lr": LR}, "params": {"w": w0.tolist(), "b": float(b0)}}
    )
    created = create_session.sync_detailed(client=admin, body=request)
    assert created.status_code == 201, created.content
    assert isinstance(created.parsed, models.SessionCreated)
    session_id = created.parsed.id
    assert created.parsed.version == 0
    session = client.AuthenticatedClient(base_url=api.url, token=created.parsed.token)

    # A JSON step: SGD without momentum is w - lr * g.
    gw = rng.standard_normal((2, 3)).astype(np.float32)
    gb = np.float32(-2.0)
    stepped = step.sync(
        session_id,
        client=session,
        body=models.StepRequest.from_dict({"grads": {"w": gw.tolist(), "b": float(gb)}}),
    )
    assert isinstance(stepped, models.StepResponse), stepped
    assert (stepped.version, stepped.applied) == (1, True)
    w1, b1 = w0 - lr * gw, b0 - lr * gb
    np.testing.assert_allclose(_floats(stepped.params["w"]), w1, rtol=1e-6)

    pulled = pull_params.sync(session_id, client=session)
    assert isinstance(pulled, models.ParamsResponse), pulled
    assert pulled.version == 1
    np.testing.assert_allclose(_floats(pulled.params["w"]), w1, rtol=1e-6)
    np.testing.assert_allclose(_floats(pulled.params["b"]), b1, rtol=1e-6)

    # New weights as safetensors (the body the generator's multi-content bug was about), then a
    # step from them.
    w2 = rng.standard_normal((2, 3)).astype(np.float32)
    document = bytes(encode({"w": w2}))
    put = put_params.sync(
        session_id,
        client=session,
        body=types.File(payload=io.BytesIO(document), mime_type="application/octet-stream"),
        reset_state=True,
    )
    assert isinstance(put, models.PutParamsResponse), put
    assert put.version == 1  # putting weights is not a step
    gw2 = rng.standard_normal((2, 3)).astype(np.float32)
    stepped = step.sync(
        session_id,
        client=session,
        body=models.StepRequest.from_dict({"grads": {"w": gw2.tolist()}}),
        return_=models.StepReturn.NONE,
    )
    assert isinstance(stepped, models.StepResponse), stepped
    assert stepped.version == 2
    assert isinstance(stepped.params, types.Unset)  # return=none: the version only
    pulled = pull_params.sync(session_id, client=session, names="w")
    assert isinstance(pulled, models.ParamsResponse), pulled
    assert pulled.version == 2
    assert set(pulled.params.additional_properties) == {"w"}
    np.testing.assert_allclose(_floats(pulled.params["w"]), w2 - lr * gw2, rtol=1e-6)

    deleted = delete_session.sync_detailed(session_id, client=session)
    assert deleted.status_code == 204, deleted.content
    gone = get_session.sync_detailed(session_id, client=admin)
    assert gone.status_code == 404
    assert isinstance(gone.parsed, models.Problem)
    assert gone.parsed.status == 404


def test_typescript_client_trains_a_session(
    api: LiveServer, admin_key: str, tmp_path: Path
) -> None:
    node = shutil.which("node")
    modules = TYPESCRIPT / "node_modules"
    tools = [modules / ".bin" / tool for tool in ("openapi-typescript", "tsc")]
    if node is None or not all(tool.exists() for tool in tools):
        pytest.fail(
            f"node and the packages of {TYPESCRIPT} are needed: `make test` installs the "
            "packages (npm ci in that directory)"
        )
    generator, tsc = (str(tool) for tool in tools)
    answer = httpx.get(api.url + "/openapi.json", timeout=10)
    assert answer.status_code == 200
    (tmp_path / "schema.json").write_bytes(answer.content)
    for name in ("tsconfig.json", "smoke.mts"):
        shutil.copy(TYPESCRIPT / name, tmp_path / name)
    (tmp_path / "node_modules").symlink_to(modules, target_is_directory=True)
    # By default openapi-typescript makes fields that have a default required, in requests too.
    _run(
        [node, generator, "schema.json", "-o", "schema.d.ts", "--default-non-nullable", "false"],
        tmp_path,
    )
    _run([node, tsc, "-p", "."], tmp_path)  # the program type-checks against the generated types
    env = {**os.environ, "OPTSERVER_URL": api.url, "OPTSERVER_ADMIN_KEY": admin_key}
    assert _run([node, str(tmp_path / "build" / "smoke.mjs")], tmp_path, env).strip() == "ok"
