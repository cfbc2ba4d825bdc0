"""Every ```python block of README.md and docs/*.md runs as written against a live local swarm (issue 15, req. 4),
so the documentation cannot drift from the code.

How a file's blocks run: all of one Markdown file's blocks, in order, as one script (a reader runs them top to
bottom in one session), in a fresh Python process whose line numbers equal the Markdown file's (a traceback points
at the doc line). Exactly two placeholders are filled, nothing else:

- ``"/ip4/.../p2p/..."`` (what ``swarm-node serve --new-swarm`` prints) → the first multiaddr of a 3-node SmolLM2
  swarm (layers 0:10, 10:20, 20:30, the fixture of tests/integration/conftest.py);
- ``"http://127.0.0.1:8289"`` (the port the docs start ``swarm-gateway serve`` on) → the URL of a
  ``swarm-gateway serve --initial-peers <that swarm>`` started for files that use it.

A block fenced ```` ```python new-process ```` runs alone in its own fresh process (as the doc tells the reader to:
it sets environment variables that nnsight and huggingface_hub read when first imported). A block fenced
```` ```python no-run ```` is not run; its first line must be ``# not run: <reason>``, and :data:`ALLOWED_NO_RUN`
lists every such block, so skipping one is a visible decision in review.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ndif_compat.local_gateway import GatewayProcess

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
PEERS = '"/ip4/.../p2p/..."'
GATEWAY = '"http://127.0.0.1:8289"'
ALLOWED_NO_RUN: dict[str, int] = {}
"""Markdown file (relative to the repo) → how many of its python blocks are marked no-run."""
FENCE = re.compile(r"^```python(?P<info>[^\n]*)\n(?P<code>.*?)^```$", re.M | re.S)

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Block:
    line: int
    """1-based line of the block's first code line in its Markdown file."""
    code: str
    run: bool
    own_process: bool = False


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    found = []
    for match in FENCE.finditer(text):
        info = match.group("info").split()
        assert info in ([], ["no-run"], ["new-process"]), \
            f"{path.name}: unknown fence info {info} (```python, ```python new-process or ```python no-run)"
        line = text.count("\n", 0, match.start("code")) + 1
        found.append(Block(line, match.group("code"), run=info != ["no-run"], own_process=info == ["new-process"]))
    return found


def scripts(path: Path, peer: str, gateway_url: str | None) -> list[str]:
    """The runnable blocks of ``path`` as scripts whose line N is the Markdown file's line N: one for the blocks
    that share a session, then one per ``new-process`` block."""
    shared = [b for b in blocks(path) if b.run and not b.own_process]
    alone = [[b] for b in blocks(path) if b.own_process]
    return [script(chosen, peer, gateway_url) for chosen in ([shared] if shared else []) + alone]


def script(chosen: list[Block], peer: str, gateway_url: str | None) -> str:
    lines: list[str] = []
    for block in chosen:
        code = block.code.replace(PEERS, repr(peer))
        if gateway_url is not None:
            code = code.replace(GATEWAY, repr(gateway_url))
        lines += [""] * (block.line - 1 - len(lines))
        lines += code.splitlines()
    return "\n".join(lines) + "\n"


def documented() -> list[Path]:
    return [p for p in DOCS if any(b.run for b in blocks(p))]


def test_the_placeholders_are_the_only_addresses_in_the_docs():
    for path in DOCS:
        for block in blocks(path):
            if block.run:
                rest = block.code.replace(PEERS, "").replace(GATEWAY, "")
                assert not re.search(r"/ip4/|/p2p/|127\.0\.0\.1:\d+", rest), f"{path.name}:{block.line}"


def test_no_run_blocks_are_few_and_say_why():
    counts = {}
    for path in DOCS:
        for block in blocks(path):
            if not block.run:
                assert block.code.startswith("# not run: "), f"{path.name}:{block.line}: give the reason"
                counts[str(path.relative_to(REPO))] = counts.get(str(path.relative_to(REPO)), 0) + 1
    assert counts == ALLOWED_NO_RUN


@pytest.fixture(scope="module")
def gateway(smollm2_swarm, tmp_path_factory):
    """``swarm-gateway serve --initial-peers <the docs swarm>``, started only if a test asks for it."""
    gateway = GatewayProcess(tmp_path_factory.mktemp("docs-gateway"), "--initial-peers", *smollm2_swarm.initial_peers,
                             "--timeout-s", "60")
    try:
        yield gateway
    finally:
        gateway.close()


@pytest.mark.parametrize("doc", documented(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_python_block_runs_as_written(doc, smollm2_swarm, request, tmp_path):
    uses_gateway = any(GATEWAY in b.code for b in blocks(doc) if b.run)
    gateway_url = request.getfixturevalue("gateway").url if uses_gateway else None
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    for name in ("NDIF_HOST", "HF_ENDPOINT"):
        env.pop(name, None)
    for i, text in enumerate(scripts(doc, smollm2_swarm.initial_peers[0], gateway_url)):
        source = tmp_path / str(i) / doc.name
        source.parent.mkdir()
        source.write_text(text)
        done = subprocess.run([sys.executable, str(source)], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        where = f"{doc.relative_to(REPO)} (line numbers are the Markdown file's)"
        assert done.returncode == 0, f"{where} failed:\n{done.stderr[-5000:]}"
        assert "Task was destroyed but it is pending" not in done.stderr, f"{where} left tasks behind:\n{done.stderr}"
