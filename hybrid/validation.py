"""Checks of a graph received from the network: structure, references, attachments, whitelist, op budget."""

from __future__ import annotations

from typing import Any

from . import ops
from .budget import literal_ints_ok
from .errors import DisallowedOpError, InvalidGraphError, LimitExceededError
from .ir import KINDS, OPS, Attachment, Graph, Ref


def validate(graph: Graph, limits_cap=None) -> None:
    """Structural and whitelist checks of a graph received from the network.

    Raises:
        InvalidGraphError: malformed structure (bad refs, fields, args not a list or kwargs not an object).
        DisallowedOpError: an op, function or method outside the whitelist, or an ``out=`` argument.
        LimitExceededError: more nodes or attachment bytes than the limits allow, or an integer literal beyond
            64 bits.
    """
    limits = graph.limits
    if limits_cap is not None:
        limits = limits_cap(limits)
    if len(graph.nodes) > limits.max_ops:
        raise LimitExceededError(f"The graph has {len(graph.nodes)} ops; the limit is {limits.max_ops}.")
    attached = sum(t.numel() * t.element_size() for t in graph.attachments)
    if attached > limits.max_attachment_bytes:
        raise LimitExceededError(f"The graph's tensor attachments are {attached} bytes; the limit is "
                                 f"{limits.max_attachment_bytes}.")
    for node in graph.nodes:
        if not isinstance(node.args, list) or not isinstance(node.kwargs, dict):
            raise InvalidGraphError(f"Node {node.id}: args must be a list and kwargs an object; got "
                                    f"{type(node.args).__name__} and {type(node.kwargs).__name__}.")
        if "out" in node.kwargs:
            raise DisallowedOpError(f"Node {node.id}: out= is not allowed (it would write into, and resize, another "
                                    f"value); use the op's result instead.")
        if node.op not in OPS:
            raise DisallowedOpError(f"Op {node.op!r} of node {node.id} is not allowed; ops are {', '.join(OPS)}.")
        if node.op == "module" and not isinstance(node.module, str):
            raise InvalidGraphError(f"Node {node.id}: a module call needs a module path (str).")
        if node.op in ("getter", "setter"):
            if not isinstance(node.module, str) or node.kind not in KINDS or not isinstance(node.call, int) or node.call < 0:
                raise InvalidGraphError(f"Node {node.id}: a {node.op} needs module (str), kind in {KINDS}, call >= 0.")
        elif node.op == "function":
            ops.function(str(node.target))
        elif node.op == "method":
            ops.check_method(str(node.target))
        elif node.op == "operator":
            ops.operator_fn(str(node.target))
        elif node.op == "load" and not (isinstance(node.target, str) and 0 < len(node.target) <= 200
                                        and not node.args and not node.kwargs):
            raise InvalidGraphError(f"Node {node.id}: a load needs a key (str, at most 200 chars) and no arguments.")
        if node.op == "setter" and len(node.args) != 1:
            raise InvalidGraphError(f"Node {node.id}: a setter takes exactly one argument.")
        if node.op == "method" and (not node.args or not isinstance(node.args[0], Ref)):
            raise InvalidGraphError(f"Node {node.id}: a method call needs the tensor it is called on as args[0].")
        for ref in node.refs():
            if not 0 <= ref < node.id:
                raise InvalidGraphError(f"Node {node.id} refers to node {ref}, which does not come before it.")
            if graph.nodes[ref].op == "setter":
                raise InvalidGraphError(f"Node {node.id} refers to node {ref}, a setter, which has no value.")
        _check_attachments(node.args, len(graph.attachments), node.id)
        _check_attachments(node.kwargs, len(graph.attachments), node.id)
        if not (literal_ints_ok(node.args) and literal_ints_ok(node.kwargs)):
            raise LimitExceededError(f"Node {node.id} has an integer argument beyond 64 bits; integers in a graph "
                                     f"must satisfy |x| < 2**63.")


def _check_attachments(value: Any, count: int, node_id: int) -> None:
    if isinstance(value, Attachment):
        if not 0 <= value.index < count:
            raise InvalidGraphError(f"Node {node_id} refers to attachment {value.index}; the graph has {count}.")
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_attachments(v, count, node_id)
    elif isinstance(value, dict):
        for v in value.values():
            _check_attachments(v, count, node_id)
