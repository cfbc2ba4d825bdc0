"""What a figure says about itself: the interval its bars and bands really show, the workload behind it (model,
batch, tokens, layers) and the series it lacks, drawn under the legend's title so a PNG read alone is honest."""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Sequence

from matplotlib.figure import Figure

from bench.stats import Summary

from .style import human_count, label, legend_below, save

CONFIDENCE = 0.95
"""The coverage the figures' intervals ask for (:func:`bench.stats.median_ci`)."""
CAPTION_FONTSIZE = 7


def interval_label(summaries: Iterable[Summary], shape: str = "") -> str:
    """The legend title for intervals drawn from ``summaries`` (see :func:`bench.stats.median_ci`).

    Below n = 6 no pair of order statistics covers the median with 95 %: the interval drawn is then [min, max]
    and is labelled so, never "95% CI".

    Args:
        summaries: every summary whose interval the figure draws.
        shape: appended to the interval's name, e.g. ``" band"``.

    Returns:
        ``"median, 95% CI"``, ``"median, min–max (n < 6: too few for a 95% CI)"`` or, when both occur,
        ``"median; 95% CI where n ≥ 6, min–max where n < 6"``.
    """
    summaries = list(summaries)
    short = [s for s in summaries if s.ci_coverage < CONFIDENCE]
    if not short:
        return f"median, 95% CI{shape}"
    ns = sorted({s.n for s in short})
    n_text = f"n = {ns[0]}" if len(ns) == 1 else f"n = {ns[0]}–{ns[-1]}"
    if len(short) == len(summaries):
        return f"median, min–max{shape} ({n_text}: too few for a 95% CI)"
    return f"median; 95% CI{shape} where n ≥ 6, min–max where {n_text}"


def workload_text(records: Sequence[dict]) -> str:
    """The parameters of the measured workload, from the records themselves: model (and size), batch, prompt
    tokens, layers, generated tokens, top-k — each value, or its range when the figure spans several.

    Returns:
        e.g. ``"model smollm2-135m (135M params) · batch 8 · 16 tokens · 30 layers"``; ``""`` for no records.
    """
    if not records:
        return ""
    models = sorted({(r["model"], r["params"]) for r in records}, key=lambda m: m[1])
    if len(models) == 1:
        parts = [f"model {models[0][0]} ({human_count(models[0][1])} params)"]
    else:
        parts = [f"models {', '.join(m for m, _ in models)}"]
    extra = lambda key: [r["extra"].get(key) for r in records]  # noqa: E731
    for name, values, unit in (("batch", [r["batch"] for r in records], ""),
                               ("", [r["seq_len"] for r in records], " tokens"),
                               ("", extra("layers"), " layers"), ("patched layer", extra("layer"), ""),
                               ("", extra("new_tokens"), " new tokens"), ("top-", extra("top_k"), "")):
        text = _values(values)
        if text:
            parts.append(f"{name}{' ' if name and not name.endswith('-') else ''}{text}{unit}")
    return " · ".join(parts)


def _values(values: Sequence) -> str:
    present = sorted({v for v in values if v is not None})
    if not present:
        return ""
    return str(present[0]) if len(present) == 1 else f"{present[0]}–{present[-1]}"


def missing_text(placements: Sequence[str], what: str = "") -> str:
    """The caption line for series a figure was meant to show but the run lacks, e.g. Petals when its venv was
    absent. Empty slots on bar charts carry "n/a"."""
    if not placements:
        return ""
    names = ", ".join(label(p) for p in placements)
    why = " (for Petals: its venv was absent or its rows failed; `make petals-env`)" if "petals" in placements else ""
    return f"not in this run{(' for ' + what) if what else ''}: {names} — n/a{why}"


def caption(lines: Iterable[str], width: int = 90) -> list[str]:
    """The non-empty ``lines`` wrapped to ``width`` characters (they go under the legend, see :func:`finish`)."""
    return [wrapped for line in lines if line for wrapped in textwrap.wrap(line, width)]


def figure_text(fig: Figure) -> list[str]:
    """Every piece of text drawn on ``fig`` (titles, legend titles and labels, tick labels, annotations such as
    "n/a", the caption), in drawing order: what a reader of the PNG sees, kept on the figure's result."""
    texts = [t.get_text() for t in fig.texts]   # the suptitle and the caption are among them
    for legend in fig.legends:
        texts += [legend.get_title().get_text(), *(t.get_text() for t in legend.get_texts())]
    for ax in fig.axes:
        texts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), *(t.get_text() for t in ax.texts)]
        texts += [t.get_text() for t in ax.get_xticklabels()]
    return [t for t in texts if t]


def finish(fig: Figure, result, out_dir, legend_title: str, captions: Iterable[str]) -> None:
    """Legend under the axes with the caption under its title (so the layout makes room for both), then save:
    ``result.paths`` and ``result.text`` are filled."""
    lines = caption(captions, width=int(fig.get_figwidth() * 15))
    if not legend_below(fig, "\n".join([legend_title, *lines])) and lines:
        fig.supxlabel("\n".join(lines), fontsize=CAPTION_FONTSIZE)   # nothing drawn: no legend to hang it on
    result.text = figure_text(fig)
    result.paths = save(fig, out_dir, result.name)
