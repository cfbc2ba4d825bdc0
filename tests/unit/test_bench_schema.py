"""The result record schema swarm-bench/1: valid records pass, each kind of bad record fails naming its field."""

from __future__ import annotations

import copy
import json

import pytest

from bench.errors import BenchError, ResultsNotFoundError, SchemaError
from bench.schema import FIELDS, PLACEMENTS, SCHEMA, VERSION_KEYS, WORKLOADS, dump_record, read_results, \
    record_context, validate_record


def valid_record(**overrides) -> dict:
    """A valid record (hybrid IOI patching at 60 MB/s + 20 ms); ``overrides`` replace top-level fields."""
    record = {
        "schema": SCHEMA, "run_id": "run-1", "workload": "ioi_patching", "placement": "hybrid",
        "model": "smollm2-135m", "params": 134_515_008, "batch": 32, "seq_len": 17,
        "link": {"bandwidth_Bps": 60e6, "latency_s": 0.02}, "node_link": None, "users": 1, "rep": 0,
        "warmup": False, "wall_s": 0.5, "load_s": None, "client_bytes_sent": 12_000, "client_bytes_received": 900,
        "node_bytes": 40_000, "round_trips": 1, "compute_s": {"node0": 0.1, "node1": 0.12}, "extra": {"layer": 6},
        "ok": True, "error": None, "config": {"n": 20, "link": "60MB/s,20ms"},
        "versions": {"python": "3.11.9", "torch": "2.13.0", "transformers": "5.23.0", "hivemind": "1.1.12",
                     "nnsight": "0.8.1"},
        "machine": {"cpus": 2, "platform": "Linux-x86_64", "ram_bytes": 8 * 2 ** 30},
        "git_commit": "0123abcd", "time": 1_800_000_000.0,
    }
    record.update(overrides)
    return record


def test_valid_record_passes_and_dumps_in_field_order():
    record = valid_record()
    validate_record(record)
    line = dump_record(record)
    assert line.endswith("\n") and list(json.loads(line)) == list(FIELDS)


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_every_workload_and_placement_is_accepted(workload, placement):
    validate_record(valid_record(workload=workload, placement=placement))


@pytest.mark.parametrize("overrides", [
    {"link": None, "node_link": {"bandwidth_Bps": 1e9, "latency_s": 0}},
    {"batch": None, "seq_len": None, "load_s": 3.2},
    {"client_bytes_sent": None, "client_bytes_received": None, "node_bytes": None, "round_trips": None,
     "compute_s": None},
    {"ok": False, "error": "PeerUnreachableError: node1 timed out", "wall_s": None},
    {"ok": False, "error": "x", "wall_s": 4.0},
    {"wall_s": 1, "time": 5, "link": {"bandwidth_Bps": 60_000_000, "latency_s": 0}},  # ints are numbers
])
def test_nullable_and_optional_forms_pass(overrides):
    validate_record(valid_record(**overrides))


def test_null_versions_are_allowed_for_packages_absent_from_the_venv():
    validate_record(valid_record(versions={**valid_record()["versions"], "nnsight": None}))


BAD = [  # (field named in the error, how to break the record)
    ("schema", lambda r: r.update(schema="swarm-bench/0")),
    ("run_id", lambda r: r.update(run_id="")),
    ("workload", lambda r: r.update(workload="ioi")),
    ("placement", lambda r: r.update(placement="cloud")),
    ("model", lambda r: r.update(model=None)),
    ("params", lambda r: r.update(params=0)),
    ("params", lambda r: r.update(params=1.5e9)),
    ("batch", lambda r: r.update(batch=0)),
    ("seq_len", lambda r: r.update(seq_len="17")),
    ("link", lambda r: r.update(link="60MB/s")),
    ("link", lambda r: r.update(link={"bandwidth_Bps": 1.0})),
    ("link.bandwidth_Bps", lambda r: r.update(link={"bandwidth_Bps": -1, "latency_s": 0.02})),
    ("link.latency_s", lambda r: r.update(link={"bandwidth_Bps": 1e6, "latency_s": float("nan")})),
    ("node_link.bandwidth_Bps", lambda r: r.update(node_link={"bandwidth_Bps": float("inf"), "latency_s": 0})),
    ("users", lambda r: r.update(users=0)),
    ("rep", lambda r: r.update(rep=-1)),
    ("warmup", lambda r: r.update(warmup=0)),
    ("wall_s", lambda r: r.update(wall_s=None)),
    ("wall_s", lambda r: r.update(wall_s=-0.1)),
    ("wall_s", lambda r: r.update(wall_s=True)),
    ("load_s", lambda r: r.update(load_s="3s")),
    ("client_bytes_sent", lambda r: r.update(client_bytes_sent=1.5)),
    ("round_trips", lambda r: r.update(round_trips=-1)),
    ("node_bytes", lambda r: r.update(node_bytes=True)),
    ("compute_s", lambda r: r.update(compute_s=[0.1])),
    ("compute_s.node0", lambda r: r.update(compute_s={"node0": "fast"})),
    ("extra", lambda r: r.update(extra=None)),
    ("ok", lambda r: r.update(ok="yes")),
    ("error", lambda r: r.update(error="boom")),
    ("error", lambda r: r.update(ok=False, error=None)),
    ("config", lambda r: r.update(config="n=20")),
    ("versions", lambda r: r.update(versions=["2.13.0"])),
    ("versions.nnsight", lambda r: r["versions"].pop("nnsight")),
    ("versions.torch", lambda r: r["versions"].update(torch=2.13)),
    ("machine", lambda r: r.update(machine=None)),
    ("machine.ram_bytes", lambda r: r["machine"].pop("ram_bytes")),
    ("machine.cpus", lambda r: r["machine"].update(cpus=0)),
    ("machine.platform", lambda r: r["machine"].update(platform="")),
    ("git_commit", lambda r: r.update(git_commit="")),
    ("time", lambda r: r.update(time=None)),
    ("wall_s", lambda r: r.pop("wall_s")),
    ("latency_ms", lambda r: r.update(latency_ms=20)),
]


@pytest.mark.parametrize("field, breaks", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_record_fails_naming_the_field(field, breaks):
    record = copy.deepcopy(valid_record())
    breaks(record)
    with pytest.raises(SchemaError) as info:
        validate_record(record)
    assert info.value.field == field
    assert repr(field) in str(info.value)
    assert isinstance(info.value, BenchError)


def test_unknown_field_message_points_to_extra():
    with pytest.raises(SchemaError, match="extra"):
        validate_record(valid_record(top_k=5))


def test_non_object_record_fails():
    with pytest.raises(SchemaError, match="JSON object"):
        validate_record([valid_record()])


def test_dump_record_refuses_invalid_records():
    with pytest.raises(SchemaError):
        dump_record(valid_record(users=0))


def test_read_results_loads_every_jsonl_file_recursively(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.jsonl").write_text(dump_record(valid_record()) + "\n" + dump_record(valid_record(rep=1)))
    (tmp_path / "sub" / "b.jsonl").write_text(dump_record(valid_record(placement="swarm")))
    (tmp_path / "notes.txt").write_text("not a result")
    records = read_results(tmp_path)
    assert [(r["placement"], r["rep"]) for r in records] == [("hybrid", 0), ("hybrid", 1), ("swarm", 0)]


def test_read_results_names_file_line_and_field(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(dump_record(valid_record()) + json.dumps(valid_record(users=0)) + "\n")
    with pytest.raises(SchemaError) as info:
        read_results(tmp_path)
    assert info.value.field == "users" and info.value.where == f"{path}:2" and f"{path}:2" in str(info.value)


def test_read_results_refuses_non_json_lines(tmp_path):
    (tmp_path / "a.jsonl").write_text("{not json\n")
    with pytest.raises(SchemaError, match="a.jsonl:1: not a JSON line"):
        read_results(tmp_path)


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: p])
def test_read_results_without_files_is_a_typed_error(tmp_path, make):
    with pytest.raises(ResultsNotFoundError, match="no \\*.jsonl"):
        read_results(make(tmp_path))


def test_record_context_fills_the_context_fields_validly(tmp_path):
    context = record_context({"n": 20})
    assert set(context) == {"config", "versions", "machine", "git_commit", "time"}
    validate_record(valid_record(**context))
    assert context["versions"]["python"] and context["machine"]["ram_bytes"] > 0
    assert record_context({}, repo=tmp_path)["git_commit"] == "unknown"  # not a checkout


def test_version_keys_are_the_agreed_ones():
    assert VERSION_KEYS == ("python", "torch", "transformers", "hivemind", "nnsight")
    assert PLACEMENTS == ("hpc", "centralized", "petals", "swarm", "hybrid")


def test_result_log_records_carry_record_context_in_their_own_dir(tmp_path, capsys):
    import argparse

    from bench.results import ResultLog
    run = tmp_path / "paper-run"
    run.mkdir()
    (run / "r.jsonl").write_text(dump_record(valid_record()))
    log = ResultLog("swarm-basics", argparse.Namespace(out=tmp_path, n=3))
    log("forward", seconds=0.5)
    path = log.write()
    assert path.parent.parent == tmp_path and path.parent.name.startswith("swarm-basics-")
    (record,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert record["measurement"] == "forward" and record["seconds"] == 0.5
    assert record["config"] == {"out": str(tmp_path), "n": 3}
    assert set(record) >= {"versions", "machine", "git_commit", "time"}
    assert len(read_results(run)) == 1   # the basics file is not under the run's directory
