"""The harness: one trio nursery per run; every child is a subprocess in its own process group, started with a
readiness handshake (a ready file it writes, or a ``ready`` line on its stdout), watched while it should be
running, and killed with its whole group (SIGKILL) when it is stopped, when the run ends, or when anything fails.

    async with open_harness(workdir) as harness:
        node = await harness.spawn("node0", cmd, ready_file=workdir / "node0.ready.json")
        ...                                   # a watched child that dies raises DeploymentError into the run
    # every child is dead here, whatever happened
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import trio

from swarm.local_swarm import REPO

from .errors import DeploymentError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Child:
    """One child process of the run."""

    name: str
    process: trio.Process
    log_path: Path
    info: dict = field(default_factory=dict)
    """What the child reported when it became ready (its ready file, or its ``ready`` line)."""
    stopping: bool = False
    """Set before an intended stop, so its exit is not reported as a failure."""

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the child's whole process group (its DHT process and p2p daemon too); idempotent."""
        self.stopping = True
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def group_alive(self) -> bool:
        """Whether a live (non-zombie) process is left in the child's process group. The leader's exit does not
        mean its group is gone: a forked DHT process or p2p daemon may still be tearing down its memory."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                state, _ppid, pgid = stat.read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue                      # the process ended while we looked
            if int(pgid) == self.pid and state not in ("Z", "X"):
                return True
        return False


class Harness:
    """Starts, watches and kills the children of one run. Build it with :func:`open_harness`."""

    def __init__(self, nursery: trio.Nursery, workdir: Path):
        self.nursery = nursery
        self.workdir = workdir
        self.children: list[Child] = []

    async def spawn(self, name: str, cmd: list[str], *, ready_file: Path | None = None, env: dict | None = None,
                    timeout_s: float = 300.0, watch: bool = True, pipe_stdio: bool = False) -> Child:
        """Start ``cmd`` and wait until it is ready.

        Args:
            name: names the log file ``<workdir>/<name>.log`` and the child in errors.
            ready_file: the child writes it (atomically) once ready; its JSON becomes ``child.info``. Without it
                (and without ``pipe_stdio``) the child counts as ready once started.
            env: extra environment variables (``PYTHONPATH`` points at the repository unless given).
            watch: a child that exits before :meth:`stop` raises :class:`DeploymentError` into the run.
            pipe_stdio: stdin/stdout are pipes (workers speak JSON lines); stderr goes to the log.

        Raises:
            DeploymentError: the child exited before it was ready, or was not ready within ``timeout_s``
                (the message carries its log tail). The child is killed.
        """
        log_path = self.workdir / f"{name}.log"
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)   # a stale one (an earlier run in this workdir) is not readiness
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        with open(log_path, "wb") as log:
            process = await trio.lowlevel.open_process(
                cmd, stdin=subprocess.PIPE if pipe_stdio else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipe_stdio else log, stderr=log, env=full_env, cwd=REPO,
                start_new_session=True)
        child = Child(name, process, log_path)
        self.children.append(child)
        try:
            with trio.fail_after(timeout_s):
                while ready_file is not None and not ready_file.exists():
                    if process.poll() is not None:
                        raise DeploymentError(f"{name} exited with {process.returncode} before it was ready; "
                                              f"log {log_path}:\n{child.log_tail()}")
                    await trio.sleep(0.1)
        except trio.TooSlowError:
            child.kill()
            raise DeploymentError(f"{name} was not ready after {timeout_s:.0f} s; log {log_path}:\n"
                                  f"{child.log_tail()}") from None
        except BaseException:
            child.kill()
            raise
        if ready_file is not None:
            child.info = json.loads(ready_file.read_text())
        if watch:
            self.nursery.start_soon(self._watch, child)
        return child

    async def _watch(self, child: Child) -> None:
        code = await child.process.wait()
        if not child.stopping:
            raise DeploymentError(f"{child.name} (pid {child.pid}) died with exit code {code}; "
                                  f"log {child.log_path}:\n{child.log_tail()}")

    async def stop(self, child: Child) -> None:
        """Kill ``child`` (its whole group) and reap it."""
        await self.kill_and_reap([child])

    def kill_all(self) -> None:
        for child in self.children:
            child.kill()

    async def kill_and_reap(self, children: list[Child], timeout_s: float = 10.0) -> None:
        """Kill ``children`` (each its whole group) and wait up to ``timeout_s`` until every leader is reaped and
        every group is empty, shielded from cancellation so that it also reaps on the way out of a cancelled
        scope. The next measurement then starts on a machine the killed run no longer loads."""
        for child in children:
            child.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(timeout_s):
            for child in children:
                await child.process.wait()
            while any(child.group_alive() for child in children):
                await trio.sleep(0.05)


@asynccontextmanager
async def open_harness(workdir: Path) -> AsyncIterator[Harness]:
    """A harness whose nursery holds the run; on leaving (normally, on error or on cancel) every child is killed."""
    workdir.mkdir(parents=True, exist_ok=True)
    async with trio.open_nursery() as nursery:
        harness = Harness(nursery, workdir)
        try:
            yield harness
        finally:
            await harness.kill_and_reap(harness.children, timeout_s=10)
            nursery.cancel_scope.cancel()
