"""Checks of a graph received from the network: structure, references, attachments, whitelist, op budget."""

from __future__ import annotations

from typing import Any

from . import ops
from .budget import literal_ints_ok
from .errors import DisallowedOpError, InvalidGraphError, LimitExceededError
from .ir import KINDS, OPS, VALUELESS, Attachment, Graph, Ref


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
    passes = 0
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
        if node.op in ("backward", "grad", "grad_set"):
            passes = _check_gradient_op(graph, node, passes)
        if node.op == "setter" and len(node.args) != 1:
            raise InvalidGraphError(f"Node {node.id}: a setter takes exactly one argument.")
        if node.op == "method" and (not node.args or not isinstance(node.args[0], Ref)):
            raise InvalidGraphError(f"Node {node.id}: a method call needs the tensor it is called on as args[0].")
        for ref in node.refs():
            if not 0 <= ref < node.id:
                raise InvalidGraphError(f"Node {node.id} refers to node {ref}, which does not come before it.")
            if graph.nodes[ref].op in VALUELESS:
                raise InvalidGraphError(f"Node {node.id} refers to node {ref}, a {graph.nodes[ref].op}, which has no "
                                        "value.")
        _check_attachments(node.args, len(graph.attachments), node.id)
        _check_attachments(node.kwargs, len(graph.attachments), node.id)
        if not (literal_ints_ok(node.args) and literal_ints_ok(node.kwargs)):
            raise LimitExceededError(f"Node {node.id} has an integer argument beyond 64 bits; integers in a graph "
                                     f"must satisfy |x| < 2**63.")


def _check_gradient_op(graph: Graph, node, passes: int) -> int:
    """Shape of a ``backward`` / ``grad`` / ``grad_set`` node; returns the number of backward passes so far."""
    arity = {"backward": (1, 2), "grad": (1, 1), "grad_set": (2, 2)}[node.op]
    if not (arity[0] <= len(node.args) <= arity[1] and isinstance(node.args[0], Ref) and isinstance(node.call, int)):
        raise InvalidGraphError(f"Node {node.id}: a {node.op} takes {arity[0]}-{arity[1]} arguments, the first a node "
                                "reference, and a pass index (call).")
    if node.op == "backward":
        if node.call != passes or set(node.kwargs) - {"retain_graph"} or not isinstance(
                node.kwargs.get("retain_graph", False), bool):
            raise InvalidGraphError(f"Node {node.id}: backward passes are numbered 0, 1, ... in graph order and take "
                                    "only retain_graph (a bool).")
        return passes + 1
    if not 0 <= node.call < passes or node.kwargs:
        raise InvalidGraphError(f"Node {node.id}: a {node.op} must belong to a backward pass recorded before it "
                                f"(pass {node.call}; {passes} so far).")
    return passes


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
