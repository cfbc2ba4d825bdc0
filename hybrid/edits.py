"""``lm.edit()`` / ``lm.clear_edits()`` and ``lm.scan()``: nnsight 0.8.1's persistent edits and shape-only runs.

Edits::

    with lm.edit() as (tracer, edited):             # inplace=True: `with lm.edit(inplace=True) as tracer:`
        edited.model.layers[0].output[:] = 0
    with edited.trace(prompt):                       # every later trace of `edited` starts with the edit
        h = edited.model.layers[0].output.save()     # zeros
    edited.clear_edits()

nnsight stores the edit block's code and replays it in every later trace. Here the block is traced once into a graph
(:class:`Edit`, on a stand-in batch of :data:`STAND_IN` token ids: an edit block has no inputs) and, when a later trace
starts, its nodes are put at the head of that trace's graph (:func:`apply_edits`), so they run wherever the trace
runs (on the nodes in ``hybrid``). The trace's first invoke re-derives every fake for its own batch, so an edit that
does not fit that batch (or baked a size it read, ``h.shape[1]``) is a TraceError at the user's line, not a wrong
value. Edits bind to forward call 0 (the first generation step), as in nnsight without ``tracer.iter``. Values an edit
saves are not returned (nnsight returns none either).

Scan (:func:`scan_execute`): the trace runs on fake values only (the skeleton already built them from the config, on
the ``meta`` device), nothing is sent; saved values are meta tensors of the right shape and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .errors import TraceError
from .ir import Attachment, Graph, Node, Ref
from .proxy import at_user_line

STAND_IN = torch.zeros((1, 8), dtype=torch.long)
"""The batch an edit block is traced on (1 row of 8 tokens); each trace it joins re-derives the fakes for its own."""
_EDIT_OPS = ("getter", "setter", "function", "method", "operator", "module")


@dataclass
class Edit:
    """One traced edit block: its nodes (ids from 0), attachments and the sizes its code read."""

    nodes: list[Node]
    attachments: list[torch.Tensor]
    reads: dict = field(default_factory=dict)


def record_edit(tracer: Any) -> Edit:
    """The edit that ``tracer`` (an edit block that just ended) recorded. Raises TraceError for ops an edit cannot
    hold (values from a session, backward passes)."""
    graph: Graph = tracer.graph
    for node in graph.nodes:
        if node.op not in _EDIT_OPS:
            raise TraceError(at_user_line(f"an edit cannot hold a {node.op!r} op (node {node.id}); edits are module "
                                          "reads and writes and tensor ops on them"))
        if node.call not in (None, 0):
            raise TraceError(at_user_line("an edit binds to the first forward call; generation steps past it "
                                          "(tracer.iter / tracer.all()) cannot be edited"))
    return Edit(nodes=[replace(n, save=False) for n in graph.nodes], attachments=list(graph.attachments),
                reads=dict(tracer._builder._reads))


def apply_edits(tracer: Any, edits: list[Edit]) -> None:
    """Put ``edits``' nodes, in order, at the head of a new trace's graph (before the trace is entered)."""
    builder = tracer._builder
    if builder.graph.nodes:
        raise TraceError("edits join a trace before it records anything")
    for edit in edits:
        offset = len(builder.graph.nodes)
        markers = [builder._attach(t) for t in edit.attachments]
        for node in edit.nodes:
            builder.graph.nodes.append(replace(node, id=node.id + offset, args=_moved(node.args, offset, markers),
                                               kwargs=_moved(node.kwargs, offset, markers)))
        for (node_id, dim), read in edit.reads.items():
            builder._reads.setdefault((node_id + offset, dim), read)


def _moved(value: Any, offset: int, markers: list[Attachment]) -> Any:
    if isinstance(value, Ref):
        return Ref(value.id + offset)
    if isinstance(value, Attachment):
        return markers[value.index]
    if isinstance(value, slice):
        return slice(*(_moved(v, offset, markers) for v in (value.start, value.stop, value.step)))
    if isinstance(value, (list, tuple)):
        return type(value)(_moved(v, offset, markers) for v in value)
    if isinstance(value, dict):
        return {k: _moved(v, offset, markers) for k, v in value.items()}
    return value


class EditContext:
    """``with lm.edit() as (tracer, edited):`` (or ``as tracer`` with ``inplace=True``): records one edit block and,
    when it ends without error, adds it to ``target``'s edits."""

    def __init__(self, tracer: Any, target: Any, inplace: bool) -> None:
        self.tracer, self.target, self.inplace = tracer, target, inplace

    def __enter__(self) -> Any:
        self.tracer.__enter__()
        return self.tracer if self.inplace else (self.tracer, self.target)

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        return self.tracer.__exit__(exc_type, exc, tb)

    def store(self, graph: Graph, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[int, Any]:
        """The edit tracer's ``execute``: keep the block instead of running it."""
        self.target._edits.append(record_edit(self.tracer))
        return {node_id: None for node_id in graph.saved()}


def scan_execute(box: list) -> Any:
    """An ``execute`` for :class:`~hybrid.tracing.Tracer` that runs nothing: each saved node is bound to its fake (a
    meta tensor of the right shape and dtype)."""
    def execute(graph: Graph, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[int, Any]:
        tracer = box[0]
        tracer.stats = {"placement": "scan", "client_bytes_sent": 0, "client_bytes_received": 0, "round_trips": 0}
        return {node_id: tracer.fake(node_id) for node_id in graph.saved()}
    return execute
