"""How a node's processes react to SIGINT and SIGTERM, so that it stops cleanly and leaves nothing behind.

A node is three processes: the main process (the CLI, the span server), its hivemind DHT process (forked) and the
p2p daemon ``p2pd`` that the DHT process starts. Ctrl-C in a terminal, ``timeout``, ``systemd stop`` and ``kill
-- -PGID`` signal the whole process group at once, and ``p2pd`` exits on SIGINT or SIGTERM by itself, so left alone
the daemon would be gone before the node could announce that it goes offline, and the DHT process (hivemind makes it
ignore SIGINT) would linger. The rules:

- The main process decides when the node stops (:class:`StopSignals`): the first signal asks it to stop (announce
  offline, shut the DHT down, exit 0); a second signal exits at once (status 128 + signal number).
- The DHT process ignores SIGINT and SIGTERM and dies with the main process (:func:`die_with_parent`): it is shut
  down by the main process, or killed by the kernel when the main process is gone, however it went.
- ``p2pd`` runs in a session of its own, out of reach of the node's process-group signals, and likewise dies with
  the DHT process that started it (:func:`detach_daemons`). So SIGKILL to the process group still ends all three.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_PR_SET_PDEATHSIG = 1


class StopRequested(BaseException):
    """A stop signal arrived before the node served (while it loaded or joined): unwind and exit 0.

    A ``BaseException`` like ``KeyboardInterrupt``, so no ``except Exception`` on the way swallows it.
    """


class StopSignals:
    """The main process's SIGINT/SIGTERM handlers: first a clean stop, then, on a second signal, exit at once.

    Install them (:meth:`install`) before any heavy work. Until :meth:`serving` is called a first signal raises
    :class:`StopRequested` where the program is (so a long load or a DHT join is abandoned at once); after it,
    the first signal sets the node's ``stop`` event and the node winds down in order.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        """The first stop signal's number, once one arrived."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def serving(self, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
        """From now on a first signal sets ``stop`` (on ``loop``) instead of raising."""
        self._loop, self._stop = loop, stop
        if self.received is not None:
            loop.call_soon_threadsafe(stop.set)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            os.write(2, f"{name} again: exiting now\n".encode())
            os._exit(128 + signum)  # the DHT process and p2pd die with this process (die_with_parent)
        self.received = signum
        if self._loop is None:
            raise StopRequested(name)
        os.write(2, f"{name}: stopping (announcing offline); send it again to exit at once\n".encode())
        self._loop.call_soon_threadsafe(self._stop.set)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when the thread that created it exits (Linux; a no-op
    elsewhere). Call it first thing in a child; if the parent is already gone, exit at once."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def ignore_stop_signals() -> None:
    """SIGINT and SIGTERM are ignored from now on (in a child whose parent decides when it stops)."""
    signal.set_wakeup_fd(-1)  # a forked child inherits the parent event loop's wake-up socket
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def detach_daemons() -> None:
    """In a DHT process: start the subprocesses that follow (hivemind's ``p2pd``) in a session of their own, so a
    signal to the node's process group does not reach them, and tie each one's life to this process.

    hivemind spawns ``p2pd`` with ``asyncio.subprocess.create_subprocess_exec`` and offers no hook for it; this
    wraps that function in this (the DHT) process only, which starts no other subprocess.
    """
    spawn = asyncio.subprocess.create_subprocess_exec

    async def detached(*args, **kwargs):
        kwargs.setdefault("start_new_session", True)
        kwargs.setdefault("preexec_fn", die_with_parent)
        return await spawn(*args, **kwargs)

    asyncio.subprocess.create_subprocess_exec = detached
