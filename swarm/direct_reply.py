"""Answers straight to the client: the last hop of a chained forward (or of a chained generation step,
:mod:`swarm.chained_session`) hands its answer to the client over one link.

Relaying the answer back through the chain (node 3 → node 2 → node 1 → client) costs one link per hop, each node
reading the whole frame before sending it on. Instead the client names itself in the request (``meta['reply_to']``,
its peer id) and, while the chain runs, opens a *collect* stream to the route's last node (handle
:data:`swarm.handles.COLLECT`, ``meta['request_id']``). The last node puts its encoded answer in its
:class:`Mailbox`; the collect stream takes it from there, and every node of the chain answers its caller with a small
acknowledgement (``{"direct": true}``) instead of the answer. The client dials the last node itself, so this works
for a client that cannot be dialled (NAT, ``client_mode``) and its bytes cross the client's link, not a node's.

Why a mailbox rather than a push: the collect stream and the answer may arrive in either order; the mailbox holds
whichever comes first. Only the peer named in ``reply_to`` may collect (the collect stream's authenticated caller
must be that peer), and only with the request id the answer was computed for; ``reply_to`` must name the client the
request is from. The mailbox is bounded in bytes (in all and per client: ``--max-mailbox-bytes``,
``--max-client-mailbox-bytes``), in entries and in time (``--mailbox-hold-s``); an answer that does not fit is refused
with :class:`~swarm.errors.MailboxFullError`, which reaches the client as that type.

The answer must carry what the relay used to add on its way back (each hop's ``compute_s``, its commitment, the
node → node bytes): each chained hop passes them *forward* in ``meta['upstream']`` and the last hop merges them into
its answer, so the client has them as soon as the answer arrives. The acknowledgements (~100 bytes per hop) travel
after it and are not counted in ``node_bytes``.

Errors still travel the chain: a hop that fails answers its caller with an error frame, relayed back to the client as
its typed error, and the client drops its collect stream. Requests that ask for gradients keep the relay: their
backward runs hop by hop on the answer's way back (:mod:`swarm.span_grad`), so a node in grad mode does not pass
``reply_to`` on and the last node answers through the chain.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field

from .commitments import parse as parse_commitments, request_id_of
from .errors import BadRequestError, MailboxFullError, OverloadedError, PeerBusyError
from .wire import MAX_STRIPES

logger = logging.getLogger(__name__)

MAX_PEER_ID_CHARS = 128


@dataclass
class _Slot:
    future: asyncio.Future
    count: int | None = None
    """The answer's collect streams (the client reads it striped over that many), as its first collector said."""
    served: set[int] = field(default_factory=set)
    waiting: int = 0
    nbytes: int = 0
    expiry: asyncio.TimerHandle | None = None


@dataclass
class Mailbox:
    """Answers waiting for their collectors, and collectors waiting for their answer, by ``(peer, request_id)``.

    The client may read one answer striped over several collect streams (``index`` of ``count``,
    :func:`swarm.wire.stripe`); the answer is kept until each has taken it, or for ``hold_s``.

    Bounded before anything is held, against clients that send answers nobody collects or open collect streams
    for answers that never come: answer bytes in all (``max_bytes``) and per peer (``max_peer_bytes``), answers
    and collectors waiting per peer (``max_per_peer``) and in all (``max_slots``). An answer past a bound is refused
    with :class:`MailboxFullError`, which travels back along the chain to the client as that type (not relayed in
    silence: the client learns why its answer took the slow path, or sets ``direct_reply=False`` itself); a collector
    past one with :class:`OverloadedError`. A collector waits at most its ``timeout_s``, an answer ``hold_s``."""

    max_bytes: int = 1 << 30
    """Most answer bytes held at once (``--max-mailbox-bytes``)."""
    max_peer_bytes: int = 256 << 20
    """Most answer bytes held at once for one peer (``--max-client-mailbox-bytes``)."""
    hold_s: float = 30.0
    """An answer not fully collected is dropped after this long (``--mailbox-hold-s``)."""
    max_per_peer: int = 16
    """Most answers (held, or awaited by a collector) one peer may have here at once."""
    max_slots: int = 4096
    """Most answers (held or awaited) for all peers together: peer ids are free to mint."""
    _slots: dict[tuple[str, str], _Slot] = field(default_factory=dict)
    _peers: dict[str, list[int]] = field(default_factory=dict)
    """Peer -> [slots, bytes held]."""
    held_bytes: int = 0

    def room_for(self, peer: str, nbytes: int) -> None:
        """Refuse early (before the answer is encoded) an answer of at least ``nbytes`` for ``peer`` that cannot fit.

        Raises:
            MailboxFullError: ``nbytes`` does not fit next to the answers held now.
        """
        error = self._no_room(peer, nbytes, (peer, None))
        if error is not None:
            raise error

    def deliver(self, peer: str, request_id: str, messages: list, nbytes: int) -> None:
        """Hand an answer's ``messages`` (``nbytes`` in all) to ``peer``'s collectors of ``request_id``, now or when
        they come.

        Raises:
            BadRequestError: ``request_id`` was answered here already (a request id names one request).
            MailboxFullError: the answer does not fit (see the class); collectors already waiting for it get the
                same error at once (never a wait until their timeout).
        """
        key = (peer, request_id)
        slot = self._slots.get(key)
        if slot is not None and slot.future.done():
            raise BadRequestError(f"Request {request_id!r} was answered on this node already; a request id names one "
                                  f"request.")
        error = self._no_room(peer, nbytes, key)
        if error is not None:
            if slot is not None:
                self._forget(key, slot)
                slot.future.set_exception(error)
                slot.future.exception()  # retrieved: no "never retrieved" log when nobody waits any more
            logger.warning("Refused a direct answer of %d bytes to %s: %s", nbytes, peer, error)
            raise error
        loop = asyncio.get_running_loop()
        if slot is None:
            slot = self._open(key)
        slot.future.set_result(messages)
        slot.nbytes = nbytes
        self.held_bytes += nbytes
        self._peers[peer][1] += nbytes
        slot.expiry = loop.call_later(self.hold_s, self._drop, key, slot)

    async def collect(self, peer: str, request_id: str, index: int, count: int, timeout_s: float) -> list:
        """The answer's messages for ``peer``'s ``request_id`` (collect stream ``index`` of ``count``), waiting up
        to ``timeout_s`` for it.

        Raises:
            BadRequestError: no request id, or a second collector of the same stripe.
            OverloadedError: ``peer`` already has :attr:`max_per_peer` answers here, or all peers :attr:`max_slots`.
            MailboxFullError: the answer came but could not be held.
            PeerBusyError: no answer within ``timeout_s``.
        """
        if not request_id:
            raise BadRequestError("A collect stream needs meta['request_id'] (the chained forward's request id).")
        key = (peer, request_id)
        slot = self._slots.get(key)
        if slot is None:
            waiting = self._peers.get(peer, [0, 0])[0]
            if waiting >= self.max_per_peer:
                raise OverloadedError(f"This client already has {waiting} answers waiting or awaited on this node (at "
                                      f"most {self.max_per_peer}); collect those first.")
            if len(self._slots) >= self.max_slots:
                raise OverloadedError(f"This node already holds {len(self._slots)} answers waiting or awaited (at most "
                                      f"{self.max_slots}); retry later.")
            slot = self._open(key, count)
        if slot.count is None:
            slot.count = count
        if index in slot.served or count != slot.count:
            raise BadRequestError(f"Collect stream {index} of request {request_id!r} is open already, or its count "
                                  f"({count}) differs from its first collector's ({slot.count}).")
        slot.served.add(index)
        slot.waiting += 1
        try:
            messages = await asyncio.wait_for(asyncio.shield(slot.future), timeout_s)
        except asyncio.TimeoutError:
            raise PeerBusyError(f"No answer to request {request_id!r} reached this node within {timeout_s:.0f} s; "
                                f"the chain before it is slow or failed (its error reaches you on the chain).") from None
        finally:
            slot.waiting -= 1
            if not slot.future.done() and slot.waiting == 0:
                self._forget(key, slot)  # every collector gave up before the answer came
        if len(slot.served) == slot.count and slot.waiting == 0:
            self._forget(key, slot)
        return messages

    def _no_room(self, peer: str, nbytes: int, key) -> MailboxFullError | None:
        slots, peer_bytes = self._peers.get(peer, [0, 0])
        if nbytes > min(self.max_bytes, self.max_peer_bytes):
            why = (f"an answer of {nbytes} bytes is larger than this node's mailbox ({self.max_bytes} bytes, "
                   f"--max-mailbox-bytes; {self.max_peer_bytes} per client, --max-client-mailbox-bytes)")
        elif self.held_bytes + nbytes > self.max_bytes:
            why = (f"this node's mailbox holds {self.held_bytes} of its {self.max_bytes} bytes (--max-mailbox-bytes) "
                   f"in answers not yet collected, and this answer needs {nbytes}")
        elif peer_bytes + nbytes > self.max_peer_bytes:
            why = (f"this client's answers not yet collected hold {peer_bytes} of its {self.max_peer_bytes} bytes "
                   f"here (--max-client-mailbox-bytes), and this answer needs {nbytes}; collect them first")
        elif key not in self._slots and (slots >= self.max_per_peer or len(self._slots) >= self.max_slots):
            why = (f"this client has {slots} answers waiting here (at most {self.max_per_peer}), or all clients "
                   f"{len(self._slots)} (at most {self.max_slots})")
        else:
            return None
        return MailboxFullError(f"Cannot hold the direct answer: {why}. Retry later, ask for fewer outputs "
                                f"(return_outputs='last'), or relay answers through the chain "
                                f"(ClientConfig(direct_reply=False)).")

    def _open(self, key, count: int | None = None) -> _Slot:
        slot = self._slots[key] = _Slot(asyncio.get_running_loop().create_future(), count)
        self._peers.setdefault(key[0], [0, 0])[0] += 1
        return slot

    def _forget(self, key, slot: _Slot) -> None:
        if self._slots.get(key) is slot:
            del self._slots[key]
            self.held_bytes -= slot.nbytes
            peer = self._peers[key[0]]
            peer[0] -= 1
            peer[1] -= slot.nbytes
            if peer[0] == 0:
                del self._peers[key[0]]
            if slot.expiry is not None:
                slot.expiry.cancel()

    def _drop(self, key, slot: _Slot) -> None:
        if self._slots.get(key) is slot:
            logger.info("Dropping an answer to %s not collected within %.0f s", key[0], self.hold_s)
            self._forget(key, slot)


def stripe_of(meta: dict) -> tuple[int, int]:
    """``(index, count)`` of a collect stream (``meta['stripe']``, ``meta['of']``; default ``(0, 1)``)."""
    index, count = meta.get("stripe", 0), meta.get("of", 1)
    if not isinstance(index, int) or not isinstance(count, int) or not 0 <= index < count <= MAX_STRIPES:
        raise BadRequestError(f"meta['stripe'] and meta['of'] must be integers with 0 <= stripe < of <= "
                              f"{MAX_STRIPES}.")
    return index, count


def reply_to_of(meta: dict, client: str) -> str | None:
    """The peer id a chained forward's answer goes to (None: relay it), checked before any work: it must be the
    client the request is from (``client``, :func:`swarm.quotas.client_identity`: the caller, or the first origin a
    chain names), so nobody can park answers under another peer's share of the mailbox, and it needs a request id
    (the collect stream's key).

    Raises:
        BadRequestError: malformed, not the request's client, or without ``meta['request_id']``.
    """
    value = meta.get("reply_to")
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PEER_ID_CHARS:
        raise BadRequestError(f"meta['reply_to'] must be a peer id (a string of at most {MAX_PEER_ID_CHARS} "
                              f"characters).")
    if value != client.split("<", 1)[0]:
        raise BadRequestError("meta['reply_to'] must be the peer id of the client that sends the request (it collects "
                              "the answer itself).")
    if not request_id_of(meta):
        raise BadRequestError("meta['reply_to'] needs meta['request_id'] (the collect stream asks for the answer by it).")
    return value


def upstream_of(meta: dict, max_chain: int) -> dict:
    """The earlier hops' stats passed forward (``compute_s``, ``read_s``, ``commitments``, ``node_bytes``), checked
    field by field: anything malformed is dropped, never trusted (they are statistics for the client, nothing computes
    on them)."""
    value = meta.get("upstream")
    if not isinstance(value, dict):
        return {"compute_s": {}, "read_s": {}, "commitments": [], "node_bytes": 0}
    node_bytes = value.get("node_bytes")
    if not isinstance(node_bytes, int) or isinstance(node_bytes, bool) or node_bytes < 0:
        node_bytes = 0
    return {"compute_s": seconds_by_peer(value.get("compute_s"), max_chain + 1),
            "read_s": seconds_by_peer(value.get("read_s"), max_chain + 1),
            "commitments": parse_commitments(value.get("commitments"), max_chain + 1), "node_bytes": node_bytes}


def seconds_by_peer(value, limit: int) -> dict[str, float]:
    """A ``{peer id: seconds}`` statistic from another node, its first ``limit`` well-formed entries (else empty)."""
    out: dict[str, float] = {}
    if isinstance(value, dict):
        for peer, seconds in list(value.items())[:limit]:
            if isinstance(peer, str) and len(peer) <= MAX_PEER_ID_CHARS and isinstance(seconds, (int, float)) \
                    and not isinstance(seconds, bool) and math.isfinite(seconds):
                out[peer] = float(seconds)
    return out


def merged(upstream: dict, stats: dict, received: int) -> dict:
    """This hop's stats after the earlier hops' (``received``: node → node bytes of this hop's own request)."""
    return {"compute_s": {**upstream["compute_s"], **stats["compute_s"]},
            "read_s": {**upstream.get("read_s", {}), **stats.get("read_s", {})},
            "commitments": upstream["commitments"] + stats.get("commitments", []),
            "node_bytes": upstream["node_bytes"] + received}
