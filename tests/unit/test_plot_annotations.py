"""What a figure says about itself (issue 15): intervals from n < 6 are labelled min–max, not "95% CI"; a series the
run lacks (Petals without its venv) leaves "n/a" slots and a note drawn on the figure; the workload's parameters
are on every figure; log-axis bars start at a stated decade. Synthetic records, no sockets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.stats import describe
from plots.annotate import interval_label, missing_text, workload_text
from plots.draw import log_baseline
from plots.figures import FIGURES
from plots.style import human_bytes
from tests.unit.test_plots import REPS, synthetic_run

assert REPS >= 6   # the full synthetic run reaches a 95 % CI; few() cuts it below


def few(records: list[dict], n: int) -> list[dict]:
    """The same run with only ``n`` measured repetitions per group (warm-ups and failures kept)."""
    return [r for r in records if r["warmup"] or not r["ok"] or r["rep"] < n]


def text_of(result) -> str:
    return " ".join(" ".join(result.text).split())   # wrapped lines read as one


def test_interval_label_follows_the_coverage_actually_reached():
    assert interval_label([describe([1.0, 2, 3, 4, 5, 6])]) == "median, 95% CI"   # n = 6 covers 96.9 %
    assert interval_label([describe([1.0, 2, 3])]) == "median, min–max (n = 3: too few for a 95% CI)"
    assert interval_label([describe([1.0, 2, 3]), describe([1.0, 2, 3, 4, 5])], " band") == (
        "median, min–max band (n = 3–5: too few for a 95% CI)")
    assert interval_label([describe([1.0, 2]), describe(list(range(20)))]) == (
        "median; 95% CI where n ≥ 6, min–max where n = 2")


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """Every figure drawn twice: from 3 repetitions per group (too few for a 95 % CI), and from the full run."""
    out = tmp_path_factory.mktemp("annotated")
    records = {"few": few(synthetic_run(seed=2), 3), "full": synthetic_run(seed=2)}
    return records, {(kind, name): FIGURES[name](rs, out / kind) for kind, rs in records.items() for name in FIGURES}


@pytest.mark.parametrize("name", list(FIGURES))
def test_figures_from_few_repetitions_never_claim_a_95_ci(name, drawn):
    result = drawn[1][("few", name)]
    assert not result.skipped
    text = text_of(result)
    assert "95% CI" not in text.replace("too few for a 95% CI", "")
    assert "min–max" in text and "n = 3" in text


@pytest.mark.parametrize("name", [n for n in FIGURES if n != "fig_concurrency"])
def test_figures_from_enough_repetitions_say_95_ci(name, drawn):
    text = text_of(drawn[1][("full", name)])
    assert "median, 95% CI" in text and "min–max" not in text


@pytest.mark.parametrize("name", list(FIGURES))
def test_every_figure_names_its_workload_parameters(name, drawn):
    records, results = drawn
    text = text_of(results[("full", name)])
    workload = {"fig6a_setup_time": ("setup_time",), "fig6b_patching_vs_size": ("patching_vs_size",),
                "fig6c_petals_vs_ours": ("remote_inference", "patching"), "fig_ioi_patching": ("ioi_patching",),
                "fig_attribution_patching": ("attribution_patching",),
                "fig_logit_lens": ("logit_lens", "remote_inference"), "fig_steering": ("steering_generation",),
                "fig_concurrency": ("concurrency",)}[name]
    used = [r for r in records["full"] if r["workload"] in workload and r["ok"] and not r["warmup"]]
    models = sorted({r["model"] for r in used})
    assert (f"model {models[0]}" in text) if len(models) == 1 else all(m in text for m in models)
    batches = {r["batch"] for r in used if r["batch"]}
    seq_lens = {r["seq_len"] for r in used if r["seq_len"]}
    if batches:   # setup has no input batch
        assert any(f"batch {b}" in text for b in batches) and any(f"{s} tokens" in text for s in seq_lens)
    if name == "fig_logit_lens":
        assert "top-5" in text
    if name == "fig_steering":
        assert "16 new tokens" in text


def test_workload_text_reads_the_records():
    base = {"model": "smollm2-135m", "params": 134_515_008, "batch": 32, "seq_len": 15, "extra": {"layers": 30}}
    assert workload_text([base]) == "model smollm2-135m (135M params) · batch 32 · 15 tokens · 30 layers"
    assert workload_text([base, dict(base, batch=8)]).startswith("model smollm2-135m (135M params) · batch 8–32 ·")
    assert workload_text([]) == ""


def test_absent_petals_leaves_n_a_slots_and_a_note_on_the_figure(tmp_path):
    records = synthetic_run(seed=4, drop=("petals",))
    fig6c = FIGURES["fig6c_petals_vs_ours"](records, tmp_path)
    assert fig6c.text.count("n/a") == 2                       # one slot per workload group
    assert "not in this run: Petals 2.2 — n/a" in text_of(fig6c)
    ioi = FIGURES["fig_ioi_patching"](records, tmp_path)
    assert ioi.text.count("n/a") == 2 + 1                     # petals in both panels, hpc counts no bytes
    assert "not in this run: Petals 2.2" in text_of(ioi)
    full = FIGURES["fig6c_petals_vs_ours"](synthetic_run(seed=4), tmp_path)
    assert "n/a" not in full.text and "not in this run" not in text_of(full)


def test_missing_text_names_the_placements_and_the_fix():
    assert missing_text([]) == ""
    assert "Petals 2.2" in missing_text(["petals"]) and "make petals-env" in missing_text(["petals"])
    assert "make petals-env" not in missing_text(["swarm"])


def test_log_bars_start_at_the_decade_below_the_lowest_interval(tmp_path):
    records = synthetic_run(seed=5, workloads=("ioi_patching",))
    result = FIGURES["fig_ioi_patching"](records, tmp_path)
    lows = []
    for placement in ("centralized", "swarm", "hybrid"):
        sizes = [r["client_bytes_sent"] + r["client_bytes_received"] for r in records
                 if r["placement"] == placement and r["ok"] and not r["warmup"]]
        lows.append(describe(sizes).ci_low)
    decade = 10.0 ** math.floor(np.log10(min(lows)))
    assert f"log axis, bars from {human_bytes(decade)}" in text_of(result)


def test_log_baseline():
    assert log_baseline([describe([12_700.0, 13_000, 15_000])]) == 10_000
    assert log_baseline([describe([0.5, 0.7]), describe([9.0, 10])]) == pytest.approx(0.1)
    assert log_baseline([]) == 1.0
