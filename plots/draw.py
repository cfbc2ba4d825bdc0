"""The two shapes every figure is made of: a line per placement with a band, and grouped bars with interval error
bars (a 95 % CI of the median, or min–max where n < 6: see :func:`plots.annotate.interval_label`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from bench.stats import Summary

from .style import BAND_ALPHA, MARKERS, color, label


def series(ax, placement: str, points: dict[float, Summary], band: str = "ci") -> None:
    """Median vs x for one placement, with a shaded band.

    Args:
        ax: the axes.
        placement: picks colour, marker and legend label.
        points: ``{x: Summary}``; drawn in increasing x.
        band: ``"ci"`` (95 % CI of the median; min–max where n < 6) or ``"iqr"`` (first to third quartile).
    """
    xs = sorted(points)
    med = [points[x].median for x in xs]
    low = [points[x].ci_low if band == "ci" else points[x].q1 for x in xs]
    high = [points[x].ci_high if band == "ci" else points[x].q3 for x in xs]
    ax.plot(xs, med, marker=MARKERS.get(placement, "o"), color=color(placement), label=label(placement))
    ax.fill_between(xs, low, high, color=color(placement), alpha=BAND_ALPHA, linewidth=0)
    if len(xs) == 1:  # a band of one point has no width: show its interval as an error bar
        ax.errorbar(xs, med, yerr=[[med[0] - low[0]], [high[0] - med[0]]], color=color(placement), fmt="none")


def grouped_bars(ax, groups: Sequence[str], placements: Sequence[str],
                 get: Callable[[str, str], Summary | None], group_labels: Sequence[str] | None = None,
                 annotate: Callable[[float], str] | None = None, log: bool = False) -> int:
    """Bars of medians, one cluster per group and one bar per placement, with asymmetric interval error bars
    (:func:`bench.stats.median_ci`: a 95 % CI, or min–max below n = 6; :func:`plots.annotate.interval_label`
    names which).

    Every placement keeps its slot: a slot without data is marked "n/a" (say why in the caption).

    Args:
        ax: the axes.
        groups: cluster keys (e.g. workloads), left to right.
        placements: bar order inside each cluster (colour and legend per placement), including those the figure
            is meant to show but has no data for.
        get: ``(group, placement) -> Summary`` or None where there is no data (the slot shows "n/a").
        group_labels: tick labels (default: the group keys).
        annotate: formats a median to print above its bar (e.g. ``"1.2 s"``); None prints nothing.
        log: a log y axis whose bars start at :func:`log_baseline` (a whole decade below the lowest interval end,
            stated in the axis label) instead of wherever matplotlib clips a bar from 0.

    Returns:
        Number of bars drawn.
    """
    width = 0.8 / max(len(placements), 1)
    found = {(g, p): get(g, p) for g in groups for p in placements}
    base = log_baseline([s for s in found.values() if s is not None]) if log else 0.0
    if log:
        ax.set_yscale("log")
    drawn = 0
    for i, placement in enumerate(placements):
        xs, meds, err_low, err_high = [], [], [], []
        for g, group in enumerate(groups):
            x = g - 0.4 + width * (i + 0.5)
            s = found[(group, placement)]
            if s is None:
                ax.annotate("n/a", (x, 0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                            textcoords="offset points", ha="center", va="bottom", fontsize=6, color="#555555")
                continue
            xs.append(x)
            meds.append(s.median)
            err_low.append(s.median - s.ci_low)
            err_high.append(s.ci_high - s.median)
        if not xs:
            continue
        ax.bar(xs, [m - base for m in meds], width * 0.9, bottom=base, color=color(placement),
               label=label(placement), yerr=np.array([err_low, err_high]), ecolor="#333333",
               error_kw={"elinewidth": 0.8})
        if annotate is not None:
            for x, m, e in zip(xs, meds, err_high):
                ax.annotate(annotate(m), (x, m + e), ha="center", va="bottom", fontsize=6,
                            xytext=(0, 1), textcoords="offset points")
        drawn += len(xs)
    if log and drawn:
        ax.set_ylim(bottom=base)
    ticks = list(group_labels or groups)
    ax.set_xticks(range(len(groups)), ticks)
    if not any(ticks):
        ax.tick_params(axis="x", bottom=False)
    ax.grid(axis="x", visible=False)
    return drawn


def log_baseline(summaries: Sequence[Summary]) -> float:
    """Where bars on a log axis start: the power of ten at or below the lowest interval end, so bar lengths
    compare in whole decades from a stated value (1.0 when there is nothing positive to draw)."""
    lows = [s.ci_low for s in summaries if s.ci_low > 0]
    return 10.0 ** math.floor(math.log10(min(lows))) if lows else 1.0


def seconds(value: float) -> str:
    """``0.0123`` → ``"12.3 ms"``, ``4.56`` → ``"4.56 s"``: bar annotations."""
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"
