"""Server-side inference sessions: one KV cache per open session, bounded in memory and idle time."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from transformers import DynamicCache

from .errors import CapacityError, SequenceTooLongError


@dataclass
class Session:
    """One client's generation state on this node."""

    session_id: str
    start: int
    end: int
    embed: bool
    head: bool
    max_length: int
    batch_size: int
    reserved_bytes: int
    cache: DynamicCache = field(default_factory=DynamicCache)
    length: int = 0
    steps: int = 0
    last_used: float = field(default_factory=time.monotonic)

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.max_length:
            raise SequenceTooLongError(
                f"Session {self.session_id} would hold {self.length + new_tokens} tokens but was opened with "
                f"max_length={self.max_length}; open a session with a larger max_length.")


class SessionManager:
    """Admits sessions while their reserved KV-cache bytes fit ``max_cache_bytes``."""

    def __init__(self, max_cache_bytes: int, bytes_per_token: int, max_length: int):
        self.max_cache_bytes = max_cache_bytes
        self.bytes_per_token = bytes_per_token
        self.max_length = max_length
        self.sessions: dict[str, Session] = {}

    @property
    def reserved_bytes(self) -> int:
        return sum(s.reserved_bytes for s in self.sessions.values())

    def open(self, session_id: str, *, start: int, end: int, embed: bool, head: bool, batch_size: int,
             max_length: int) -> Session:
        """Raises SequenceTooLongError over the node's length limit, CapacityError when memory is reserved."""
        if max_length > self.max_length:
            raise SequenceTooLongError(f"max_length={max_length} exceeds this node's limit of {self.max_length} tokens.")
        layers = end - start
        need = self.bytes_per_token * layers * batch_size * max_length
        if self.reserved_bytes + need > self.max_cache_bytes:
            raise CapacityError(
                f"KV cache full: the session needs {need} bytes, {self.max_cache_bytes - self.reserved_bytes} of "
                f"{self.max_cache_bytes} are free. Retry later, use a smaller batch/max_length, or another node.")
        session = Session(session_id, start, end, embed, head, max_length, batch_size, need)
        self.sessions[session_id] = session
        return session

    def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)
