"""The gateway's side of request execution: one sandboxed cell per request, forked from a clean template.

    pool = CellPool(spec, limits, workers=2)
    pool.start()                                   # starts the template (ndif_compat.zygote); waits for the model
    reply = pool.run(job_id, blob, compress, on_log, on_start)   # blocking; call it from a thread
    pool.close()

- The template is a new program started with an **empty environment** (API keys live only in this process),
  holding the model with sealed read-only weights; it forks cells ahead of time (``workers`` spares), so a
  request waits for neither a fork nor a sandbox set-up.
- ``run`` hands the request's bytes to a cell over its own socket and enforces, from outside, the wall time
  (``timeout_s``) and the cell's private memory (``max_memory_bytes``); the cell is killed past either and always
  discarded afterwards. At most ``workers`` requests run at once; the rest wait.
- The swarm backend's cells have no network either: their swarm calls come to this process as data (hidden
  states, our IR), checked and made here on one swarm connection (:mod:`ndif_compat.broker`).
- What a cell sends back is read as bounded JSON and bytes (:mod:`ndif_compat.channel`), never unpickled here; its
  metadata is checked field by field; the response to the client is built by the gateway, for the job whose cell
  answered. A cell that dies is classified by its exit status (SIGSEGV: a write to the read-only weights;
  SIGSYS: a system call the sandbox forbids).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import psutil

from .broker import BrokerError
from .channel import Channel, ChannelError
from .config import BackendSpec, ExecutionLimits
from .errors import ExecutionLimitError, GatewayError, SandboxViolationError, WorkerCrashedError
from .workers import Reply, _error_class
from .zygote import CONTROL_MESSAGE_BYTES

logger = logging.getLogger(__name__)

META_FIELDS = {"path": str, "reason": str, "gradients": bool, "swarm_bytes_sent": int, "swarm_bytes_received": int,
               "swarm_calls": int, "request": str}
MAX_LOG_LINES = 1000
MAX_ERROR_TEXT = 16 * 2**10
CLEAN_ENV_NAMES = ("PATH", "LANG", "LC_ALL", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE",
                   "OPENBLAS_L2_SIZE", "PYTHONPATH")
"""The only variables of the gateway's environment a template inherits (none can hold a secret)."""


class _Cell:
    def __init__(self, pid: int, channel: Channel):
        self.pid, self.channel = pid, channel
        self.exited = threading.Event()
        self.status: int | None = None


class CellPool:
    """Runs each request in a fresh sandboxed cell; same interface as :class:`~ndif_compat.workers.WorkerPool`."""

    def __init__(self, spec: BackendSpec, limits: ExecutionLimits, workers: int = 1, start_timeout_s: float = 300.0):
        self.spec, self.limits, self.workers, self.start_timeout_s = spec, limits, workers, start_timeout_s
        self._slots = threading.Semaphore(workers)
        self._spares: queue.Queue[_Cell] = queue.Queue()
        self._cells: dict[int, _Cell] = {}
        self._lock = threading.Lock()
        self._control: socket.socket | None = None
        self._template: subprocess.Popen | None = None
        self._ready = threading.Event()
        self._failure: str | None = None
        self._failure_class: type[GatewayError] = WorkerCrashedError
        self._closed = False
        self._launch, self._launched = threading.Event(), threading.Event()
        self._launch_error: GatewayError | None = None
        self._scratch_root: Path | None = None
        self.broker = None
        """The swarm backend's swarm connection (:class:`~ndif_compat.broker.SwarmBroker`), outside the cells."""

    # ---- the template ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the template and wait until its model is loaded and its first cells are forked.

        Raises:
            WorkerCrashedError: the template failed (its message says why: a missing sandbox feature, the model).
        """
        if self.spec.kind == "swarm" and self.broker is None:
            from .broker import SwarmBroker
            self.broker = SwarmBroker(self.spec.model_path, self.spec.initial_peers, self.limits.max_request_bytes)
            self.broker.connect()
        # The template is started (and restarted) by one thread that lives as long as the pool: a process's
        # parent-death signal follows the thread that forked it.
        threading.Thread(target=self._keep_template, daemon=True, name="gateway-template-keeper").start()
        self._launch.set()
        self._launched.wait()
        if self._launch_error is not None:
            self.close()
            raise self._launch_error

    def _keep_template(self) -> None:
        while True:
            self._launch.wait()
            self._launch.clear()
            if self._closed:
                return
            self._stop_template()
            try:
                self._start_template()
                self._launch_error = None
            except GatewayError as e:
                logger.error("%s", e)
                self._launch_error = e
            self._launched.set()

    def _start_template(self) -> None:
        self._scratch_root = Path(tempfile.mkdtemp(prefix="swarm-gateway-cells-"))
        os.chmod(self._scratch_root, 0o711)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = {"spec": {**asdict(self.spec), "model_path": str(self.spec.model_path)},
                  "limits": asdict(self.limits), "scratch_root": str(self._scratch_root)}
        env = {k: os.environ[k] for k in CLEAN_ENV_NAMES if k in os.environ}
        env["HOME"] = str(self._scratch_root)
        self._template = subprocess.Popen(
            [sys.executable, "-m", "ndif_compat.zygote", str(theirs.fileno()), json.dumps(config)],
            pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL, start_new_session=True,
            cwd=str(Path(__file__).resolve().parents[1]))
        theirs.close()
        self._control = ours
        self._ready.clear()
        self._failure = None
        threading.Thread(target=self._read_control, daemon=True, name="gateway-template").start()
        if not self._ready.wait(self.start_timeout_s) or self._failure:
            failure = self._failure or f"the model was not loaded within {self.start_timeout_s:g} s"
            cls = self._failure_class if self._failure else WorkerCrashedError
            self._stop_template()
            raise cls(f"the gateway's template process failed to start: {failure}")
        for _ in range(self.workers):
            self._ask("fork")

    def _ask(self, kind: str, **fields) -> None:
        with self._lock:
            if self._control is not None:
                try:
                    self._control.send(json.dumps({"kind": kind, **fields}).encode())
                except OSError:
                    pass

    def _read_control(self) -> None:
        control = self._control
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(control, CONTROL_MESSAGE_BYTES, 1)
            except OSError:
                data, fds = b"", []
            if not data:
                break
            message = json.loads(data)
            kind = message["kind"]
            if kind == "ready":
                self._ready.set()
            elif kind == "failed":
                self._failure = message["error"]
                self._failure_class = _error_class(message.get("name", ""))
                self._ready.set()
            elif kind == "cell" and fds:
                cell = _Cell(message["pid"], Channel(fds[0]))
                with self._lock:
                    self._cells[cell.pid] = cell
                self._spares.put(cell)
            elif kind == "exit":
                with self._lock:
                    cell = self._cells.pop(message["pid"], None)
                if cell is not None:
                    cell.status = message["status"]
                    cell.exited.set()
        if not self._closed and self._ready.is_set() and self._failure is None:  # it died serving: restart it
            logger.error("the gateway's template process exited; restarting it")
            with self._lock:
                for cell in self._cells.values():
                    cell.exited.set()
                self._cells.clear()
            self._launch.set()

    # ---- requests -------------------------------------------------------------------------------------------------

    def run(self, request_id: str, blob: bytes, compress: bool, on_log: Callable[[str], None],
            on_start: Callable[[], None] = lambda: None) -> Reply:
        """Execute one request in a fresh cell. Raises the request's typed error."""
        with self._slots:
            try:
                cell = self._spares.get(timeout=self.start_timeout_s)
            except queue.Empty:
                raise WorkerCrashedError("no sandboxed process became ready in time; retry later.") from None
            self._ask("fork")                              # the next request's cell, while this one runs
            try:
                on_start()
                return self._supervise(cell, request_id, blob, compress, on_log)
            finally:
                self._ask("kill", pid=cell.pid)
                cell.channel.close()

    def _supervise(self, cell: _Cell, request_id: str, blob: bytes, compress: bool,
                   on_log: Callable[[str], None]) -> Reply:
        calls = self.broker.request() if self.broker is not None else None
        try:
            reply = self._exchange(cell, request_id, blob, compress, on_log, calls)
        finally:
            if calls is not None:
                calls.close()
        if calls is not None:    # measured here, not reported by the cell
            reply.meta.update(swarm_bytes_sent=calls.sent, swarm_bytes_received=calls.received,
                              swarm_calls=calls.count)
        return reply

    def _exchange(self, cell: _Cell, request_id: str, blob: bytes, compress: bool, on_log: Callable[[str], None],
                  calls) -> Reply:
        try:
            cell.channel.send("run", {"id": request_id, "compress": bool(compress)}, blob)
        except OSError:
            raise self._died(cell) from None
        deadline = time.monotonic() + self.limits.timeout_s
        logs = 0
        try:
            process = psutil.Process(cell.pid)
        except psutil.NoSuchProcess:
            raise self._died(cell) from None
        while True:
            if cell.channel.poll(0.05):
                try:
                    kind, meta, body = cell.channel.recv(self.limits.max_result_bytes)
                except EOFError:
                    raise self._died(cell) from None
                except ChannelError as e:
                    raise ExecutionLimitError(f"the request's answer was refused: {e}. Save less (a slice, a "
                                              "reduction).") from None
                if kind == "call" and calls is not None:
                    try:
                        answer, data = calls.handle(meta, body)
                    except GatewayError as e:
                        text = str(e) if isinstance(e, BrokerError) else f"{type(e).__name__}: {e}"
                        cell.channel.send("reply_error", {"text": text[:MAX_ERROR_TEXT]})
                    else:
                        cell.channel.send("reply", answer, data)
                    continue
                if kind == "log":
                    logs += 1
                    if logs <= MAX_LOG_LINES and isinstance(meta.get("text"), str):
                        on_log(meta["text"])
                    continue
                if kind == "done":
                    return Reply(body, _checked_meta(meta))
                if kind == "error":
                    name, text = meta.get("name"), meta.get("text")
                    cls = _error_class(name) if isinstance(name, str) else GatewayError
                    raise cls(str(text)[:MAX_ERROR_TEXT])
                raise WorkerCrashedError(f"the request's process sent an unknown message {kind[:40]!r}.")
            if time.monotonic() > deadline:
                raise ExecutionLimitError(f"the request ran past the gateway's time limit of "
                                          f"{self.limits.timeout_s:g} s and was stopped (infinite loop?).")
            try:
                info, threads = process.memory_info(), process.num_threads()
            except psutil.NoSuchProcess:
                continue
            if threads > self.limits.max_threads:
                raise ExecutionLimitError(f"the request started more than {self.limits.max_threads} threads on the "
                                          "gateway and was stopped.")
            private = info.rss - info.shared
            if private > self.limits.max_memory_bytes:
                raise ExecutionLimitError(f"the request used more than {self.limits.max_memory_bytes / 2**30:.1f} "
                                          "GiB of memory on the gateway and was stopped.")

    def _died(self, cell: _Cell) -> GatewayError:
        """The typed error for a cell that closed its channel without an answer (by its exit status)."""
        cell.exited.wait(5.0)
        status = cell.status
        if status is not None and status < 0:
            sig = -status
            if sig in (signal.SIGSEGV, signal.SIGBUS):
                return SandboxViolationError("the request wrote to read-only memory (the model's parameters and "
                                             "buffers are read-only on this gateway); it was stopped. Copy a "
                                             "tensor (.clone()) before changing it in place.")
            if sig == signal.SIGSYS:
                return SandboxViolationError("the request made a system call the gateway's sandbox forbids (new "
                                             "processes, programs, sockets, signals to other processes); it was "
                                             "stopped.")
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            return WorkerCrashedError(f"the process running the request was ended by {name}. Retry, and report it "
                                      "if it repeats.")
        if status is None:
            return WorkerCrashedError("the process running the request ended with the gateway's template process, "
                                      "which is being restarted; retry in a few seconds.")
        return WorkerCrashedError(f"the process running the request exited (status {status}) without an answer. "
                                  "Retry, and report it if it repeats.")

    # ---- shutdown -------------------------------------------------------------------------------------------------

    def _stop_template(self) -> None:
        with self._lock:
            control, self._control = self._control, None
        if control is not None:
            control.close()
        template, self._template = self._template, None
        if template is not None:
            try:
                os.killpg(template.pid, signal.SIGKILL)     # the template and any cell still in its group
            except (ProcessLookupError, PermissionError):
                pass
            template.wait(timeout=10)
        while not self._spares.empty():
            self._spares.get_nowait().channel.close()
        if self._scratch_root is not None:
            shutil.rmtree(self._scratch_root, ignore_errors=True)

    def close(self) -> None:
        self._closed = True
        self._launch.set()
        self._stop_template()
        if self.broker is not None:
            self.broker.close()


def _checked_meta(meta: dict) -> dict:
    """The cell's metadata, keeping only the known fields of the right types (the cell is not trusted)."""
    checked = {}
    for name, kind in META_FIELDS.items():
        value = meta.get(name)
        if type(value) is kind:
            checked[name] = value[:(512 if name == "reason" else 32)] if kind is str else value
    return checked
