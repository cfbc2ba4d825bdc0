"""swarm-bench run's argument checking, the Petals checkpoint conversion and the missing-venv message."""

from __future__ import annotations

import json

import pytest

from bench.cli import build_run_parser, run_config
from bench.errors import PetalsUnavailableError
from bench.link_shaper import LinkSpec
from bench.petals import dht_prefix, petals_checkpoint, petals_python


def test_unknown_workload_or_placement_is_refused(capsys):
    parser = build_run_parser()
    for argv in (["--workload", "ioi,patching"], ["--placements", "cloud"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert "choose from" in capsys.readouterr().err


def test_defaults_parse():
    args = build_run_parser().parse_args(["--suite", "smoke", "--link", "60MB/s,20ms", "-n", "3"])
    assert args.suite == "smoke" and args.n == 3 and args.node_link == "same"


def test_no_size_workload_runs_on_petals():
    from bench.cli import PETALS_WORKLOADS, SIZE_WORKLOADS
    assert not set(SIZE_WORKLOADS) & set(PETALS_WORKLOADS)   # plan_jobs relies on it to leave petals out


def test_attribution_patching_plans_batch_32_in_every_placement_but_petals(tmp_path):
    from bench.cli import plan_jobs
    from swarm.checkpoint import resolve_checkpoint

    resolve_checkpoint("smollm2-135m")   # the cached checkpoint: plan_jobs reads only its headers
    for suite in ("paper", "smoke"):
        args = build_run_parser().parse_args(["--suite", suite, "--workload", "attribution_patching",
                                              "--petals-venv", str(tmp_path / "nope")])
        planned = {m.placement: m for job in plan_jobs(args, _cache_dir()) for m in job.measurements}
        assert set(planned) == {"hpc", "centralized", "swarm", "hybrid"}
        assert {(m.experiment.experiment, m.experiment.batch) for m in planned.values()} == {
            ("attribution_patching", 32)}
    from bench.cli import SUITES
    assert all("attribution_patching" in suite["workloads"] for suite in SUITES.values())


def _cache_dir():
    from swarm.embedded import default_cache_dir
    return default_cache_dir()


def test_missing_petals_venv_says_how_to_create_it(tmp_path):
    with pytest.raises(PetalsUnavailableError, match="make petals-env"):
        petals_python(tmp_path / "nope")


def test_petals_checkpoint_rewrites_the_config_for_transformers_4_34(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"x")
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float32",
                                                   "rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}}))
    out = petals_checkpoint(model, tmp_path / "cache")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 1e5 and config["torch_dtype"] == "float32"
    assert "rope_parameters" not in config and "dtype" not in config
    assert (out / "model.safetensors").resolve() == (model / "model.safetensors").resolve()
    assert "." not in dht_prefix(out) and dht_prefix(out).endswith("-petals")


def test_link_is_parsed_on_the_command_line_and_recorded_as_parsed(capsys):
    parser = build_run_parser()
    args = parser.parse_args(["--link", "100Mbit/s,20ms", "--node-link", "none"])
    assert args.link == LinkSpec(12.5e6, 0.02) and args.node_link is None
    config = run_config(args, "r1")
    assert config["link"] == {"bandwidth_Bps": 12.5e6, "latency_s": 0.02} and config["node_link"] is None
    json.dumps(config)                                    # it goes into every record
    assert parser.parse_args([]).link is None and parser.parse_args([]).node_link == "same"


@pytest.mark.parametrize("flag", ["--link", "--node-link"])
def test_a_case_confusable_link_stops_the_command(flag, capsys):
    with pytest.raises(SystemExit) as caught:
        build_run_parser().parse_args([flag, "100Mb/s"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "'Mb/s'" in err and "Mbit/s" in err and "MB/s" in err


def test_line_rate_summary_takes_medians_side_by_side():
    from bench.line_rate import cpu_ceiling_MBps, summarize, table
    from bench.link_spec import LinkSpec
    link = LinkSpec.parse("20MB/s,20ms")
    rows = [{"bytes": 100_000, "streams": k, "direction": d, "ratio": r, "MBps": 1.0}
            for k in (1, 8) for d in ("up", "down") for r in ((1.1, 1.3, 9.0) if k == 1 else (1.0, 1.2, 1.1))]
    summary = summarize(rows, link, {100_000: 500.0})
    assert [(s["streams"], s["up_ratio"], s["down_ratio"]) for s in summary] == [(1, 1.3, 1.3), (8, 1.1, 1.1)]
    assert summary[0]["link_MBps"] == 20.0 and summary[0]["cpu_MBps"] == 500.0
    text = table(summary)
    assert "100KB" in text and "up x8" in text and "1.300" in text
    assert cpu_ceiling_MBps(300_000, repeats=1) > 0
