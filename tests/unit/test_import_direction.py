"""Imports flow plots -> bench -> ndif_compat -> hybrid -> swarm, never back; swarm knows nothing of nnsight.

Every ``import``/``from ... import`` anywhere in a file counts, including those inside functions and relative ones.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHAIN = ("plots", "bench", "ndif_compat", "hybrid", "swarm")
"""Left may import right; right must never import left."""
FORBIDDEN_EXTRA = {"swarm": {"nnsight"}}
"""Third-party packages a project package must not import."""


def imported_top_levels(file: Path) -> set[tuple[str, int]]:
    """``(top-level package, line)`` of every import in ``file``, relative imports resolved against its package."""
    package = file.relative_to(ROOT).parent.parts
    tree = ast.parse(file.read_text(), filename=str(file))
    found: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update((alias.name.split(".")[0], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.add((node.module.split(".")[0], node.lineno))
            else:  # `from . import x` / `from ..pkg import y`: stays inside the file's own top-level package
                base = package[: len(package) - (node.level - 1)]
                target = list(base) + (node.module.split(".") if node.module else [])
                if target:
                    found.add((target[0], node.lineno))
    return found


def violations() -> list[str]:
    problems = []
    for position, package in enumerate(CHAIN):
        forbidden = set(CHAIN[:position]) | FORBIDDEN_EXTRA.get(package, set())
        for file in sorted((ROOT / package).rglob("*.py")):
            for imported, line in sorted(imported_top_levels(file)):
                if imported in forbidden:
                    problems.append(f"{file.relative_to(ROOT)}:{line} imports {imported!r}")
    return problems


def test_every_package_exists():
    for package in CHAIN:
        assert (ROOT / package / "__init__.py").is_file(), package


def test_no_import_against_the_arrow():
    problems = violations()
    assert not problems, "imports against plots -> bench -> ndif_compat -> hybrid -> swarm:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "package, source, bad",
    [
        ("swarm", "import hybrid.ir\n", True),
        ("swarm", "def f():\n    from nnsight import LanguageModel\n", True),
        ("swarm", "from bench import harness\n", True),
        ("hybrid", "from swarm.errors import SwarmError\nfrom . import ir\n", False),
        ("hybrid", "from ..plots import figures\n", True),
        ("plots", "import bench, swarm, nnsight\n", False),
    ],
)
def test_checker_catches_what_it_should(package, source, bad, tmp_path, monkeypatch):
    fake_root = tmp_path
    for name in CHAIN:
        (fake_root / name).mkdir()
        (fake_root / name / "__init__.py").write_text("")
    (fake_root / package / "probe.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    assert bool(violations()) is bad
