"""pyproject.toml declares every third-party distribution our packages import, so `pip install .` gives working
console scripts (issue 15: trio, matplotlib and nnsight were missing). Reads sources and installed metadata only."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("swarm", "hybrid", "ndif_compat", "bench", "plots")
NOT_DECLARED = {
    # bench/petals_*.py run inside the real-Petals baseline's own venv (`make petals-env`), never in ours.
    "petals": "runs only in the Petals venv",
    # bench/node_event_loop.py is a repository-only script (`python -m bench.node_event_loop` from a checkout) that
    # builds its tiny model with tests/tiny_checkpoints.py; no console script reaches it.
    "tests": "repository-only script",
}


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def declared() -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in project()["dependencies"]}


def imported_modules() -> dict[str, set[str]]:
    """Top-level module → the source files importing it (absolute imports only; relative ones are ours)."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


def test_every_third_party_import_is_declared():
    dists = importlib.metadata.packages_distributions()
    missing = {}
    for module, files in imported_modules().items():
        if module in sys.stdlib_module_names or module in PACKAGES or module in NOT_DECLARED:
            continue
        assert module in dists, f"{module} (imported by {sorted(files)}) is not installed here"
        names = {canonicalize_name(d) for d in dists[module]}
        if not names & declared():
            missing[module] = sorted(files)
    assert not missing, f"imported but not in pyproject.toml dependencies: {missing}"


def test_console_scripts_point_at_our_packages():
    scripts = project()["scripts"]
    assert set(scripts) == {"swarm-node", "swarm-gateway", "swarm-bench"}
    assert all(target.split(".")[0] in PACKAGES and ":" in target for target in scripts.values())


def test_torch_is_bounded_not_pinned_and_the_rest_of_the_stack_is_pinned():
    requirements = {canonicalize_name(Requirement(r).name): Requirement(r) for r in project()["dependencies"]}
    torch = requirements["torch"].specifier
    assert "2.13.0" in torch and "2.13.0+cpu" in torch and "2.13.5" in torch and "2.14.0" not in torch
    for name in ("hivemind", "transformers", "nnsight"):   # the wire and traced module paths depend on them
        assert str(requirements[name].specifier).startswith("=="), name


def test_license_and_python_versions():
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    assert project()["requires-python"] == ">=3.11,<3.13"
    makefile = (REPO / "Makefile").read_text()
    assert "python3.11" in makefile and "python3.12" in makefile
