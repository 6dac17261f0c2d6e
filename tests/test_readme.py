"""The code blocks of README.md and client/README.md, run against a real server.

Conventions of the two files, which this test enforces:

* A block fenced as ```bash or ```python is an example to run, and every one is run here: bash
  with ``bash -euo pipefail``, the virtualenv's ``bin`` first on PATH (so ``python3`` and
  ``optserver`` are the project's); python with the virtualenv's interpreter. The ``make``
  commands, which build the virtualenv this test runs in, are a ```console transcript.
* A ```console block is a shell transcript (``$`` prompts) and a ```text block an illustration;
  neither is run. Any other info string, or none, fails ``test_every_fence_says_what_it_is``.
* An example that talks to a server does so at the server's default address, ``127.0.0.1:8000``,
  spelled exactly so; it names no other address. Starting that server is the README's
  ```console transcript; here a server (``tests.live.live_server``) runs on a free loopback port
  instead, and each block runs with that one literal replaced by the test server's address and
  with ``OPTSERVER_URL`` (which ``optserver_client.compat`` reads) set to the test server. Nothing
  else in a block is changed.
* ``# -> X`` at the end of a line shows output. A block's stdout must be exactly its shown
  outputs, in order: each is one line or, when it starts with ``{``, one JSON object (curl prints
  them without a newline), which is compared as JSON, numbers exactly. ``...`` in a shown output
  stands for anything; a JSON output that has one is matched as text against the object written
  with ``json.dumps`` (``", "`` and ``": "`` separators, the server's key order).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from optserver.config import Settings
from tests.live import LiveServer, live_server

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "client/README.md")
RUNNABLE = frozenset({"bash", "python"})
NOT_RUN = frozenset({"console", "text"})
DOCUMENTED_ADDRESS = "127.0.0.1:8000"
VENV_BIN = Path(sys.executable).parent
TIMEOUT_S = 120.0

FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
SHOWN = re.compile(r"(?:^|\s)# -> (?P<output>.*?)\s*$")
ADDRESS = re.compile(r"localhost(?::\d+)?|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it starts (the opening fence's line), its info string, its body."""

    document: str
    line: int
    info: str
    body: str

    @property
    def language(self) -> str:
        return self.info.split()[0] if self.info.split() else ""

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.language in RUNNABLE

    def shown_outputs(self) -> list[str]:
        found = (SHOWN.search(line) for line in self.body.splitlines())
        return [m["output"] for m in found if m is not None]


def parse_blocks(text: str, document: str) -> list[Block]:
    """The fenced blocks of a CommonMark document (an unclosed fence runs to the end)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None or (opening["fence"][0] == "`" and "`" in opening["info"]):
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = FENCE.match(lines[j])
            if (
                closing is not None
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"].strip()
            ):
                break
            line = lines[j]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))) :])
            j += 1
        blocks.append(Block(document, i + 1, opening["info"].strip(), "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def document_blocks() -> list[Block]:
    return [b for d in DOCUMENTS for b in parse_blocks((ROOT / d).read_text("utf-8"), d)]


BLOCKS = document_blocks()
RUNNABLE_BLOCKS = [b for b in BLOCKS if b.runnable]


# --- Outputs -------------------------------------------------------------------------------------

Output = str | dict[str, Any]


def split_outputs(stdout: str) -> list[Output]:
    """What a block printed: JSON objects (at a ``{`` that starts one) and otherwise lines."""
    decoder = json.JSONDecoder()
    outputs: list[Output] = []
    i = 0
    while True:
        while i < len(stdout) and stdout[i].isspace():
            i += 1
        if i == len(stdout):
            return outputs
        if stdout[i] == "{":
            try:
                value, i = decoder.raw_decode(stdout, i)
            except json.JSONDecodeError:
                pass
            else:
                if isinstance(value, dict):
                    outputs.append(value)
                    continue
        end = stdout.find("\n", i)
        end = len(stdout) if end < 0 else end
        outputs.append(stdout[i:end].rstrip())
        i = end


def matches(shown: str, printed: Output) -> bool:
    """Whether ``printed`` is the output a README shows as ``shown`` (see the module's doc)."""
    if isinstance(printed, dict):
        if "..." not in shown:
            try:
                return bool(json.loads(shown) == printed)
            except json.JSONDecodeError:
                return False
        text = json.dumps(printed, ensure_ascii=False)
    else:
        text = printed
    pattern = ".*".join(re.escape(part) for part in shown.split("..."))
    return re.fullmatch(pattern, text, re.DOTALL) is not None


def check_outputs(where: str, shown: list[str], stdout: str) -> None:
    printed = split_outputs(stdout)
    render = [json.dumps(p) if isinstance(p, dict) else p for p in printed]
    listing = "\n".join(f"  {n + 1}. {r}" for n, r in enumerate(render)) or "  (nothing)"
    assert len(printed) == len(shown), (
        f"{where}: the block shows {len(shown)} outputs (# ->) but printed {len(printed)}:\n"
        f"{listing}"
    )
    for n, (expected, actual) in enumerate(zip(shown, printed, strict=True)):
        assert matches(expected, actual), (
            f"{where}: output {n + 1} differs\n  shown:   {expected}\n  printed: {render[n]}"
        )


# --- Running a block -----------------------------------------------------------------------------


def localize(block: Block, server_url: str) -> str:
    """The block's source with the documented address replaced by the test server's."""
    address = server_url.removeprefix("http://")
    source = block.body.replace(DOCUMENTED_ADDRESS, address)
    others = sorted({a for a in ADDRESS.findall(source) if a != address})
    assert not others, f"{block.where}: an example names {others}, not {DOCUMENTED_ADDRESS}"
    return source


def run_block(block: Block, server_url: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    source = localize(block, server_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVER_")}
    env["OPTSERVER_URL"] = server_url
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    if block.language == "bash":
        script = workdir / "block.sh"
        command = ["bash", "-euo", "pipefail", str(script)]
    else:
        script = workdir / "block.py"
        command = [sys.executable, str(script)]
    script.write_text(source, "utf-8")
    return subprocess.run(
        command,
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def report(block: Block, result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"{block.where}: the block exited with status {result.returncode} (line n of the "
        f"script is line {block.line} + n of {block.document})\n"
        f"--- stdout\n{result.stdout}--- stderr\n{result.stderr}"
    )


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server() as running:
        yield running


@pytest.mark.parametrize("block", RUNNABLE_BLOCKS, ids=[b.where for b in RUNNABLE_BLOCKS])
def test_example_runs_as_shown(block: Block, server: LiveServer, tmp_path: Path) -> None:
    result = run_block(block, server.url, tmp_path)
    assert result.returncode == 0, report(block, result)
    check_outputs(block.where, block.shown_outputs(), result.stdout)


# --- The conventions, and that this test can fail ----------------------------------------------


def test_every_fence_says_what_it_is() -> None:
    unknown = [f"{b.where} ({b.info!r})" for b in BLOCKS if b.language not in RUNNABLE | NOT_RUN]
    assert not unknown, f"fences neither run nor marked as transcripts: {unknown}"
    for document in DOCUMENTS:
        assert any(b.document == document for b in RUNNABLE_BLOCKS), f"no example in {document}"


def test_the_parser_keeps_fences_lines_and_bodies() -> None:
    text = "# T\n\n```bash\necho hi  # -> hi\n```\n\n  ````python x\n  print(1)\n  ```\n  ````\n"
    blocks = parse_blocks(text, "doc.md")
    assert [(b.line, b.info, b.body) for b in blocks] == [
        (3, "bash", "echo hi  # -> hi\n"),
        (7, "python x", "print(1)\n```\n"),
    ]
    assert blocks[0].shown_outputs() == ["hi"]
    assert parse_blocks("```console\n$ make test\n```\n", "d")[0].runnable is False


def test_outputs_are_checked() -> None:
    step = '{"version":1,"params":{"b":0.49}}'
    check_outputs("x", ['{"version": 1, "params": {"b": 0.49}}'], step)
    check_outputs("x", ['{"version": 1, ...}', "1 [-0.05 -0.05]"], step + "1 [-0.05 -0.05]\n")
    check_outputs("x", ['{"id": "...", "token": "..."}'], '{"id":"9f0c","token":"Xk3"}')
    failing = [
        (
            ['{"version": 1, "params": {"b": 0.49}}'],
            '{"version":1,"params":{"b":0.49000000953674316}}',
        ),
        (['{"id": "9f0c...", ...}'], '{"id":"73b8","version":0}'),
        (["1 [-0.05 -0.05]"], "1 [-0.05 -0.06]\n"),
        (["1"], "1\n2\n"),
        (["1", "2"], "1\n"),
    ]
    for shown, stdout in failing:
        with pytest.raises(AssertionError):
            check_outputs("x", shown, stdout)


def test_a_broken_example_fails(server: LiveServer, tmp_path: Path) -> None:
    """The first README example that imports something, without its first import, must fail."""
    block = next(b for b in RUNNABLE_BLOCKS if b.language == "python" and "import " in b.body)
    lines = block.body.splitlines(keepends=True)
    first = next(i for i, ln in enumerate(lines) if ln.startswith(("import ", "from ")))
    broken = Block(
        block.document, block.line, block.info, "".join(lines[:first] + lines[first + 1 :])
    )
    result = run_block(broken, server.url, tmp_path)
    assert result.returncode != 0, report(broken, result)
    assert "NameError" in result.stderr


# --- The README's tables against the code --------------------------------------------------------


def table_rows(section: str) -> list[list[str]]:
    """The cells of the first table under the README heading ``section``."""
    text = (ROOT / "README.md").read_text("utf-8")
    body = text.split(f"\n{section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in body.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]
    return cells[2:]  # past the header and the delimiter row


def test_http_api_table_lists_every_route(server: LiveServer) -> None:
    documented: set[tuple[str, str]] = set()
    for first, _ in table_rows("## The HTTP API"):
        method = ""
        for span in re.findall(r"`([^`]+)`", first):
            if " " in span:
                method, span = span.split(" ", 1)
            documented.add((method, re.sub(r"\{[^}]*\}", "{}", span)))
    paths: dict[str, dict[str, Any]] = httpx.get(server.url + "/openapi.json").json()["paths"]
    served = {
        (method.upper(), re.sub(r"\{[^}]*\}", "{}", path))
        for path, operations in paths.items()
        for method in operations
    }
    assert documented == served


UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def documented_default(text: str) -> object:
    """A default as the configuration table writes it; ``None`` for one computed at start."""
    if text == "none":
        return None
    if quoted := re.fullmatch(r"`([^`]*)`", text):
        return quoted[1]
    if power := re.fullmatch(r"(\d+)\*\*(\d+)", text):
        return int(power[1]) ** int(power[2])
    if sized := re.fullmatch(r"(\d+) (KiB|MiB|GiB)(/s)?", text):
        return int(sized[1]) * UNITS[sized[2]]
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    return None  # e.g. "CPUs (≤ 8)": worked out when the server starts


def test_configuration_table_matches_settings() -> None:
    documented: dict[str, object] = {}
    for first, second, *_ in table_rows("## Configuration"):
        names = [n.strip("` ") for n in first.split(" / ")]
        defaults = [d.strip() for d in second.split(" / ")]
        assert len(names) == len(defaults), (first, second)
        documented.update(zip(names, map(documented_default, defaults), strict=True))
    fields = Settings.model_fields
    assert set(documented) == {name.upper() for name in fields}
    for name, field in fields.items():
        default = field.default
        actual = str(default).lower() if isinstance(default, bool) else default
        if isinstance(documented[name.upper()], str) and not isinstance(actual, str):
            actual = str(actual)
        assert documented[name.upper()] == actual, name
