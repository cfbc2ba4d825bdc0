"""A request's wall-time limit, enforced inside long Python work too (issue 10, req. 3).

The interpreter checks its wall-time limit between ops, and the pre-run check bounds every op's size (so no single
tensor op can run long); but decoding a huge graph, validating it or a long run of cheap ops is Python code that
only checks between steps, if at all. :data:`WATCHDOG` covers those: code run under
``with WATCHDOG.guard(deadline, limit_s):`` gets :class:`WallTimeExceededError` raised *in its thread* (between
Python bytecodes, via ``PyThreadState_SetAsyncExc``) within ``tick_s`` of the deadline. A C call that never returns
to Python (one tensor op) is not interrupted: its size was checked before it ran.

The guard is only ever held around hybrid code on the node's compute thread (never around the model's own layers,
the KV cache or the session store), so the exception unwinds through code that owns nothing shared.
"""

from __future__ import annotations

import ctypes
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from .errors import LimitExceededError


class WallTimeExceededError(LimitExceededError):
    """The request ran past its wall-time limit on this node (raised by the watchdog inside long work)."""

    def __init__(self, message: str = "The request ran past its wall-time limit on this node; send less work "
                                      "per request or raise limits.max_wall_s within the node's cap.") -> None:
        super().__init__(message)


def _raise_in(thread_id: int, exc_type: type[BaseException] | None) -> None:
    """Schedule ``exc_type`` in thread ``thread_id`` (None clears one scheduled and not yet raised)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(exc_type) if exc_type is not None else None)


class Watchdog:
    """One daemon thread that interrupts guarded threads past their deadline.

    Args:
        tick_s: how often it looks while anything is guarded (the margin past a deadline).
    """

    def __init__(self, tick_s: float = 0.02) -> None:
        self.tick_s = tick_s
        self._deadlines: dict[int, float] = {}  # thread id -> monotonic deadline
        self._fired: set[int] = set()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.fired = 0
        """How many times it interrupted a thread (for tests and logs)."""

    @contextmanager
    def guard(self, deadline: float, limit_s: float) -> Iterator[None]:
        """Run the block with the calling thread interrupted at ``deadline`` (``time.monotonic()``).

        Raises:
            LimitExceededError: the block was still running at the deadline (the message names ``limit_s``).
        """
        me = threading.get_ident()
        with self._cond:
            if me in self._deadlines:  # nested: the outer guard's deadline holds
                outer = True
            else:
                outer = False
                self._deadlines[me] = deadline
                if self._thread is None:
                    self._thread = threading.Thread(target=self._watch, name="hybrid-watchdog", daemon=True)
                    self._thread.start()
                self._cond.notify()
        if outer:
            yield
            return
        try:
            yield
        except WallTimeExceededError:
            raise WallTimeExceededError(f"The request ran past its wall-time limit of {limit_s} s on this node "
                                        f"(interrupted inside its work); send less work per request.") from None
        finally:
            with self._cond:
                del self._deadlines[me]
                fired = me in self._fired
                self._fired.discard(me)
            if fired:
                _raise_in(me, None)  # the interrupt may still be pending: never let it escape the guard late

    def _watch(self) -> None:
        while True:
            with self._cond:
                while not self._deadlines:
                    self._cond.wait()
                now = time.monotonic()
                for thread_id, deadline in self._deadlines.items():
                    if now >= deadline and thread_id not in self._fired:
                        self._fired.add(thread_id)
                        self.fired += 1
                        _raise_in(thread_id, WallTimeExceededError)
            time.sleep(self.tick_s)


#: The watchdog of this process (a node's compute threads share it).
WATCHDOG = Watchdog()
