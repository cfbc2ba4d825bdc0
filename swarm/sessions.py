"""Server-side inference sessions: one KV cache per open session, bounded in memory and idle time.

KV-cache bytes are charged as used: opening a session costs nothing up front (its ``max_length`` is only a bound on
its own length), and each step is charged the bytes its new tokens add before it runs. A step is refused with a typed
:class:`CapacityError` when it would take the node's cache past ``max_cache_bytes``, or its client's sessions past
``max_client_bytes``; a client may hold at most ``max_client_sessions`` sessions open at once. So one client cannot
reserve the cache away from others with a few tiny sessions that name a huge ``max_length`` (issue 10, req. 4).
"""

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
    client: str = ""
    """Who opened it (see :mod:`swarm.quotas`); its bytes count against this client's quota."""
    charged_bytes: int = 0
    """KV-cache bytes charged so far: the tokens its steps appended (or are appending)."""
    cache: DynamicCache = field(default_factory=DynamicCache)
    length: int = 0
    steps: int = 0
    busy: bool = False
    """A step is running; another step of the same session is refused until it ends."""
    last_used: float = field(default_factory=time.monotonic)

    def check_room(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.max_length:
            raise SequenceTooLongError(
                f"Session {self.session_id} would hold {self.length + new_tokens} tokens but was opened with "
                f"max_length={self.max_length}; open a session with a larger max_length.")


class SessionManager:
    """Holds the node's sessions and charges their KV-cache bytes as tokens are appended.

    Args:
        max_cache_bytes: KV-cache bytes all sessions may hold together.
        bytes_per_token: cache bytes one token adds per layer and batch row (keys and values).
        max_length: the longest session this node admits.
        max_client_bytes: KV-cache bytes one client's sessions may hold together (default: ``max_cache_bytes``).
        max_client_sessions: sessions one client may hold open at once (default: unbounded).
    """

    def __init__(self, max_cache_bytes: int, bytes_per_token: int, max_length: int, *,
                 max_client_bytes: int | None = None, max_client_sessions: int | None = None):
        self.max_cache_bytes = max_cache_bytes
        self.bytes_per_token = bytes_per_token
        self.max_length = max_length
        self.max_client_bytes = max_cache_bytes if max_client_bytes is None else max_client_bytes
        self.max_client_sessions = max_client_sessions
        self.sessions: dict[str, Session] = {}

    @property
    def used_bytes(self) -> int:
        return sum(s.charged_bytes for s in self.sessions.values())

    def client_bytes(self, client: str) -> int:
        return sum(s.charged_bytes for s in self.sessions.values() if s.client == client)

    def client_sessions(self, client: str) -> int:
        return sum(1 for s in self.sessions.values() if s.client == client)

    def open(self, session_id: str, *, start: int, end: int, embed: bool, head: bool, batch_size: int,
             max_length: int, client: str = "") -> Session:
        """Admit a session; it holds no cache bytes until its first step is charged (:meth:`charge`).

        Raises:
            SequenceTooLongError: ``max_length`` is over the node's limit.
            CapacityError: ``client`` already holds ``max_client_sessions`` sessions open here.
        """
        if max_length > self.max_length:
            raise SequenceTooLongError(f"max_length={max_length} exceeds this node's limit of {self.max_length} tokens.")
        if self.max_client_sessions is not None and self.client_sessions(client) >= self.max_client_sessions:
            raise CapacityError(
                f"Too many sessions: this client holds {self.client_sessions(client)} open on this node, the limit "
                f"(--max-client-sessions) is {self.max_client_sessions}. Close finished sessions (idle ones expire), "
                f"or use another node.")
        session = Session(session_id, start, end, embed, head, max_length, batch_size, client)
        self.sessions[session_id] = session
        return session

    def step_bytes(self, session: Session, new_tokens: int) -> int:
        """The cache bytes ``new_tokens`` more tokens add to ``session``."""
        return self.bytes_per_token * (session.end - session.start) * session.batch_size * new_tokens

    def charge(self, session: Session, new_tokens: int) -> None:
        """Charge the bytes of ``new_tokens`` more tokens to ``session`` before its step runs.

        Raises:
            CapacityError: the step would take the client's sessions past ``max_client_bytes`` or the node's cache
                past ``max_cache_bytes``; nothing is charged.
        """
        need = self.step_bytes(session, new_tokens)
        mine = self.client_bytes(session.client)
        if mine + need > self.max_client_bytes:
            raise CapacityError(
                f"KV-cache quota reached: this step needs {need} bytes, this client's sessions hold {mine} of the "
                f"{self.max_client_bytes} one client may hold on this node (--max-client-cache-bytes). Close "
                f"finished sessions, use a smaller batch or shorter generations, or another node.")
        used = self.used_bytes
        if used + need > self.max_cache_bytes:
            raise CapacityError(
                f"KV cache full: this step needs {need} bytes, {self.max_cache_bytes - used} of {self.max_cache_bytes} "
                f"are free (--max-cache-bytes). Retry later, use a smaller batch, or another node.")
        session.charged_bytes += need

    def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)
