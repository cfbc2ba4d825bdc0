"""Drive worker processes on a running deployment and turn their answers into ``swarm-bench/1`` records.

One *measurement* = one workload × placement × model × users on one deployment: warm-up repetitions, then ``n``
measured ones. ``hpc`` and ``setup_time`` start a fresh worker per repetition (its load / connect time is the
point); the others reuse one worker per user. With ``users > 1`` every user runs one request per round and all
start together (the worker waits for ``go``); ``extra.round_wall_s`` is the round's duration.

Measurements of one workload on one deployment (``swarm`` and ``hybrid`` share the swarm's nodes) run *interleaved*
(:func:`measure_interleaved`): one worker per placement, and each repetition runs every placement once, in an order
that alternates, so load from other jobs on a shared machine falls on all placements alike instead of on whichever
ran during it. Each single-user repetition also records the CPU seconds it cost (``extra.node_cpu_s``: the
deployment's processes, p2p daemons included; ``extra.worker_cpu_s``: the worker's, its daemon included), which a
busy machine inflates far less than wall time. A worker's reference timings (the logit lens's floor) run after its
clock stops but before the CPU is read, so they count in its CPU seconds.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Callable

import trio

from .deployments import Deployment
from .errors import DeploymentError
from .harness import Child, Harness
from .workloads import ExperimentConfig


@dataclass(frozen=True)
class Measurement:
    """What to measure on one deployment."""

    workload: str
    placement: str
    experiment: ExperimentConfig
    n: int = 20
    warmup: int = 1
    users: int = 1
    params: int = 1


class WorkerProcess:
    """A :mod:`bench.worker` (or Petals worker) child speaking JSON lines."""

    def __init__(self, child: Child):
        self.child = child
        self._buffer = b""

    async def read_event(self, timeout_s: float) -> dict:
        with trio.move_on_after(timeout_s) as scope:
            while b"\n" not in self._buffer:
                data = await self.child.process.stdout.receive_some(65536)
                if not data:
                    raise DeploymentError(f"worker {self.child.name} exited (code {self.child.process.poll()}); "
                                          f"log {self.child.log_path}:\n{self.child.log_tail()}")
                self._buffer += data
        if scope.cancelled_caught:
            raise DeploymentError(f"worker {self.child.name} gave no answer in {timeout_s:.0f} s; log "
                                  f"{self.child.log_path}:\n{self.child.log_tail()}")
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    async def go(self) -> None:
        await self.child.process.stdin.send_all(b"go\n")


def worker_command(deployment: Deployment, measurement: Measurement, threads: int = 1) -> list[str]:
    """The worker command line: :mod:`bench.petals_worker` in the Petals venv, else :mod:`bench.worker`."""
    placement = "local" if measurement.placement == "hpc" else measurement.placement
    spec = {"placement": placement, "model": str(deployment.config.model),
            "initial_peers": deployment.initial_peers, "experiment": asdict(measurement.experiment),
            "threads": threads}
    if measurement.placement == "petals":
        from .petals import dht_prefix, petals_checkpoint, petals_python
        from .workloads import plain_inputs
        config = deployment.config
        model = petals_checkpoint(config.model, config.cache_dir)
        spec.update(model=str(model), dht_prefix=dht_prefix(model),
                    inputs=plain_inputs(config.model, measurement.experiment))
        return [str(petals_python(config.petals_venv)), "-m", "bench.petals_worker", json.dumps(spec)]
    return [sys.executable, "-m", "bench.worker", json.dumps(spec)]


async def _open_worker(harness: Harness, deployment: Deployment, measurement: Measurement, tag: str,
                       timeout_s: float) -> tuple[WorkerProcess, dict]:
    child = await harness.spawn(tag, worker_command(deployment, measurement), pipe_stdio=True, watch=False,
                                env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                     "HIVEMIND_LOGLEVEL": "WARNING"})
    worker = WorkerProcess(child)
    ready = await worker.read_event(timeout_s)
    return worker, ready


def tree_cpu_s(pids: list[int]) -> float | None:
    """User + system CPU seconds of the processes ``pids`` and all their live descendants (Linux ``/proc``; None
    elsewhere). Counts what the processes have used so far; take the difference of two readings."""
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        stats = list(Path("/proc").glob("[0-9]*/stat"))
    except OSError:
        return None
    if not stats:
        return None
    for stat in stats:
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue                      # the process ended while we looked
        pid = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(pid)
        cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
    total, todo, seen = 0.0, list(pids), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += cpu.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return total


class CpuMeter:
    """CPU seconds of the deployment's processes and of one worker between :meth:`start` and :meth:`stop`."""

    def __init__(self, deployment: Deployment | None, worker: "WorkerProcess"):
        nodes = [] if deployment is None else [c.pid for c in deployment.nodes]
        if deployment is not None and deployment.relay is not None:
            nodes.append(deployment.relay.pid)
        self.nodes, self.worker = nodes, [worker.child.pid] if hasattr(worker, "child") else []
        self.before: tuple = (None, None)

    def start(self) -> None:
        self.before = (tree_cpu_s(self.nodes) if self.nodes else None, tree_cpu_s(self.worker) if self.worker else None)

    def stop(self) -> dict:
        after = (tree_cpu_s(self.nodes) if self.nodes else None, tree_cpu_s(self.worker) if self.worker else None)
        return {key: round(b - a, 3) for key, a, b in zip(("node_cpu_s", "worker_cpu_s"), self.before, after)
                if a is not None and b is not None}


async def _close_worker(harness: Harness, worker: WorkerProcess) -> None:
    try:
        await worker.child.process.stdin.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    with trio.move_on_after(10):
        await worker.child.process.wait()
    await harness.stop(worker.child)


def _partial(m: Measurement, rep: int, ready: dict, answer: dict, **extra) -> dict:
    """One repetition's per-repetition record fields (see :func:`measure`)."""
    stats = answer.get("stats") or {}
    load_s = ready.get("load_s")
    out = {"rep": rep, "warmup": rep < m.warmup, "users": m.users, "batch": ready.get("batch"),
           "seq_len": ready.get("seq_len"), "wall_s": answer.get("wall_s") if answer.get("ok") else None,
           "load_s": load_s, "ok": bool(answer.get("ok")), "error": answer.get("error"),
           "compute_s": stats.get("compute_s") or None,
           "extra": {**(answer.get("extra") or {}), **extra}}
    if stats.get("read_s"):  # per node: its request frame's read time (a flow-control stall shows as a round trip)
        out["extra"]["read_s"] = stats["read_s"]
    for key in ("client_bytes_sent", "client_bytes_received", "node_bytes", "round_trips"):
        out[key] = int(stats[key]) if stats.get(key) is not None else None
    if m.workload == "setup_time" and answer.get("ok"):
        out["wall_s"] = ready.get("setup_s", 0.0) + answer["wall_s"]   # connect/load + first forward
        out["extra"]["first_forward_s"] = answer["wall_s"]
    return out


async def measure(harness: Harness, deployment: Deployment, m: Measurement, emit: Callable[[dict], None], *,
                  timeout_s: float = 600.0) -> None:
    """Run ``m`` and call ``emit(partial_record)`` per repetition (per user and round when ``users > 1``).

    A partial record holds the per-repetition fields (``rep``, ``warmup``, ``wall_s``, ``load_s``, counters,
    ``compute_s``, ``extra``, ``ok``, ``error``, ``batch``, ``seq_len``, ``users``); the caller adds the rest.
    A worker that fails to start yields one ``ok=false`` record per repetition instead of stopping the run.
    """
    total = m.warmup + m.n
    fresh = m.placement == "hpc" or m.workload == "setup_time"
    name = f"{m.workload}-{m.placement}-u{m.users}"

    def record(rep: int, ready: dict, answer: dict, **extra) -> dict:
        return _partial(m, rep, ready, answer, **extra)

    def failure(rep: int, error: Exception) -> dict:
        return record(rep, {}, {"ok": False, "error": f"{type(error).__name__}: {error}"[:2000]})

    if fresh:
        for rep in range(total):
            try:
                worker, ready = await _open_worker(harness, deployment, m, f"{name}-r{rep}", timeout_s)
                try:
                    await worker.go()
                    emit(record(rep, ready, await worker.read_event(timeout_s)))
                finally:
                    await _close_worker(harness, worker)
            except DeploymentError as e:
                emit(failure(rep, e))
        return

    opened: dict[int, tuple[WorkerProcess, dict]] = {}   # user -> worker; filled in start-up order

    async def open_one(u: int) -> None:
        opened[u] = await _open_worker(harness, deployment, m, f"{name}-user{u}", timeout_s)

    try:
        error = await _gather(open_one, range(m.users))
        if error is not None:
            for rep in range(total):
                for _ in range(m.users):
                    emit(failure(rep, error))
            return
        workers = [opened[u] for u in range(m.users)]   # workers[u] is user u's worker (named ...-user{u})
        for rep in range(total):
            answers: list[dict | None] = [None] * len(workers)   # indexed by user, not by finishing order
            t0 = time.perf_counter()

            async def one(u: int) -> None:
                worker, _ = workers[u]
                await worker.go()
                answers[u] = await worker.read_event(timeout_s)

            meter = CpuMeter(deployment, workers[0][0]) if m.users == 1 else None
            if meter is not None:
                meter.start()
            error = await _gather(one, range(len(workers)))
            if error is not None:
                for _ in range(m.users):
                    emit(failure(rep, error))
                return
            round_wall_s = time.perf_counter() - t0
            for u, ((_, ready), answer) in enumerate(zip(workers, answers)):
                extra = {"user": u, "round_wall_s": round_wall_s} if m.users > 1 else meter.stop()
                emit(record(rep, ready, answer, **extra))
    finally:
        with trio.CancelScope(shield=True):
            for worker, _ in opened.values():
                await _close_worker(harness, worker)


def interleavable(m: Measurement) -> bool:
    """Whether ``m`` can share repetitions with other placements (:func:`measure_interleaved`): one user, and a worker
    kept across repetitions."""
    return m.users == 1 and m.placement != "hpc" and m.workload != "setup_time"


async def measure_interleaved(harness: Harness, deployment: Deployment, measurements: list[Measurement],
                              emits: list[Callable[[dict], None]], *, timeout_s: float = 600.0) -> None:
    """Run several single-user measurements on one deployment repetition by repetition: repetition ``r`` runs each
    placement once, in list order for even ``r`` and reversed for odd ``r`` (so neither always goes first), one at a
    time. ``emits[i]`` gets ``measurements[i]``'s records, as :func:`measure` would give them."""
    if not all(interleavable(m) for m in measurements):
        raise ValueError("measure_interleaved takes single-user measurements on kept workers only")
    opened: dict[int, tuple[WorkerProcess, dict]] = {}

    async def open_one(i: int) -> None:
        m = measurements[i]
        opened[i] = await _open_worker(harness, deployment, m, f"{m.workload}-{m.placement}-u1", timeout_s)

    try:
        error = await _gather(open_one, range(len(measurements)))
        broken: dict[int, DeploymentError] = {i: error for i in range(len(measurements)) if error is not None}
        total = max(m.warmup + m.n for m in measurements)
        for rep in range(total):
            order = list(range(len(measurements)))
            for i in (order if rep % 2 == 0 else order[::-1]):
                m = measurements[i]
                if rep >= m.warmup + m.n:
                    continue
                if i in broken:  # its worker failed: the others go on, as separate measurements would
                    failed = broken[i]
                    emits[i](_partial(m, rep, {}, {"ok": False, "error": f"{type(failed).__name__}: {failed}"[:2000]}))
                    continue
                worker, ready = opened[i]
                meter = CpuMeter(deployment, worker)
                meter.start()
                try:
                    await worker.go()
                    answer = await worker.read_event(timeout_s)
                except (DeploymentError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    broken[i] = e if isinstance(e, DeploymentError) else DeploymentError(
                        f"worker {worker.child.name} stopped taking work: {type(e).__name__}")
                    emits[i](_partial(m, rep, {}, {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}))
                    continue
                emits[i](_partial(m, rep, ready, answer, **meter.stop()))
    finally:
        with trio.CancelScope(shield=True):
            for worker, _ in opened.values():
                await _close_worker(harness, worker)


async def _gather(fn, items) -> DeploymentError | None:
    """Run ``fn(item)`` for every item concurrently; the first DeploymentError, or None."""
    errors: list[DeploymentError] = []

    async def guarded(item) -> None:
        try:
            await fn(item)
        except DeploymentError as e:
            errors.append(e)

    async with trio.open_nursery() as nursery:
        for item in items:
            nursery.start_soon(guarded, item)
    return errors[0] if errors else None


def count_params(model_dir) -> int:
    """Parameters of a safetensors checkpoint directory (from the file headers; no tensor is read)."""
    from pathlib import Path

    from safetensors import safe_open
    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                size = 1
                for dim in shape:
                    size *= dim
                total += size
    return max(total, 1)


