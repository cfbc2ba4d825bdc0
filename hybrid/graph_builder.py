"""The graph builder: records traced operations as :class:`hybrid.ir.Node` s and runs each on fake (meta) values at
once, so a mistake is reported at the user's line before anything is sent. :class:`hybrid.proxy.Proxy` is the
user-facing handle of one recorded node."""

from __future__ import annotations

import numbers
import os
from typing import Any, Callable

import torch

from .errors import HybridError, TraceError
from .attention_weights import weights_optional
from .ir import Attachment, Graph, Node, Ref
from .backward import BackwardRecorder, backward_fake, grad_fake
from .meta import module_call_key, run_on_fakes
from .planner import is_inplace
from .proxy import Proxy, TupleProxy, at_user_line, describe, describe_node, user_site


def _fresh(value: Any) -> Any:
    """A new meta value of the same structure (so one getter's fake never aliases another's)."""
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta")
    if type(value) in (tuple, list):
        return type(value)(_fresh(v) for v in value)
    return value


def _short_site(site: str) -> str:
    """``file.py:line`` without the directories (a node learns where an op was traced, not the user's paths)."""
    return os.path.basename(site)


def conform_fake(new: Any, old: Any, where: str) -> Any:
    """The fake of what a module holds after ``where = new``, by the interpreter's rule (``_conform``): a number or
    a tensor that broadcasts to the module's tensor becomes that tensor's shape and dtype; tuples part by part;
    None stays None. Raises TraceError for anything else."""
    if isinstance(old, torch.Tensor):
        if isinstance(new, (int, float)) and not isinstance(new, bool):
            return torch.empty_like(old)
        if not isinstance(new, torch.Tensor):
            raise TraceError(at_user_line(f"setting {where}: expected a tensor like {describe(old)}, got "
                                          f"{describe(new)}"))
        try:
            new.expand_as(old)
        except RuntimeError:
            raise TraceError(at_user_line(f"setting {where}: a {describe(new)} value does not broadcast to the "
                                          f"module's {describe(old)}")) from None
        return torch.empty_like(old)
    if isinstance(old, tuple):
        if not isinstance(new, (tuple, list)) or len(new) != len(old):
            raise TraceError(at_user_line(f"setting {where}: expected a tuple of {len(old)} like the module's value "
                                          f"{describe(old)}, got {describe(new)}"))
        return tuple(conform_fake(n, o, f"{where}[{i}]") for i, (n, o) in enumerate(zip(new, old)))
    if old is None:
        if new is not None:
            raise TraceError(at_user_line(f"setting {where}: the module's value is None here"))
        return None
    raise TraceError(at_user_line(f"setting {where}: a {type(old).__name__} value cannot be replaced"))


def _session_successor(ended: "GraphBuilder") -> "GraphBuilder | None":
    """The builder of the trace open now on this thread, if it may use values of the ended trace's builder (a later
    trace of the same session imports them as ``load`` nodes), else None."""
    from .tracing import current_tracer

    tracer = current_tracer()
    builder = tracer._builder if tracer is not None else None
    if builder is None or builder is ended or builder.closed or builder.importer is None:
        return None
    return builder


class GraphBuilder:
    """Records nodes into :attr:`graph` and keeps a fake value per node (:attr:`fakes`).

    Args:
        getter_fake: ``(module, kind, call) -> fake`` for getter nodes (the tracer answers from the skeleton's
            :class:`~hybrid.envoy.ShapeInfo` for the current batch shape).
    """

    def __init__(self, getter_fake: Callable[[str, str, int], Any],
                 module_of: Callable[[str], torch.nn.Module] | None = None) -> None:
        self.graph = Graph()
        self._module_of = module_of
        self.fakes: dict[int, Any] = {}
        self.values: dict[int, Any] | None = None
        """Saved values by node id, once the trace has run."""
        self.closed = False
        self._getter_fake = getter_fake
        self._overrides: dict[tuple, Any] = {}
        self._attached: dict[int, tuple[torch.Tensor, Attachment]] = {}
        self._attachment_fakes: list[torch.Tensor] = []
        self._module_fakes: dict[tuple, torch.Tensor] = {}
        """:func:`hybrid.meta.module_call_key` -> the fake result of that module call (the logit lens's 30 ``norm`` and
        ``lm_head`` calls on equal shapes run on fakes once each)."""
        self._reads: dict[tuple[int, int], tuple[int, str]] = {}
        self.importer: Callable[[Proxy], str] | None = None
        """The session's key for another trace's value used here (``lm.session()``); raises if it cannot be."""
        self.imports: dict[int, Proxy] = {}
        self.backward_pass: int | None = None
        """The backward pass whose ``with`` block is open (``.grad`` belongs to it), else None."""
        self.gradients = BackwardRecorder(self)
        self.check_order: Callable[[], None] | None = None
        """Called after a write into a gradient; raises TraceError if the graph's order rule breaks (the tracer)."""
        """``load`` node id -> the earlier trace's proxy whose value it stands for."""

    def record(self, op: str, *, target: str | None = None, args: tuple | list = (), kwargs: dict | None = None,
               module: str | None = None, kind: str | None = None, call: int | None = None) -> "Proxy":
        """Convert the arguments, run the op on fakes, and append the node. Raises TraceError (shapes, data-dependent
        ops, values that cannot enter a graph) or DisallowedOpError; nothing is appended then."""
        if self.closed:
            later = _session_successor(self)
            if later is None:
                raise TraceError(at_user_line("this trace has ended; values from it are read with .value after .save() "
                                              "(or used in a later trace of the same `with lm.session():`)"))
            # a value of an earlier trace of this session, used in the trace open now: the op belongs to that trace
            return later.record(op, target=target, args=args, kwargs=kwargs, module=module, kind=kind, call=call)
        attached = len(self.graph.attachments)
        try:
            args, kwargs = self._to_ir(list(args)), self._to_ir(dict(kwargs or {}))  # may add load nodes first
            node = Node(id=len(self.graph.nodes), op=op, target=target, args=args, kwargs=kwargs, module=module,
                        kind=kind, call=call, site=_short_site(user_site()))
            fake = self._evaluate(node, self.fakes, self._overrides)
        except BaseException:
            self._forget_attachments(attached)
            raise
        self.graph.nodes.append(node)
        self.fakes[node.id] = fake
        if self.backward_pass is not None and self.check_order is not None and (
                node.op == "grad_set" or is_inplace(node)):
            try:
                self.check_order()
            except BaseException:
                self.graph.nodes.pop()
                del self.fakes[node.id]
                raise
        return Proxy(self, node.id)

    def grad_of(self, value: "Proxy") -> "Proxy":
        """``value.grad`` in the open backward pass."""
        return self.gradients.grad(value)

    def set_grad(self, value: "Proxy", new: Any) -> None:
        """``value.grad = new`` in the open backward pass."""
        self.gradients.set_grad(value, new)

    def backward_of(self, root: "Proxy") -> Callable:
        """``root.backward``: called, it records a backward pass."""
        return self.gradients.backward(root)

    def repropagate(self) -> None:
        """Recompute every fake after the batch shape changed (a new invoke). Raises TraceError if an op no longer
        fits, or if user code already read a size that has now changed (it may be baked into the graph)."""
        fakes: dict[int, Any] = {}
        overrides: dict[tuple, Any] = {}
        for node in self.graph.nodes:
            fakes[node.id] = self._evaluate(node, fakes, overrides)
        for (node_id, dim), (old, site) in self._reads.items():
            new = fakes[node_id].shape[dim]
            if new != old:
                raise TraceError(
                    f"code at {site} read size {old} of dim {dim} of {describe_node(self.graph.nodes[node_id])}, "
                    f"which is now {new}: the batch grew, so the tokens dim is only final once every invoke is added. "
                    "Put the longest prompt in the first invoke, or index positions from the right (h[:, -1])")
        self.fakes, self._overrides = fakes, overrides

    def module_fake(self, module: str, kind: str, call: int) -> Any:
        """The fake of what the module's value is now: after the latest setter recorded for it, else as the model
        computes it."""
        key = (module, kind, call)
        return self._overrides[key] if key in self._overrides else self._getter_fake(*key)

    def note_read(self, node_id: int, dim: int, size: int) -> None:
        """User code saw ``size`` as dim ``dim`` of node ``node_id``; :meth:`repropagate` checks it still holds."""
        self._reads.setdefault((node_id, dim), (size, user_site()))

    def value_of(self, node_id: int) -> Any:
        node = self.graph.nodes[node_id]
        if self.values is None:
            raise TraceError(at_user_line(f"{describe_node(node)} has no value yet: values exist only after the "
                                          "`with lm.trace(...)` block ends"))
        if not node.save:
            raise TraceError(at_user_line(f"{describe_node(node)} (node {node_id}) was not saved; call .save() on it "
                                          "inside the trace"))
        if node_id not in self.values:
            raise TraceError(at_user_line(f"{describe_node(node)} (node {node_id}) has no value: its generation step "
                                          "never ran (every row ended with the EOS token first)"))
        return self.values[node_id]

    def _evaluate(self, node: Node, fakes: dict[int, Any], overrides: dict[tuple, Any]) -> Any:
        if node.op == "getter":
            key = (node.module, node.kind, node.call)
            return _fresh(overrides[key] if key in overrides else self._getter_fake(node.module, node.kind, node.call))
        if node.op == "load":
            return _fresh(self.imports[node.id].fake)
        args, kwargs = self._to_fake(node.args, fakes), self._to_fake(node.kwargs, fakes)
        if node.op == "backward":
            backward_fake(args)
            return None
        if node.op == "grad":
            return grad_fake(args[0])
        if node.op == "grad_set":
            grad_fake(args[0])
            conform_fake(args[1], torch.empty_like(args[0], device="meta"), "x.grad")
            return None
        if node.op == "setter":
            key = (node.module, node.kind, node.call)
            old = overrides[key] if key in overrides else self._getter_fake(*key)
            if self._module_of is not None and node.kind == "output":
                old = weights_optional(args[0], old, self._module_of(node.module))
            overrides[key] = conform_fake(args[0], old, f"{node.module}.{node.kind}")
            return None
        try:
            if node.op == "module":
                if self._module_of is None:
                    raise TraceError("this trace cannot call modules")
                key = module_call_key(node.module, args, kwargs)
                if key in self._module_fakes:
                    return _fresh(self._module_fakes[key])
                with torch.no_grad():
                    result = self._module_of(node.module)(*args, **kwargs)
                if key is not None and isinstance(result, torch.Tensor):
                    self._module_fakes[key] = result
                return result
            return run_on_fakes(node.op, node.target, args, kwargs)
        except HybridError:
            raise
        except Exception as e:  # the op itself failed on the fakes: the user's mistake, reported at their line
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            hint = ("; its result's shape would depend on tensor values, which are unknown while tracing"
                    if any(w in text for w in ("meta", "nonzero", "data-dependent", "Scalar")) else "")
            shown = describe(args) + (f" {describe(kwargs)}" if kwargs else "")
            message = f"{describe_node(node)} fails on traced values {shown}: {text}{hint}"
            raise TraceError(at_user_line(message)) from None

    def _to_ir(self, value: Any) -> Any:
        """A user value as an IR argument: proxies -> Ref, tensors -> Attachment, containers recursively."""
        if isinstance(value, Proxy):
            if value._builder is not self:
                if self.importer is None:
                    raise TraceError(at_user_line("a value traced in another trace cannot be used in this one; to share "
                                                  "values between traces, run them in one `with lm.session():`"))
                return self._import(value)
            return Ref(value.node_id)
        if isinstance(value, TupleProxy):
            return tuple(self._to_ir(v) for v in value.items)
        if isinstance(value, torch.Tensor):
            return self._attach(value)
        if value is None or value is Ellipsis or isinstance(value, (bool, str, torch.dtype)):
            return value
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real):
            return float(value)
        if isinstance(value, slice):
            return slice(self._to_ir(value.start), self._to_ir(value.stop), self._to_ir(value.step))
        if isinstance(value, tuple):
            return tuple(self._to_ir(v) for v in value)
        if isinstance(value, list):
            return [self._to_ir(v) for v in value]
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return {k: self._to_ir(v) for k, v in value.items()}
        raise TraceError(at_user_line(f"a {type(value).__name__} cannot be passed into the graph; use traced values, "
                                      "tensors, numbers, strings, dtypes, slices and lists/tuples of them"))

    def _to_fake(self, value: Any, fakes: dict[int, Any]) -> Any:
        if isinstance(value, Ref):
            return fakes[value.id]
        if isinstance(value, Attachment):
            return self._attachment_fakes[value.index]
        if isinstance(value, slice):
            return slice(*(self._to_fake(v, fakes) for v in (value.start, value.stop, value.step)))
        if isinstance(value, (tuple, list)):
            return type(value)(self._to_fake(v, fakes) for v in value)
        if isinstance(value, dict):
            return {k: self._to_fake(v, fakes) for k, v in value.items()}
        return value

    def _import(self, proxy: "Proxy") -> Ref:
        """An earlier trace's value as a ``load`` node (keyed by the session): it is loaded where a node kept it, or
        sent by the client, when this trace runs."""
        for node_id, known in self.imports.items():
            if known._builder is proxy._builder and known.node_id == proxy.node_id:
                return Ref(node_id)
        if not isinstance(proxy.fake, torch.Tensor):
            raise TraceError(at_user_line(f"only tensors can be shared between traces; {describe_node(proxy.node)} is "
                                          f"{describe(proxy.fake)} (index it first)"))
        node = Node(id=len(self.graph.nodes), op="load", target=self.importer(proxy))
        self.graph.nodes.append(node)
        self.imports[node.id] = proxy
        self.fakes[node.id] = _fresh(proxy.fake)
        return Ref(node.id)

    def _forget_attachments(self, keep: int) -> None:
        """Drop attachments made by an op that was refused (all but the first ``keep``)."""
        del self.graph.attachments[keep:], self._attachment_fakes[keep:]
        for key in [k for k, (_, marker) in self._attached.items() if marker.index >= keep]:
            del self._attached[key]

    def _attach(self, tensor: torch.Tensor) -> Attachment:
        known = self._attached.get(id(tensor))
        if known is not None:
            return known[1]
        if tensor.device.type == "meta":
            raise TraceError(at_user_line("a meta tensor has no data and cannot be attached to a graph"))
        marker = self.graph.attach(tensor)
        self._attached[id(tensor)] = (tensor, marker)  # holding the tensor keeps its id unique
        self._attachment_fakes.append(torch.empty_like(tensor, device="meta"))
        return marker
