"""Statistics over result records: median, quartiles and a 95% confidence interval of the median.

The CI is the distribution-free order-statistic interval (no bootstrap, no randomness, no normality assumption):
with ``x_(1) <= ... <= x_(n)`` sorted and ``B ~ Binomial(n, 1/2)`` the number of samples below the true median, the
interval ``[x_(j), x_(n+1-j)]`` covers the median with probability ``1 - 2 P(B <= j-1)``; ``j`` is the largest rank
whose coverage is still at least the requested confidence. For n = 20 that is ``[x_(6), x_(15)]`` (95.9 %), for
n = 128 ``[x_(53), x_(76)]`` (95.8 %). Below n = 6 no pair of order statistics reaches 95 %: the interval is then
``[min, max]`` and :attr:`Summary.ci_coverage` says how much it really covers (e.g. 93.75 % at n = 5).

Quartiles use linear interpolation between order statistics (numpy's default, ``statistics.quantiles(...,
method="inclusive")``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .errors import BenchError


@dataclass(frozen=True)
class Summary:
    """Statistics of one group of repetitions (warm-ups and failed repetitions already dropped)."""

    n: int
    """Repetitions kept."""
    median: float
    q1: float
    """First quartile (25th percentile)."""
    q3: float
    """Third quartile (75th percentile)."""
    ci_low: float
    """Lower end of the confidence interval of the median."""
    ci_high: float
    ci_coverage: float
    """Exact coverage of ``[ci_low, ci_high]`` (≥ the requested confidence when n is large enough)."""
    dropped_warmup: int = 0
    dropped_failed: int = 0


def median(values: Sequence[float]) -> float:
    """The sample median (mean of the two middle values for even n). Raises BenchError if ``values`` is empty."""
    return quantile(values, 0.5)


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile, linear interpolation between order statistics (numpy's default method).

    Raises:
        BenchError: ``values`` is empty or ``q`` is outside [0, 1].
    """
    if not values:
        raise BenchError("cannot take a quantile of no values")
    if not 0 <= q <= 1:
        raise BenchError(f"quantile q={q} must lie in [0, 1]")
    xs = sorted(values)
    position = q * (len(xs) - 1)
    below = math.floor(position)
    above = min(below + 1, len(xs) - 1)
    return xs[below] + (xs[above] - xs[below]) * (position - below)


def _binomial_half_cdf(k: int, n: int) -> float:
    """P(B <= k) for B ~ Binomial(n, 1/2), exact in integers until the final division."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n


def median_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Distribution-free confidence interval of the median from order statistics (see the module docstring).

    Args:
        values: the samples (any order).
        confidence: the wanted coverage, in (0, 1).

    Raises:
        BenchError: ``values`` is empty or ``confidence`` is outside (0, 1).

    Returns:
        ``(low, high, coverage)``: ``[low, high]`` = ``[x_(j), x_(n+1-j)]`` and its exact coverage. When n is too
        small to reach ``confidence``, ``[min, max]`` with its (smaller) coverage; ``(x, x, 0.0)`` for n = 1.
    """
    if not values:
        raise BenchError("cannot take a confidence interval of no values")
    if not 0 < confidence < 1:
        raise BenchError(f"confidence={confidence} must lie in (0, 1)")
    xs = sorted(values)
    n = len(xs)
    tail = (1 - confidence) / 2
    j = 1  # 1-based rank of the lower end; j = 1 is [min, max]
    while j + 1 <= (n + 1) // 2 and _binomial_half_cdf(j, n) <= tail:
        j += 1
    coverage = 1 - 2 * _binomial_half_cdf(j - 1, n) if n > 1 else 0.0
    return xs[j - 1], xs[n - j], coverage


def describe(values: Sequence[float], confidence: float = 0.95, dropped_warmup: int = 0,
             dropped_failed: int = 0) -> Summary:
    """:class:`Summary` of a non-empty list of samples. Raises BenchError if ``values`` is empty."""
    low, high, coverage = median_ci(values, confidence)
    return Summary(n=len(values), median=median(values), q1=quantile(values, 0.25), q3=quantile(values, 0.75),
                   ci_low=low, ci_high=high, ci_coverage=coverage, dropped_warmup=dropped_warmup,
                   dropped_failed=dropped_failed)


def field_value(record: dict, name: str):
    """``record[name]``; a dotted name reaches into dicts (``"extra.top_k"``, ``"link.latency_s"``). Missing → None.

    Dicts come back as sorted tuples of items, so any field can be part of a grouping key.
    """
    value = record
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, dict):
        return tuple(sorted((k, field_value(value, k)) for k in value))
    return value


def client_bytes(record: dict) -> int | None:
    """Bytes over the client link, sent + received; None when the placement does not count them."""
    sent, received = record["client_bytes_sent"], record["client_bytes_received"]
    return None if sent is None or received is None else sent + received


Value = str | Callable[[dict], float | None]


def summarize(records: Iterable[dict], by: Sequence[str] = ("workload", "placement"), value: Value = "wall_s",
              confidence: float = 0.95) -> dict[tuple, Summary]:
    """Group records and summarize one value per group, dropping warm-ups and failed repetitions.

    Args:
        records: validated result records.
        by: field names forming the group key (dotted names allowed, see :func:`field_value`).
        value: the field to summarize (dotted allowed) or a function of a record (e.g. :func:`client_bytes`);
            records where it is None are left out.
        confidence: coverage of the CI of the median.

    Returns:
        ``{key tuple: Summary}`` in order of first appearance; a group whose repetitions were all warm-ups,
        failed or None is absent.
    """
    get = value if callable(value) else (lambda r: field_value(r, value))
    groups: dict[tuple, list[float]] = {}
    dropped: dict[tuple, list[int]] = {}
    for record in records:
        key = tuple(field_value(record, f) for f in by)
        counts = dropped.setdefault(key, [0, 0])
        if record["warmup"]:
            counts[0] += 1
            continue
        if not record["ok"]:
            counts[1] += 1
            continue
        sample = get(record)
        if sample is not None:
            groups.setdefault(key, []).append(float(sample))
    return {key: describe(samples, confidence, *dropped[key]) for key, samples in groups.items()}


def round_throughputs(records: Iterable[dict]) -> dict[tuple, list[float]]:
    """Requests per second of each ``concurrency`` round, grouped by ``(placement, users)``.

    A round is the records sharing ``(run_id, placement, model, users, rep)``; its throughput is the number of ok
    requests divided by the round's duration: ``extra["round_wall_s"]`` when the writer recorded it, else the
    longest ``wall_s`` of the round (the users start together). Warm-up rounds and rounds with no ok request are
    dropped.
    """
    rounds: dict[tuple, list[dict]] = {}
    for r in records:
        if r["workload"] == "concurrency" and not r["warmup"]:
            rounds.setdefault((r["run_id"], r["placement"], r["model"], r["users"], r["rep"]), []).append(r)
    out: dict[tuple, list[float]] = {}
    for (_, placement, _, users, _), members in rounds.items():
        ok = [m for m in members if m["ok"]]
        if not ok:
            continue
        declared = [m["extra"].get("round_wall_s") for m in members if m["extra"].get("round_wall_s")]
        duration = max(declared) if declared else max(m["wall_s"] for m in ok)
        if duration > 0:
            out.setdefault((placement, users), []).append(len(ok) / duration)
    return out
