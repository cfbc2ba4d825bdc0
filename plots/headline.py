"""The headline comparisons of issue 4, computed from one run's records: ratios of medians, and the
concurrency table. Pure data; :mod:`plots.summary` renders it."""

from __future__ import annotations

from dataclasses import dataclass

from bench.stats import Summary, client_bytes, describe, round_throughputs, summarize

from .data import select


@dataclass(frozen=True)
class Ratio:
    """``numerator.median / denominator.median``; either side None when the run has no such rows."""

    name: str
    numerator: Summary | None
    denominator: Summary | None
    unit: str
    """Unit of both medians: ``"s"`` or ``"B"``."""
    missing: str = ""
    """What is absent when the ratio cannot be computed."""

    @property
    def value(self) -> float | None:
        if self.numerator is None or self.denominator is None or self.denominator.median == 0:
            return None
        return self.numerator.median / self.denominator.median


@dataclass(frozen=True)
class ConcurrencyRow:
    placement: str
    users: int
    response: Summary
    throughput: Summary | None
    """Requests per second over rounds; None when no round completed."""


def _ratio(name: str, stats: dict, numerator: tuple, denominator: tuple, unit: str) -> Ratio:
    absent = [f"{key[0]} {key[1]}" for key in (numerator, denominator) if key not in stats]
    return Ratio(name, stats.get(numerator), stats.get(denominator), unit,
                 missing=("no " + " / ".join(absent) + " rows") if absent else "")


def ioi_batch(records: list[dict], notes: list[str] | None = None, workload: str = "ioi_patching") -> int | None:
    """The IOI batch the headline uses for ``workload`` (``ioi_patching`` or ``attribution_patching``): 32 when
    measured, else the largest (noted); None without rows."""
    batches = {r["batch"] for r in records if r["workload"] == workload and r["batch"] is not None}
    if not batches:
        return None
    if 32 in batches:
        return 32
    if notes is not None:
        what = "IOI" if workload == "ioi_patching" else workload
        notes.append(f"no batch-32 {what} rows; {what} ratios use batch {max(batches)}")
    return max(batches)


def headline_ratios(records: list[dict], notes: list[str] | None = None) -> list[Ratio]:
    """The issue's headline comparisons, always in the same order (a ratio without data has ``value`` None).

    IOI ratios use :func:`ioi_batch`; "ours" for the plain forward is hybrid and swarm, each against Petals; the
    logit lens is compared with the plain forward of the same placement (hybrid) and model.

    Args:
        records: one run's validated records.
        notes: receives what was left out or substituted.
    """
    batch = ioi_batch(records, notes)
    ioi = [r for r in select(records, "ioi_patching", notes) if r["batch"] == batch]
    ioi_time = {(p, "IOI patching"): s for (p,), s in summarize(ioi, by=("placement",)).items()}
    ioi_bytes = {(p, "IOI patching"): s for (p,), s in summarize(ioi, by=("placement",), value=client_bytes).items()}
    plain = {(p, "plain forward"): s
             for (p,), s in summarize(select(records, "remote_inference", notes), by=("placement",)).items()}
    lens_rows = select(records, ("logit_lens", "remote_inference"), notes)
    lens_models = {r["model"] for r in lens_rows if r["workload"] == "logit_lens"}
    lens = {(p, w): s for (w, p), s in summarize([r for r in lens_rows if r["model"] in lens_models],
                                                 by=("workload", "placement")).items()}
    b = f"batch {batch}" if batch else "batch 32"
    attr_batch = ioi_batch(records, notes, workload="attribution_patching")
    attr = [r for r in select(records, "attribution_patching", notes) if r["batch"] == attr_batch]
    attr_time = {(p, "attribution patching"): s for (p,), s in summarize(attr, by=("placement",)).items()}
    attr_bytes = {(p, "attribution patching"): s
                  for (p,), s in summarize(attr, by=("placement",), value=client_bytes).items()}
    a = f"batch {attr_batch}" if attr_batch else "batch 32"
    return [
        _ratio(f"IOI patching {b}: time swarm ÷ hybrid", ioi_time, ("swarm", "IOI patching"),
               ("hybrid", "IOI patching"), "s"),
        _ratio(f"IOI patching {b}: time petals ÷ hybrid", ioi_time, ("petals", "IOI patching"),
               ("hybrid", "IOI patching"), "s"),
        _ratio(f"IOI patching {b}: client-link bytes swarm ÷ hybrid", ioi_bytes, ("swarm", "IOI patching"),
               ("hybrid", "IOI patching"), "B"),
        _ratio(f"IOI patching {b}: time hybrid ÷ centralized", ioi_time, ("hybrid", "IOI patching"),
               ("centralized", "IOI patching"), "s"),
        _ratio(f"attribution patching {a}: time swarm ÷ hybrid", attr_time, ("swarm", "attribution patching"),
               ("hybrid", "attribution patching"), "s"),
        _ratio(f"attribution patching {a}: client-link bytes swarm ÷ hybrid", attr_bytes,
               ("swarm", "attribution patching"), ("hybrid", "attribution patching"), "B"),
        _ratio(f"attribution patching {a}: time hybrid ÷ centralized", attr_time,
               ("hybrid", "attribution patching"), ("centralized", "attribution patching"), "s"),
        _ratio(f"attribution patching {a}: client-link bytes hybrid ÷ centralized", attr_bytes,
               ("hybrid", "attribution patching"), ("centralized", "attribution patching"), "B"),
        _ratio("plain forward: time hybrid ÷ petals", plain, ("hybrid", "plain forward"),
               ("petals", "plain forward"), "s"),
        _ratio("plain forward: time swarm ÷ petals", plain, ("swarm", "plain forward"),
               ("petals", "plain forward"), "s"),
        _ratio("logit lens (hybrid): time ÷ plain forward", lens, ("hybrid", "logit_lens"),
               ("hybrid", "remote_inference"), "s"),
    ]


def concurrency_rows(records: list[dict], notes: list[str] | None = None) -> list[ConcurrencyRow]:
    """Response time (median, quartiles) and throughput per (placement, users), sorted by placement then users."""
    rows = select(records, "concurrency", notes)
    latency = summarize(rows, by=("placement", "users"))
    throughput = round_throughputs(rows)
    out = [ConcurrencyRow(p, users, s, describe(throughput[(p, users)]) if throughput.get((p, users)) else None)
           for (p, users), s in latency.items()]
    return sorted(out, key=lambda row: (row.placement, row.users))
