"""Figure 6a and 6b of the NNsight/NDIF paper: setup time and activation-patching runtime against model size."""

from __future__ import annotations

from pathlib import Path

from bench.stats import summarize

from .annotate import finish, interval_label, missing_text, workload_text
from .data import FigureResult, load, placements_in, select, shaped_link
from .draw import series
from .style import human_count, log_labels, new_figure, styled


def _versus_params(source, out_dir: Path, *, name: str, workload: str, title: str, ylabel: str,
                   wanted: tuple[str, ...]) -> FigureResult:
    result = FigureResult(name)
    records = select(load(source), workload, result.notes)
    stats = summarize(records, by=("placement", "params"))
    if not stats:
        result.notes.append(f"skipped: no successful {workload} repetitions")
        return result
    fig, (ax,) = new_figure(width_in=4.4, height_in=4.2)
    for placement in placements_in(records):
        points = {params: s for (p, params), s in stats.items() if p == placement}
        if points:
            series(ax, placement, points)
    drawn = {p for p, _ in stats}
    result.notes += [f"no {p} series" for p in wanted if p not in drawn]
    ax.set_xscale("log")
    ax.set_yscale("log")
    log_labels(ax.xaxis, human_count)
    log_labels(ax.yaxis)
    ax.set_xlabel("model size (parameters)")
    ax.set_ylabel(ylabel)
    link = shaped_link(records)
    ax.set_title(title + (f"\nclient link {link}" if link else ""))
    finish(fig, result, out_dir, interval_label(stats.values(), " band"),
           [workload_text([r for r in records if r["ok"] and not r["warmup"]]),
            missing_text([p for p in wanted if p not in drawn])])
    return result


@styled
def fig6a_setup_time(source, out_dir: Path) -> FigureResult:
    """Setup time vs model size (paper Fig. 6a): ``setup_time`` ``wall_s`` per placement vs ``params``, log-log.

    For ``hpc`` this is the per-job model load; remote placements pay their setup once, outside the job.

    Args:
        source: a run directory or a list of records.
        out_dir: where ``fig6a_setup_time.png`` / ``.pdf`` go.

    Returns:
        The paths written, or no paths and a note when the run has no ``setup_time`` rows.
    """
    return _versus_params(source, out_dir, name="fig6a_setup_time", workload="setup_time",
                          title="Setup time vs model size", ylabel="setup time (s)", wanted=("hpc",))


@styled
def fig6b_patching_vs_size(source, out_dir: Path) -> FigureResult:
    """Activation-patching runtime vs model size (paper Fig. 6b): HPC against the remote placements, log-log.

    Args:
        source: a run directory or a list of records (``patching_vs_size`` rows).
        out_dir: where ``fig6b_patching_vs_size.png`` / ``.pdf`` go.

    Returns:
        The paths written, or no paths and a note when there are no ``patching_vs_size`` rows.
    """
    return _versus_params(source, out_dir, name="fig6b_patching_vs_size", workload="patching_vs_size",
                          title="Activation patching runtime vs model size", ylabel="runtime per experiment (s)",
                          wanted=("hpc", "hybrid"))
