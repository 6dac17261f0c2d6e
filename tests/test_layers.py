"""The layers of ARCHITECTURE.md, held by what each module imports (read from its source, not
run): the optimizer core imports nothing else of the server; from the service down, nothing
knows HTTP; the client never imports the server, and torch only where it is the point."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "optserver"
CLIENT = ROOT / "client" / "optserver_client"
#: What HTTP is served with (the client uses httpx, which brings h11: it is not checked there).
FRAMEWORKS = ("fastapi", "starlette", "uvicorn")
HTTP = (*FRAMEWORKS, "httptools", "h11")
#: The server's modules above the service: the HTTP edge, the command line, the demo (which
#: starts servers), the entry points.
ABOVE = ("api/", "cli/", "demo/", "embedded.py", "__main__.py")


def _imports(path: Path, *, top_level: bool = False) -> set[str]:
    """The absolute module names ``path`` imports (``top_level``: outside functions only)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _modules(root: Path) -> list[Path]:
    return sorted(root.rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(SERVER).as_posix()


@pytest.mark.parametrize("path", _modules(SERVER / "optim"), ids=_rel)
def test_the_optimizer_core_imports_nothing_else_of_the_server(path: Path) -> None:
    outside = {
        n
        for n in _imports(path)
        if _within(n, ("optserver",)) and not _within(n, ("optserver.optim",))
    }
    assert not outside, f"{_rel(path)} imports {sorted(outside)}"


@pytest.mark.parametrize(
    "path", [p for p in _modules(SERVER) if not _rel(p).startswith(ABOVE)], ids=_rel
)
def test_nothing_from_the_service_down_knows_http(path: Path) -> None:
    http = {n for n in _imports(path) if _within(n, (*HTTP, "optserver.api", "optserver.cli"))}
    assert not http, f"{_rel(path)} imports {sorted(http)}"


@pytest.mark.parametrize("path", _modules(CLIENT), ids=lambda p: p.name)
def test_the_client_never_imports_the_server_and_torch_only_in_its_module(path: Path) -> None:
    server = {n for n in _imports(path) if _within(n, ("optserver", *FRAMEWORKS))}
    assert not server, f"{path.name} imports {sorted(server)}"
    if path.name != "torch.py":
        assert "torch" not in _imports(path, top_level=True), f"{path.name} imports torch"
