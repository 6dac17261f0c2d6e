"""/docs (Swagger UI) and /redoc (ReDoc) render in a real headless browser that can reach
loopback only: their scripts and styles come from the server, not a CDN, so the pages work
offline. What the pages must show is derived from the server's own /openapi.json.

Needs /usr/bin/chromium (scripts/ensure_chromium.sh installs it); without it these tests fail.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from tests.live import LiveServer

CHROMIUM = Path("/usr/bin/chromium")
#: Seconds of real time one page may take, start to DOM dump.
BROWSER_TIMEOUT = 120.0
#: Milliseconds of virtual time for the page's scripts (it stands still while fetches are
#: pending, so a slow machine gets the same page).
VIRTUAL_TIME_BUDGET = 30_000
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
#: HTML elements without an end tag.
VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track"}
    | {"wbr", "param"}
)


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list[Element | str] = field(default_factory=list)

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def text(self) -> str:
        """The text inside, whitespace collapsed."""
        parts: list[str] = []
        stack: list[Element | str] = [self]
        while stack:
            node = stack.pop()
            if isinstance(node, str):
                parts.append(node)
            else:
                stack.extend(reversed(node.children))
        return " ".join("".join(parts).split())

    def iter(self) -> Iterator[Element]:
        """This element and every one inside it, in document order."""
        stack: list[Element] = [self]
        while stack:
            element = stack.pop()
            yield element
            stack.extend(c for c in reversed(element.children) if isinstance(c, Element))

    def find(self, cls: str) -> Element | None:
        return next((e for e in self.iter() if cls in e.classes), None)


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self._open = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {name: value or "" for name, value in attrs})
        self._open[-1].children.append(element)
        if tag not in VOID:
            self._open.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._open[-1].children.append(Element(tag, {name: value or "" for name, value in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self._open) - 1, 0, -1):
            if self._open[depth].tag == tag:
                del self._open[depth:]
                return

    def handle_data(self, data: str) -> None:
        self._open[-1].children.append(data)


def parse(html: str) -> Element:
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


def render(url: str, profile: Path) -> Element:
    """The DOM of ``url`` once its scripts have run, from headless Chromium with a fresh profile
    that reaches loopback only: every other host goes through a proxy port where nothing
    listens, so a page that needs a CDN stays blank."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: run scripts/ensure_chromium.sh (as root) to install it",
            pytrace=False,
        )
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))  # bound and never listening: connections are refused
        proxy = f"http://127.0.0.1:{dead.getsockname()[1]}"
        command = [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",  # tests run as root, where Chromium's sandbox refuses to start
            "--disable-gpu",
            "--disable-dev-shm-usage",  # containers often have a small /dev/shm
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--proxy-server={proxy}",
            "--proxy-bypass-list=127.0.0.1",
            f"--virtual-time-budget={VIRTUAL_TIME_BUDGET}",
            "--dump-dom",
            url,
        ]
        # A session of its own: on a timeout the whole browser (all its processes) is killed.
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = process.communicate(timeout=BROWSER_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            pytest.fail(f"Chromium did not dump {url} within {BROWSER_TIMEOUT} s")
    assert process.returncode == 0, (process.returncode, err.decode(errors="replace")[-3000:])
    return parse(out.decode())


def schema_of(server: LiveServer) -> dict[str, Any]:
    response = httpx.get(server.url + "/openapi.json", timeout=30)
    response.raise_for_status()
    schema: dict[str, Any] = response.json()
    return schema


def operations(schema: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(METHOD, path) -> operation, for every operation in ``schema``."""
    return {
        (method.upper(), path): operation
        for path, item in schema["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    }


def external(base: str, values: list[str]) -> list[str]:
    """Those of ``values`` (URLs, relative to ``base``) that leave ``base``'s origin."""
    origin = urlsplit(base)[:2]
    resolved = [(value, urlsplit(urljoin(base, value))) for value in values]
    return [value for value, url in resolved if url.scheme != "data" and url[:2] != origin]


def assert_self_contained(server: LiveServer, page: str) -> None:
    """The page's HTML refers to nothing on another origin, and what it refers to is served."""
    url = server.url + page
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200
    elements = list(parse(response.text).iter())
    references = [
        value
        for element in elements
        for name, value in element.attrs.items()
        if name in ("src", "href")
    ]
    scripts = [e for e in elements if e.tag == "script" and "src" in e.attrs]
    assert scripts, f"{page} loads no script: nothing to check"
    assert external(url, references) == [], f"{page} refers to other hosts"
    for reference in references:
        asset = httpx.get(urljoin(url, reference), timeout=30)
        assert asset.status_code == 200, (reference, asset.status_code)


def test_swagger_ui_renders_offline(server: LiveServer, tmp_path: Path) -> None:
    assert_self_contained(server, "/docs")
    schema = schema_of(server)
    expected = operations(schema)
    dom = render(server.url + "/docs", tmp_path / "profile")

    title = next((e for e in dom.iter() if e.tag == "h1" and "title" in e.classes), None)
    assert title is not None, "Swagger UI rendered no title: its scripts did not run"
    assert title.text().startswith(schema["info"]["title"]), title.text()
    assert schema["info"]["version"] in title.text()

    rendered: dict[tuple[str, str], str] = {}
    for block in dom.iter():
        if "opblock" not in block.classes:
            continue
        method, path = block.find("opblock-summary-method"), block.find("opblock-summary-path")
        assert method is not None and path is not None, block
        summary = block.find("opblock-summary-description")
        key = (method.text(), path.attrs["data-path"])
        assert key not in rendered, f"{key} rendered twice"
        rendered[key] = "" if summary is None else summary.text()
    assert sorted(rendered) == sorted(expected)
    assert any(path.endswith("/step") for _, path in rendered)
    for key, operation in expected.items():
        assert rendered[key] == operation.get("summary", ""), key


def test_redoc_renders_offline(server: LiveServer, tmp_path: Path) -> None:
    assert_self_contained(server, "/redoc")
    schema = schema_of(server)
    expected = operations(schema)
    dom = render(server.url + "/redoc", tmp_path / "profile")

    title = next((e for e in dom.iter() if e.tag == "h1"), None)
    assert title is not None, "ReDoc rendered no title: its script did not run"
    assert title.text().startswith(schema["info"]["title"]), title.text()

    # Each operation's panel: its method (a class of the verb's element) and then its path.
    endpoints: list[tuple[str, str]] = []
    for parent in dom.iter():
        elements = [c for c in parent.children if isinstance(c, Element)]
        for verb, following in pairwise(elements):
            if "http-verb" in verb.classes:
                (method,) = verb.classes & HTTP_METHODS
                endpoints.append((method.upper(), following.text()))
    assert sorted(endpoints) == sorted(expected)
    # Each operation's heading is its summary.
    headings = {e.text() for e in dom.iter() if e.tag == "h2"}
    summaries = {operation["summary"] for operation in expected.values() if "summary" in operation}
    assert summaries, "the schema has no summaries to look for"
    assert summaries <= headings, summaries - headings
