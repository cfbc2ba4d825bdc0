"""Client-side inference sessions: a KV cache on every node of the route, rebuilt elsewhere when a node dies.

The client keeps, for every hop, the inputs it sent there. When a hop's node becomes unreachable, the layers it
ran are rerouted to other nodes and the hop's whole history is replayed through the new nodes in one call per
node, step by step as originally sent, so the rebuilt caches are bit-identical (each new node's outputs form the
next new node's history); then the current step continues. The result
is the same as if nothing had failed.

A node that refuses a step as overloaded (:class:`OverloadedError`) or full (:class:`CapacityError`: its KV cache, or
this client's share of it; KV bytes are charged as steps append tokens, so a session can meet a full cache midway)
does so before doing any work, and is not dead: it counts as busy, and the hop moves to an idle replica the same way
(its session there closed). With no replica to go to, an overloaded node is retried, session kept, after a backoff
(:meth:`RemoteSequence.overload_backoff`); a full node's CapacityError is raised.

The recovery (re-route and replay) runs inside the step's retry loop: a replay refused or cut off is noted against
its own node and retried within ``max_retries`` like the step, never raised past it. A step that fails anyway leaves
the hops that ran it (and the one it failed on) stale: their nodes' caches hold a step the session does not count,
so the next step rebuilds them from their history first (exact, never a silently shifted cache).

A hop's opening step (the prompt, or a replayed history: an answer of many positions) is collected over striped
streams like a chain's answer (:meth:`RemoteSequence.hop_call`, ``ClientConfig.direct_reply``); a node that cannot
hold that answer in its mailbox closes the session, and the same opening step is sent again on one stream, reopening
it. One-token steps answer on the request's stream.

Spot checks (``ClientConfig.verify``): a drawn step of a hop is recomputed statelessly on another route (the hop's
history and the step in one forward) and compared (:func:`swarm.verification.spot_check_step`). A node outvoted
there is replaced like a dead one when all its earlier steps were checked; otherwise ResultMismatchError (its
unchecked answers may already sit in later hops' caches).
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field

import torch

from .errors import CapacityError, OverloadedError, PeerUnreachableError, ResultMismatchError
from .remote_sequence import RemoteSequence, _extras
from .routing import Hop
from .handles import INFERENCE
from .transport import call
from .verification import should_check, spot_check_step

logger = logging.getLogger(__name__)


@dataclass
class _HopState:
    hop: Hop
    embed: bool
    head: bool
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    history: list[torch.Tensor] = field(default_factory=list)
    """Inputs this hop received, one tensor per step, each (B, T_step, ...)."""
    opened: bool = False
    unchecked: int = 0
    """Steps of this hop no spot check covered (``ClientConfig.verify``): its node's answers to them are unverified."""
    stale: bool = False
    """A step that failed after this hop ran it (or while it ran) left the node's cache ahead of ``history``: rebuild
    before the next step."""


class _NoReplica(Exception):
    """A refusing node (full, not overloaded) has no replica to move to: its ``error`` is raised, not retried."""

    def __init__(self, error: CapacityError):
        super().__init__(str(error))
        self.error = error


class InferenceSession:
    """Step through the model with server-side KV caches. Use :meth:`RemoteSequence`-backed :meth:`create`."""

    def __init__(self, sequence: RemoteSequence, hops: list[Hop], *, batch_size: int, max_length: int,
                 embed: bool, head: bool):
        self.sequence = sequence
        self.batch_size, self.max_length = batch_size, max_length
        self.embed, self.head = embed, head
        n = sequence.num_layers
        self._hops = [_HopState(h, embed and h.start == 0, head and h.end == n) for h in hops]
        self._positions: list[torch.Tensor] = []
        self.length = 0
        self.closed = False
        self.compute_s: dict[str, float] = {}
        """Seconds of compute per node (peer id), over every step so far."""

    @classmethod
    async def create(cls, sequence: RemoteSequence, *, batch_size: int, max_length: int, embed: bool = False,
                     head: bool = False, start: int = 0, end: int | None = None) -> "InferenceSession":
        """A session over layers ``[start, end)`` (default: all)."""
        hops = await sequence.route(start, end, embed=embed, head=head)
        return cls(sequence, hops, batch_size=batch_size, max_length=max_length, embed=embed, head=head)

    @property
    def route(self) -> list[Hop]:
        return [h.hop for h in self._hops]

    async def step(self, inputs: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run new tokens (ids when ``embed``, else hidden states ``(B, T, D)``) through every hop.

        Args:
            attention_mask: the full 2D mask ``(B, past + T)``, or None for no padding.
            position_ids: ``(B or 1, T)``; default continues from the session's length.
        """
        length = inputs.shape[1]
        if position_ids is None:
            position_ids = torch.arange(self.length, self.length + length).unsqueeze(0)
        position_ids = position_ids.expand(inputs.shape[0], -1)
        extras = _extras(attention_mask, position_ids)
        x, i, retries, failed_at, recover = inputs, 0, 0, None, None
        try:
            while i < len(self._hops):
                if recover is None and self._hops[i].stale:  # an earlier step failed after this hop ran it
                    recover = functools.partial(self._renew, i, attention_mask)
                t0 = time.perf_counter()
                try:
                    if recover is not None:  # inside the try: a replay refused or cut off is retried like the step
                        await recover()
                        recover = None
                    state = self._hops[i]
                    out = await self._send(state, x, extras)
                except _NoReplica as e:
                    raise e.error from None
                except (PeerUnreachableError, CapacityError) as e:
                    retries += 1
                    if retries > self.sequence.config.max_retries:
                        raise
                    failed_at = failed_at or t0
                    if recover is None:  # the step failed on hop i's node (a failed replay noted its own node)
                        self._note(self._hops[i].hop.peer_id, e)
                    if isinstance(e, CapacityError):  # full or overloaded: busy, not dead
                        recover = functools.partial(self._after_refusal, i, attention_mask, e, retries)
                    else:
                        logger.warning("%s; rebuilding layers %d:%d elsewhere", e, self._hops[i].hop.start,
                                       self._hops[i].hop.end)
                        recover = functools.partial(self._replace, i, attention_mask)
                    continue
                if should_check(self.sequence.config.verify):
                    out, outvoted = await self._check(state, x, out, extras, attention_mask, position_ids)
                    if outvoted:  # the node is excluded now: rebuild the hop elsewhere from its history, resend
                        recover = functools.partial(self._move, i, attention_mask)
                        continue
                else:
                    state.unchecked += 1
                state.history.append(x)
                x = out
                i += 1
        except BaseException:
            # Hops before ``i`` ran this step and hop ``i`` may have: their caches hold a step the session does not
            # count. The next step rebuilds them from their history (without this step) before using them.
            for state in self._hops[:i]:
                state.history.pop()
                state.stale = True
            if i < len(self._hops):
                self._hops[i].stale = True
            raise
        if failed_at is not None:
            self.sequence.stats.reroutes += 1
            self.sequence.stats.reroute_s.append(time.perf_counter() - failed_at)
        self._positions.append(position_ids)
        self.length += length
        return x

    def _note(self, peer_id: str, error: PeerUnreachableError | CapacityError) -> None:
        """``peer_id`` failed a step or a replay: full or overloaded counts as busy; slow as busy; dead as excluded."""
        if isinstance(error, CapacityError):
            self.sequence.mark_busy(peer_id)
        else:
            self.sequence.note_failure(peer_id, error)

    async def _check(self, state: _HopState, x: torch.Tensor, out: torch.Tensor, extras: dict,
                     attention_mask: torch.Tensor | None, position_ids: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Spot-check this step of ``state``'s hop (:func:`swarm.verification.spot_check_step`). Raises
        ResultMismatchError when its node is outvoted after unchecked steps: those may have fed wrong numbers to
        the later hops' caches, so the session cannot continue exactly (a new one avoids the node)."""
        positions = torch.cat([*self._positions, position_ids], dim=1)
        full = {**_extras(attention_mask, positions)}
        out, outvoted = await spot_check_step(self.sequence, state.hop, state.history, x, out, full,
                                              embed=state.embed, head=state.head)
        if outvoted and state.unchecked:
            raise ResultMismatchError(
                f"A spot check outvoted {state.hop.peer_id} on layers {state.hop.start}:{state.hop.end} after "
                f"{state.unchecked} unchecked step(s) of this session, which may carry its wrong numbers; no result "
                "is returned. Start the generation again: this client now routes around that node (verify=1.0 "
                "checks every step, so a caught node is replaced mid-session instead).")
        return out, outvoted

    async def _send(self, state: _HopState, x: torch.Tensor, extras: dict,
                    chunks: list[int] | None = None) -> torch.Tensor:
        meta = {"session_id": state.session_id, "start": state.hop.start, "end": state.hop.end,
                "embed": state.embed, "head": state.head}
        if chunks is not None:
            meta["chunks"] = chunks
        if not state.opened:
            meta["open"] = {"max_length": self.max_length, "batch_size": self.batch_size}
        if not state.opened and self.sequence.config.direct_reply:
            # the prompt (or a replayed history): a large answer, collected striped (RemoteSequence.hop_call)
            meta["request_id"] = secrets.token_hex(8)
            out, reply = await self.sequence.hop_call(
                state.hop, {"inputs": x, **extras}, meta, handle=INFERENCE,
                answer_bytes=self.sequence.answer_bytes_of(x, state.embed, state.head),
                timeout_s=self.sequence.config.step_timeout_s)
        else:  # one new token's step: a small answer, on the request's stream
            out, reply = await call(self.sequence.p2p, state.hop.peer_id, INFERENCE, {"inputs": x, **extras}, meta,
                                    timeout_s=self.sequence.config.step_timeout_s, traffic=self.sequence.traffic,
                                    liveness_s=self.sequence.config.liveness_s)
        state.opened = True
        for peer, seconds in (reply.get("compute_s") or {}).items():
            self.compute_s[peer] = self.compute_s.get(peer, 0.0) + float(seconds)
        return out["outputs"]

    async def _after_refusal(self, index: int, attention_mask: torch.Tensor | None, error: CapacityError,
                             retries: int) -> None:
        """Hop ``index``'s node refused the step before doing any work (overloaded, or its KV cache or this client's
        quota there is full): move the hop to an idle replica (closing the session on the refusing node). With none,
        an overloaded node is retried, session kept, after a backoff; a full one's ``error`` is raised."""
        old = self._hops[index]
        hops = await self.sequence.route(old.hop.start, old.hop.end, embed=old.embed, head=old.head)
        if [(h.peer_id, h.start, h.end) for h in hops] == [(old.hop.peer_id, old.hop.start, old.hop.end)]:
            if not isinstance(error, OverloadedError):
                raise _NoReplica(error)
            logger.info("%s; no idle replica for layers %d:%d, retrying after a backoff", error, old.hop.start,
                        old.hop.end)
            await self.sequence.overload_backoff(error, old.hop.peer_id, retries)
            if old.stale:  # its cache holds a failed step (its rebuild was the refused call): rebuild it again
                await self._move(index, attention_mask, hops)
            return
        logger.warning("%s; moving layers %d:%d to a replica", error, old.hop.start, old.hop.end)
        await self._move(index, attention_mask, hops)

    async def _move(self, index: int, attention_mask: torch.Tensor | None, hops: list[Hop] | None = None) -> None:
        """:meth:`_replace` hop ``index``, then close its session on the old node (alive: refused or outvoted)."""
        old = self._hops[index]
        await self._replace(index, attention_mask, hops)
        await self._close_state(old)

    async def _renew(self, index: int, attention_mask: torch.Tensor | None) -> None:
        """Rebuild a stale hop (a failed step left its node's cache holding that step) from its history, on the route
        the client would pick now (usually the same node; never an excluded one)."""
        await self._move(index, attention_mask)

    async def _replace(self, index: int, attention_mask: torch.Tensor | None, hops: list[Hop] | None = None) -> None:
        """Reroute hop ``index``'s layers (onto ``hops`` if given) and replay its history through the new hops."""
        old = self._hops[index]
        if hops is None:
            hops = await self.sequence.route(old.hop.start, old.hop.end, embed=old.embed, head=old.head)
        n = self.sequence.num_layers
        new = [_HopState(h, old.embed and h.start == 0, old.head and h.end == n) for h in hops]
        if old.history:
            past_mask = attention_mask[:, :self.length] if attention_mask is not None else None
            extras = _extras(past_mask, torch.cat(self._positions, dim=1))
            chunks = [h.shape[1] for h in old.history]
            x = torch.cat(old.history, dim=1)
            for k, state in enumerate(new):
                try:
                    out = await self._send(state, x, extras, chunks=chunks)
                except (PeerUnreachableError, CapacityError) as e:  # the step's retry loop tries again
                    self._note(state.hop.peer_id, e)
                    for opened in new[:k]:
                        await self._close_state(opened)
                    raise
                state.history.extend(x.split(chunks, dim=1))
                x = out
        self._hops[index:index + 1] = new

    async def close(self) -> None:
        """Free the caches on the nodes (best effort: they also expire when idle)."""
        if self.closed:
            return
        self.closed = True
        for state in self._hops:
            await self._close_state(state)

    async def _close_state(self, state: _HopState) -> None:
        if state.opened and state.hop.peer_id not in self.sequence.excluded():  # a dead node's cache expires
            try:
                await call(self.sequence.p2p, state.hop.peer_id, INFERENCE, {}, {"session_id": state.session_id,
                           "close": True}, timeout_s=self.sequence.config.ping_timeout_s)
            except Exception as e:  # the node may be gone; its cache then expires
                logger.debug("Closing session on %s failed: %s", state.hop.peer_id, e)
