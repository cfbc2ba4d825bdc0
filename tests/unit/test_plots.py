"""plots/: every figure is drawn (PNG + PDF) from a synthetic run covering every workload and placement, the CLI
writes them with summary.md, and the headline ratios in it equal an independent computation from the same records.
Absent data skips a figure or a series with a note; it never crashes. No timing assertions."""

from __future__ import annotations

import contextlib
import io
import random
import sys
import types
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from bench.schema import PLACEMENTS, WORKLOADS, dump_record
from plots.cli import main
from plots.figures import FIGURES, plot_run
from tests.unit.test_bench_schema import valid_record

matplotlib.use("Agg")
LINK = {"bandwidth_Bps": 60e6, "latency_s": 0.02}
SIZES = (10_000_000, 50_000_000, 135_000_000)
REPS = 6


def synthetic_run(seed: int = 0, drop: tuple[str, ...] = (), workloads=WORKLOADS) -> list[dict]:
    """Records of one run: every workload × placement, REPS repetitions plus a warm-up and a failed repetition per
    group (both must be ignored), random times; ``drop`` removes placements."""
    rng = random.Random(seed)
    scale = {"hpc": 0.5, "centralized": 1.0, "petals": 6.0, "swarm": 4.0, "hybrid": 1.3}
    records: list[dict] = []

    def group(workload, placement, *, params=135_000_000, batch=8, users=1, per_user=1, extra=None):
        remote = placement != "hpc"
        counted = placement not in ("hpc", "petals")
        for rep in range(-1, REPS + 1):  # -1: warm-up, REPS: a failed repetition
            for _ in range(per_user):
                base = scale[placement] * params / 1e8 * (1 + 0.3 * users) * rng.uniform(0.8, 1.25)
                sent = int(rng.uniform(1e4, 2e4) * (50 if placement == "swarm" else 1))
                records.append(valid_record(
                    run_id="synthetic", workload=workload, placement=placement, model=f"synthetic-{params // 10**6}M",
                    params=params, batch=batch,
                    users=users, rep=max(rep, 0), warmup=rep < 0, ok=rep < REPS, wall_s=base * (5 if rep < 0 else 1)
                    if rep < REPS else None, error=None if rep < REPS else "PeerUnreachableError: synthetic",
                    link=LINK if remote else None, load_s=base / 2 if placement == "hpc" else None,
                    client_bytes_sent=sent if counted else None, client_bytes_received=sent // 10 if counted else None,
                    node_bytes=sent * 3 if counted else None, round_trips=rng.randint(1, 40) if counted else None,
                    compute_s={"node0": base / 3} if counted else None, extra=dict(extra or {})))

    for placement in PLACEMENTS:
        if placement in drop:
            continue
        for params in SIZES:
            if "setup_time" in workloads and placement in ("hpc", "centralized"):
                group("setup_time", placement, params=params, batch=None)
            if "patching_vs_size" in workloads:
                group("patching_vs_size", placement, params=params)
        for workload in ("remote_inference", "patching", "logit_lens"):
            if workload in workloads:
                group(workload, placement, extra={"top_k": 5} if workload == "logit_lens" else None)
        if "ioi_patching" in workloads:
            group("ioi_patching", placement, batch=32)
        if "attribution_patching" in workloads and placement != "petals":   # the Petals worker has no backward
            group("attribution_patching", placement, batch=32, extra={"layers": 30})
        if "steering_generation" in workloads:
            group("steering_generation", placement, extra={"new_tokens": 16})
        if "concurrency" in workloads and placement in ("centralized", "hybrid"):
            for users in (1, 2, 4):
                group("concurrency", placement, users=users, per_user=users)
    return records


def write_run(records: list[dict], run_dir: Path) -> Path:
    run_dir.mkdir(parents=True)
    half = len(records) // 2  # two files: read_results must merge them
    (run_dir / "a.jsonl").write_text("".join(map(dump_record, records[:half])))
    (run_dir / "b.jsonl").write_text("".join(map(dump_record, records[half:])))
    return run_dir


@pytest.fixture(scope="module")
def plotted(tmp_path_factory):
    """The CLI's `plot` on the full synthetic run: (records, out dir, exit status, stdout)."""
    base = tmp_path_factory.mktemp("plots")
    records = synthetic_run()
    run_dir = write_run(records, base / "results" / "synthetic")
    out = base / "figures"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main(["plot", str(run_dir), "--out", str(out)])
    return records, out, status, stdout.getvalue().splitlines()


def assert_drawn(out: Path, name: str):
    for suffix in (".png", ".pdf"):
        path = out / f"{name}{suffix}"
        assert path.is_file() and path.stat().st_size > 1000, path
    assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"


def test_synthetic_run_covers_every_workload_and_placement():
    records = synthetic_run()
    assert {r["workload"] for r in records} == set(WORKLOADS)
    assert {r["placement"] for r in records} == set(PLACEMENTS)


@pytest.mark.parametrize("name", list(FIGURES))
def test_cli_plot_writes_every_figure(plotted, name):
    _, out, status, lines = plotted
    assert status == 0
    assert_drawn(out, name)
    assert str(out / f"{name}.png") in lines and str(out / "summary.md") in lines


@pytest.mark.parametrize("name", list(FIGURES))
def test_each_figure_function_draws_from_records(name, tmp_path):
    result = FIGURES[name](synthetic_run(seed=1), tmp_path)
    assert result.name == name and not result.skipped and not result.notes
    assert result.paths == [tmp_path / f"{name}.png", tmp_path / f"{name}.pdf"]
    assert_drawn(tmp_path, name)


def kept(records, workload, placement, **equal):
    return [r for r in records if r["workload"] == workload and r["placement"] == placement and r["ok"]
            and not r["warmup"] and all(r[k] == v for k, v in equal.items())]


def med_time(records, workload, placement, **equal):
    return float(np.median([r["wall_s"] for r in kept(records, workload, placement, **equal)]))


def med_bytes(records, workload, placement, **equal):
    return float(np.median([r["client_bytes_sent"] + r["client_bytes_received"]
                            for r in kept(records, workload, placement, **equal)]))


def summary_line(text: str, name: str) -> str:
    [line] = [line for line in text.splitlines() if line.startswith(f"| {name} |")]
    return line


def test_summary_holds_the_headline_ratios_computed_independently(plotted):
    records, out, _, _ = plotted
    text = (out / "summary.md").read_text()
    ioi = dict(workload="ioi_patching", batch=32)
    attr = dict(workload="attribution_patching", batch=32)
    want = {
        "IOI patching batch 32: time swarm ÷ hybrid": med_time(records, placement="swarm", **ioi)
        / med_time(records, placement="hybrid", **ioi),
        "IOI patching batch 32: time petals ÷ hybrid": med_time(records, placement="petals", **ioi)
        / med_time(records, placement="hybrid", **ioi),
        "IOI patching batch 32: client-link bytes swarm ÷ hybrid": med_bytes(records, placement="swarm", **ioi)
        / med_bytes(records, placement="hybrid", **ioi),
        "IOI patching batch 32: time hybrid ÷ centralized": med_time(records, placement="hybrid", **ioi)
        / med_time(records, placement="centralized", **ioi),
        "attribution patching batch 32: time swarm ÷ hybrid": med_time(records, placement="swarm", **attr)
        / med_time(records, placement="hybrid", **attr),
        "attribution patching batch 32: client-link bytes swarm ÷ hybrid": med_bytes(records, placement="swarm", **attr)
        / med_bytes(records, placement="hybrid", **attr),
        "attribution patching batch 32: time hybrid ÷ centralized": med_time(records, placement="hybrid", **attr)
        / med_time(records, placement="centralized", **attr),
        "attribution patching batch 32: client-link bytes hybrid ÷ centralized":
        med_bytes(records, placement="hybrid", **attr) / med_bytes(records, placement="centralized", **attr),
        "plain forward: time hybrid ÷ petals": med_time(records, "remote_inference", "hybrid")
        / med_time(records, "remote_inference", "petals"),
        "plain forward: time swarm ÷ petals": med_time(records, "remote_inference", "swarm")
        / med_time(records, "remote_inference", "petals"),
        "logit lens (hybrid): time ÷ plain forward": med_time(records, "logit_lens", "hybrid")
        / med_time(records, "remote_inference", "hybrid"),
    }
    for name, ratio in want.items():
        assert f"| {ratio:.2f}× |" in summary_line(text, name), name
    assert "n/a" not in text.split("## Headline ratios")[1].split("##")[0]


def test_summary_concurrency_table_matches_the_records(plotted):
    records, out, _, _ = plotted
    text = (out / "summary.md").read_text()
    for placement in ("centralized", "hybrid"):
        for users in (1, 2, 4):
            rows = kept(records, "concurrency", placement, users=users)
            times = [r["wall_s"] for r in rows]
            rounds = {}
            for r in rows:
                rounds.setdefault(r["rep"], []).append(r["wall_s"])
            throughput = np.median([len(ts) / max(ts) for ts in rounds.values()])
            line = summary_line(text, f"{placement} | {users}")
            q1, q3 = np.quantile(times, [0.25, 0.75])
            assert line.startswith(f"| {placement} | {users} | {np.median(times):.4g} | {q1:.4g} – {q3:.4g} | "
                                   f"{throughput:.3g} [")


def test_summary_lists_context_and_figures(plotted):
    records, out, _, _ = plotted
    text = (out / "summary.md").read_text()
    assert "(n=6)" in text and "†" not in text.split("## Headline ratios")[1]  # 6 repetitions reach 95 %
    assert records[0]["git_commit"] in text and "60 MB/s, 20 ms" in text
    for name in FIGURES:
        assert f"- {name}: [{name}.png]({name}.png), [{name}.pdf]({name}.pdf)" in text


def test_absent_petals_draws_without_that_series_and_says_so(tmp_path):
    records = synthetic_run(drop=("petals",))
    results, summary = plot_run(write_run(records, tmp_path / "run"), tmp_path / "out",
                                only=["fig6c_petals_vs_ours", "fig_ioi_patching"])
    assert all(not r.skipped for r in results)
    assert_drawn(tmp_path / "out", "fig6c_petals_vs_ours")
    fig6c = results[0]
    assert "no petals rows for plain remote inference" in fig6c.notes
    text = summary.read_text()
    assert "no petals rows for plain remote inference" in text
    assert "| IOI patching batch 32: time petals ÷ hybrid | n/a (no petals IOI patching rows) |" in text
    assert "| plain forward: time hybrid ÷ petals | n/a (no petals plain forward rows) |" in text


def test_a_run_with_one_workload_skips_the_other_figures(tmp_path):
    records = synthetic_run(workloads=("concurrency",))
    results, summary = plot_run(write_run(records, tmp_path / "run"), tmp_path / "out")
    drawn = {r.name for r in results if not r.skipped}
    assert drawn == {"fig_concurrency"}
    assert all(r.notes and r.notes[0].startswith("skipped: ") for r in results if r.skipped)
    text = summary.read_text()
    assert "- fig6a_setup_time: skipped\n  - skipped: no successful setup_time repetitions" in text
    assert not (tmp_path / "out" / "fig6a_setup_time.png").exists()


def test_a_second_link_is_left_out_with_a_note(tmp_path):
    records = synthetic_run(workloads=("ioi_patching",))
    other = {"bandwidth_Bps": 1e9, "latency_s": 0.0}
    records += [dict(r, link=other, rep=r["rep"] + 100) for r in records if r["placement"] == "hybrid"][:3]
    results, summary = plot_run(write_run(records, tmp_path / "run"), tmp_path / "out", only=["fig_ioi_patching"])
    assert any("left out 1 GB/s, 0 ms" in n for n in results[0].notes)


def test_cli_plot_reports_bad_input_without_a_traceback(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "no *.jsonl result files" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "r.jsonl").write_text(dump_record(valid_record())[:-1].replace('"users": 1', '"users": 0') + "\n")
    assert main(["plot", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "r.jsonl:1: field 'users' is 0" in capsys.readouterr().err
    good = write_run(synthetic_run(workloads=("concurrency",)), tmp_path / "good")
    assert main(["plot", str(good), "--out", str(tmp_path / "out2"), "--only", "fig_concurrency,fig_nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown figure(s) fig_nope;" in err and "known: fig6a_setup_time" in err
    assert not (tmp_path / "out2").exists()   # refused before anything is drawn


def test_plotting_several_runs_at_once_is_refused_with_the_runs_named(tmp_path, capsys):
    root = tmp_path / "results"
    write_run(synthetic_run(workloads=("patching",)), root / "run-a")
    write_run(synthetic_run(seed=1, workloads=("patching",)), root / "run-b")
    assert main(["plot", str(root), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "holds result files in 2 directories" in err and "run-a/" in err and "run-b/" in err
    assert not (tmp_path / "out").exists()
    one_dir = tmp_path / "pooled"    # two runs' records copied into one directory are refused too
    one_dir.mkdir()
    (one_dir / "a.jsonl").write_text((root / "run-a" / "a.jsonl").read_text())
    (one_dir / "b.jsonl").write_text((root / "run-b" / "b.jsonl").read_text().replace('"synthetic"', '"other"'))
    assert main(["plot", str(one_dir), "--out", str(tmp_path / "out")]) == 2
    assert "the records come from 2 runs (other, synthetic)" in capsys.readouterr().err


def test_cli_help_texts(capsys):
    for argv in (["--help"], ["plot", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
    text = capsys.readouterr().out
    assert "run" in text and "fig_concurrency" in text and "summary.md" in text


def test_cli_run_delegates_to_bench_cli(monkeypatch):
    seen = []
    fake = types.ModuleType("bench.cli")
    fake.run_main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "bench.cli", fake)
    assert main(["run", "--suite", "paper", "--help"]) == 7
    assert seen == [["--suite", "paper", "--help"]]


def test_shaped_link_names_the_most_used_shaped_link_only():
    from plots.data import shaped_link
    shaped = {"bandwidth_Bps": 6e7, "latency_s": 0.02}
    assert shaped_link([{"link": None}] * 3 + [{"link": shaped}]) == "60 MB/s, 20 ms"
    assert shaped_link([{"link": None}]) is None
    assert shaped_link([]) is None


def test_ioi_figure_uses_the_headline_batch_even_when_it_failed(tmp_path):
    records = synthetic_run(workloads=("ioi_patching",))
    assert {r["batch"] for r in records} == {32}
    records += [dict(r, batch=8, rep=r["rep"] + 100) for r in records]
    records = [dict(r, ok=False, wall_s=None, error="boom") if r["batch"] == 32 else r for r in records]
    results, _ = plot_run(write_run(records, tmp_path / "run"), tmp_path / "out", only=["fig_ioi_patching"])
    assert results[0].skipped
    assert results[0].notes[-1] == "skipped: no successful ioi_patching repetitions at batch 32"


def test_attribution_figure_draws_time_and_bytes_per_placement_and_notes_what_is_missing(tmp_path):
    records = synthetic_run(workloads=("attribution_patching",), drop=("centralized",))
    assert {r["placement"] for r in records} == {"hpc", "swarm", "hybrid"}
    results, summary = plot_run(write_run(records, tmp_path / "run"), tmp_path / "out",
                                only=["fig_attribution_patching"])
    [result] = results
    assert not result.skipped
    assert_drawn(tmp_path / "out", "fig_attribution_patching")
    assert result.notes == ["no centralized rows for IOI attribution patching"]
    text = summary.read_text()
    swarm = med_bytes(records, "attribution_patching", "swarm", batch=32)
    hybrid = med_bytes(records, "attribution_patching", "hybrid", batch=32)
    assert f"| {swarm / hybrid:.2f}× |" in summary_line(text, "attribution patching batch 32: client-link bytes swarm ÷ hybrid")
    assert "n/a (no centralized attribution patching rows)" in summary_line(
        text, "attribution patching batch 32: time hybrid ÷ centralized")


def test_attribution_figure_skips_with_a_note_without_rows(tmp_path):
    results, _ = plot_run(write_run(synthetic_run(workloads=("ioi_patching",)), tmp_path / "run"), tmp_path / "out",
                          only=["fig_attribution_patching"])
    assert results[0].skipped
    assert results[0].notes[-1] == "skipped: no successful attribution_patching repetitions"
