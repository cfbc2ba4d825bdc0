"""Response time and throughput against the number of concurrent users (paper Fig. 9)."""

from __future__ import annotations

from pathlib import Path

from .annotate import finish, interval_label, workload_text
from .data import FigureResult, load, placements_in, select, shaped_link
from .draw import series
from .headline import concurrency_rows
from .style import new_figure, styled


@styled
def fig_concurrency(source, out_dir: Path) -> FigureResult:
    """1..N concurrent users on one deployment: median response time with its interquartile band (left) and
    throughput in requests per second, median over rounds with its 95 % CI band (right), per placement.

    Throughput per round is defined in :func:`bench.stats.round_throughputs`.

    Args:
        source: a run directory or a list of records (``concurrency`` rows).
        out_dir: where ``fig_concurrency.png`` / ``.pdf`` go.

    Returns:
        The paths written, or a note when there are no ``concurrency`` rows.
    """
    result = FigureResult("fig_concurrency")
    records = load(source)
    rows = concurrency_rows(records, result.notes)   # the same numbers as summary.md's concurrency table
    if not rows:
        result.notes.append("skipped: no successful concurrency repetitions")
        return result
    records = select(records, "concurrency")   # the rows behind ``rows`` (the dropped links were noted above)
    fig, (ax_lat, ax_tp) = new_figure(ncols=2)
    for placement in placements_in(records):
        points = {row.users: row.response for row in rows if row.placement == placement}
        if points:
            series(ax_lat, placement, points, band="iqr")
        points = {row.users: row.throughput for row in rows if row.placement == placement and row.throughput}
        if points:
            series(ax_tp, placement, points, band="ci")
    for ax in (ax_lat, ax_tp):
        ax.set_xlabel("concurrent users")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylim(bottom=0)
    ax_lat.set_ylabel("response time (s)")
    ax_lat.set_title("response time (median, quartile band)")
    ax_tp.set_ylabel("throughput (requests/s)")
    ax_tp.set_title("throughput (" + interval_label([r.throughput for r in rows if r.throughput], " band") + ")")
    link = shaped_link(records)
    models = sorted({r["model"] for r in records})
    fig.suptitle(f"Concurrent users on one deployment ({', '.join(models)})"
                 + (f", client link {link}" if link else ""))
    finish(fig, result, out_dir, "placement", [workload_text([r for r in records if r["ok"] and not r["warmup"]])])
    return result
