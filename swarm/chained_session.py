"""Generation steps pushed node → node: server-side KV caches on every hop, one client call per step.

The client sends a step to the first hop only; each hop runs its layers against its own session's KV cache and
passes the hidden states (and a span hook's carry) to the next hop itself (``meta['next']`` of the inference RPC,
see :mod:`swarm.span_server`); the last hop's answer goes straight to the client's collect stream
(:mod:`swarm.direct_reply`, ``ClientConfig.direct_reply``), or comes back along the chain without it. Compared to
:class:`swarm.inference_session.InferenceSession`, where the client relays the hidden states between hops, the
client link carries only the step's inputs and the last hop's answer.

Failover: when a step's chain fails, the hops that did run have already grown their caches, so the session is
rebuilt whole: the unreachable nodes are excluded, fresh sessions are opened on a new route, and every earlier
step is replayed through it with the inputs, masks, span hook and carry it had (one call per step), before the
failed step runs again. The rebuilt caches are bit-identical, so the result is as if nothing had failed.

A hop that refuses the step as overloaded (:class:`OverloadedError`, naming itself in ``peer_id``) is not dead: it
counts as busy and the session is rebuilt on a route around it where a replica exists. When the first hop refused
(nothing ran) and no other route exists, the step is retried on the same sessions after a backoff; when a later hop
refused, the earlier hops already ran the step, so the session is rebuilt (on the same nodes if need be) after it.
A step that fails anyway (any error past the retries, e.g. a hop's CapacityError or MailboxFullError) may have run on
the hops before the failing one: the session counts as stale and the next step rebuilds it first, so no cache is
silently a step ahead.

Spot checks (``ClientConfig.verify``): each hop of a step is checked with that probability by replaying the session
on fresh sessions along a route avoiding its node (:func:`swarm.verification.check_chained_step`); a node outvoted
there is routed around (the session rebuilt) when all its earlier answers were checked, else ResultMismatchError.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from dataclasses import dataclass

import torch

from .errors import OverloadedError, PeerUnreachableError
from .handles import INFERENCE
from .remote_sequence import HookRequest, RemoteSequence, _extras, hook_result
from .routing import Hop
from .transport import call
from .verification import check_chained_step

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Step:
    inputs: torch.Tensor
    extras: dict
    hook: HookRequest | None
    carry: bytes


class ChainedSession:
    """Step through layers ``[start, end)`` with the hops chained; use :meth:`create`."""

    def __init__(self, sequence: RemoteSequence, hops: list[Hop], *, batch_size: int, max_length: int,
                 embed: bool, head: bool, start: int, end: int):
        self.sequence, self.batch_size, self.max_length = sequence, batch_size, max_length
        self.embed, self.head, self.start, self.end = embed, head, start, end
        self._hops = hops
        self._session_ids = [uuid.uuid4().hex for _ in hops]
        self._opened = [False] * len(hops)
        self._history: list[_Step] = []
        self._stale = False
        """A step failed after some hops may have run it: rebuild from the history before the next step."""
        self.length = 0
        self.compute_s: dict[str, float] = {}
        """Seconds of compute per node (peer id), over every step so far."""
        self.node_bytes = 0
        """Bytes that crossed node → node links, over every step so far."""
        self.closed = False
        self.traffic = sequence.traffic
        """Where this session's step calls are counted (a spot check's replay counts in ``verify_traffic``)."""
        self.unchecked: dict[str, int] = {}
        """Peer id -> answers of this session no spot check covered (its node's part in them is unverified)."""
        self.checkers: dict[frozenset[str], ChainedSession] = {}
        """Spot checks' sessions, by the peers their route avoids (:func:`swarm.verification.check_chained_step`)."""

    @classmethod
    async def create(cls, sequence: RemoteSequence, *, batch_size: int, max_length: int, embed: bool = False,
                     head: bool = False, start: int = 0, end: int | None = None) -> "ChainedSession":
        end = sequence.num_layers if end is None else end
        hops = await sequence.route(start, end, embed=embed, head=head)
        return cls(sequence, hops, batch_size=batch_size, max_length=max_length, embed=embed, head=head,
                   start=start, end=end)

    @property
    def route(self) -> list[Hop]:
        return list(self._hops)

    @property
    def history(self) -> list[_Step]:
        """Every step so far, as sent (a spot check replays them elsewhere)."""
        return list(self._history)

    async def step(self, inputs: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None, hook: HookRequest | None = None, carry: bytes = b"",
                   last_only: bool = False, argmax: bool = False, checkable: bool = True
                   ) -> tuple[torch.Tensor, bytes]:
        """Run new tokens (ids when ``embed``, else hidden states ``(B, T, D)``) through the chain.

        Args:
            attention_mask: the full 2D mask ``(B, past + T)``, or None for no padding.
            position_ids: ``(B or 1, T)``; default continues from the session's length.
            hook: the step's span hook, run on every hop; ``carry`` is the first hop's.
            last_only: the last hop answers only the last position.
            argmax: (with ``head`` and ``last_only``) the last hop answers the greedy next token ``(B, 1)`` instead of
                the logits, which then never cross the link.
            checkable: False where another route cannot reproduce the step (its hook reads values the route's
                nodes hold): spot checks drawn for it count as skipped.
        Returns:
            The last hop's outputs and its hook result (``b""`` without a hook).
        """
        length = inputs.shape[1]
        if position_ids is None:
            position_ids = torch.arange(self.length, self.length + length).unsqueeze(0)
        step = _Step(inputs, _extras(attention_mask, position_ids.expand(inputs.shape[0], -1)), hook, carry)
        retries, failed_at = 0, None
        recover = self._renew if self._stale else None  # an earlier step failed midway: rebuild first
        try:
            while True:
                t0 = time.perf_counter()
                try:
                    if recover is not None:  # inside the try: a replay refused or cut off is retried like the step
                        await recover()
                        recover = None
                    outputs, result = await self._send(step, last_only, argmax)
                    break
                except OverloadedError as e:
                    retries += 1
                    if retries > self.sequence.config.max_retries:
                        raise
                    failed_at = failed_at or t0
                    recover = functools.partial(self._after_overload, e, retries)
                except PeerUnreachableError as e:
                    retries += 1
                    if retries > self.sequence.config.max_retries:
                        raise
                    failed_at = failed_at or t0
                    logger.warning("Chained inference step failed (%s); rebuilding the session on a new route", e)
                    recover = self._rebuild
            if failed_at is not None:
                self.sequence.stats.reroutes += 1
                self.sequence.stats.reroute_s.append(time.perf_counter() - failed_at)
            self._history.append(step)
            self.length += length
            if self.sequence.config.verify > 0:
                outputs, result = await check_chained_step(self, outputs, result, last_only=last_only, argmax=argmax,
                                                           checkable=checkable)
            return outputs, result
        except BaseException:
            # Hops that ran this step (or a rebuild's replay, half done) hold it in their caches while the session
            # does not count it: the next step rebuilds the session from its history before running.
            self._stale = True
            self._opened = [True] * len(self._hops)  # may be open: the rebuild closes them (closing is idempotent)
            raise

    async def _send(self, step: _Step, last_only: bool, argmax: bool = False) -> tuple[torch.Tensor, bytes]:
        n = self.sequence.num_layers
        chain = []
        for i, hop in enumerate(self._hops):
            entry = {"peer": hop.peer_id, "start": hop.start, "end": hop.end, "head": self.head and hop.end == n,
                     "session_id": self._session_ids[i], "last_only": last_only and i == len(self._hops) - 1,
                     "argmax": argmax and i == len(self._hops) - 1,
                     "open": None if self._opened[i] else {"max_length": self.max_length, "batch_size": self.batch_size}}
            chain.append(entry)
        first = chain[0]
        meta = {"session_id": first["session_id"], "start": first["start"], "end": first["end"],
                "embed": self.embed and first["start"] == 0, "head": first["head"], "last_only": first["last_only"],
                "argmax": first["argmax"], "next": chain[1:]}
        if first["open"] is not None:
            meta["open"] = first["open"]
        tensors = {"inputs": step.inputs, **step.extras}
        if step.hook is not None:
            step.hook.attach(tensors, meta, self.route, step.carry)
        if self.sequence.config.direct_reply and len(self._hops) > 1:  # the answer crosses one link (direct_reply)
            meta.update(reply_to=self.sequence.p2p.peer_id.to_base58(), request_id=uuid.uuid4().hex)
        out, reply = await self.sequence._chain_call(self._hops, tensors, meta, handle=INFERENCE,
                                                     timeout_s=self.sequence.config.step_timeout_s * len(self._hops),
                                                     checking=self.traffic is self.sequence.verify_traffic)
        self._opened = [True] * len(self._hops)
        for peer, seconds in (reply.get("compute_s") or {}).items():
            self.compute_s[peer] = self.compute_s.get(peer, 0.0) + float(seconds)
        self.node_bytes += int(reply.get("node_bytes", 0))
        return out["outputs"], hook_result(out)

    async def _after_overload(self, error: OverloadedError, retries: int) -> None:
        """A hop refused the step as overloaded: count it busy, then retry on the same sessions (the first hop refused
        and there is no other route) or rebuild the session on the new route; back off first if the refusing node is
        still on it."""
        old = [(h.peer_id, h.start, h.end) for h in self._hops]
        refuser = error.peer_id if error.peer_id in [p for p, _, _ in old] else ""
        for peer_id in [refuser] if refuser else [p for p, _, _ in old]:  # unnamed: any hop may be the one
            self.sequence.mark_busy(peer_id)
        hops = await self.sequence.route(self.start, self.end, embed=self.embed, head=self.head)
        if not refuser or refuser in [h.peer_id for h in hops]:  # jittered, doubling; only while it counts busy
            await self.sequence.overload_backoff(error, refuser or old[0][0], retries)
        if refuser == old[0][0] and [(h.peer_id, h.start, h.end) for h in hops] == old and not self._stale:
            return  # nothing ran anywhere and the sessions hold the whole history: they take the step again
        logger.warning("Chained step refused (%s); rebuilding the session on a route around it", error)
        await self._rebuild(hops)

    async def _rebuild(self, hops: list[Hop] | None = None) -> None:
        """Open fresh sessions on ``hops`` (default: a new route, unreachable nodes excluded) and replay every earlier
        step."""
        if hops is None:
            await self.sequence.ban_unreachable(self._hops)
        self._stale = True  # until the whole history is replayed: a replay cut short leaves the sessions partial
        await self._close_sessions()
        self._hops = hops if hops is not None else await self.sequence.route(self.start, self.end, embed=self.embed,
                                                                              head=self.head)
        self._session_ids = [uuid.uuid4().hex for _ in self._hops]
        self._opened = [False] * len(self._hops)
        for step in self._history:
            await self._send(step, last_only=True)
        self._stale = False

    async def _renew(self) -> None:
        """Rebuild the stale session (fresh sessions, history replayed) on the route the client would pick now."""
        await self._rebuild(await self.sequence.route(self.start, self.end, embed=self.embed, head=self.head))

    async def close(self) -> None:
        """Free the caches on the nodes (best effort: they also expire when idle)."""
        if not self.closed:
            self.closed = True
            await self._close_sessions()
            for checker in self.checkers.values():
                await checker.close()
            self.checkers.clear()

    async def _close_sessions(self) -> None:
        excluded = self.sequence.excluded()
        for hop, session_id, opened in zip(self._hops, self._session_ids, self._opened):
            if opened and hop.peer_id not in excluded:
                try:
                    await call(self.sequence.p2p, hop.peer_id, INFERENCE, {}, {"session_id": session_id, "close": True},
                               timeout_s=self.sequence.config.ping_timeout_s)
                except Exception as e:  # the node may be gone; its cache then expires
                    logger.debug("Closing session on %s failed: %s", hop.peer_id, e)
