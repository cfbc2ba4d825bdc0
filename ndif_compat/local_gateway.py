"""Start a real ``swarm-gateway serve`` process on this machine and always clean it up (tests, benchmarks)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatewayProcess:
    """``swarm-gateway serve <args>`` on 127.0.0.1 (its own process group); :meth:`close` ends it, and its workers
    follow it. ``url`` is set once it serves.

    Raises:
        RuntimeError: the gateway exited or was not ready within ``timeout_s`` (its log tail is in the message).
    """

    def __init__(self, workdir: Path, *args: str, timeout_s: float = 300.0):
        self.ready = workdir / f"gateway-{time.monotonic_ns()}.ready.json"
        self.log_path = self.ready.with_suffix(".log")
        cmd = [sys.executable, "-m", "ndif_compat.cli", "serve", "--host", "127.0.0.1", "--port", str(free_port()),
               "--ready-file", str(self.ready), *args]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"gateway not ready:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        self.url = json.loads(self.ready.read_text())["url"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        """SIGTERM (the gateway stops its workers), then SIGKILL to the group."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=10)

    def __enter__(self) -> "GatewayProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
