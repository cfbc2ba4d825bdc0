"""Every figure of a run, in order, and the one call that draws them all plus ``summary.md``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.errors import BenchConfigError

from .data import FigureResult, load
from .fig_concurrency import fig_concurrency
from .fig_interp import fig_logit_lens, fig_steering
from .fig_placements import fig6c_petals_vs_ours, fig_attribution_patching, fig_ioi_patching
from .fig_scaling import fig6a_setup_time, fig6b_patching_vs_size
from .summary import write_summary

logger = logging.getLogger(__name__)

FIGURES: dict[str, Callable[..., FigureResult]] = {
    "fig6a_setup_time": fig6a_setup_time,
    "fig6b_patching_vs_size": fig6b_patching_vs_size,
    "fig6c_petals_vs_ours": fig6c_petals_vs_ours,
    "fig_ioi_patching": fig_ioi_patching,
    "fig_attribution_patching": fig_attribution_patching,
    "fig_logit_lens": fig_logit_lens,
    "fig_steering": fig_steering,
    "fig_concurrency": fig_concurrency,
}
"""Figure name (also the file stem) → function ``(records or run dir, out_dir) -> FigureResult``."""


def plot_run(run_dir: str | Path, out_dir: str | Path, only: Sequence[str] | None = None,
             command: str | None = None) -> tuple[list[FigureResult], Path]:
    """Draw every figure (or those named in ``only``) of a run and write ``summary.md``.

    A figure whose data is absent is skipped with a note in the summary, never an error.

    Args:
        run_dir: ``results/<run-id>/`` (every ``*.jsonl`` under it is read and validated).
        out_dir: where the PNG/PDF files and ``summary.md`` go (created).
        only: figure names from :data:`FIGURES`; None draws all.
        command: recorded in the summary as the command that made it.

    Raises:
        bench.errors.ResultsNotFoundError: no result files under ``run_dir``.
        bench.errors.SchemaError: a record is invalid (names file, line and field).
        bench.errors.BenchConfigError: a name in ``only`` is not a figure (checked before anything is read).

    Returns:
        ``(figure results, summary path)``.
    """
    names = list(FIGURES) if only is None else list(only)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise BenchConfigError(f"unknown figure(s) {', '.join(unknown)}; known: {', '.join(FIGURES)}")
    records = load(run_dir)
    results = []
    for name in names:
        result = FIGURES[name](records, Path(out_dir))
        logger.info("%s: %s", name, "skipped" if result.skipped else "drawn")
        results.append(result)
    return results, write_summary(records, Path(out_dir), results, command)
