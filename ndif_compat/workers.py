"""Worker processes that execute requests, and the supervisor that enforces time and memory from outside.

Each worker is a separate process (its own session, so killing it ends its children: the DHT process and p2p
daemon of a swarm connection) that loads a :class:`~ndif_compat.runtime.Runtime` and then runs one request at a
time. The supervisor sends a request, relays its LOG lines, and kills the worker when the request runs past
``timeout_s`` or the worker's resident memory passes ``max_memory_bytes``; a worker that was killed, crashed, or
had its parameters written is replaced. Requests wait in a queue for a free worker.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import psutil

from .config import BackendSpec, ExecutionLimits
from .errors import ExecutionLimitError, GatewayError, ParametersModifiedError, WorkerCrashedError

logger = logging.getLogger(__name__)


def _error_class(name: str) -> type[GatewayError]:
    from . import errors
    cls = getattr(errors, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, GatewayError) else GatewayError


def worker_main(conn, spec: BackendSpec, limits: ExecutionLimits) -> None:
    """Entry point of a worker process: load the runtime, answer ``("ready", pid)``, then serve requests."""
    os.setsid()
    parent = os.getppid()

    def orphan_watch() -> None:  # the gateway died without killing us: end this worker and its children
        while os.getppid() == parent:
            time.sleep(1.0)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=orphan_watch, daemon=True).start()
    logging.basicConfig(level=logging.WARNING)
    from .execution import decompress
    from .runtime import Runtime

    try:
        runtime = Runtime.load(spec)
    except BaseException as e:
        conn.send(("failed", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        _, request_id, blob, compress = message
        log = lambda text: conn.send(("log", text))  # noqa: E731
        try:
            data = decompress(blob, compress, limits.max_request_bytes)
            outcome, meta = runtime.execute(data, compress, request_id, log)
            if len(outcome.result) > limits.max_result_bytes:
                raise ExecutionLimitError(f"the result is {len(outcome.result)} bytes; this gateway returns at most "
                                          f"{limits.max_result_bytes}. Save less (a slice, a reduction).")
            conn.send(("done", outcome.result, meta))
        except GatewayError as e:
            replace = isinstance(e, ParametersModifiedError)
            conn.send(("error", type(e).__name__, str(e), replace))
            if replace:
                return
        except BaseException as e:  # a bug of ours: report it, keep serving
            conn.send(("error", "GatewayError", f"internal error: {type(e).__name__}: {e}", True))
            return


@dataclass
class Reply:
    result: bytes
    meta: dict


class Worker:
    """One worker process; :meth:`run` sends it a request and waits under the limits."""

    def __init__(self, spec: BackendSpec, limits: ExecutionLimits, start_timeout_s: float):
        self.spec, self.limits, self.start_timeout_s = spec, limits, start_timeout_s
        self.process: multiprocessing.process.BaseProcess | None = None
        self.conn = None

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def start(self) -> None:
        """Start the process and wait until its model is loaded. Raises WorkerCrashedError if it fails."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(child, self.spec, self.limits), daemon=False,
                                   name="swarm-gateway-worker")
        self.process.start()
        child.close()
        self.conn = parent
        if not parent.poll(self.start_timeout_s):
            self.kill()
            raise WorkerCrashedError(f"a worker did not load the model within {self.start_timeout_s} s.")
        try:
            kind, detail = parent.recv()
        except EOFError:
            kind, detail = "failed", f"exit code {self.process.exitcode}"
        if kind != "ready":
            self.kill()
            raise WorkerCrashedError(f"a worker failed to start: {detail}")

    def kill(self) -> None:
        """End the worker and its children (its process group)."""
        if self.process is None:
            return
        pid = self.process.pid
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.join(timeout=10)
        if self.conn is not None:
            self.conn.close()
        self.process, self.conn = None, None

    def run(self, request_id: str, blob: bytes, compress: bool, on_log: Callable[[str], None]) -> Reply:
        """Execute one request. Raises the request's typed error; kills the worker on a limit or crash."""
        if not self.alive():
            self.start()
        self.conn.send(("run", request_id, blob, compress))
        deadline = time.monotonic() + self.limits.timeout_s
        proc = psutil.Process(self.process.pid)
        while True:
            if self.conn.poll(0.05):
                try:
                    message = self.conn.recv()
                except EOFError:
                    code = self.process.exitcode if self.process else None
                    self.kill()
                    raise WorkerCrashedError(f"the worker running the request died (exit code {code}); it was "
                                             "replaced. Retry, and report it if it repeats.") from None
                if message[0] == "log":
                    on_log(message[1])
                    continue
                if message[0] == "done":
                    return Reply(message[1], message[2])
                _, name, text, replace = message
                if replace:
                    self.kill()
                raise _error_class(name)(text)
            if time.monotonic() > deadline:
                self.kill()
                raise ExecutionLimitError(f"the request ran past the gateway's time limit of "
                                          f"{self.limits.timeout_s:g} s and was stopped (infinite loop?).")
            try:
                rss = proc.memory_info().rss
            except psutil.NoSuchProcess:
                rss = 0
            if rss > self.limits.max_memory_bytes:
                self.kill()
                raise ExecutionLimitError(f"the request used more than {self.limits.max_memory_bytes / 2**30:.1f} "
                                          "GiB of memory on the gateway and was stopped.")


class WorkerPool:
    """``workers`` processes; :meth:`run` (blocking, call it from a thread) takes a free one, waiting if needed."""

    def __init__(self, spec: BackendSpec, limits: ExecutionLimits, workers: int = 1, start_timeout_s: float = 300.0):
        self._free: queue.Queue[Worker] = queue.Queue()
        self._all = [Worker(spec, limits, start_timeout_s) for _ in range(workers)]
        for worker in self._all:
            self._free.put(worker)

    def start(self) -> None:
        """Start every worker (in parallel) and wait until all are ready."""
        errors: list[BaseException] = []

        def start_one(worker: Worker) -> None:
            try:
                worker.start()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=start_one, args=(w,)) for w in self._all]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.close()
            raise errors[0]

    def run(self, request_id: str, blob: bytes, compress: bool, on_log: Callable[[str], None],
            on_start: Callable[[], None] = lambda: None) -> Reply:
        worker = self._free.get()
        try:
            on_start()
            return worker.run(request_id, blob, compress, on_log)
        finally:
            if not worker.alive():  # replaced in the background so the next request finds it loaded
                threading.Thread(target=self._restart, args=(worker,), daemon=True).start()
            else:
                self._free.put(worker)

    def _restart(self, worker: Worker) -> None:
        try:
            worker.start()
        except GatewayError as e:
            logger.error("could not restart a worker: %s", e)
        self._free.put(worker)

    def close(self) -> None:
        for worker in self._all:
            worker.kill()
