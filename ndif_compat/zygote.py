"""The template process: loads the model once, seals its weights read-only, and forks one *cell* per request.

    python -m ndif_compat.zygote <control fd> <config JSON>     # started by ndif_compat.cells.CellPool

The gateway starts it with an empty environment (no API keys, nothing of the gateway's memory: it is a new
program, not a fork of the gateway). It never runs request code itself. Its life:

1. probe the sandbox (:func:`ndif_compat.sandbox.probe`; fail closed), load the backend
   (:class:`~ndif_compat.runtime.Runtime`, warmed up with one torch thread: OpenMP pools do not survive fork),
   seal the weights (:func:`~ndif_compat.sealed_weights.seal_weights`), answer ``ready``;
2. on each ``fork`` from the gateway: make a scratch directory, fork a cell with a fresh socket pair, and hand the
   gateway the cell's pid and its end of the socket (``SCM_RIGHTS``);
3. on ``kill``: SIGKILL that cell if it is still its child (pids are never signalled after they were reaped);
   reap cells, remove their scratch directories, and report each exit status (``exit``).

A cell (:func:`cell_main`) closes everything it inherited, enters the sandbox, reads one request from its socket,
runs it, sends the result or a typed error, and exits: no request ever sees the leftovers of another.
"""

from __future__ import annotations

import gc
import json
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import traceback
from pathlib import Path

from .channel import Channel
from .config import BackendSpec, ExecutionLimits
from .errors import ExecutionLimitError, GatewayError
from .sandbox import SandboxPolicy, enter, probe

CONTROL_MESSAGE_BYTES = 64 * 2**10
MAX_LOG_LINE = 4096


def send(control: socket.socket, kind: str, fds: tuple[int, ...] = (), **fields) -> None:
    data = json.dumps({"kind": kind, **fields}).encode()[:CONTROL_MESSAGE_BYTES]
    socket.send_fds(control, [data], list(fds)) if fds else control.send(data)


def main(argv: list[str]) -> int:
    control = socket.socket(fileno=int(argv[0]))
    config = json.loads(argv[1])
    spec = BackendSpec(**{**config["spec"], "model_path": Path(config["spec"]["model_path"]),
                          "initial_peers": tuple(config["spec"]["initial_peers"])})
    limits = ExecutionLimits(**config["limits"])
    scratch_root = Path(config["scratch_root"])
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)      # PR_SET_PDEATHSIG: end with the gateway
    try:
        probe(scratch_root)
        from .runtime import Runtime
        runtime = Runtime.load(spec, threads=1, brokered=spec.kind == "swarm")
        runtime.seal_weights()
        runtime.rehearse()
        gc.collect()
        gc.freeze()       # the template's objects are never scanned by a cell's collector: no copy-on-write storm
    except BaseException as e:
        detail = "" if isinstance(e, GatewayError) else f"\n{traceback.format_exc()[-3000:]}"
        send(control, "failed", name=type(e).__name__, error=f"{e}{detail}")
        return 1
    send(control, "ready", pid=os.getpid())
    cells: dict[int, Path] = {}
    while True:
        readable, _, _ = select.select([control], [], [], 0.05)
        if readable:
            data = control.recv(CONTROL_MESSAGE_BYTES)
            if not data:                                    # the gateway is gone
                for pid in cells:
                    os.kill(pid, signal.SIGKILL)
                return 0
            message = json.loads(data)
            if message["kind"] == "fork":
                scratch = Path(tempfile.mkdtemp(prefix="cell-", dir=scratch_root))
                mine, theirs = socket.socketpair()
                pid = os.fork()
                if pid == 0:                                 # the cell
                    code = 0
                    try:
                        mine.close()
                        cell_main(theirs.detach(), scratch, runtime, limits, spec.threads, control.fileno(),
                                  spec.model_path)
                    except BaseException:
                        code = 70
                    finally:
                        os._exit(code)
                theirs.close()
                cells[pid] = scratch
                send(control, "cell", (mine.fileno(),), pid=pid)
                mine.close()
            elif message["kind"] == "kill" and message.get("pid") in cells:
                os.kill(message["pid"], signal.SIGKILL)
        while cells:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            shutil.rmtree(cells.pop(pid, scratch_root / "none"), ignore_errors=True)
            send(control, "exit", pid=pid, status=os.waitstatus_to_exitcode(status))


def cell_main(fd: int, scratch: Path, runtime, limits: ExecutionLimits, threads: int, control_fd: int,
              model_path: Path) -> None:
    """One request in this freshly forked process, then return (the caller exits)."""
    os.close(control_fd)
    devnull = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(devnull, target)
    os.closerange(3, fd)
    os.closerange(fd + 1, 65536)
    channel = Channel(fd)
    try:
        enter(scratch, SandboxPolicy(max_file_bytes=limits.max_scratch_bytes, readable=(str(model_path),)))
        os.environ.clear()
        os.environ.update(HOME=str(scratch), TMPDIR=str(scratch))
        tempfile.tempdir = str(scratch)
        import torch
        torch.set_num_threads(threads)
        if runtime.calls is not None:              # the swarm backend: swarm calls go through the gateway
            from .broker import BrokerLink
            runtime.calls.link = BrokerLink(channel, limits.max_result_bytes)
        kind, meta, blob = channel.recv(max_body=limits.max_request_bytes)
        if kind != "run":
            return
        from .execution import decompress
        data = decompress(blob, bool(meta.get("compress")), limits.max_request_bytes)
        del blob
        log = lambda text: channel.send("log", {"text": str(text)[:MAX_LOG_LINE]})  # noqa: E731
        outcome, info = runtime.execute(data, bool(meta.get("compress")), str(meta.get("id", "")), log)
        if len(outcome.result) > limits.max_result_bytes:
            raise ExecutionLimitError(f"the result is {len(outcome.result)} bytes; this gateway returns at most "
                                      f"{limits.max_result_bytes}. Save less (a slice, a reduction).")
        channel.send("done", info, outcome.result)
    except GatewayError as e:
        channel.send("error", {"name": type(e).__name__, "text": str(e)})
    except BaseException as e:  # a bug of ours: still an answer
        channel.send("error", {"name": "GatewayError", "text": f"internal error: {type(e).__name__}: {e}"})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
