"""Values the traces of one ``lm.session()`` leave on a node for a later trace of the same session.

A trace's request names, per node id, a key (``keep``); the node that computes the value stores it here instead of
sending it back. A later trace reads it with a ``load`` node pinned to that node. Keys carry the session's random id,
so only the session that made a value can name it. The store is bounded in bytes and in time; a value that is gone
is a :class:`~hybrid.errors.SessionValueError` (run the session again).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import torch

from .errors import LimitExceededError, SessionValueError


class SessionStore:
    """Thread-safe key → tensor store, oldest evicted first past ``max_bytes``, entries dropped after ``ttl_s``."""

    def __init__(self, max_bytes: int = 256 * 2**20, ttl_s: float = 600.0):
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self._values: OrderedDict[str, tuple[torch.Tensor, float]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t, _ in self._values.values())

    def put(self, key: str, value: torch.Tensor) -> None:
        if not isinstance(value, torch.Tensor):
            raise SessionValueError(f"only tensors can be kept for a later trace; {key!r} is {type(value).__name__}")
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            raise LimitExceededError(f"a session value of {size} bytes exceeds this node's store of {self.max_bytes}")
        with self._lock:
            self._expire()
            self._values.pop(key, None)
            while self._values and self.bytes + size > self.max_bytes:
                self._values.popitem(last=False)
            self._values[key] = (value.detach().clone(), time.monotonic() + self.ttl_s)

    def get(self, key: str) -> torch.Tensor:
        with self._lock:
            self._expire()
            if key not in self._values:
                raise SessionValueError(f"session value {key!r} is not held on this node (expired after "
                                        f"{self.ttl_s:.0f} s, evicted, or the node restarted); run the session again")
            return self._values[key][0]

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, (_, until) in self._values.items() if until < now]:
            del self._values[key]


#: The store of this process (a node serves all its requests from one).
STORE = SessionStore()
