"""Placements side by side: paper Fig. 6c (Petals vs ours, plain inference and patching), and IOI activation
patching and attribution patching time and client-link bytes."""

from __future__ import annotations

from pathlib import Path

from bench.stats import client_bytes, summarize

from .annotate import finish, interval_label, missing_text, workload_text
from .data import FigureResult, load, missing_note, placements_in, select, shaped_link
from .draw import grouped_bars, seconds
from .headline import ioi_batch
from .style import BYTES_FORMATTER, ORDER, WORKLOAD_LABELS, human_bytes, new_figure, styled

REMOTE = ("petals", "swarm", "hybrid")


def _with(placements: list[str], wanted) -> list[str]:
    """``placements`` plus the ``wanted`` ones the run lacks (their slots show "n/a"), in the house order."""
    present = set(placements) | set(wanted)
    return [p for p in ORDER if p in present] + [p for p in placements if p not in ORDER]


@styled
def fig6c_petals_vs_ours(source, out_dir: Path) -> FigureResult:
    """Petals vs swarm vs hybrid (paper Fig. 6c): median time of plain remote inference and of activation
    patching, bars with interval error bars (95 % CI, or min–max below n = 6, as the legend says); centralized is
    drawn too when present. Petals, swarm and hybrid always have a slot: an absent one shows "n/a" and the
    caption says so (e.g. no Petals rows when its venv was absent).

    Args:
        source: a run directory or a list of records (``remote_inference`` and ``patching`` rows).
        out_dir: where ``fig6c_petals_vs_ours.png`` / ``.pdf`` go.

    Returns:
        The paths written (absent placements are left out and noted), or a note when neither workload has rows.
    """
    result = FigureResult("fig6c_petals_vs_ours")
    groups = ("remote_inference", "patching")
    records = [r for r in select(load(source), groups, result.notes) if r["placement"] != "hpc"]
    stats = summarize(records, by=("workload", "placement"))
    if not stats:
        result.notes.append("skipped: no successful remote_inference or patching repetitions")
        return result
    for group in groups:
        result.notes += missing_note([r for r in records if r["workload"] == group], REMOTE, WORKLOAD_LABELS[group])
    fig, (ax,) = new_figure(width_in=4.8, height_in=3.6)
    placements = _with(placements_in(records), REMOTE)
    grouped_bars(ax, groups, placements, lambda g, p: stats.get((g, p)),
                 [WORKLOAD_LABELS[g] for g in groups], annotate=seconds)
    ax.set_ylabel("time per request (s)")
    link = shaped_link(records)
    ax.set_title("Petals vs ours" + (f" — client link {link}" if link else ""))
    absent = [p for p in REMOTE if not any(k[1] == p for k in stats)]
    finish(fig, result, out_dir, interval_label(stats.values()),
           [workload_text(_ok(records)), missing_text(absent)])
    return result


def _ok(records: list[dict]) -> list[dict]:
    return [r for r in records if r["ok"] and not r["warmup"]]


@styled
def fig_ioi_patching(source, out_dir: Path) -> FigureResult:
    """IOI activation patching (batch 32 where present, else the largest batch): time per experiment and bytes
    over the client link per placement; bytes on a log axis whose bars start at a stated decade. Placements that do
    not count bytes (``hpc``, ``petals``) show "n/a" in the bytes panel; absent remote placements show "n/a" in
    both, and the caption says which.

    Args:
        source: a run directory or a list of records (``ioi_patching`` rows).
        out_dir: where ``fig_ioi_patching.png`` / ``.pdf`` go.

    Returns:
        The paths written, or a note when there are no ``ioi_patching`` rows.
    """
    records = load(source)
    batch = ioi_batch(records)   # the batch summary.md's IOI ratios use, chosen from the same records
    return _time_and_bytes(records, out_dir, FigureResult("fig_ioi_patching"), "ioi_patching", batch,
                           ("petals", "swarm", "hybrid", "centralized"), "IOI activation patching")


@styled
def fig_attribution_patching(source, out_dir: Path) -> FigureResult:
    """IOI attribution patching (one forward of clean + corrupted rows and one backward; every layer's attribution
    at every position returns), batch 32 where present, else the largest batch: time per experiment and bytes over
    the client link per placement, bytes on a log axis, like :func:`fig_ioi_patching`.

    Args:
        source: a run directory or a list of records (``attribution_patching`` rows).
        out_dir: where ``fig_attribution_patching.png`` / ``.pdf`` go.

    Returns:
        The paths written, or a note when there are no ``attribution_patching`` rows.
    """
    records = load(source)
    batch = ioi_batch(records, workload="attribution_patching")
    return _time_and_bytes(records, out_dir, FigureResult("fig_attribution_patching"), "attribution_patching",
                           batch, ("swarm", "hybrid", "centralized"), "IOI attribution patching (forward + backward)")


def _time_and_bytes(records: list[dict], out_dir: Path, result: FigureResult, workload: str, batch: int | None,
                    expected: tuple[str, ...], title: str) -> FigureResult:
    """Two panels per placement for ``workload`` rows at ``batch``: median time, and client-link bytes (log)."""
    records = [r for r in select(records, workload, result.notes)
               if r["ok"] and not r["warmup"] and r["batch"] == batch]
    if not records:
        result.notes.append(f"skipped: no successful {workload} repetitions"
                            + (f" at batch {batch}" if batch is not None else ""))
        return result
    if batch != 32:
        result.notes.append(f"no batch-32 {WORKLOAD_LABELS[workload]} rows; drew batch {batch}")
    times = summarize(records, by=("placement",))
    sizes = summarize(records, by=("placement",), value=client_bytes)
    result.notes += missing_note(records, expected, WORKLOAD_LABELS[workload])
    fig, (ax_t, ax_b) = new_figure(ncols=2, height_in=3.6)
    wanted = tuple(p for p in ("centralized", *REMOTE) if p in expected)
    placements = _with(placements_in(records), wanted)
    grouped_bars(ax_t, ["time"], placements, lambda _, p: times.get((p,)), [""], annotate=seconds)
    ax_t.set_ylabel("time per experiment (s)")
    ax_t.set_title("time")
    grouped_bars(ax_b, ["bytes"], placements, lambda _, p: sizes.get((p,)), [""], annotate=human_bytes, log=True)
    ax_b.yaxis.set_major_formatter(BYTES_FORMATTER)
    ax_b.set_ylabel("bytes sent + received")
    present = {p for (p,) in times}
    uncounted = [p for p in placements if (p,) not in sizes and p in present]
    notes = ([f"log axis, bars from {human_bytes(ax_b.get_ylim()[0])}"] if sizes else []) + (
        [f"not counted: {', '.join(uncounted)}"] if uncounted else [])
    ax_b.set_title("bytes over the client link" + ("\n" + "; ".join(notes) if notes else ""))
    link = shaped_link(records)
    fig.suptitle(f"{title}, batch {batch}" + (f", client link {link}" if link else ""))
    finish(fig, result, out_dir, interval_label([*times.values(), *sizes.values()]),
           [workload_text(records), missing_text([p for p in wanted if p not in present])])
    return result
