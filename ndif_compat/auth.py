"""API keys and per-key rate limits (token buckets)."""

from __future__ import annotations

import threading
import time

from .errors import RateLimitedError, UnauthorizedError


class KeyRing:
    """Checks a request's API key and charges its bucket: ``rate_per_minute`` tokens refill, ``burst`` at most.

    Without configured keys every client is accepted and buckets are per client address.
    """

    def __init__(self, keys: frozenset[str], rate_per_minute: float, burst: int):
        self.keys, self.rate_s, self.burst = keys, rate_per_minute / 60.0, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def identify(self, api_key: str | None, address: str) -> str:
        """The identity to charge. Raises :class:`UnauthorizedError` for a missing or unknown key."""
        if not self.keys:
            return f"addr:{address}"
        if not api_key:
            raise UnauthorizedError("this gateway needs an API key: set NDIF_API_KEY (header 'ndif-api-key').")
        if api_key not in self.keys:
            raise UnauthorizedError("unknown API key; ask the gateway operator for one.")
        return f"key:{api_key}"

    def charge(self, identity: str) -> None:
        """Take one token. Raises :class:`RateLimitedError` (with the wait) when the bucket is empty."""
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(identity, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate_s)
            if tokens < 1.0:
                wait = (1.0 - tokens) / self.rate_s if self.rate_s > 0 else float("inf")
                self._buckets[identity] = (tokens, now)
                raise RateLimitedError(f"rate limit: at most {self.rate_s * 60:g} requests per minute "
                                       f"(burst {self.burst}); retry in {wait:.1f} s.")
            self._buckets[identity] = (tokens - 1.0, now)
