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

from swarm.errors import CapacityError

from .errors import LimitExceededError, SessionValueError


class SessionStore:
    """Thread-safe key → tensor store, bounded in bytes in all and per owner, entries dropped after ``ttl_s``.

    Every value is kept for an *owner* (the client that made it, :attr:`swarm.span_hook.HookContext.client`). A put
    past the owner's share (``max_owner_bytes``) or past the store's size (``max_bytes``) evicts the owner's own
    oldest values, never another owner's: if the owner's values cannot make room, the put is refused with
    :class:`~swarm.errors.CapacityError`. So one client's many puts cannot evict another client's values
    (issue 10, req. 4); see :mod:`swarm.quotas` for what an identity is and what minting many of them buys.
    """

    def __init__(self, max_bytes: int = 256 * 2**20, ttl_s: float = 600.0, max_owner_bytes: int | None = None):
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self.max_owner_bytes = max_bytes if max_owner_bytes is None else max_owner_bytes
        self._values: OrderedDict[str, tuple[torch.Tensor, float, str]] = OrderedDict()
        self._owner_bytes: dict[str, int] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def configure(self, *, max_bytes: int, max_owner_bytes: int) -> None:
        """Set the bounds (a node does once, from its ``--max-store-mb`` / ``--max-client-store-mb``)."""
        with self._lock:
            self.max_bytes, self.max_owner_bytes = max_bytes, max_owner_bytes

    @property
    def bytes(self) -> int:
        return self._bytes

    def owner_bytes(self, owner: str) -> int:
        return self._owner_bytes.get(owner, 0)

    def put(self, key: str, value: torch.Tensor, owner: str = "") -> None:
        """Keep ``value`` under ``key`` for ``owner``, evicting only ``owner``'s oldest values to make room.

        Raises:
            SessionValueError: ``value`` is not a tensor.
            LimitExceededError: the value alone is larger than one owner may keep.
            CapacityError: other owners' values fill the store; retry later (values expire) or elsewhere.
        """
        if not isinstance(value, torch.Tensor):
            raise SessionValueError(f"only tensors can be kept for a later trace; {key!r} is {type(value).__name__}")
        size = value.numel() * value.element_size()
        if size > min(self.max_bytes, self.max_owner_bytes):
            raise LimitExceededError(f"a session value of {size} bytes exceeds this node's store of "
                                     f"{min(self.max_bytes, self.max_owner_bytes)} bytes per client")
        with self._lock:
            self._expire()
            self._drop(key)
            mine = [k for k, (_, _, o) in self._values.items() if o == owner]  # oldest first
            while mine and (self.owner_bytes(owner) + size > self.max_owner_bytes or self._bytes + size > self.max_bytes):
                self._drop(mine.pop(0))
            if self._bytes + size > self.max_bytes:
                raise CapacityError(
                    f"This node's session store is full: {self._bytes} of {self.max_bytes} bytes are other clients' "
                    f"values, which a client never evicts. Retry the session later (values expire after "
                    f"{self.ttl_s:.0f} s), keep fewer or smaller values, or run it on another node.")
            self._values[key] = (value.detach().clone(), time.monotonic() + self.ttl_s, owner)
            self._bytes += size
            self._owner_bytes[owner] = self.owner_bytes(owner) + size

    def get(self, key: str) -> torch.Tensor:
        with self._lock:
            self._expire()
            if key not in self._values:
                raise SessionValueError(f"session value {key!r} is not held on this node (expired after "
                                        f"{self.ttl_s:.0f} s, evicted, or the node restarted); run the session again")
            return self._values[key][0]

    def _drop(self, key: str) -> None:
        entry = self._values.pop(key, None)
        if entry is None:
            return
        tensor, _, owner = entry
        size = tensor.numel() * tensor.element_size()
        self._bytes -= size
        left = self._owner_bytes.get(owner, 0) - size
        if left > 0:
            self._owner_bytes[owner] = left
        else:
            self._owner_bytes.pop(owner, None)

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, (_, until, _) in self._values.items() if until < now]:
            self._drop(key)


#: The store of this process (a node serves all its requests from one).
STORE = SessionStore()
