"""The bench harness on real processes: deployments start with a readiness handshake, workers measure through
the link relays, records carry what the schema needs, and every child is dead afterwards, also on failure."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import trio

from bench.deployments import DeploymentConfig, deploy, split_spans
from bench.errors import DeploymentError
from bench.harness import open_harness
from bench.link_shaper import LinkSpec
from bench.runner import Measurement, measure
from bench.synthetic import write_tokenizer
from bench.workloads import ExperimentConfig


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_checkpoint_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny"
    shutil.copytree(tiny_checkpoint_factory("llama", num_layers=4), path)
    write_tokenizer(path, 128)
    return path


def _alive(pgid: int) -> list[str]:
    """The live (non-zombie) processes left in process group ``pgid``, as ``pid state cmdline`` lines."""
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            left.append(f"{stat.parent.name} {fields[0]} {cmdline[:200]}")
    return left


def test_split_spans_cover_the_layers():
    assert split_spans(30, 3) == [(0, 10), (10, 20), (20, 30)]
    assert split_spans(4, 3) == [(0, 2), (2, 3), (3, 4)]


def test_swarm_deployment_behind_relays_measures_hybrid_and_swarm(tmp_path, tiny_model):
    records: dict[str, list[dict]] = {"hybrid": [], "swarm": []}

    async def main():
        async with open_harness(tmp_path) as harness:
            config = DeploymentConfig("swarm", tiny_model, num_nodes=2, link=LinkSpec.parse("20MB/s,5ms"),
                                      node_link=LinkSpec.parse("50MB/s,1ms"))
            async with deploy(harness, config) as deployment:
                assert len(deployment.nodes) == 2 and deployment.relay is not None
                for placement, out in records.items():
                    m = Measurement("patching", placement, ExperimentConfig("patching", batch=4, seq_len=8),
                                    n=1, warmup=1)
                    await measure(harness, deployment, m, out.append)
                await trio.sleep(0.6)
                relayed = deployment.relay_bytes()
            return harness.children, relayed

    children, relayed = trio.run(main)
    for placement, out in records.items():
        assert [r["rep"] for r in out] == [0, 1] and [r["warmup"] for r in out] == [True, False]
        assert all(r["ok"] and r["error"] is None and r["wall_s"] > 0 for r in out), out
        assert out[-1]["client_bytes_sent"] > 0 and out[-1]["round_trips"] >= 1
    assert records["hybrid"][-1]["extra"]["argmax"] == records["swarm"][-1]["extra"]["argmax"]
    assert records["hybrid"][-1]["node_bytes"] > 0 and records["swarm"][-1]["node_bytes"] == 0
    traced = sum(r["client_bytes_sent"] + r["client_bytes_received"] for out in records.values() for r in out)
    assert relayed["client_up"] + relayed["client_down"] >= traced      # every client byte crossed the relay
    assert relayed["node_up"] > 0                                        # node↔node traffic took the node link
    assert not [left for c in children for left in _alive(c.pid)]


def test_hpc_runs_a_fresh_worker_per_repetition_and_records_load_time(tmp_path, tiny_model):
    out: list[dict] = []

    async def main():
        async with open_harness(tmp_path) as harness:
            async with deploy(harness, DeploymentConfig("hpc", tiny_model)) as deployment:
                m = Measurement("setup_time", "hpc", ExperimentConfig("remote_inference", batch=2, seq_len=8),
                                n=1, warmup=0)
                await measure(harness, deployment, m, out.append)
            return harness.children

    children = trio.run(main)
    assert len(out) == 1 and out[0]["ok"] and out[0]["load_s"] > 0 and out[0]["wall_s"] >= out[0]["load_s"]
    assert len(children) == 1 and not _alive(children[0].pid)


def test_a_child_that_dies_fails_the_run_and_everything_is_killed(tmp_path):
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    dies = [sys.executable, "-c", "import time, pathlib, sys; pathlib.Path(sys.argv[1]).write_text('{}'); "
            "time.sleep(0.5); sys.exit(3)", str(tmp_path / "dies.ready")]
    box = []

    async def main():
        async with open_harness(tmp_path) as harness:
            box.append(harness)
            await harness.spawn("sleeper", sleeper)
            await harness.spawn("dies", dies, ready_file=tmp_path / "dies.ready")
            await trio.sleep(30)   # the watcher's DeploymentError cancels this

    with pytest.raises(BaseException) as caught:
        trio.run(main)
    errors = caught.value.exceptions if isinstance(caught.value, BaseExceptionGroup) else [caught.value]
    assert any(isinstance(e, DeploymentError) and "dies" in str(e) and "exit code 3" in str(e) for e in errors)
    assert not [left for c in box[0].children for left in _alive(c.pid)]


def test_a_child_that_exits_before_ready_is_reported_with_its_log(tmp_path):
    async def main():
        async with open_harness(tmp_path) as harness:
            await harness.spawn("broken", [sys.executable, "-c", "print('no model here'); raise SystemExit(2)"],
                                ready_file=tmp_path / "never.json")

    with pytest.raises(BaseException) as caught:
        trio.run(main)
    errors = caught.value.exceptions if isinstance(caught.value, BaseExceptionGroup) else [caught.value]
    assert any(isinstance(e, DeploymentError) and "before it was ready" in str(e) for e in errors)


def test_a_stale_ready_file_is_not_readiness(tmp_path):
    """A ready file left by an earlier run in the same workdir (runs appending to one run directory) must not make
    the harness hand out the dead child's addresses: it waits for the new child's own file."""
    ready = tmp_path / "node.ready.json"
    ready.write_text('{"pid": -1, "stale": true}')
    child_cmd = [sys.executable, "-c", "import json, os, pathlib, sys, time; time.sleep(0.5); "
                 "p = pathlib.Path(sys.argv[1]); t = p.with_suffix('.tmp'); t.write_text(json.dumps({'pid': os.getpid()})); "
                 "t.rename(p); time.sleep(600)", str(ready)]

    async def main():
        async with open_harness(tmp_path) as harness:
            child = await harness.spawn("node", child_cmd, ready_file=ready, timeout_s=30)
            return child.info, child.pid

    info, pid = trio.run(main)
    assert info == {"pid": pid}
