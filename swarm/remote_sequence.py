"""The client's view of the swarm for one model: discovery, routing, forward/backward with failover.

Hidden states travel client → node → client → next node (as in Petals). When a call fails with
:class:`PeerUnreachableError`, the remaining layers are rerouted; errors the node *answered* with (bad input,
capacity) are raised to the caller unchanged.

Slow is not dead. A node that failed liveness (a missed ping, a broken connection) is excluded for ``ban_s``, twice
as long after each further failure (up to ``max_ban_s``), until it answers a ping again. A node that still answers
pings but did not finish in time (:class:`PeerBusyError`) is not excluded: it counts as loaded (``busy_load``) for
``busy_s``, so routes prefer its replicas while it catches up, and it is still used where it is the only one.
A node that answers :class:`OverloadedError` (its compute queue is full) is treated the same way: counted busy,
routed around where a replica exists, else retried after a backoff (``overload_backoff_s``, doubled per retry).

Claims are checked (:mod:`swarm.claims`). Before first use, a node's ``info`` answer must match its record (span,
stages, checkpoint hash). A call refused with a plain :class:`BadRequestError` (not a subclass: those are about the
request's payload, sizes or session) is probed with one well-formed token per hop:
a node that refuses the probe for layers it announced is *distrusted* (excluded for ``refusal_ban_s``, a ping does
not lift it) and the request is rerouted; if every hop takes the probe, the request itself was bad and the error is
raised. A chained forward refused with :class:`OverloadedError` is probed the same way to find the full node, which
is then routed around like any busy node. Nodes whose answers this client used are *trusted*: routing prefers them
(``untrusted_factor``), and each client draws its own cost ``jitter`` per node to spread near-equal routes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import operator
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from hivemind.dht import DHT
from hivemind.utils import get_dht_time
from hivemind.p2p import P2P

from ._loop import BackgroundLoop
from .claims import claim_mismatch, find_refusing_hop
from .commitments import parse as parse_commitments
from .errors import BadRequestError, MailboxFullError, MissingBlocksError, OverloadedError, PeerUnreachableError
from .peer_health import PeerHealth
from .records import SUSPECT_TTL_S, ServerRecord, records_with_expiration, suspect_reporters, suspects_key
from .routing import Hop, plan_route
from .handles import BACKWARD, COLLECT, FORWARD
from .transport import Traffic, call, ping
from .wire import STRIPE_BYTES
from .verification import plan_avoiding, should_check, spot_check, spot_check_chain

logger = logging.getLogger(__name__)

COMMITMENT_LOG = 4096
"""How many hops' commitments a client keeps (:attr:`RemoteSequence.commitments`)."""


@dataclass(frozen=True)
class ClientConfig:
    """How the client talks to the swarm."""

    request_timeout_s: float = 60.0
    """Deadline for one forward/backward call to one node."""
    step_timeout_s: float = 20.0
    """Deadline for one inference step on one node."""
    ping_timeout_s: float = 3.0
    """Deadline for measuring a node's latency."""
    records_max_age_s: float = 5.0
    """Re-read the DHT when the cached records are older than this."""
    ban_s: float = 60.0
    """A node that failed liveness is excluded for this long, doubled after each further failure."""
    max_ban_s: float = 600.0
    """The longest exclusion after repeated liveness failures."""
    busy_s: float = 30.0
    """A node that answered pings but not the call in time counts as busy for this long (not excluded)."""
    busy_load: float = 8.0
    """The load a busy node counts as when routing (a record's ``load`` is requests in flight plus sessions)."""
    max_retries: int = 5
    """Reroutes allowed within one call before giving up."""
    overload_backoff_s: float = 0.25
    """After an OverloadedError with no replica to go to, wait this long before retrying, doubled per retry."""
    liveness_s: float = 2.0
    """A call unanswered this long starts pinging the node; a missed ping marks it dead (see transport.call)."""
    refusal_ban_s: float = 600.0
    """A node whose info contradicts its record, or that refuses a probe of layers it announced, is excluded this
    long (pings do not lift it)."""
    untrusted_factor: float = 1.5
    """Route cost factor of a node whose answers this client has not used yet."""
    route_jitter: float = 0.3
    """Each node's route cost is scaled by a factor drawn once per client in ``[1, 1 + route_jitter]``."""
    hop_s: float = 0.02
    """Fixed route cost of one hop beyond its ping (so fewer hops win at similar latency)."""
    suspect_weight: float = 1.0
    """Each distinct client reporting a node as computing wrong numbers adds this to its route cost factor."""
    direct_reply: bool = True
    """Chained forwards: the last node's answer comes straight to this client over one link (the client opens a
    collect stream to it, see swarm/direct_reply.py) instead of back through every node of the route."""
    collect_streams: int = 8
    """Streams the direct answer is read over at once (swarm.wire.stripe: each new stream starts with a small
    flow-control window; at most swarm.wire.MAX_STRIPES)."""
    verify: float = 0.05
    """Share of hops recomputed on other nodes and compared (swarm/verification.py); 1.0 checks every hop, 0 none.
    Covers forwards, chained forwards (hybrid traces) and hop-by-hop inference steps; chained sessions' steps are not
    checked. A check costs nothing where no other node serves the hop's layers (it is skipped); its calls are counted
    in ``verify_traffic``, not ``traffic``."""


@dataclass
class RouteStats:
    """What the client observed (for benchmarks and the failover test)."""

    reroutes: int = 0
    reroute_s: list[float] = field(default_factory=list)
    """Seconds from the failed call's start to the rerouted call's success, per reroute."""
    distrusted: list[str] = field(default_factory=list)
    """Peers excluded because their info contradicted their record, they refused layers they announced, or a spot
    check outvoted their output."""
    verify_checks: int = 0
    """Hops drawn for a spot check (``ClientConfig.verify``), skipped ones included."""
    verify_mismatches: int = 0
    """Spot checks where the second opinion disagreed."""
    verify_skipped: int = 0
    """Spot checks given up: no other node serves the hop's layers, or the other route failed."""
    suspects: list[str] = field(default_factory=list)
    """Peers a spot check outvoted (distrusted here and reported in the DHT), in order."""


class RemoteSequence(PeerHealth):
    """Layers ``[0, num_layers)`` of one model, served by the swarm (what it knows of each peer: :class:`PeerHealth`)."""

    def __init__(self, dht: DHT, p2p: P2P, loop: BackgroundLoop, *, key: str, model_name: str, num_layers: int,
                 checkpoint_hash: str, config: ClientConfig = ClientConfig(), hidden_size: int | None = None,
                 owner: bytes | None = None):
        self.dht, self.p2p, self.loop = dht, p2p, loop
        self.key, self.model_name, self.num_layers = key, model_name, num_layers
        self.checkpoint_hash = checkpoint_hash
        PeerHealth.__init__(self, config, RouteStats())
        self.traffic = Traffic()
        """Bytes and calls over this client's links (every call of this sequence credits it)."""
        self._call_options = {"traffic": self.traffic, "liveness_s": config.liveness_s}
        self.verify_traffic = Traffic()
        """Bytes and calls of spot checks' re-runs (kept apart so ``traffic`` is what the requests themselves cost)."""
        self._verify_options = {"traffic": self.verify_traffic, "liveness_s": config.liveness_s}
        self._records: list[ServerRecord] = []
        self._known: dict[str, tuple[ServerRecord, float]] = {}
        self._refreshing: asyncio.Future | None = None
        self._records_at = 0.0
        self.hidden_size = hidden_size
        """Width of the hidden states (for claim probes; None = refusals cannot be attributed and are raised)."""
        self._checked: dict[str, tuple] = {}
        """Peer id -> the record claim its info answer was last checked against."""
        self.owner = owner
        """This client's owner marker (``[owner:<key>]``) for signing suspect reports; None = it does not report."""
        self.commitments: deque[dict] = deque(maxlen=COMMITMENT_LOG)
        """The commitments of this client's latest answers (:mod:`swarm.commitments`): ``peer``, ``request_id``,
        ``digest`` per hop, oldest first, for audits."""

    def record_commitments(self, reply: dict, request_id: str) -> list[dict]:
        """Keep the commitments an answer carried in :attr:`commitments` (those naming another request are dropped)
        and leave them in ``reply["commitments"]``."""
        kept = [c for c in parse_commitments(reply.get("commitments"), 256) if c["request_id"] == request_id]
        self.commitments.extend(kept)
        reply["commitments"] = kept
        return kept

    # ---- discovery and routing --------------------------------------------------------------------------

    async def records(self, *, refresh: bool = False) -> list[ServerRecord]:
        """The known online-or-not records of this model.

        Blocks on a DHT lookup only with ``refresh`` or when nothing is known yet; stale records are returned at
        once while a lookup refreshes them in the background (a lookup can stall seconds behind a frozen peer).
        """
        if refresh or not self._known:
            await self._refresh()
        elif time.monotonic() - self._records_at > self.config.records_max_age_s and (
                self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.ensure_future(self._refresh())
            self._refreshing.add_done_callback(_log_failure)
        return self._records

    async def report_suspect(self, peer_id: str, reason: str) -> None:
        """Publish a signed, expiring report that ``peer_id`` computed wrong numbers (other clients weigh it)."""
        if self.owner is None:
            return
        stored = await self.dht.store(suspects_key(self.checkpoint_hash), {"suspect": peer_id, "reason": reason},
                                      get_dht_time() + SUSPECT_TTL_S, subkey=peer_id.encode() + self.owner,
                                      return_future=True)
        if not stored:
            logger.warning("No DHT peer stored the suspect report on %s", peer_id)

    async def _refresh(self) -> None:
        found, suspects = await asyncio.gather(
            self.dht.get(self.key, latest=True, return_future=True),
            self.dht.get(suspects_key(self.checkpoint_hash), latest=True, return_future=True))
        self._suspects = suspect_reporters(suspects)
        # A lookup may miss records (those right after a peer froze time out with nothing): merge with what is
        # known and forget a record only when its own expiration time has passed.
        fresh = records_with_expiration(found)
        for record, expires in fresh:
            if record.checkpoint_hash == self.checkpoint_hash:
                self._known[record.peer_id] = (record, expires)
        if fresh:  # an empty answer is a failed lookup, not an empty swarm: keep routing on what we knew
            now = get_dht_time()
            self._known = {p: (r, e) for p, (r, e) in self._known.items() if e > now}
        self._records = [r for r, _ in self._known.values()]
        self._records_at = time.monotonic()
        unchecked = [r for r in self._records if r.online and self._checked.get(r.peer_id) != _claim(r)]
        if unchecked:
            await asyncio.gather(*(self._measure(r) for r in unchecked))

    async def _measure(self, record: ServerRecord) -> None:
        """Ping a node (its latency) and check that its info answer states what its record claims."""
        peer_id = record.peer_id
        try:
            self._latency_s[peer_id], info = await ping(self.p2p, peer_id, timeout_s=self.config.ping_timeout_s)
        except PeerUnreachableError:
            self.ban(peer_id)
            return
        self._checked[peer_id] = _claim(record)
        wrong = claim_mismatch(record, info)
        if wrong is not None:
            self.distrust(peer_id, f"its info answer contradicts its record ({wrong})")
        self.saw_alive(peer_id, info)

    async def find_refusing(self, hops: list[Hop], error: Exception, *, embed: bool, head: bool) -> Hop | None:
        """After ``hops`` (a chain, or one hop) were refused with ``error``: probe each hop's layers and act on the
        first that fails (a refusal of announced layers distrusts it; an overload marks it busy; a dead node is
        banned). Returns that hop, or None when every hop took the probe (or probes are impossible)."""
        if self.hidden_size is None:
            return None
        found = await find_refusing_hop(self.p2p, hops, hidden_size=self.hidden_size, embed=embed, head=head,
                                        num_layers=self.num_layers, timeout_s=self.config.request_timeout_s,
                                        **self._call_options)
        if found is None:
            return None
        hop, why = found
        if isinstance(why, BadRequestError):
            self.distrust(hop.peer_id, f"it refused a probe of layers {hop.start}:{hop.end} it announced ({why})")
        else:
            self.note_failure(hop.peer_id, why)
        return hop

    async def route(self, start: int = 0, end: int | None = None, *, embed: bool = False, head: bool = False,
                    refresh: bool = False) -> list[Hop]:
        """Plan on the known records (re-read from the DHT when stale, when ``refresh``, or when they cannot
        cover the layers). After a failure this avoids a DHT lookup, which can stall seconds behind a frozen peer.

        Raises:
            MissingBlocksError: no usable nodes cover ``[start, end)`` even after re-reading the DHT.
        """
        end = self.num_layers if end is None else end
        for attempt in range(3):
            records = await self.records(refresh=refresh or attempt > 0)
            try:
                return plan_route(records, start, end, exclude=self.excluded(), model_name=self.model_name,
                                  embed=embed, head=head, costs=self.costs())
            except MissingBlocksError:
                # DHT lookups right after a peer froze can come back incomplete; the next one routes around it.
                if attempt == 2:
                    raise
                await asyncio.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    # ---- forward / backward -----------------------------------------------------------------------------

    async def forward(self, inputs: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, embed: bool = False, head: bool = False,
                      keep_hop_inputs: bool = False, start: int = 0, end: int | None = None,
                      ) -> tuple[torch.Tensor, list[tuple[Hop, torch.Tensor]]]:
        """Run layers ``[start, end)`` (default: all); return outputs and (if asked) each hop with its input."""
        extras = _extras(attention_mask, position_ids)
        end = self.num_layers if end is None else end
        hops = await self.route(start, end, embed=embed, head=head)
        trail: list[tuple[Hop, torch.Tensor]] = []
        x, i, retries, reroute_started = inputs, 0, 0, None
        while i < len(hops):
            hop = hops[i]
            first, last = hop.start == 0 and embed, hop.end == self.num_layers and head
            t0 = time.perf_counter()
            try:
                request_id = secrets.token_hex(8)
                out, reply = await self.hop_call(hop, {"inputs": x, **extras},
                                                  {"start": hop.start, "end": hop.end, "embed": first, "head": last,
                                                   "request_id": request_id},
                                                  answer_bytes=self.answer_bytes_of(x, first, last))
                self.record_commitments(reply, request_id)
            except (PeerUnreachableError, OverloadedError, BadRequestError) as e:
                retries += 1
                if retries > self.config.max_retries:
                    raise
                if isinstance(e, BadRequestError):
                    if not _may_be_false_claim(e) or await self.find_refusing([hop], e, embed=first, head=last) is None:
                        raise  # the node takes well-formed requests for its layers: this request is at fault
                else:
                    self.note_failure(hop.peer_id, e)
                logger.warning("%s; rerouting layers %d:%d", e, hop.start, self.num_layers)
                hops = hops[:i] + await self.route(hop.start, end, embed=first, head=head)
                await self.overload_backoff(e, hops[i].peer_id, retries)
                self.stats.reroutes += 1
                reroute_started = reroute_started or t0
                continue
            if reroute_started is not None:
                self.stats.reroute_s.append(time.perf_counter() - reroute_started)
                reroute_started = None
            self._trusted.add(hop.peer_id)
            if keep_hop_inputs:
                trail.append((hop, x))
            y = out["outputs"]
            if should_check(self.config.verify):
                y = await spot_check(self, hop, x, y, extras, embed=first, head=last)
            x = y
            i += 1
        return x, trail

    async def forward_chain(self, inputs: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                            position_ids: torch.Tensor | None = None, embed: bool = False, head: bool = False,
                            hook: HookRequest | None = None, carry: bytes = b"",
                            return_outputs: bool | str = True) -> tuple[torch.Tensor, bytes, list[Hop], dict]:
        """Push the inputs through the whole route node → node; only the last node's answer comes back, straight from
        the last node over one link (``ClientConfig.direct_reply``, :mod:`swarm.direct_reply`), or relayed back
        through the route for requests with gradients.

        Args:
            hook: the span hook every hop runs; each hop's result is the next hop's ``carry`` and the last hop's
                result is returned.
            carry: the first hop's carry (values the client computed before the route).
            return_outputs: False to get an empty tensor instead of the final hidden states / logits, ``"last"`` for
                the last position's alone.
        Returns:
            ``(outputs, hook_result, route, reply meta)``; the meta has ``compute_s`` per peer and ``node_bytes``
            (bytes that crossed node → node links; with a direct answer, the request frames passed on, not the
            acknowledgements) and ``direct`` (whether the answer came straight from the last node).
        Raises:
            ResultMismatchError: with ``ClientConfig.verify``, a checked answer was contradicted and not settled.
        """
        extras = _extras(attention_mask, position_ids)
        run = functools.partial(self._forward_chain, inputs, extras, embed=embed, head=head, hook=hook, carry=carry,
                                return_outputs=return_outputs)
        answer = await run()
        if self.config.verify > 0:
            answer = await spot_check_chain(self, answer, run, hook.agree if hook and hook.agree else operator.eq)
        return answer

    async def _forward_chain(self, inputs: torch.Tensor, extras: dict, *, embed: bool, head: bool,
                             hook: HookRequest | None, carry: bytes, return_outputs: bool | str,
                             avoid: frozenset[str] = frozenset()) -> tuple[torch.Tensor, bytes, list[Hop], dict]:
        """:meth:`forward_chain` without spot checks, on a route avoiding ``avoid`` (planned on the known records
        at once, no DHT retries, where ``avoid`` is given: a spot check's re-run)."""
        failed_at, overloaded = None, False
        for attempt in range(self.config.max_retries + 1):
            if avoid:
                hops = await plan_avoiding(self, 0, self.num_layers, embed=embed, head=head, avoid=avoid)
            else:
                hops = await self.route(embed=embed, head=head)
            if overloaded and any(self._busy.get(h.peer_id, 0.0) > time.monotonic() for h in hops):
                await self._backoff(attempt)  # the full node has no idle replica: give it time
            chain = [{"peer": h.peer_id, "start": h.start, "end": h.end, "head": head and h.end == self.num_layers}
                     for h in hops]
            tensors = {"inputs": inputs, **extras}
            request_id = secrets.token_hex(8)
            meta = {"request_id": request_id, "start": hops[0].start, "end": hops[0].end, "embed": embed,
                    "head": chain[0]["head"],
                    "next": chain[1:], "return_outputs": return_outputs}
            if self.config.direct_reply:
                meta["reply_to"] = self.p2p.peer_id.to_base58()
            if hook is not None:
                hook.attach(tensors, meta, hops, carry)
            t0 = time.perf_counter()
            try:
                out, reply = await self._chain_call(hops, tensors, meta,
                                                    timeout_s=self.config.request_timeout_s * len(hops),
                                                    checking=bool(avoid))
            except (OverloadedError, BadRequestError) as e:  # which node of the chain refused, the error does not say
                failed_at = failed_at or t0
                if attempt == self.config.max_retries or (isinstance(e, BadRequestError) and not _may_be_false_claim(e)):
                    raise
                refused = await self.find_refusing(hops, e, embed=embed, head=head)
                if refused is None and isinstance(e, BadRequestError):
                    raise  # every node takes well-formed requests for its layers: this request is at fault
                logger.warning("Chained forward refused (%s); %s", e,
                               f"routing around {refused.peer_id}" if refused else "retrying after a backoff")
                overloaded = isinstance(e, OverloadedError)
                if refused is None:  # the overload passed before the probe: back off, then retry the same route
                    await self._backoff(attempt + 1)
                else:
                    self.stats.reroutes += 1
                continue
            except PeerUnreachableError as e:
                failed_at = failed_at or t0
                if attempt == self.config.max_retries:
                    raise
                logger.warning("Chained forward failed (%s); checking the route's nodes", e)
                await self.ban_unreachable(hops)
                self.stats.reroutes += 1
                continue
            if failed_at is not None:
                self.stats.reroute_s.append(time.perf_counter() - failed_at)
            self._trusted.update(h.peer_id for h in hops)
            self.record_commitments(reply, request_id)
            return out["outputs"], hook_result(out), hops, reply
        raise AssertionError("unreachable")

    def answer_bytes_of(self, x: torch.Tensor, embed: bool, head: bool) -> int | None:
        """About how many bytes a hop's answer to ``x`` has (None where unknown here: the head's logits)."""
        if head:
            return None
        if embed:  # token ids in, hidden states out
            return x.numel() * self.hidden_size * 4 if self.hidden_size else None
        return x.numel() * x.element_size()

    async def hop_call(self, hop: Hop, tensors: dict, meta: dict, *, answer_bytes: int | None,
                        handle: str = FORWARD, timeout_s: float | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        """One hop's forward, backward or opening inference step (``handle``) on the hop-by-hop path (Petals-style
        traces and generation: :meth:`forward`, :meth:`backward`, :class:`~swarm.inference_session.InferenceSession`).
        With ``ClientConfig.direct_reply`` its answer is collected like a chain's last hop (:meth:`_chain_call`),
        over one collect stream per 240 KiB of ``answer_bytes``: on the request's own stream, an answer over a
        fresh stream's 256 KiB window waits a round trip per doubling of the window (a 1.1 MB answer, three).
        A node that cannot hold the answer in its mailbox answers the same request again on the request's stream (it
        closed an inference session whose answer it could not hold: only an opening step, which reopens it, may
        come here). ``timeout_s``: default ``ClientConfig.request_timeout_s``."""
        timeout_s = self.config.request_timeout_s if timeout_s is None else timeout_s
        if self.config.direct_reply:
            streams = self.config.collect_streams if answer_bytes is None else \
                max(1, min(self.config.collect_streams, -(-answer_bytes // STRIPE_BYTES)))
            try:
                return await self._chain_call([hop], tensors, {**meta, "reply_to": self.p2p.peer_id.to_base58()},
                                              timeout_s=timeout_s, handle=handle, pull=streams)
            except MailboxFullError as e:
                logger.info("%s; taking the answer on the request's stream", e)
        return await call(self.p2p, hop.peer_id, handle, tensors, meta, timeout_s=timeout_s, **self._call_options)

    async def _chain_call(self, hops: list[Hop], tensors: dict, meta: dict, *, timeout_s: float,
                          checking: bool = False, handle: str = FORWARD,
                          pull: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        """Send a chained forward to the route's first node; with ``meta['reply_to']``, collect the answer from the
        last node at the same time (swarm/direct_reply.py), over ``pull`` streams (default
        ``ClientConfig.collect_streams``). An error any hop answered comes back on the chain and is
        raised as its own type; the collect stream is then dropped. The collect stream is part of the same round
        trip: its bytes count in :attr:`traffic`, not as a call. A spot check's re-run (``checking``) counts in
        :attr:`verify_traffic` instead. ``handle``: FORWARD, INFERENCE for a chained generation step, or BACKWARD
        for one hop's backward (:meth:`hop_call`)."""
        options = self._verify_options if checking else self._call_options
        chain = asyncio.ensure_future(call(self.p2p, hops[0].peer_id, handle, tensors, meta, timeout_s=timeout_s,
                                           **options))
        if "reply_to" not in meta:
            out, reply = await chain
            return out, {**reply, "direct": False}
        side = Traffic()
        collect = asyncio.ensure_future(call(self.p2p, hops[-1].peer_id, COLLECT, {},
                                             {"request_id": meta["request_id"]}, timeout_s=timeout_s, traffic=side,
                                             liveness_s=self.config.liveness_s,
                                             pull=self.config.collect_streams if pull is None else pull))
        try:
            done, _ = await asyncio.wait({chain, collect}, return_when=asyncio.FIRST_COMPLETED)
            if collect in done and collect.exception() is None:
                out, reply = collect.result()  # the acknowledgements still on their way back are not needed
            else:
                out, reply = await chain  # the chain's error, typed, wins over the collect stream's
                if reply.get("direct"):
                    out, reply = await collect
                else:  # relayed: requests with gradients (their backward runs on the way back)
                    return out, {**reply, "direct": False}
            return out, {**reply, "direct": True}
        finally:
            for task in (chain, collect):
                task.cancel()
            for task in (chain, collect):
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: an abandoned task's error is not logged as unhandled
            options["traffic"].bytes_sent += side.bytes_sent
            options["traffic"].bytes_received += side.bytes_received

    async def ban_unreachable(self, hops: list[Hop]) -> None:
        """Ping every node of a failed route and exclude those that do not answer."""
        async def check(peer_id: str) -> None:
            try:
                _, info = await ping(self.p2p, peer_id, timeout_s=self.config.ping_timeout_s)
            except PeerUnreachableError:
                self.ban(peer_id)
            else:
                self.saw_alive(peer_id, info)
        await asyncio.gather(*(check(h.peer_id) for h in hops))

    async def backward(self, trail: list[tuple[Hop, torch.Tensor]], grad_outputs: torch.Tensor, *,
                       attention_mask: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Gradients w.r.t. the first hop's hidden-state inputs, given the forward ``trail``."""
        extras = _extras(attention_mask, position_ids)
        grad = grad_outputs
        for hop, x in reversed(trail):
            rerouted = False
            for attempt in range(self.config.max_retries + 1):
                try:
                    if rerouted:  # inside the try: a reroute refused or cut off is retried like the call itself
                        grad_in = await self._backward_rerouted(hop, x, grad, extras)
                    else:
                        out, _ = await self.hop_call(hop, {"inputs": x, "grad_outputs": grad, **extras},
                                                      {"start": hop.start, "end": hop.end,
                                                       "request_id": secrets.token_hex(8)},
                                                      answer_bytes=x.numel() * x.element_size(), handle=BACKWARD)
                        grad_in = out["outputs"]
                    break
                except (PeerUnreachableError, OverloadedError) as e:
                    if attempt == self.config.max_retries:
                        raise
                    if not rerouted:  # a failed reroute noted its own node
                        self.note_failure(hop.peer_id, e)
                    if isinstance(e, OverloadedError):
                        await asyncio.sleep(min(self.config.overload_backoff_s * 2 ** attempt, 4.0))
                    rerouted = True
            grad = grad_in
        return grad

    async def _backward_rerouted(self, hop: Hop, x: torch.Tensor, grad: torch.Tensor, extras: dict) -> torch.Tensor:
        """Backward through ``hop``'s layers on other nodes: re-run their forward to get each sub-hop's input. A node
        that fails here is noted (excluded or busy) before the error is raised, so a retry routes around it."""
        self.stats.reroutes += 1
        sub = await self.route(hop.start, hop.end)

        async def run(h: Hop, handle: str, tensors: dict) -> torch.Tensor:
            try:
                out, _ = await call(self.p2p, h.peer_id, handle, {**tensors, **extras},
                                    {"start": h.start, "end": h.end}, timeout_s=self.config.request_timeout_s,
                                    **self._call_options)
            except (PeerUnreachableError, OverloadedError) as e:
                self.note_failure(h.peer_id, e)
                raise
            return out["outputs"]
        inputs = []
        for h in sub:
            inputs.append(x)
            x = await run(h, FORWARD, {"inputs": x})
        for h, xi in zip(reversed(sub), reversed(inputs)):
            grad = await run(h, BACKWARD, {"inputs": xi, "grad_outputs": grad})
        return grad


@dataclass(frozen=True)
class HookRequest:
    """A span hook for a chained call (forward, or an inference step): every hop runs it."""

    kind: str
    version: int
    make_payload: Callable[[list[Hop]], bytes]
    """``make_payload(route)``: the payload for ``route`` (called again if the route changes)."""
    agree: Callable[[bytes, bytes], bool] | None = None
    """``agree(a, b)``: whether two routes' hook results mean the same (a spot check compares them with it; the hook
    decodes them and allows its values' dtype tolerance). None: byte for byte."""

    def attach(self, tensors: dict, meta: dict, route: list[Hop], carry: bytes) -> None:
        """Add the payload, the first hop's ``carry`` and the hook's name to a request's tensors and meta."""
        tensors["hook_payload"] = torch.frombuffer(bytearray(self.make_payload(route)), dtype=torch.uint8)
        if carry:
            tensors["hook_carry"] = torch.frombuffer(bytearray(carry), dtype=torch.uint8)
        meta.update(hook={"kind": self.kind, "version": self.version}, hop=0)


def hook_result(out: dict) -> bytes:
    """The last hop's hook result in an answer (``b""`` without one)."""
    result = out.get("hook_result")
    return result.numpy().tobytes() if result is not None else b""


def _may_be_false_claim(error: BadRequestError) -> bool:
    """Only a plain :class:`BadRequestError` (what a node answers for layers or stages it does not serve) may mean a
    false claim; its subclasses (a hook's payload, sizes, sessions) are about the request and are raised unprobed."""
    return type(error) is BadRequestError


def _claim(record: ServerRecord) -> tuple:
    return (record.start, record.end, record.embed, record.head, record.checkpoint_hash)


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("Background refresh of swarm records failed: %s", task.exception())


def _extras(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
    extras = {}
    if attention_mask is not None:
        extras["attention_mask"] = attention_mask.to(torch.int64)
    if position_ids is not None:
        extras["position_ids"] = position_ids.to(torch.int64)
    return extras
