"""Drive worker processes on a running deployment and turn their answers into ``swarm-bench/1`` records.

One *measurement* = one workload × placement × model × users on one deployment: warm-up repetitions, then ``n``
measured ones. ``hpc`` and ``setup_time`` start a fresh worker per repetition (its load / connect time is the
point); the others reuse one worker per user. With ``users > 1`` every user runs one request per round and all
start together (the worker waits for ``go``); ``extra.round_wall_s`` is the round's duration.
"""

from __future__ import annotations

import json
import sys
import time
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


async def _close_worker(harness: Harness, worker: WorkerProcess) -> None:
    try:
        await worker.child.process.stdin.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    with trio.move_on_after(10):
        await worker.child.process.wait()
    await harness.stop(worker.child)


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
        stats = answer.get("stats") or {}
        load_s = ready.get("load_s")
        out = {"rep": rep, "warmup": rep < m.warmup, "users": m.users, "batch": ready.get("batch"),
               "seq_len": ready.get("seq_len"), "wall_s": answer.get("wall_s") if answer.get("ok") else None,
               "load_s": load_s, "ok": bool(answer.get("ok")), "error": answer.get("error"),
               "compute_s": stats.get("compute_s") or None,
               "extra": {**(answer.get("extra") or {}), **extra}}
        for key in ("client_bytes_sent", "client_bytes_received", "node_bytes", "round_trips"):
            out[key] = int(stats[key]) if stats.get(key) is not None else None
        if m.workload == "setup_time" and answer.get("ok"):
            out["wall_s"] = ready.get("setup_s", 0.0) + answer["wall_s"]   # connect/load + first forward
            out["extra"]["first_forward_s"] = answer["wall_s"]
        return out

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

            error = await _gather(one, range(len(workers)))
            if error is not None:
                for _ in range(m.users):
                    emit(failure(rep, error))
                return
            round_wall_s = time.perf_counter() - t0
            for u, ((_, ready), answer) in enumerate(zip(workers, answers)):
                extra = {"user": u, "round_wall_s": round_wall_s} if m.users > 1 else {}
                emit(record(rep, ready, answer, **extra))
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


