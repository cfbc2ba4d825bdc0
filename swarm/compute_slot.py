"""The node's one compute slot, granted round-robin over clients and handed over between layers.

Every job of the node's compute executor (parsing, a span's layers, serialising) runs while holding the slot, so one
job computes at a time, as with a single compute thread. But a long job does not hold it to the end: a span runs
layer by layer and, between two layers, :meth:`ComputeSlot.pass_on` hands the slot to a waiting job if there is one
(the next client in round-robin order) and queues for it again. So a request that holds the node for a long time
(a big batch, a replay of thousands of chunks) delays another client's request by about one layer per client ahead of
it, not by its whole length (issue 10, req. 4: long requests are preempted at layer boundaries).

Waiting jobs are grouped per client; the slot goes to the waiting client that held it least recently (a client that
never held it first, ties in arrival order), and within one client in arrival order. So a client's second queued job
does not run before another client's first, whatever their arrival order.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from contextlib import contextmanager
from typing import Iterator


class ComputeSlot:
    """A fair lock over the node's compute threads."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._holder: object | None = None
        self._waiting: OrderedDict[str, deque[object]] = OrderedDict()
        self._turn = 0
        self._last_turn: dict[str, int] = {}
        """Client -> the turn at which it last got the slot (pruned to recent clients)."""
        self.handovers = 0
        """How many times a job passed the slot to another between layers (for tests and logs)."""

    @property
    def waiting(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._waiting.values())

    @contextmanager
    def held(self, client: str) -> Iterator[None]:
        """Run the block holding the slot, queued behind other clients' jobs round-robin."""
        self.acquire(client)
        try:
            yield
        finally:
            self.release()

    def acquire(self, client: str) -> None:
        ticket = object()
        with self._cond:
            if self._holder is None and not self._waiting:
                self._holder = ticket
                self._took(client)
                return
            self._waiting.setdefault(client, deque()).append(ticket)
            try:
                while self._holder is not ticket:
                    self._cond.wait()
            except BaseException:
                if self._holder is ticket:
                    self._grant_next()
                else:
                    self._forget(client, ticket)
                raise

    def release(self) -> None:
        with self._cond:
            self._grant_next()

    def pass_on(self, client: str) -> None:
        """Between two layers: if another job waits, let it (the next client round-robin) run first, then wait for
        the slot again; otherwise go on at once."""
        with self._cond:
            if not self._waiting:
                return
            self.handovers += 1
            self._grant_next()
        self.acquire(client)

    def _grant_next(self) -> None:
        self._holder = None
        if not self._waiting:
            return
        client = min(self._waiting, key=lambda c: self._last_turn.get(c, -1))
        queue = self._waiting[client]
        self._holder = queue.popleft()
        if not queue:
            del self._waiting[client]
        self._took(client)
        self._cond.notify_all()

    def _took(self, client: str) -> None:
        self._last_turn[client] = self._turn
        self._turn += 1
        if len(self._last_turn) > 4096:  # forget clients not seen for long; they count as new (served first)
            self._last_turn = {c: t for c, t in self._last_turn.items() if t > self._turn - 1024 or c in self._waiting}

    def _forget(self, client: str, ticket: object) -> None:
        queue = self._waiting.get(client)
        if queue is not None and ticket in queue:
            queue.remove(ticket)
            if not queue:
                del self._waiting[client]
