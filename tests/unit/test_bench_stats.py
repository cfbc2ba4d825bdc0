"""bench.stats against independent computations (numpy, scipy, the statistics module)."""

from __future__ import annotations

import random
import statistics

import numpy as np
import pytest
from scipy.stats import binom

from bench.errors import BenchError
from bench.stats import client_bytes, describe, field_value, median, median_ci, quantile, round_throughputs, \
    summarize
from tests.unit.test_bench_schema import valid_record

SIZES = [1, 2, 3, 5, 6, 7, 10, 20, 21, 64, 128]


def samples(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.lognormvariate(0, 0.5) for _ in range(n)]


@pytest.mark.parametrize("n", SIZES)
def test_median_and_quartiles_match_numpy(n):
    xs = samples(n, n)
    assert median(xs) == pytest.approx(np.median(xs))
    for q in (0, 0.25, 0.5, 0.75, 1):
        assert quantile(xs, q) == pytest.approx(np.quantile(xs, q))
    if n >= 2:
        assert [quantile(xs, 0.25), quantile(xs, 0.75)] == pytest.approx(
            statistics.quantiles(xs, n=4, method="inclusive")[::2])


def scipy_order_statistic_ci(xs, confidence=0.95):
    """The textbook interval: the largest j with P(B <= j-1) <= alpha/2, B ~ Binomial(n, 1/2), via scipy."""
    n, xs = len(xs), sorted(xs)
    tail = (1 - confidence) / 2
    candidates = [j for j in range(1, (n + 1) // 2 + 1) if binom.cdf(j - 1, n, 0.5) <= tail]
    j = max(candidates, default=1)
    return xs[j - 1], xs[n - j], 1 - 2 * binom.cdf(j - 1, n, 0.5)


@pytest.mark.parametrize("n", [n for n in SIZES if n > 1])
def test_median_ci_matches_scipy_binomial(n):
    xs = samples(n, 100 + n)
    low, high, coverage = median_ci(xs)
    want = scipy_order_statistic_ci(xs)
    assert (low, high) == (want[0], want[1])
    assert coverage == pytest.approx(want[2])
    assert low <= median(xs) <= high
    if n >= 6:
        assert coverage >= 0.95
    else:
        assert (low, high) == (min(xs), max(xs)) and coverage < 0.95


def test_median_ci_known_ranks():
    xs = list(range(1, 21))
    assert median_ci(xs)[:2] == (6, 15)  # the classic table value for n = 20
    assert median_ci([4.0]) == (4.0, 4.0, 0.0)


def test_median_ci_covers_the_true_median_about_as_often_as_it_says():
    rng = random.Random(0)
    hits = sum(low <= 0 <= high for low, high, _ in
               (median_ci([rng.gauss(0, 1) for _ in range(20)]) for _ in range(2000)))
    assert 0.94 < hits / 2000 < 0.98  # nominal 95.86 %; binomial noise of 2000 trials is ~0.45 %


@pytest.mark.parametrize("bad", [lambda: median([]), lambda: quantile([1.0], 1.5), lambda: median_ci([]),
                                 lambda: median_ci([1.0], confidence=1.0)])
def test_bad_arguments_raise_bench_error(bad):
    with pytest.raises(BenchError):
        bad()


def test_summarize_groups_and_drops_warmups_and_failures():
    records = []
    for placement, scale in (("hybrid", 1.0), ("swarm", 3.0)):
        records.append(valid_record(placement=placement, warmup=True, wall_s=99.0))
        records.append(valid_record(placement=placement, ok=False, error="timeout", wall_s=None))
        records += [valid_record(placement=placement, rep=i, wall_s=scale * (i + 1)) for i in range(7)]
    result = summarize(records, by=("placement",))
    assert list(result) == [("hybrid",), ("swarm",)]
    for (placement,), scale in zip(result, (1.0, 3.0)):
        kept = [scale * (i + 1) for i in range(7)]
        got = result[(placement,)]
        assert got == describe(kept, dropped_warmup=1, dropped_failed=1)
        assert got.median == np.median(kept) and got.n == 7
        assert (got.q1, got.q3) == pytest.approx(tuple(np.quantile(kept, [0.25, 0.75])))


def test_summarize_value_functions_dotted_fields_and_unknown_counters():
    records = [valid_record(rep=i, client_bytes_sent=100 * i, client_bytes_received=i) for i in range(5)]
    records.append(valid_record(placement="petals", client_bytes_sent=None, client_bytes_received=None))
    result = summarize(records, by=("placement", "link.latency_s"), value=client_bytes)
    assert list(result) == [("hybrid", 0.02)]
    assert result[("hybrid", 0.02)].median == 202
    by_layer = summarize(records, by=("extra.layer",), value="compute_s.node1")
    assert by_layer[(6,)].median == 0.12


def test_field_value_makes_dicts_hashable():
    record = valid_record()
    assert field_value(record, "link") == (("bandwidth_Bps", 60e6), ("latency_s", 0.02))
    assert field_value(record, "extra.missing") is None


def test_round_throughputs_use_round_wall_or_the_slowest_user():
    records = []
    for rep in range(3):
        records += [valid_record(workload="concurrency", users=4, rep=rep, wall_s=1.0 + u) for u in range(4)]
        records += [valid_record(workload="concurrency", users=2, rep=rep, wall_s=0.5,
                                 extra={"round_wall_s": 0.8})]
        records += [valid_record(workload="concurrency", users=2, rep=rep, ok=False, error="x", wall_s=None)]
    records.append(valid_record(workload="concurrency", users=4, rep=9, warmup=True, wall_s=0.01))
    result = round_throughputs(records)
    assert result[("hybrid", 4)] == [4 / 4.0] * 3
    assert result[("hybrid", 2)] == [1 / 0.8] * 3
