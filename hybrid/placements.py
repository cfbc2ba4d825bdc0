"""Placements: where one traced graph runs. The same graph runs in each, so results and costs compare.

- ``local`` (HPC): the whole model is loaded in this process; the graph runs on module hooks here.
- ``hybrid``: the graph is planned over the route and pushed with the hidden states, node → node
  (:meth:`swarm.remote_sequence.RemoteSequence.forward_chain`); only saved values come back. Stages the swarm
  does not serve (embedding, head) run on the client as executors of their own.
- ``centralized``: ``hybrid`` on a deployment where one node serves every stage (a one-hop route).
- ``swarm`` (Petals-style comparator): the graph runs on the client; the client pulls the hidden state at every
  intervened layer boundary, runs the graph there, and sends the (possibly changed) state onward. Like Petals it
  can only reach decoder-layer inputs/outputs, the embedding and the head.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from swarm.model import SwarmModel
from swarm.remote_sequence import HookRequest
from swarm.span_hook import active_hook
from swarm.stages import SpanModel

from .blobs import entries_for
from .errors import BlobMissingError, DisallowedOpError, HybridError
from .interpreter import Interpreter
from .ir import Graph
from .node_plugin import TRIM_MIN_ROWS, InterpreterHook, trims_head
from .planner import Executor, Plan, plan_graph, reads_last_logits_only, saves_last_logits
from .source import split_op_path
from .request import HOOK_KIND, HOOK_VERSION, NO_LINKS, SessionLinks, encode_request
from .values import pack_values, results_agree, unpack_values

PLACEMENTS = ("local", "hybrid", "centralized", "swarm")
_LAYER_BOUNDARY = re.compile(r"^model\.layers\.(\d+)$")


@dataclass
class TraceStats:
    """What one trace cost. The benchmarks are built on these numbers."""

    placement: str
    client_bytes_sent: int = 0
    """Serialized bytes the client sent to nodes."""
    client_bytes_received: int = 0
    """Serialized bytes the client received from nodes."""
    node_bytes: int = 0
    """Bytes that crossed node → node links (both directions)."""
    round_trips: int = 0
    """Calls the client made."""
    compute_s: dict[str, float] = field(default_factory=dict)
    """Seconds of span compute per node (peer id)."""
    read_s: dict[str, float] = field(default_factory=dict)
    """Seconds per node (peer id) from its request stream opening to the whole request frame read, every stripe
    included (pushed runs): about its bytes over the link's bandwidth; a stream that waits for its flow-control window
    shows as a round trip more."""
    wall_s: float = 0.0
    route: list[str] = field(default_factory=list)
    """Executors in order: ``client`` or peer ids."""
    commitments: list[dict] = field(default_factory=list)
    """One per node of the route, in order (``peer``, ``request_id``, ``digest``): what each node committed to
    having computed (:mod:`swarm.commitments`)."""
    verify_checks: int = 0
    """Hops drawn for a spot check during this trace (``ClientConfig.verify``), skipped ones included."""
    verify_mismatches: int = 0
    """Checks where another route's answer disagreed (each settled by a third route, or the trace failed)."""
    verify_skipped: int = 0
    """Checks given up: no other node serves the hop's layers, or the other route failed."""
    suspects: list[str] = field(default_factory=list)
    """Peers a check outvoted during this trace: excluded by this client and reported in the DHT."""
    verify_bytes: int = 0
    """Serialized bytes (both directions) of the checks' re-runs; not in ``client_bytes_*`` or ``round_trips``."""
    head_on: str = "local"
    """Who ran the model's head: ``"node"`` (the route's last node sends what the graph reads of it), ``"client"``
    (the node sent the last position's hidden state and the client ran its own head: fewer bytes when the graph
    saves the logits rows, see :func:`hybrid.planner.saves_last_logits`) or ``"local"``."""
    head_positions: str = "all"
    """Where the model's head ran: ``"last"`` when the graph reads only the last position's logits and the batch has
    at least ``hybrid.node_plugin.TRIM_MIN_ROWS`` rows × positions (the head then runs on that position alone),
    else ``"all"``."""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def run_local_stage(model: SpanModel, interpreter: Interpreter, inputs: torch.Tensor, call: int = 0,
                    last_hidden: bool = False, **kwargs) -> torch.Tensor:
    """Run ``model(inputs, **kwargs)`` here with ``interpreter`` on its module events (forward call ``call``); with
    autograd when the graph has backward passes (the embedding's output is then where gradients start).
    ``last_hidden``: ``inputs`` is the last position's hidden state alone, for a head that reads only it."""
    with torch.set_grad_enabled(interpreter.grad_mode), active_hook(InterpreterHook(interpreter, call,
                                                                                   last_hidden=last_hidden)):
        return model(inputs, **kwargs)


def finish_all(interpreter: Interpreter) -> dict[int, Any]:
    """An executor that runs every stage: its values after the forward and after its backward passes."""
    values = interpreter.finish()
    if interpreter.grad_mode:
        values.update(interpreter.finish_backward())
    return values


class _RemoteSegment(torch.autograd.Function):
    """Layers ``[start, end)`` on the swarm with autograd, Petals-style: the forward keeps each hop's input on the
    client, the backward sends it again with the gradient to each hop's backward RPC."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, client: SwarmModel, start: int, end: int, attention_mask, position_ids):
        out, trail = client.loop.run(client.sequence.forward(
            hidden.detach(), attention_mask=attention_mask, position_ids=position_ids, start=start, end=end,
            keep_hop_inputs=True))
        ctx.client, ctx.trail, ctx.extras = client, trail, (attention_mask, position_ids)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mask, positions = ctx.extras
        grad = ctx.client.loop.run(ctx.client.sequence.backward(ctx.trail, grad.contiguous(), attention_mask=mask,
                                                                position_ids=positions))
        return grad, None, None, None, None, None


class LocalRunner:
    """HPC placement: the whole model in this process (``trim_head``: see :func:`hybrid.planner.plan_graph`)."""

    def __init__(self, model: SpanModel, trim_head: bool = True):
        self.model, self.trim_head = model, trim_head

    def run(self, graph: Graph, events, input_ids, attention_mask, position_ids=None,
            links: SessionLinks = NO_LINKS) -> tuple[dict[int, Any], TraceStats]:
        t0 = time.perf_counter()
        num_layers = self.model.config.num_hidden_layers
        plan = plan_graph(graph, events, num_layers, [Executor("local", 0, num_layers + 1)], trim_head=self.trim_head)
        interpreter = Interpreter(graph, plan, 0, dict(links.supplied), device=next(self.model.parameters()).device,
                                  modules=dict(self.model.named_modules()))
        run_local_stage(self.model, interpreter, input_ids, embed=True, head=True, attention_mask=attention_mask,
                         position_ids=position_ids)
        saves = {k: v for k, v in finish_all(interpreter).items() if graph.nodes[k].save}
        return saves, TraceStats("local", wall_s=time.perf_counter() - t0, route=["local"],
                                 head_positions="last" if trims_head(plan, input_ids) else "all")


class SwarmRunner:
    """Runs graphs on a swarm, pushed (``hybrid``/``centralized``) or pulled (``swarm``)."""

    def __init__(self, client: SwarmModel, trim_head: bool = True):
        self.client, self.trim_head = client, trim_head
        self.sequence = client.sequence
        self.local = client.local  # embedding + head, with span-hook dispatch installed
        self.modules = dict(self.local.named_modules())
        self.num_layers = client.num_layers

    def run(self, placement: str, graph: Graph, events, input_ids, attention_mask,
            position_ids=None, links: SessionLinks = NO_LINKS) -> tuple[dict[int, Any], TraceStats]:
        meter = ClientLinkMeter(self.sequence)
        if placement == "swarm":
            saves, stats = self._pulled(graph, events, input_ids, attention_mask, position_ids, links)
        else:
            saves, stats = self._pushed(graph, events, input_ids, attention_mask, position_ids, links,
                                        single_hop=placement == "centralized")
            stats.placement = placement
        meter.charge(stats)
        return saves, stats

    # ---- pushed: hybrid / centralized ---------------------------------------------------------------------

    def executors(self, hops, remote_embed: bool, remote_head: bool) -> list[Executor]:
        """The executors of a pushed run over ``hops``: the client's embedding and head where no node serves them."""
        n = self.num_layers
        executors = [] if remote_embed else [Executor("client", 0, 0)]
        for hop in hops:
            first = 0 if remote_embed and hop.start == 0 else hop.start + 1
            last = n + 1 if remote_head and hop.end == n else hop.end
            executors.append(Executor(hop.peer_id, first, last))
        return executors + ([] if remote_head else [Executor("client", n + 1, n + 1)])

    def remote_stages(self) -> tuple[bool, bool]:
        """Whether some online node serves the embedding / the head."""
        records = self.client.loop.run(self.sequence.records())
        return any(r.embed and r.online for r in records), any(r.head and r.online for r in records)

    def _pushed(self, graph, events, input_ids, attention_mask, position_ids, links, *, single_hop: bool):
        remote_embed, remote_head = self.remote_stages()
        # The graph saves only the last position's logits rows: the last node sends its last hidden state (B, D)
        # and the client runs its own head (bit for bit the node's, see last_rows_padded), not (B, V) logits.
        last_hidden = (remote_head and self.trim_head and not any(n.op == "backward" for n in graph.nodes)
                       and input_ids.numel() >= TRIM_MIN_ROWS and reads_last_logits_only(graph)
                       and saves_last_logits(graph))
        remote_head = remote_head and not last_hidden
        if any(n.op == "backward" for n in graph.nodes) and not (remote_embed and remote_head):
            raise HybridError("Gradients pushed to the nodes need nodes that serve the embedding and the head (the "
                              "backward runs node to node inside the chained forward); this swarm's client runs "
                              f"the {'embedding' if not remote_embed else 'head'} itself. Use placement='swarm'.")
        hops = self.client.loop.run(self.sequence.route(embed=remote_embed, head=remote_head))
        if single_hop:
            check_one_hop(hops, self.num_layers)
        n = self.num_layers

        plans: dict[tuple[Executor, ...], Plan] = {}

        def plan_for(route) -> Plan:  # once per route: the request is encoded, and the answer read, with its plan
            executors = tuple(self.executors(route, remote_embed, remote_head))
            if executors not in plans:
                plans[executors] = plan_graph(graph, events, n, list(executors), held=links.held,
                                              trim_head=self.trim_head)
            return plans[executors]

        plan = plan_for(hops)
        offset = 0 if remote_embed else 1
        supplied = {k: links.supplied[k] for k in plan.inputs}
        carry, inputs = (pack_values(supplied) if supplied else b""), input_ids
        if not remote_embed:  # the client's embedding is executor 0
            embed_interp = Interpreter(graph, plan, 0, supplied, modules=self.modules)
            inputs = run_local_stage(self.local, embed_interp, input_ids, start=0, end=0, embed=True)
            carry = pack_values(embed_interp.finish())
        used: list = []

        blobs = entries_for(graph.attachments, inline=False)  # large attachments go by hash (hybrid.blobs)

        def payload(route) -> bytes:
            used[:] = route
            return encode_request(graph, plan_for(route), offset, keep=links.keep, blobs=blobs)

        def chain():
            return self.client.loop.run(self.sequence.forward_chain(
                inputs, attention_mask=attention_mask, position_ids=position_ids, embed=remote_embed,
                head=remote_head, hook=HookRequest(HOOK_KIND, HOOK_VERSION, payload, results_agree), carry=carry,
                return_outputs="last" if last_hidden else not remote_head))
        try:
            outputs, result, route, reply = chain()
        except BlobMissingError:  # some node of the route does not hold them yet: send them once, to be kept
            if not blobs:
                raise
            blobs = entries_for(graph.attachments, inline=True)
            outputs, result, route, reply = chain()
        values = unpack_values(result)
        plan = plan_for(route)
        if not remote_head:  # the client's head is the last executor
            head_interp = Interpreter(graph, plan, len(plan.executors) - 1, values, modules=self.modules)
            run_local_stage(self.local, head_interp, outputs, start=0, end=0, head=True, last_hidden=last_hidden)
            values = head_interp.finish()
        saves = {k: v for k, v in values.items() if graph.nodes[k].save}
        stats = TraceStats("hybrid", head_on="node" if remote_head else "client", node_bytes=int(reply.get("node_bytes", 0)),
                           compute_s=dict(reply.get("compute_s", {})), read_s=dict(reply.get("read_s", {})),
                           route=[e.name for e in plan.executors], commitments=list(reply.get("commitments", [])),
                           head_positions="last" if trims_head(plan, input_ids) else "all")
        return saves, stats

    # ---- pulled: swarm (Petals-style) -----------------------------------------------------------------------

    def _pulled(self, graph, events, input_ids, attention_mask, position_ids, links):
        n = self.num_layers
        boundaries = layer_boundaries(graph)
        plan = plan_graph(graph, events, n, [Executor("client", 0, n + 1)], trim_head=self.trim_head)
        interpreter = Interpreter(graph, plan, 0, dict(links.supplied), modules=self.modules)
        hidden = run_local_stage(self.local, interpreter, input_ids, start=0, end=0, embed=True)

        def run_segment(start: int, end: int, hidden: torch.Tensor) -> torch.Tensor:
            if interpreter.grad_mode:
                return _RemoteSegment.apply(hidden, self.client, start, end, attention_mask, position_ids)
            out, _ = self.client.loop.run(self.sequence.forward(
                hidden, attention_mask=attention_mask, position_ids=position_ids, start=start, end=end))
            return out
        with torch.set_grad_enabled(interpreter.grad_mode):
            hidden = pull_through(interpreter, hidden, 0, boundaries, n, run_segment)
        run_local_stage(self.local, interpreter, hidden, start=0, end=0, head=True)
        values = finish_all(interpreter)
        saves = {k: v for k, v in values.items() if graph.nodes[k].save}
        return saves, TraceStats("swarm", route=["client"], head_on="client",
                                 head_positions="last" if trims_head(plan, input_ids) else "all")


def layer_boundaries(graph: Graph) -> set[int]:
    """Hidden-state boundaries the Petals-style placement must pull: ``i`` is the input of layer ``i`` (the output
    of layer ``i - 1``). Raises DisallowedOpError for a module inside a layer, which Petals cannot reach."""
    boundaries = set()
    for node in graph.nodes:
        if node.op in ("getter", "setter"):
            if split_op_path(node.module):
                raise DisallowedOpError(
                    f"placement='swarm' (Petals-style) runs the graph on the client, outside the modules' forwards; "
                    f"{node.module!r} is an operation inside one (module.source), which only the executor running "
                    f"that module can reach. Use placement='hybrid'.")
            match = _LAYER_BOUNDARY.match(node.module)
            if match:
                layer = int(match.group(1))
                boundaries.add(layer if node.kind == "input" else layer + 1)
            elif not node.module.startswith(("model.embed_tokens", "model.norm", "lm_head")):
                raise DisallowedOpError(
                    f"placement='swarm' (Petals-style) reaches only decoder-layer inputs/outputs, the embedding "
                    f"and the head; {node.module!r} is inside a layer. Use placement='hybrid'.")
    return boundaries


def segments(boundaries: set[int], num_layers: int) -> list[tuple[int, int]]:
    """The layer ranges the client runs one after another to stop at every boundary."""
    ends = sorted(b for b in boundaries if 0 < b < num_layers) + [num_layers]
    return list(zip([0] + ends[:-1], ends))


def pull_through(interpreter: Interpreter, hidden: torch.Tensor, call: int, boundaries: set[int], num_layers: int,
                 run_segment: Callable[[int, int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Petals-style: run the layers segment by segment (``run_segment(start, end, hidden)``), giving the client's
    interpreter the hidden state at every boundary (forward call ``call``) and sending on what it returns."""
    for start, end in segments(boundaries, num_layers):
        if start == 0 and 0 in boundaries:
            hidden = interpreter.on_event("model.layers.0", "input", call, hidden)
        skipped = interpreter.skip_output(f"model.layers.{start}", call) if end == start + 1 else None
        hidden = skipped[0] if skipped is not None else run_segment(start, end, hidden)  # a skipped layer: not run
        hidden = interpreter.on_event(f"model.layers.{end - 1}", "output", call, hidden)
        if end < num_layers:
            hidden = interpreter.on_event(f"model.layers.{end}", "input", call, hidden)
    return hidden


def check_one_hop(hops: list, num_layers: int) -> None:
    """``centralized`` runs on one node that serves every layer. Raises HybridError otherwise."""
    if len(hops) != 1:
        raise HybridError(f"placement='centralized' needs one node serving all {num_layers} layers; this swarm's "
                          f"route has {len(hops)} hops. Use placement='hybrid'.")


class ClientLinkMeter:
    """What crossed the client's link from now on, and what spot checks did (:meth:`charge` writes both into a
    :class:`TraceStats`; the checks' traffic apart from the request's own)."""

    def __init__(self, sequence) -> None:
        self.sequence, self.t0 = sequence, time.perf_counter()
        traffic, checks, stats = sequence.traffic, sequence.verify_traffic, sequence.stats
        self.start = (traffic.bytes_sent, traffic.bytes_received, traffic.calls)
        self.verify_start = (checks.bytes_sent + checks.bytes_received, stats.verify_checks,
                             stats.verify_mismatches, stats.verify_skipped, len(stats.suspects))

    def charge(self, stats: TraceStats) -> None:
        traffic, checks, seen = self.sequence.traffic, self.sequence.verify_traffic, self.sequence.stats
        stats.client_bytes_sent = traffic.bytes_sent - self.start[0]
        stats.client_bytes_received = traffic.bytes_received - self.start[1]
        stats.round_trips = traffic.calls - self.start[2]
        stats.verify_bytes = checks.bytes_sent + checks.bytes_received - self.verify_start[0]
        stats.verify_checks = seen.verify_checks - self.verify_start[1]
        stats.verify_mismatches = seen.verify_mismatches - self.verify_start[2]
        stats.verify_skipped = seen.verify_skipped - self.verify_start[3]
        stats.suspects = list(seen.suspects[self.verify_start[4]:])
        stats.wall_s = time.perf_counter() - self.t0
