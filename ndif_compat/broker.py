"""The swarm backend's network, kept outside the sandbox: a cell asks, the gateway calls the swarm.

A sandboxed cell has no network, so for the ``swarm`` backend it holds no swarm connection. Its decoder layers
(:class:`BrokerCalls`) and its hybrid model (:class:`BrokeredLanguageModel`) send each swarm call as a ``call``
message over the cell's channel; the gateway's :class:`SwarmBroker` checks it and makes it on the gateway's one
swarm connection, and answers ``reply`` (or ``reply_error``). What crosses is data only, in the codecs volunteer
nodes already accept from strangers: hidden states and values as :func:`hybrid.values.pack_values` (JSON +
safetensors), graphs as our IR (:class:`hybrid.ir.Graph`, validated and capped as a node does). Calls:

=================  ============================================================================================
``forward``        layers ``[start, end)`` on a hidden state (gateway execution)
``backward``       the gradient w.r.t. a hidden state fed to layers ``[start, end)``, given their output's gradient
``step``           the next step of this request's KV-cache session for ``[start, end)`` (gateway generation)
``close``          end this request's sessions
``run_graph``      a hybrid trace: graph + input ids + mask (+ values a session supplies) → saves + stats
``run_generation`` a hybrid generation: the same + greedy options → tokens + per-step values + stats
=================  ============================================================================================

The broker runs one call at a time (the swarm bytes of a request are measured around its own calls).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import fields
from typing import Any

import torch

from .errors import BadRequestError, GatewayError

OPS = ("forward", "backward", "step", "close", "run_graph", "run_generation")
PLACEMENTS = ("hybrid",)
"""Placements a cell may ask for: ``hybrid`` runs each part of the graph on the node owning its module (the
gateway runs only the embedding and head parts, with the node's caps)."""


class BrokerError(GatewayError):
    """A swarm call the gateway made for a request failed, or the request's call was malformed."""

    code = "broker_error"


def join(first: bytes, second: bytes) -> bytes:
    return struct.pack("<Q", len(first)) + first + second


def split(body: bytes) -> tuple[bytes, bytes]:
    if len(body) < 8:
        raise BadRequestError("malformed swarm call body")
    (n,) = struct.unpack("<Q", body[:8])
    if n > len(body) - 8:
        raise BadRequestError("malformed swarm call body")
    return body[8:8 + n], body[8 + n:]


# ---- the cell's side ----------------------------------------------------------------------------------------------

class BrokerLink:
    """The cell's end of the broker: one call at a time over the cell's channel."""

    def __init__(self, channel, max_reply_bytes: int):
        self.channel, self.max_reply_bytes = channel, max_reply_bytes

    def call(self, op: str, meta: dict | None = None, body: bytes = b"") -> tuple[dict, bytes]:
        self.channel.send("call", {"op": op, **(meta or {})}, body)
        kind, reply, data = self.channel.recv(self.max_reply_bytes)
        if kind == "reply_error":
            raise BrokerError(str(reply.get("text", "the swarm call failed")))
        if kind != "reply":
            raise BrokerError(f"unexpected answer {kind!r} to a swarm call")
        return reply, data


class RehearsalLink:
    """Stands in for the broker while the template warms up: decoder layers answer with their input (values that
    reach no one), graph calls fail (the rehearsal then takes the gateway path)."""

    def call(self, op: str, meta: dict | None = None, body: bytes = b"") -> tuple[dict, bytes]:
        from hybrid.values import pack_values, unpack_values

        if op in ("forward", "step"):
            return {}, pack_values({0: unpack_values(body)[0]})
        if op == "close":
            return {}, b""
        raise BrokerError("no swarm while the template warms up")


class BrokerCalls:
    """:class:`~ndif_compat.swarm_layers.SwarmStack`'s swarm calls, made by the gateway for this cell."""

    def __init__(self, link: BrokerLink | None = None):
        self.link = link
        """Set in the cell, once it is connected (the template has none)."""

    def _call(self, op: str, hidden, mask, positions, start: int, end: int, grad=None, **extra) -> torch.Tensor:
        from hybrid.values import pack_values, unpack_values

        if self.link is None:
            raise BrokerError("this process has no swarm connection")
        values = {0: hidden, 1: mask, 2: positions, **({3: grad} if grad is not None else {})}
        _, body = self.link.call(op, {"start": start, "end": end, **extra}, pack_values(values))
        return unpack_values(body)[0]

    def forward(self, hidden, mask, positions, start: int, end: int) -> torch.Tensor:
        return self._call("forward", hidden, mask, positions, start, end)

    def backward(self, hidden, grad, mask, positions, start: int, end: int) -> torch.Tensor:
        return self._call("backward", hidden, mask, positions, start, end, grad=grad)

    def step(self, hidden, mask, positions, start: int, end: int, max_length: int) -> torch.Tensor:
        return self._call("step", hidden, mask, positions, start, end, max_length=max_length)

    def close(self) -> None:
        if self.link is not None:
            self.link.call("close")


class _Stats(dict):
    def as_dict(self) -> dict:
        return dict(self)


def brokered_language_model(path, link_box: BrokerCalls):
    """A :class:`hybrid.LanguageModel` without a swarm connection: it records graphs here and has them run by the
    gateway (``link_box.link``)."""
    import hybrid
    from hybrid.request import NO_LINKS
    from hybrid.values import pack_values, unpack_values

    def links_meta(links) -> tuple[dict, dict]:
        meta = {"keep": {str(k): v for k, v in links.keep.items()}, "held": {str(k): v for k, v in links.held.items()}}
        return meta, dict(links.supplied)

    class BrokeredLanguageModel(hybrid.LanguageModel):
        def _placement(self, placement: str | None) -> str:
            if placement not in (None, *PLACEMENTS):
                raise BrokerError(f"placement {placement!r} is not run for a gateway request")
            return "hybrid"

        def _call(self, op: str, graph, input_ids, attention_mask, placement: str, links, **meta):
            if link_box.link is None:
                raise BrokerError("this process has no swarm connection")
            link_meta, supplied = links_meta(links)
            values = {**supplied, -1: input_ids, -2: attention_mask}
            reply, body = link_box.link.call(op, {"placement": placement, **link_meta, **meta},
                                             join(graph.to_bytes(), pack_values(values)))
            return unpack_values(body), _Stats(reply.get("stats", {}))

        def run_graph(self, graph, input_ids, attention_mask, *, placement="hybrid", links=NO_LINKS):
            return self._call("run_graph", graph, input_ids, attention_mask, placement, links)

        def run_generation(self, graph, input_ids, attention_mask, options, *, placement="hybrid", links=NO_LINKS):
            options_meta = {f.name: getattr(options, f.name) for f in fields(options)}
            values, stats = self._call("run_generation", graph, input_ids, attention_mask, placement, links,
                                       options=options_meta)
            tokens = values.pop(-1)
            return tokens, values, stats

    return BrokeredLanguageModel(str(path))


# ---- the gateway's side -------------------------------------------------------------------------------------------

class SwarmBroker:
    """The gateway's swarm connection, shared by the cells' calls (one call at a time). Build it, then
    :meth:`connect` (does the I/O)."""

    def __init__(self, model_path, initial_peers, max_message_bytes: int):
        self.model_path, self.initial_peers = model_path, list(initial_peers)
        self.max_message_bytes = max_message_bytes
        self.lm = None
        self._lock = threading.Lock()

    def connect(self) -> None:
        import hybrid

        self.lm = hybrid.LanguageModel(str(self.model_path), initial_peers=self.initial_peers)
        self.lm.client  # noqa: B018 (opens the connection now, so a bad peer list fails at start-up)

    def request(self) -> "BrokerRequest":
        return BrokerRequest(self)

    def close(self) -> None:
        if self.lm is not None:
            self.lm.close()


class BrokerRequest:
    """The swarm calls of one request (its KV-cache sessions, its swarm bytes); :meth:`close` when it ends."""

    def __init__(self, broker: SwarmBroker):
        from .swarm_layers import ClientCalls

        self.broker = broker
        self.calls = ClientCalls(broker.lm.client)
        self.sent = self.received = self.count = 0

    def handle(self, meta: dict, body: bytes) -> tuple[dict, bytes]:
        """One call. Raises BadRequestError (malformed) or BrokerError (the swarm failed)."""
        op = meta.get("op")
        if op not in OPS:
            raise BadRequestError(f"unknown swarm call {op!r}")
        traffic = self.broker.lm.client.sequence.traffic
        with self.broker._lock:
            before = (traffic.bytes_sent, traffic.bytes_received, traffic.calls)
            try:
                return getattr(self, f"_{op}")(meta, body)
            except GatewayError:
                raise
            except Exception as e:  # the swarm's typed errors, or a check of ours: the cell sees the text
                raise BrokerError(f"{type(e).__name__}: {e}") from None
            finally:
                self.sent += traffic.bytes_sent - before[0]
                self.received += traffic.bytes_received - before[1]
                self.count += traffic.calls - before[2]

    def close(self) -> None:
        with self.broker._lock:
            self.calls.close()

    # ---- calls --------------------------------------------------------------------------------------------------

    def _span(self, meta: dict) -> tuple[int, int]:
        n = self.broker.lm.config.num_hidden_layers
        start, end = meta.get("start"), meta.get("end")
        if type(start) is not int or type(end) is not int or not 0 <= start < end <= n:
            raise BadRequestError(f"a swarm call names layers [{start!r}, {end!r}); the model has {n}")
        return start, end

    def _states(self, body: bytes, values: dict | None = None) -> tuple[torch.Tensor, Any, Any]:
        from hybrid.values import unpack_values

        values = unpack_values(body) if values is None else values
        hidden, mask, positions = values.get(0), values.get(1), values.get(2)
        d = self.broker.lm.config.hidden_size
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3 or hidden.shape[-1] != d or \
                not hidden.is_floating_point():
            raise BadRequestError(f"a swarm call's hidden state must be (batch, tokens, {d}) floats")
        for name, value in (("mask", mask), ("positions", positions)):
            if value is not None and (not isinstance(value, torch.Tensor) or value.shape != hidden.shape[:2]
                                      or value.is_floating_point()):
                raise BadRequestError(f"a swarm call's {name} must be integers of shape (batch, tokens)")
        return hidden.to(self.broker.lm.dtype), mask, positions

    def _forward(self, meta: dict, body: bytes) -> tuple[dict, bytes]:
        from hybrid.values import pack_values

        start, end = self._span(meta)
        out = self.calls.forward(*self._states(body), start, end)
        return {}, pack_values({0: out})

    def _backward(self, meta: dict, body: bytes) -> tuple[dict, bytes]:
        from hybrid.values import pack_values, unpack_values

        start, end = self._span(meta)
        values = unpack_values(body)
        hidden, mask, positions = self._states(body, values)
        grad = values.get(3)
        if not isinstance(grad, torch.Tensor) or grad.shape != hidden.shape or not grad.is_floating_point():
            raise BadRequestError(f"a swarm backward's gradient must be floats shaped like its hidden state "
                                  f"{tuple(hidden.shape)}")
        out = self.calls.backward(hidden, grad.to(hidden.dtype), mask, positions, start, end)
        return {}, pack_values({0: out})

    def _step(self, meta: dict, body: bytes) -> tuple[dict, bytes]:
        from hybrid.values import pack_values

        start, end = self._span(meta)
        max_length = meta.get("max_length")
        if type(max_length) is not int or not 0 < max_length <= 1 << 20:
            raise BadRequestError(f"a swarm session's max_length must be a positive integer; got {max_length!r}")
        out = self.calls.step(*self._states(body), start, end, max_length)
        return {}, pack_values({0: out})

    def _close(self, meta: dict, body: bytes) -> tuple[dict, bytes]:
        self.calls.close()
        return {}, b""

    def _graph_call(self, meta: dict, body: bytes):
        from hybrid.ir import Graph
        from hybrid.node_plugin import cap_limits
        from hybrid.request import SessionLinks
        from hybrid.validation import validate
        from hybrid.values import unpack_values

        placement = meta.get("placement")
        if placement not in PLACEMENTS:
            raise BadRequestError(f"placement {placement!r} is not run for a gateway request; allowed: {PLACEMENTS}")
        graph_bytes, value_bytes = split(body)
        graph = Graph.from_bytes(graph_bytes, max_attachment_bytes=self.broker.max_message_bytes)
        validate(graph, cap_limits)
        graph.limits = cap_limits(graph.limits)
        values = unpack_values(value_bytes)
        input_ids, mask = values.pop(-1, None), values.pop(-2, None)
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point() or (
                mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape)):
            raise BadRequestError("a graph call needs integer input ids (batch, tokens) and a mask of that shape")
        try:
            keep = {int(k): str(v)[:200] for k, v in dict(meta.get("keep", {})).items()}
            held = {int(k): int(v) for k, v in dict(meta.get("held", {})).items()}
        except (TypeError, ValueError):
            raise BadRequestError("malformed session links in a graph call") from None
        if any(not 0 <= k < len(graph.nodes) for k in [*keep, *held, *values]):
            raise BadRequestError("session links name nodes the graph does not have")
        return graph, input_ids, mask, SessionLinks(keep, held, values)

    def _run_graph(self, meta: dict, body: bytes) -> tuple[dict, bytes]:
        from hybrid.values import pack_values

        graph, input_ids, mask, links = self._graph_call(meta, body)
        saves, stats = self.broker.lm.run_graph(graph, input_ids, mask, placement="hybrid", links=links)
        return {"stats": stats.as_dict()}, pack_values(saves)

    def _run_generation(self, meta: dict, body: bytes) -> tuple[dict, bytes]:
        from hybrid.generation import GenerateOptions
        from hybrid.values import pack_values

        graph, input_ids, mask, links = self._graph_call(meta, body)
        given = meta.get("options")
        if not isinstance(given, dict) or given.get("do_sample"):
            raise BadRequestError("a gateway request's generation must be greedy (do_sample=False)")
        known = {f.name for f in fields(GenerateOptions)}
        try:
            options = GenerateOptions(**{k: v for k, v in given.items() if k in known})
            if type(options.max_new_tokens) is not int or not 0 < options.max_new_tokens <= 4096:
                raise ValueError("max_new_tokens")
        except (TypeError, ValueError) as e:
            raise BadRequestError(f"malformed generation options ({e})") from None
        tokens, values, stats = self.broker.lm.run_generation(graph, input_ids, mask, options, placement="hybrid",
                                                              links=links)
        return {"stats": stats.as_dict()}, pack_values({**values, -1: tokens})
