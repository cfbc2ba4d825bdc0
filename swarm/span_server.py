"""The node's RPC surface: forward, backward and inference steps over its span, on hivemind P2P.

Every RPC is one request frame in, one response frame out (see :mod:`swarm.wire`); frames stream, so payloads
over hivemind's 4 MiB message cap are fine, and a large request may arrive striped over several streams (its other
streams on handle ``STRIPE``, :mod:`swarm.stripes`). Handle names are explicit versioned constants.

Request metadata (all RPCs):
    ``names``: names of the frame's tensors, from ``inputs``, ``attention_mask``, ``position_ids``,
    ``grad_outputs``, ``hook_payload``, ``hook_carry``; ``start``/``end``: the layers to run (within the node's span);
    ``embed``/``head``: run those stages too; ``hook``: ``{"kind", "version"}`` or absent; ``origin``: on a chained
    call, the client the previous node serves (set by nodes; the request counts against ``origin<caller``, see
    :mod:`swarm.quotas`).
Inference adds ``session_id`` and, on its first step, ``open: {"max_length", "batch_size"}``; ``close: true``
ends it; ``chunks: [T_1, T_2, ...]`` runs the inputs as consecutive steps of those lengths (history replay; not with
a hook, which sees one step per call); with a hook, ``hop`` is the node's position in the client's route;
``last_only: true`` answers only the last position's outputs (the client of a generation needs no more), and the
head, if run, computes only that position's logits (``logits_to_keep=1``, as transformers' ``generate``);
``argmax: true`` (with the head and ``last_only``) answers the greedy next token ``(B, 1)`` instead of the logits.
Forward may be *chained*: ``next: [{"peer", "start", "end", "head"}, ...]`` makes this node send its outputs
(with ``hook_payload`` and its hook's result as ``hook_carry``, ``hop`` + 1) to the next node itself and relay
that node's answer back; with ``reply_to`` (the client's peer id) the last node's answer goes straight to the
client's collect stream (handle ``COLLECT``) instead and the nodes relay only an acknowledgement (see
:mod:`swarm.direct_reply`; requests with gradients keep the relay); ``return_outputs: false`` makes the last node
answer an empty tensor instead of its hidden states (the caller only wants the hook's result), ``"last"`` only the
last position's ``(B, 1, ...)`` (the client runs its own head on it). An inference step may be chained the same
way, each onward hop naming its own session: ``next: [{"peer", "start", "end", "head", "session_id", "open"?, "last_only"?,
"argmax"?}, ...]``, and with ``reply_to`` (and ``request_id``) its last node's answer goes to the client's collect
stream too.

Any failure is answered with an error frame (typed, with a message); the node never dies of a bad request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

import msgpack
import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from .errors import (BadRequestError, CapacityError, InternalNodeError, OverloadedError, SwarmError,
                     UnknownSessionError)
from .commitments import commit, request_id_of
from .commitments import parse as parse_commitments
from .compute_slot import ComputeSlot
from .direct_reply import Mailbox, merged, reply_to_of, seconds_by_peer, stripe_of, upstream_of
from .quotas import ClientQueue, client_identity
from .sessions import SessionManager
from .span_grad import SavedTensorBudget, backward_reply, forward_with_grad, wants_grad, weight_storages
from .span_hook import HookRegistry, active_hook
from .span_requests import (TENSOR_NAMES, SpanRequest, hook_result, parse_chain, parse_inference_chain,  # noqa: F401
                            parse_request)
from .stages import SpanModel
from .stripes import StripeBoard, serve_stripes
from .handles import BACKWARD, COLLECT, FORWARD, INFERENCE, INFO
from .transport import Traffic, call
from .wire import encode_error, encode_frame, read_frame, stripe

logger = logging.getLogger(__name__)


async def _counted(messages: AsyncIterator, total: list[int]) -> AsyncIterator:
    """``messages``, adding each one's serialized size to ``total[0]``."""
    async for message in messages:
        total[0] += message.ByteSize()
        yield message


@dataclass(frozen=True)
class ServerLimits:
    """What one node accepts. Violations are answered with typed errors."""

    max_request_bytes: int = 256 << 20
    """Largest request (sum of tensor bytes)."""
    max_batch_tokens: int = 16384
    """Largest batch × sequence in one call."""
    max_length: int = 4096
    """Longest sequence (a session's whole history included)."""
    max_cache_bytes: int = 1 << 30
    """KV-cache bytes all open sessions may hold together, charged as steps append tokens (not reserved for a
    session's max_length up front); a step past it is refused with CapacityError."""
    max_client_cache_bytes: int = 256 << 20
    """KV-cache bytes one client's sessions may hold together on this node (see swarm.quotas for who a client is)."""
    max_client_sessions: int = 16
    """Inference sessions one client may hold open on this node at once."""
    session_timeout_s: float = 300.0
    """An inference session idle for this long is dropped."""
    linger_s: float = 30.0
    """After answering, wait up to this long for the caller to close the stream."""
    chain_timeout_s: float = 120.0
    """Deadline for the rest of a chained forward, as seen from this node."""
    max_chain: int = 64
    """Most onward hops a chained forward may name."""
    liveness_s: float = 2.0
    """In a chained forward, ping the next node after this long without an answer; a missed ping fails the chain."""
    max_backward_bytes: int = 4 << 30
    """Most bytes autograd may save for one request's backward passes on this node (requests whose graph asks for
    gradients); counted as the forward saves them, refused with CapacityError beyond."""
    max_queued_compute: int = 8
    """Most jobs running or queued in the compute executor; a forward/backward/inference request arriving at this
    bound is refused at once with OverloadedError (the client retries later or on a replica)."""
    max_client_queued_compute: int = 4
    """Most requests of one client running or queued on this node; more are refused with OverloadedError, so one
    client cannot fill the whole compute queue and others are still admitted."""
    max_mailbox_bytes: int = 1 << 30
    """Most bytes of direct answers (swarm.direct_reply) this node holds at once for clients to collect; an answer that
    does not fit is refused with MailboxFullError (the client may retry, or relay it with direct_reply=False)."""
    max_client_mailbox_bytes: int = 256 << 20
    """Most bytes of direct answers this node holds at once for one client; more are refused with MailboxFullError,
    so one client that never collects cannot take the whole mailbox."""
    mailbox_hold_s: float = 30.0
    """A direct answer not collected within this long is dropped (its bytes freed)."""


class SpanServer:
    """Serves one :class:`SpanModel`. Call :meth:`register` on a running P2P instance."""

    signer = None
    """The node's identity key (``hivemind.utils.crypto.RSAPrivateKey``): signs each answer's commitment for third
    parties (:func:`swarm.commitments.commit`); None = unsigned commitments."""

    def __init__(self, model: SpanModel, *, limits: ServerLimits = ServerLimits(),
                 hooks: HookRegistry | None = None, info: dict | None = None):
        self.model = model
        self.limits = limits
        self.hooks = hooks or HookRegistry()
        self.info = info or {}
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        itemsize = next(model.parameters()).element_size()
        self.sessions = SessionManager(limits.max_cache_bytes, 2 * config.num_key_value_heads * head_dim * itemsize,
                                       min(limits.max_length, config.max_position_embeddings),
                                       max_client_bytes=limits.max_client_cache_bytes,
                                       max_client_sessions=limits.max_client_sessions)
        self.queue = ClientQueue(limits.max_client_queued_compute)
        """Requests admitted and not yet answered, per client."""
        self.inflight = 0
        self.computing = 0
        """Jobs in the compute executor (running or queued): parsing, hooks, the span, serialising answers."""
        self._p2p: P2P | None = None
        # Jobs run on several threads but compute one at a time: each holds the compute slot, which a span hands to
        # other waiting jobs between its layers (swarm.compute_slot), so long requests do not block others.
        self._slot = ComputeSlot()
        self._executor = concurrent.futures.ThreadPoolExecutor(max(1, limits.max_queued_compute),
                                                               thread_name_prefix="span-compute")
        self._weights = weight_storages(model)
        self._device = next(model.parameters()).device
        self._dtype = next(model.parameters()).dtype
        self.mailbox = Mailbox(max_bytes=limits.max_mailbox_bytes, max_peer_bytes=limits.max_client_mailbox_bytes,
                               hold_s=limits.mailbox_hold_s)
        """Answers of chained forwards waiting for the client's collect stream (swarm.direct_reply)."""
        self.stripes = StripeBoard(wait_s=limits.chain_timeout_s)
        """The extra streams of striped requests, waiting for their first stream's reader (swarm.stripes)."""

    @property
    def load(self) -> int:
        return self.inflight + len(self.sessions.sessions)

    async def register(self, p2p: P2P) -> None:
        self._p2p = p2p
        for name, handler in ((FORWARD, self._forward), (BACKWARD, self._backward), (INFERENCE, self._inference)):
            await p2p.add_protobuf_handler(name, self._framed(handler), runtime_pb2.ExpertRequest,
                                           stream_input=True, stream_output=True)
        await serve_stripes(p2p, self.stripes)
        await p2p.add_protobuf_handler(COLLECT, self._collect, runtime_pb2.ExpertRequest, stream_input=True,
                                       stream_output=True)
        await p2p.add_protobuf_handler(INFO, self._info, runtime_pb2.ExpertRequest)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def expire_sessions_forever(self, period_s: float = 5.0) -> None:
        while True:
            await asyncio.sleep(period_s)
            now = time.monotonic()
            for sid, session in list(self.sessions.sessions.items()):
                if now - session.last_used > self.limits.session_timeout_s:
                    logger.info("Dropping idle session %s", sid)
                    self.sessions.close(sid)

    async def _info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(metadata=msgpack.packb({**self.info, "load": self.load,
                                                                  "computing": self.computing,
                                                                  "mailbox_bytes": self.mailbox.held_bytes}))

    def _framed(self, handler):
        async def serve(requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext):
            self.inflight += 1
            try:
                received, caller = [0], context.remote_id.to_base58()
                opened = time.perf_counter()

                async def stripes(stripe_id: str, count: int):  # a striped request's other streams (swarm.wire)
                    return [_counted(s, received) for s in await self.stripes.take(caller, stripe_id, count)]
                frame = await read_frame(_counted(requests, received), max_bytes=self.limits.max_request_bytes,
                                         accept_error=False, stripes=stripes)
                if frame is None:
                    raise BadRequestError("Empty request stream.")
                client = client_identity(context.remote_id.to_base58(), frame[1].get("origin"))
                counted = self._admit(frame[1], client)
                try:
                    tensors, meta = await handler(*frame, client, received=received[0],
                                                  read_s=time.perf_counter() - opened)
                    # Serialising a large answer is work too: it runs in the compute executor, not on the event loop.
                    messages = await self._compute(
                        lambda: list(encode_frame(tensors, meta, runtime_pb2.ExpertResponse)), client)
                finally:
                    if counted:
                        self.queue.done(client)
            except SwarmError as e:
                logger.info("Rejected %s from %s: %s", context.handle_name, context.remote_id, e)
                messages = encode_error(e)
            except Exception as e:  # a bug on our side: report it, keep serving
                logger.exception("Internal error in %s", context.handle_name)
                messages = encode_error(InternalNodeError(f"{type(e).__name__}: {e}"))
            finally:
                self.inflight -= 1
            for message in messages:
                yield message
            # Keep the stream open until the caller closes it: if we closed first, the p2p daemon would reset
            # the stream and the caller could lose the tail of our answer (seen in ~1 of 3 runs on loopback).
            await asyncio.sleep(self.limits.linger_s)
        return serve

    async def _collect(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext):
        """The client's end of a direct answer (swarm.direct_reply): wait for the answer to ``meta['request_id']``
        that names this caller in ``reply_to``, and stream it. Costs no compute: not admitted to the compute queue."""
        try:
            frame = await read_frame(requests, max_bytes=0, max_tensors=0, accept_error=False)
            if frame is None:
                raise BadRequestError("Empty collect stream.")
            request_id = request_id_of(frame[1])
            index, count = stripe_of(frame[1])
            messages = await self.mailbox.collect(context.remote_id.to_base58(), request_id, index, count,
                                                  self.limits.chain_timeout_s)
            messages = stripe(messages, count, request_id or "-")[index]
        except SwarmError as e:
            logger.info("Rejected %s from %s: %s", context.handle_name, context.remote_id, e)
            messages = list(encode_error(e))
        except Exception as e:  # a bug on our side: report it, keep serving
            logger.exception("Internal error in %s", context.handle_name)
            messages = list(encode_error(InternalNodeError(f"{type(e).__name__}: {e}")))
        for message in messages:
            yield message
        await asyncio.sleep(self.limits.linger_s)  # the caller closes the stream (see _framed)

    # ---- parsing and validation -------------------------------------------------------------------------

    def _parse(self, tensors: list[torch.Tensor], meta: dict, *, step: int = 0, past: int = 0,
               client: str = "") -> SpanRequest:
        return parse_request(self.model, self.hooks, tensors, meta, max_batch_tokens=self.limits.max_batch_tokens,
                             max_length=self.sessions.max_length, dtype=self._dtype, device=self._device, step=step,
                             past=past, client=client)

    def _admit(self, meta: dict, client: str) -> bool:
        """Refuse new compute when the executor already holds ``max_queued_compute`` jobs, or ``client`` already has
        ``max_client_queued_compute`` requests here, before any parsing or compute is queued; closing a session
        costs no compute and is always admitted. Returns whether the request was counted in ``client``'s queue.

        Raises:
            OverloadedError: the compute queue is at its bound (in all, or for this client).
        """
        if meta.get("close") is True:
            return False
        me = self._p2p.peer_id.to_base58() if self._p2p is not None else ""
        if self.computing >= self.limits.max_queued_compute:
            raise OverloadedError(f"This node's compute queue is full: {self.computing} job(s) running or queued, "
                                  f"the limit (--max-queued-compute) is {self.limits.max_queued_compute}; "
                                  f"retry after a short backoff or use another replica of these layers.", me)
        try:
            self.queue.admit(client)
        except OverloadedError as e:
            e.peer_id = me
            raise
        return True

    async def _compute(self, fn, client: str = ""):
        """Run ``fn`` in the compute executor, holding the compute slot (queued round-robin by ``client``): everything
        heavier than moving bytes runs there, so the event loop stays free to answer pings (``info``) while a request
        decodes, computes or serialises."""
        self.computing += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._in_slot, fn, client)
        finally:
            self.computing -= 1

    def _in_slot(self, fn, client: str):
        with self._slot.held(client):
            return fn()

    def _between_layers(self, client: str):
        return lambda: self._slot.pass_on(client)

    def _run(self, request: SpanRequest, inputs: torch.Tensor, cache=None) -> torch.Tensor:
        with active_hook(request.hook):
            return self.model(inputs, start=request.start, end=request.end, embed=request.embed, head=request.head,
                              attention_mask=request.tensors.get("attention_mask"),
                              position_ids=request.tensors.get("position_ids"), cache=cache,
                              between_layers=self._between_layers(request.client))

    @staticmethod
    def _reply(output: torch.Tensor, hook_result: bytes | None, extra: dict | None = None):
        tensors, names = [output.cpu()], ["outputs"]
        if hook_result is not None:
            tensors.append(torch.frombuffer(bytearray(hook_result), dtype=torch.uint8))
            names.append("hook_result")
        return tensors, {"names": names, **(extra or {})}

    async def _parsed(self, tensors: list[torch.Tensor], meta: dict, client: str, *, step: int = 0,
                      past: int = 0) -> SpanRequest:
        """:meth:`_parse` in the compute executor: a hook's payload (a graph) is decoded and checked there, never on
        the event loop, which must stay free to answer pings."""
        return await self._compute(lambda: self._parse(tensors, meta, step=step, past=past, client=client), client)

    # ---- handlers ---------------------------------------------------------------------------------------

    async def _forward(self, tensors, meta, client: str, received: int = 0, read_s: float = 0.0):
        chain = parse_chain(meta.get("next", []), self.limits.max_chain)
        reply_to = reply_to_of(meta, client)
        keep_outputs = meta.get("return_outputs", True)
        if not isinstance(keep_outputs, bool) and keep_outputs != "last":
            raise BadRequestError("meta['return_outputs'] must be a boolean or \"last\" (the last position only).")
        request_id = request_id_of(meta)
        t0 = time.perf_counter()  # parsing counts: a hook's graph work may run while it is built
        request = await self._parsed(tensors, meta, client)
        grad = wants_grad(request.hook)

        def work():
            if grad:  # autograd state is kept until the rest of the chain answers (swarm.span_grad)
                budget = SavedTensorBudget(self.limits.max_backward_bytes, self._weights)
                output = forward_with_grad(lambda x: self._run(request, x), request.hook, request.tensors["inputs"],
                                           budget)
            else:
                with torch.no_grad():
                    output = self._run(request, request.tensors["inputs"])
            return output, hook_result(request.hook) if request.hook is not None else None
        output, result = await self._compute(work, client)
        me = self._p2p.peer_id.to_base58()
        stats = {"compute_s": {me: time.perf_counter() - t0}, "read_s": {me: read_s}, "node_bytes": 0,
                 "commitments": [commit(output, request_id, me, self.signer)]}
        if reply_to is not None and not grad:  # the answer goes straight to the client (swarm.direct_reply)
            stats = merged(upstream_of(meta, self.limits.max_chain), stats, received if "origin" in meta else 0)
        if not chain:
            kept = output[:, -1:] if keep_outputs == "last" else output if keep_outputs else output.new_empty(0)
            reply = self._reply(kept.detach(), result, stats)
            if reply_to is not None and not grad:
                reply = await self._deliver(reply_to, request_id, reply, client)
        else:
            hop, rest = chain[0], chain[1:]
            onward_meta = {"start": hop["start"], "end": hop["end"], "head": hop["head"], "next": rest,
                           "return_outputs": keep_outputs, "request_id": request_id}
            if reply_to is not None and not grad:  # in grad mode the answer is relayed: backward runs on its way
                onward_meta.update(reply_to=reply_to, upstream=stats)
            reply = await self._pass_on(FORWARD, hop["peer"], output.detach(), result, onward_meta, request, tensors,
                                        meta, stats)
        if grad:
            reply = await self._compute(lambda: backward_reply(request.hook, output, *reply), client)
        return reply

    async def _deliver(self, reply_to: str, request_id: str, reply, client: str):
        """Put the answer in the mailbox for ``reply_to``'s collect stream and answer the caller with an
        acknowledgement.

        Raises:
            MailboxFullError: the mailbox cannot hold the answer (checked on its tensor bytes before encoding it, and
                on its encoded size after); the error travels back along the chain to the client.
        """
        tensors, meta = reply
        self.mailbox.room_for(reply_to, sum(t.numel() * t.element_size() for t in tensors))
        messages = await self._compute(lambda: list(encode_frame(tensors, meta, runtime_pb2.ExpertResponse)), client)
        self.mailbox.deliver(reply_to, request_id, messages, sum(m.ByteSize() for m in messages))
        return [], {"names": [], "direct": True}

    async def _pass_on(self, handle: str, peer: str, output: torch.Tensor, hook_result: bytes | None,
                       onward_meta: dict, request: SpanRequest, tensors, meta: dict, stats: dict):
        """Chained call: send the outputs (with the masks, and the hook's payload and result as the next carry)
        straight to the next node, and relay its answer back with the compute seconds and node → node bytes."""
        onward_meta["origin"] = request.client  # the next node counts this request against the same client
        onward = {"inputs": output}
        onward.update({k: request.tensors[k].cpu() for k in ("attention_mask", "position_ids") if k in request.tensors})
        if request.hook is not None:
            onward["hook_payload"] = tensors[meta["names"].index("hook_payload")]
            onward["hook_carry"] = torch.frombuffer(bytearray(hook_result), dtype=torch.uint8)
            onward_meta.update(hook=meta["hook"], hop=request.hop + 1)
        traffic = Traffic()
        out, reply = await call(self._p2p, peer, handle, onward, onward_meta,
                                timeout_s=self.limits.chain_timeout_s, traffic=traffic, liveness_s=self.limits.liveness_s)
        names = reply.get("names", list(out))
        for key in ("compute_s", "read_s"):
            stats.setdefault(key, {}).update(seconds_by_peer(reply.get(key), self.limits.max_chain + 1))
        stats["node_bytes"] = int(reply.get("node_bytes", 0)) + traffic.bytes_sent + traffic.bytes_received
        if "commitments" in stats:  # this hop's, then the later hops' in route order
            stats["commitments"] = stats["commitments"] + parse_commitments(reply.get("commitments"),
                                                                            self.limits.max_chain)
        return [out[n] for n in names], {"names": names, **{k: v for k, v in reply.items() if k not in ("names",)},
                                         **stats}

    async def _backward(self, tensors, meta, client: str, received: int = 0, read_s: float = 0.0):
        reply_to, request_id = reply_to_of(meta, client), request_id_of(meta)  # swarm.direct_reply, as in _forward
        request = await self._parsed(tensors, meta, client)
        if request.embed:
            raise BadRequestError("Backward through the embedding is not served; send hidden states.")
        grad_outputs = request.tensors.get("grad_outputs")
        if grad_outputs is None:
            raise BadRequestError("Backward needs a 'grad_outputs' tensor.")

        def work():
            inputs = request.tensors["inputs"].detach().requires_grad_(True)
            with torch.enable_grad():
                outputs = self._run(request, inputs)
                if grad_outputs.shape != outputs.shape or grad_outputs.dtype != outputs.dtype:
                    raise BadRequestError(f"grad_outputs must be {outputs.dtype} {tuple(outputs.shape)}; "
                                          f"got {grad_outputs.dtype} {tuple(grad_outputs.shape)}.")
                (grad_inputs,) = torch.autograd.grad(outputs, inputs, grad_outputs)
            return grad_inputs, hook_result(request.hook) if request.hook is not None else None
        reply = self._reply(*await self._compute(work, client))
        if reply_to is not None:  # the client collects it over as many streams as it opened
            reply = await self._deliver(reply_to, request_id, reply, client)
        return reply

    async def _inference(self, tensors, meta, client: str, received: int = 0, read_s: float = 0.0):
        session_id = meta.get("session_id")
        if not isinstance(session_id, str) or not 0 < len(session_id) <= 128:
            raise BadRequestError("Inference needs meta['session_id'] as a non-empty string (≤128 chars).")
        if meta.get("close"):
            self.sessions.close(session_id)
            return [], {"names": [], "closed": True}
        reply_to, request_id = reply_to_of(meta, client), request_id_of(meta)  # swarm.direct_reply, as in _forward
        session = self.sessions.sessions.get(session_id)
        step = session.steps if session is not None else 0
        request = await self._parsed(tensors, meta, client, step=step,
                                     past=session.length if session is not None else 0)
        if self.sessions.sessions.get(session_id) is not session:
            raise BadRequestError(f"Session {session_id!r} was opened, closed or dropped while this step was parsed; "
                                  f"send one step of a session at a time.")
        batch, length = request.tensors["inputs"].shape[:2]
        opened_here = session is None
        if session is None:
            spec = meta.get("open")
            if not isinstance(spec, dict):
                raise UnknownSessionError(f"Session {session_id!r} is not open on this node (expired after "
                                          f"{self.limits.session_timeout_s:.0f} s idle, closed, or never opened); "
                                          f"open it again with meta['open'] and replay its history.")
            max_length = spec.get("max_length")
            if not isinstance(max_length, int) or max_length <= 0:
                raise BadRequestError("meta['open']['max_length'] must be a positive integer.")
            session = self.sessions.open(session_id, start=request.start, end=request.end, embed=request.embed,
                                         head=request.head, batch_size=batch, max_length=max_length, client=client)
        elif batch != session.batch_size:
            raise BadRequestError(f"Session {session_id!r} was opened with batch size {session.batch_size}; got {batch}.")
        elif (session.start, session.end, session.embed, session.head) != (request.start, request.end, request.embed, request.head):
            raise BadRequestError(f"Session {session_id!r} was opened for layers {session.start}:{session.end}; "
                                  f"steps must use the same layers.")
        if session.busy:
            raise BadRequestError(f"Session {session_id!r} is running a step; send one step of a session at a time.")
        session.check_room(length)
        last_only, argmax = meta.get("last_only", False), meta.get("argmax", False)
        if not isinstance(last_only, bool) or not isinstance(argmax, bool):
            raise BadRequestError("meta['last_only'] and meta['argmax'] must be booleans.")
        if argmax and not (request.head and last_only):
            raise BadRequestError("meta['argmax'] answers the next token's id, which needs the head ('head': true) "
                                  "and the last position only ('last_only': true).")
        chain = parse_inference_chain(meta.get("next", []), self.limits.max_chain)

        chunks = meta.get("chunks", [length])
        if not isinstance(chunks, list) or not all(isinstance(c, int) and c > 0 for c in chunks) or sum(chunks) != length:
            raise BadRequestError(f"meta['chunks'] must be positive step lengths summing to {length}; got {chunks!r}.")
        if request.hook is not None and len(chunks) > 1:
            raise BadRequestError("A span hook sees one step per call; replay hooked steps one call each, "
                                  "without meta['chunks'].")

        try:  # CapacityError past the node's or this client's KV-cache bytes
            self.sessions.charge(session, length)
        except CapacityError:
            if opened_here:  # a refused first step leaves no empty session behind
                self.sessions.close(session_id)
            raise
        between_layers = self._between_layers(client)

        def work():
            # A replayed history arrives as several steps in one call; running them one by one recomputes the
            # KV cache exactly as the original steps did, so a rebuilt session matches bit for bit.
            outputs, offset = [], 0
            mask, positions = request.tensors.get("attention_mask"), request.tensors.get("position_ids")
            with torch.no_grad(), active_hook(request.hook):
                for size in chunks:
                    if offset:
                        between_layers()
                    part = slice(offset, offset + size)
                    seen = mask.shape[1] - length + offset + size if mask is not None else None
                    outputs.append(self.model(
                        request.tensors["inputs"][:, part], start=request.start, end=request.end, embed=request.embed,
                        head=request.head, attention_mask=mask[:, :seen] if mask is not None else None,
                        position_ids=positions[:, part] if positions is not None else None, cache=session.cache,
                        logits_to_keep=1 if last_only else 0, between_layers=between_layers))
                    offset += size
            output = torch.cat(outputs, dim=1)
            if request.hook is None:
                return output, None, None
            try:  # the hook failing after the span ran leaves the cache whole: the session stays usable
                return output, hook_result(request.hook), None
            except SwarmError as e:
                return output, None, e
        t0 = time.perf_counter()
        session.busy = True
        try:
            output, result, hook_error = await self._compute(work, client)
        except BaseException:
            self.sessions.close(session_id)  # the cache may be half-updated: never reuse it
            raise
        finally:
            session.busy = False
        session.length += length
        session.steps += 1
        session.last_used = time.monotonic()
        if hook_error is not None:
            raise hook_error
        me = self._p2p.peer_id.to_base58()
        stats = {"compute_s": {me: time.perf_counter() - t0}, "read_s": {me: read_s}, "node_bytes": 0}
        if reply_to is not None:
            stats = merged(upstream_of(meta, self.limits.max_chain), stats, received if "origin" in meta else 0)
        if not chain:
            if argmax:  # greedy decoding's next token (B, 1), after the hook's writes: the logits stay here
                output = output[:, -1:].float().argmax(-1)
            reply = self._reply(output[:, -1:] if last_only else output, result, {"length": session.length, **stats})
            if reply_to is not None:  # straight to the client's collect stream (swarm.direct_reply)
                try:
                    reply = await self._deliver(reply_to, request_id, reply, client)
                except BaseException:  # the step grew the cache but its answer is lost: never reuse the session
                    self.sessions.close(session_id)
                    raise
            return reply
        hop, rest = chain[0], chain[1:]
        onward_meta = {"session_id": hop["session_id"], "start": hop["start"], "end": hop["end"], "embed": False,
                       "head": hop["head"], "next": rest, "last_only": hop["last_only"], "argmax": hop["argmax"]}
        if hop["open"] is not None:
            onward_meta["open"] = hop["open"]
        if reply_to is not None:
            onward_meta.update(reply_to=reply_to, upstream=stats, request_id=request_id)
        return await self._pass_on(INFERENCE, hop["peer"], output, result, onward_meta, request, tensors, meta, stats)
