"""Start real ``swarm-node serve`` processes on this machine and always clean them up (demo, tests, benchmarks).

Each node runs in its own process group: SIGKILL to the group ends the node and its DHT process, and its p2p daemon
(in a session of its own, see :mod:`swarm.stop_signals`) dies with the DHT process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class NodeProcess:
    proc: subprocess.Popen
    ready_file: Path
    log_path: Path
    info: dict

    @property
    def maddrs(self) -> list[str]:
        return self.info["maddrs"]

    @property
    def peer_id(self) -> str:
        return self.info["peer_id"]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the node's whole process group (python, its DHT process and its p2p daemon)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        # children left behind by an abrupt kill
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class LocalSwarm:
    """A set of node processes on 127.0.0.1; :meth:`close` (or leaving the ``with`` block) kills every one."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.nodes: list[NodeProcess] = []

    def start(self, model: str | Path, *args: str, initial_peers: list[str] | None = None,
              timeout_s: float = 180.0, threads: int = 1, env: dict[str, str] | None = None) -> NodeProcess:
        """Start ``swarm-node serve`` with extra CLI ``args`` (and extra environment ``env``) and wait until it serves.

        Raises:
            RuntimeError: the node exited before it was ready (its log tail is in the message).
            TimeoutError: the node was not ready within ``timeout_s``.
        """
        index = len(self.nodes)
        ready = self.workdir / f"node{index}.ready.json"
        log_path = self.workdir / f"node{index}.log"
        ready.unlink(missing_ok=True)  # a file left by an earlier run in this directory is not this node's
        cmd = [sys.executable, "-m", "swarm.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
               "--num-threads", str(threads), "--ready-file", str(ready), "--announce-period", "2",
               "--record-ttl", "6", *args]
        cmd += ["--initial-peers", *initial_peers] if initial_peers else ["--new-swarm"]
        # the repo first, then whatever PYTHONPATH the caller runs with (an environment installed with --target)
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads), **(env or {})}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                    start_new_session=True)
        node = NodeProcess(proc, ready, log_path, {})
        self.nodes.append(node)
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"node {index} exited with {proc.returncode}:\n{node.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {index} not ready after {timeout_s} s:\n{node.log()[-4000:]}")
            time.sleep(0.1)
        node.info = json.loads(ready.read_text())
        return node

    @property
    def initial_peers(self) -> list[str]:
        return self.nodes[0].maddrs

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for node in self.nodes:
            node.kill(signal.SIGKILL)
