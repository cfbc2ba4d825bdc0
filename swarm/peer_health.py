"""What a client knows about each peer beyond its record: dead, busy, distrusted or trusted, and what routing weighs.

- *Dead* (missed a ping, broken connection): excluded for ``ban_s``, doubled per failure in a row (up to
  ``max_ban_s``); a ping answer restarts the count.
- *Busy* (:class:`PeerBusyError`, :class:`OverloadedError`): not excluded; counts ``busy_load`` more for ``busy_s``.
- *Distrusted* (its info contradicts its record, or it refused layers it announced): excluded for
  ``refusal_ban_s``; pings do not lift it.
- *Trusted* (this client used its answers): routing prefers it over nodes without history (``untrusted_factor``).
- Each client draws its own route-cost factor per peer in ``[1, 1 + route_jitter]``, spreading near-equal routes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from .errors import OverloadedError, PeerBusyError, PeerUnreachableError
from .records import ServerRecord
from .routing import RouteCosts

logger = logging.getLogger(__name__)


class PeerHealth:
    """Per-peer state and the decisions made from it (a base of :class:`swarm.remote_sequence.RemoteSequence`)."""

    def __init__(self, config, stats):
        self.config = config
        """A :class:`swarm.remote_sequence.ClientConfig`."""
        self.stats = stats
        """A :class:`swarm.remote_sequence.RouteStats` (``distrusted`` is appended to)."""
        self._records: list[ServerRecord] = []
        self._latency_s: dict[str, float] = {}
        self._banned: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        """Peer id -> liveness failures in a row (the exclusion doubles with each)."""
        self._load: dict[str, float] = {}
        """Peer id -> load seen in its last ping answer (fresher than its DHT record)."""
        self._busy: dict[str, float] = {}
        """Peer id -> until when it counts as busy (``time.monotonic()``)."""
        self._distrusted: dict[str, float] = {}
        """Peer id -> until when it is excluded for a false claim (``time.monotonic()``)."""
        self._trusted: set[str] = set()
        """Peers whose answers this client has used."""
        self._rng = random.Random()
        self._jitter: dict[str, float] = {}
        self._suspects: dict[str, int] = {}
        """Peer id -> distinct clients whose signed suspect reports name it (read with the records)."""

    def distrust(self, peer_id: str, why: str) -> None:
        """Exclude ``peer_id`` for ``refusal_ban_s``: it does not serve what it announces."""
        logger.warning("Excluding peer %s for %.0f s: %s", peer_id, self.config.refusal_ban_s, why)
        self._distrusted[peer_id] = time.monotonic() + self.config.refusal_ban_s
        self._trusted.discard(peer_id)
        self.stats.distrusted.append(peer_id)

    def ban(self, peer_id: str) -> None:
        """``peer_id`` failed liveness: exclude it for ``ban_s``, doubled for each failure in a row before."""
        failures = self._failures.get(peer_id, 0)
        self._failures[peer_id] = failures + 1
        exclusion_s = min(self.config.ban_s * 2 ** min(failures, 16), max(self.config.max_ban_s, self.config.ban_s))
        self._banned[peer_id] = time.monotonic() + exclusion_s

    def mark_busy(self, peer_id: str) -> None:
        """``peer_id`` answers pings but did not finish a call in time: route around it for ``busy_s`` where a
        replica can take its layers, without excluding it."""
        self._busy[peer_id] = time.monotonic() + self.config.busy_s

    def note_failure(self, peer_id: str, error: PeerUnreachableError | OverloadedError) -> None:
        """Slow or dead: a :class:`PeerBusyError` or :class:`OverloadedError` marks the peer busy; any other failure
        excludes it (:meth:`ban`)."""
        if isinstance(error, (PeerBusyError, OverloadedError)):
            self.mark_busy(peer_id)
        else:
            self.ban(peer_id)

    def saw_alive(self, peer_id: str, info: dict | None = None) -> None:
        """``peer_id`` answered a ping (``info`` is its answer): its failure count restarts; note its load."""
        self._failures.pop(peer_id, None)
        load = (info or {}).get("load")
        if isinstance(load, (int, float)) and not isinstance(load, bool) and load >= 0:
            self._load[peer_id] = float(load)

    async def overload_backoff(self, error: Exception, next_peer: str, retries: int) -> None:
        """After ``error``: if it was an overload and the new route goes to a peer that counts as busy too (no idle
        replica to take the layers), wait ``overload_backoff_s * 2 ** (retries - 1)`` (at most 4 s, jittered so
        refused callers do not come back together) first."""
        if isinstance(error, OverloadedError) and self._busy.get(next_peer, 0.0) > time.monotonic():
            delay_s = min(self.config.overload_backoff_s * 2 ** max(retries - 1, 0), 4.0)
            await asyncio.sleep(delay_s * random.uniform(0.5, 1.5))

    async def _backoff(self, retries: int) -> None:
        """Wait ``overload_backoff_s * 2 ** (retries - 1)`` (at most 4 s), jittered."""
        delay_s = min(self.config.overload_backoff_s * 2 ** max(retries - 1, 0), 4.0)
        await asyncio.sleep(delay_s * random.uniform(0.5, 1.5))

    def excluded(self) -> frozenset[str]:
        now = time.monotonic()
        return frozenset(p for bans in (self._banned, self._distrusted) for p, until in bans.items() if until > now)

    def costs(self) -> RouteCosts:
        """What routing weighs beyond the records: latency, fresher load, trust, this client's jitter per node."""
        for record in self._records:
            if record.peer_id not in self._jitter:
                self._jitter[record.peer_id] = self._rng.uniform(1.0, 1.0 + self.config.route_jitter)
        return RouteCosts(latency_s=dict(self._latency_s), load=self.loads(), trusted=frozenset(self._trusted),
                          jitter=dict(self._jitter), hop_s=self.config.hop_s,
                          untrusted_factor=self.config.untrusted_factor, suspects=dict(self._suspects),
                          suspect_weight=self.config.suspect_weight)

    def loads(self) -> dict[str, float]:
        """The load to route with, per peer where known better than its record: the last ping's, plus
        ``busy_load`` while it counts as busy."""
        now = time.monotonic()
        out = dict(self._load)
        for peer_id, until in self._busy.items():
            if until > now:
                out[peer_id] = out.get(peer_id, 0.0) + self.config.busy_load
        return out
