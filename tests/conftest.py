"""Fixtures shared by unit and integration tests: tiny random checkpoints and the embedded SmolLM2 checkpoint.

``hypothesis`` is imported here, on the main thread before any test starts a thread: otherwise its pytest plugin
imports it in the terminal summary of a session that collected no hypothesis test, while our background event-loop
threads still run, and CPython 3.11's AST recursion-depth bug (python/cpython#106905; pytest's assertion rewriting
parses the module) failed that import once with ``SystemError: AST constructor recursion depth mismatch``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import hypothesis  # noqa: F401  (see below)
import pytest

from swarm.checkpoint import resolve_checkpoint
from tests.tiny_checkpoints import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``factory(family, **kwargs) -> Path``: :func:`make_tiny_checkpoint`, built once per distinct arguments.

    The directories are shared by the whole session: tests must not modify them (copy first).
    """
    built: dict[tuple, Path] = {}

    def factory(family: str, **kwargs) -> Path:
        key = (family, tuple(sorted(kwargs.items())))
        if key not in built:
            name = "-".join([family] + [f"{k}={v}" for k, v in sorted(kwargs.items())])
            built[key] = make_tiny_checkpoint(family, tmp_path_factory.mktemp(name), **kwargs)
        return built[key]

    return factory


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M checkpoint in the default cache, converted on first use (~30 s, once)."""
    return resolve_checkpoint("smollm2-135m")
