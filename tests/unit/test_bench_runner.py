"""bench.runner.measure's round logic, with fake workers in place of processes."""

from __future__ import annotations

import trio

from bench import runner
from bench.runner import Measurement, measure
from bench.workloads import ExperimentConfig


class FakeWorker:
    """Answers after ``delay_s``; user 0 is slowest, so finishing order is the reverse of user order."""

    def __init__(self, user: int, users: int):
        self.user = user
        self.delay_s = 0.01 * (users - user)
        self.closed = False

    async def go(self) -> None:
        pass

    async def read_event(self, timeout_s: float) -> dict:
        await trio.sleep(self.delay_s)
        return {"ok": True, "wall_s": self.delay_s, "extra": {"who": self.user}, "stats": {}}


def test_concurrent_rounds_label_each_answer_with_its_own_user(monkeypatch):
    users = 3
    opened: list[FakeWorker] = []

    async def fake_open(harness, deployment, m, tag, timeout_s):
        user = int(tag.rsplit("user", 1)[1])
        await trio.sleep(0.01 * (users - user))   # start-up order is also the reverse of user order
        worker = FakeWorker(user, users)
        opened.append(worker)
        return worker, {"batch": 1, "seq_len": 8, "user": user}

    async def fake_close(harness, worker):
        worker.closed = True

    monkeypatch.setattr(runner, "_open_worker", fake_open)
    monkeypatch.setattr(runner, "_close_worker", fake_close)
    m = Measurement(workload="concurrency", placement="swarm", experiment=ExperimentConfig("patching"), n=2, warmup=1,
                    users=users)
    records: list[dict] = []
    trio.run(measure, None, None, m, records.append)

    assert len(records) == 3 * users
    for rec in records:
        assert rec["ok"]
        assert rec["extra"]["user"] == rec["extra"]["who"]
        assert rec["wall_s"] == 0.01 * (users - rec["extra"]["user"])
    assert [rec["extra"]["user"] for rec in records] == [0, 1, 2] * 3
    assert [rec["rep"] for rec in records] == [0] * 3 + [1] * 3 + [2] * 3
    assert [rec["warmup"] for rec in records] == [True] * 3 + [False] * 6
    assert all(w.closed for w in opened) and len(opened) == users


def test_median_s_warms_up_once_then_times_n_calls():
    from bench.timing import median_s
    calls = []
    assert median_s(lambda: calls.append(1), 5) >= 0.0
    assert len(calls) == 6


def test_interleaved_placements_alternate_which_goes_first(monkeypatch):
    """Each repetition runs every placement once, the order alternating, and each record lands in its own stream."""
    calls: list[str] = []

    class Worker:
        def __init__(self, placement: str):
            self.placement = placement

        async def go(self) -> None:
            calls.append(self.placement)

        async def read_event(self, timeout_s: float) -> dict:
            return {"ok": True, "wall_s": 0.1, "extra": {"who": self.placement}, "stats": {"round_trips": 1}}

    async def fake_open(harness, deployment, m, tag, timeout_s):
        return Worker(m.placement), {"batch": 8, "seq_len": 16}

    async def fake_close(harness, worker):
        pass

    monkeypatch.setattr(runner, "_open_worker", fake_open)
    monkeypatch.setattr(runner, "_close_worker", fake_close)
    ms = [Measurement(workload="patching", placement=p, experiment=ExperimentConfig("patching"), n=3, warmup=1)
          for p in ("swarm", "hybrid")]
    out: dict[str, list[dict]] = {"swarm": [], "hybrid": []}
    trio.run(runner.measure_interleaved, None, None, ms, [out["swarm"].append, out["hybrid"].append])
    assert calls == ["swarm", "hybrid", "hybrid", "swarm", "swarm", "hybrid", "hybrid", "swarm"]
    for placement, records in out.items():
        assert [r["extra"]["who"] for r in records] == [placement] * 4
        assert [r["rep"] for r in records] == [0, 1, 2, 3]
        assert [r["warmup"] for r in records] == [True, False, False, False]
        assert all(r["round_trips"] == 1 for r in records)


def test_tree_cpu_counts_this_process():
    import os
    import time as _time
    before = runner.tree_cpu_s([os.getpid()])
    t0 = _time.process_time()
    while _time.process_time() - t0 < 0.05:
        pass
    after = runner.tree_cpu_s([os.getpid()])
    assert before is not None and after - before >= 0.03
