"""Interpretability workloads: the all-layer logit lens against a plain forward, and steering-vector generation."""

from __future__ import annotations

from pathlib import Path

from bench.stats import summarize

from .annotate import finish, interval_label, workload_text
from .data import FigureResult, load, placements_in, select, shaped_link
from .draw import grouped_bars, seconds
from .style import WORKLOAD_LABELS, new_figure, styled


@styled
def fig_logit_lens(source, out_dir: Path) -> FigureResult:
    """All-layer logit lens (top-k returned) next to a plain forward of the same model, per placement.

    The plain forward is the ``remote_inference`` rows of the models that have ``logit_lens`` rows.

    Args:
        source: a run directory or a list of records.
        out_dir: where ``fig_logit_lens.png`` / ``.pdf`` go.

    Returns:
        The paths written, or a note when there are no ``logit_lens`` rows.
    """
    result = FigureResult("fig_logit_lens")
    records = select(load(source), ("logit_lens", "remote_inference"), result.notes)
    models = {r["model"] for r in records if r["workload"] == "logit_lens"}
    records = [r for r in records if r["model"] in models]
    stats = summarize(records, by=("workload", "placement"))
    if not any(w == "logit_lens" for w, _ in stats):
        result.notes.append("skipped: no successful logit_lens repetitions")
        return result
    groups = ("remote_inference", "logit_lens")
    lens_placements = [p for p in placements_in(records) if ("logit_lens", p) in stats]
    result.notes += [f"no plain forward of {p} to compare the logit lens with" for p in lens_placements
                     if ("remote_inference", p) not in stats]
    fig, (ax,) = new_figure(width_in=4.8, height_in=3.6)
    grouped_bars(ax, groups, lens_placements, lambda g, p: stats.get((g, p)),
                 ["plain forward", "all-layer logit lens"], annotate=seconds)
    top_k = sorted({r["extra"].get("top_k") for r in records if r["extra"].get("top_k") is not None})
    ax.set_ylabel("time per request (s)")
    link = shaped_link(records)
    ax.set_title("Logit lens vs plain forward" + (f" (top-{top_k[0]})" if len(top_k) == 1 else "")
                 + (f"\nclient link {link}" if link else ""))
    kept = [r for r in records if r["ok"] and not r["warmup"] and r["placement"] in lens_placements]
    finish(fig, result, out_dir, interval_label(s for (w, p), s in stats.items() if p in lens_placements),
           [workload_text(kept)])
    return result


def _per_token(record: dict) -> float | None:
    tokens = record["extra"].get("new_tokens")
    return record["wall_s"] / tokens if tokens else None


@styled
def fig_steering(source, out_dir: Path) -> FigureResult:
    """Steering-vector generation per placement: time per generation and, where the records carry
    ``extra.new_tokens``, time per generated token.

    Args:
        source: a run directory or a list of records (``steering_generation`` rows).
        out_dir: where ``fig_steering.png`` / ``.pdf`` go.

    Returns:
        The paths written, or a note when there are no ``steering_generation`` rows.
    """
    result = FigureResult("fig_steering")
    records = select(load(source), "steering_generation", result.notes)
    totals = summarize(records, by=("placement",))
    if not totals:
        result.notes.append("skipped: no successful steering_generation repetitions")
        return result
    per_token = summarize(records, by=("placement",), value=_per_token)
    if not per_token:
        result.notes.append("records carry no extra.new_tokens: per-token panel left empty")
    placements = placements_in(records)
    fig, (ax_total, ax_token) = new_figure(ncols=2)
    grouped_bars(ax_total, ["gen"], placements, lambda _, p: totals.get((p,)), [""], annotate=seconds)
    ax_total.set_ylabel("time per generation (s)")
    ax_total.set_title("whole generation")
    grouped_bars(ax_token, ["tok"], placements, lambda _, p: per_token.get((p,)), [""], annotate=seconds)
    ax_token.set_ylabel("time per generated token (s)")
    ax_token.set_title("per token")
    link = shaped_link(records)
    fig.suptitle(WORKLOAD_LABELS["steering_generation"] + (f", client link {link}" if link else ""))
    finish(fig, result, out_dir, interval_label([*totals.values(), *per_token.values()]),
           [workload_text([r for r in records if r["ok"] and not r["warmup"]])])
    return result
