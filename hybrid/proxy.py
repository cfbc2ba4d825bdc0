"""Traced values: a :class:`Proxy` is one graph node plus a fake (meta) value of what the node will compute.

Every operation on a proxy is recorded as a node by the :class:`GraphBuilder` *and* run at once on the fake values,
so a shape or dtype mistake, a bad index or an op outside the whitelist (``hybrid.ops``) is raised at the user's
line, before anything is sent. What is recorded:

- Python operators (``h + 1``, ``2 * h`` as ``mul(2, h)``, ``-h``, ``h < 0``, ``h += v`` as ``iadd``...):
  ``operator`` nodes; ``h[i]`` is ``getitem [Ref(h), i]`` and ``h[i] = v`` the in-place ``setitem [Ref(h), i, v]``.
- Tensor methods (``h.softmax(-1)``, ``h.to(torch.float32)``): ``method`` nodes with ``args[0]`` the tensor.
- Whitelisted torch functions reached through ``__torch_function__`` (``torch.cat([a, b])``, ``F.log_softmax``):
  ``function`` nodes. A tensor on the left of an operator (``steer + h``) is recorded as that operator.
- Tensors from the user's scope become attachments (``Graph.attach``), the same tensor object once.

Static facts come back as plain values: ``.shape`` (a :class:`TracedShape`), ``.size()``, ``len()``, ``.dtype``,
``.ndim``, ``.dim()``. Anything that needs tensor *data* (``bool()``, ``if``, iterating a tensor, ``int()``) raises
TraceError: data-dependent control flow cannot be part of a graph.
"""

from __future__ import annotations

import numbers
import os
import sys
from typing import Any, Callable

import torch

from . import ops
from .errors import DisallowedOpError, HybridError, TraceError
from .ir import Attachment, Graph, Node, Ref

_HYBRID_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_DATA_DEPENDENT = ("a traced value has no data while tracing, so it cannot drive Python control flow or become a "
                   "Python number; keep the computation in the graph (e.g. torch.where instead of `if`)")


def user_site() -> str:
    """``file:line`` of the innermost frame outside ``hybrid`` and ``torch``: the user's line."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith((_HYBRID_DIR, _TORCH_DIR)):
        frame = frame.f_back
    return "<unknown>" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"


def at_user_line(message: str) -> str:
    return f"{message} (at {user_site()})"


def describe(value: Any) -> str:
    """Short text of a fake value: ``(2, 5, 64) float32`` for a tensor, recursively for tuples."""
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={describe(v)}" for k, v in value.items()) + "}"
    plain = isinstance(value, (int, float, bool, str, type(None), slice, torch.dtype))
    return repr(value) if plain else type(value).__name__


def describe_node(node: Node) -> str:
    if node.op == "getter":
        return f"{node.module}.{node.kind}"
    if node.op == "setter":
        return f"setting {node.module}.{node.kind}"
    return {"function": f"{node.target}()", "method": f".{node.target}()", "module": f"{node.module}(...)"}.get(
        node.op, f"operator {node.target}")


def _fresh(value: Any) -> Any:
    """A new meta value of the same structure (so one getter's fake never aliases another's)."""
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta")
    if type(value) in (tuple, list):
        return type(value)(_fresh(v) for v in value)
    return value


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


def _run_op(op: str, target: str, args: list, kwargs: dict) -> Any:
    """Run one whitelisted op on fake values. Ops whose result is a Python value at run time (``item``,
    ``torch.allclose``) give a 0-dim meta placeholder after checking what they can."""
    if op == "function":
        if target == "torch.allclose":
            torch.isclose(*args, **kwargs)
            return torch.empty((), dtype=torch.bool, device="meta")
        return ops.function(target)(*args, **kwargs)
    if op == "method":
        ops.check_method(target)
        if target == "item":
            if args[0].numel() != 1:
                raise RuntimeError(f"item() needs a one-element tensor; this one has shape {tuple(args[0].shape)}")
            return torch.empty((), dtype=args[0].dtype, device="meta")
        return getattr(args[0], target)(*args[1:], **kwargs)
    if op == "operator":
        return ops.operator_fn(target)(*args, **kwargs)
    raise TraceError(f"unknown op {op!r}")


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
        self._reads: dict[tuple[int, int], tuple[int, str]] = {}
        self.accepts: Callable[["GraphBuilder"], bool] | None = None
        """Whether values traced by that other builder may be used here (traces of one ``lm.session()``)."""
        self.externals: dict[int, Proxy] = {}
        """Attachment index -> the other trace's proxy whose value fills it (see :meth:`resolve_externals`)."""

    def record(self, op: str, *, target: str | None = None, args: tuple | list = (), kwargs: dict | None = None,
               module: str | None = None, kind: str | None = None, call: int | None = None) -> "Proxy":
        """Convert the arguments, run the op on fakes, and append the node. Raises TraceError (shapes, data-dependent
        ops, values that cannot enter a graph) or DisallowedOpError; nothing is appended then."""
        if self.closed:
            raise TraceError(at_user_line("this trace has ended; values from it are read with .value after .save()"))
        attached = len(self.graph.attachments)
        try:
            node = Node(id=len(self.graph.nodes), op=op, target=target, args=self._to_ir(list(args)),
                        kwargs=self._to_ir(dict(kwargs or {})), module=module, kind=kind, call=call)
            fake = self._evaluate(node, self.fakes, self._overrides)
        except BaseException:
            self._forget_attachments(attached)
            raise
        self.graph.nodes.append(node)
        self.fakes[node.id] = fake
        return Proxy(self, node.id)

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
        args, kwargs = self._to_fake(node.args, fakes), self._to_fake(node.kwargs, fakes)
        if node.op == "setter":
            key = (node.module, node.kind, node.call)
            old = overrides[key] if key in overrides else self._getter_fake(*key)
            overrides[key] = conform_fake(args[0], old, f"{node.module}.{node.kind}")
            return None
        try:
            if node.op == "module":
                if self._module_of is None:
                    raise TraceError("this trace cannot call modules")
                with torch.no_grad():
                    return self._module_of(node.module)(*args, **kwargs)
            return _run_op(node.op, node.target, args, kwargs)
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
                if self.accepts is None or not self.accepts(value._builder):
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

    def _import(self, proxy: "Proxy") -> Attachment:
        """An earlier trace's value as an attachment of this graph, filled in when the earlier trace has run. The
        earlier trace saves it, so it comes back to the client."""
        for index, known in self.externals.items():
            if known._builder is proxy._builder and known.node_id == proxy.node_id:
                return Attachment(index)
        fake = proxy.fake
        if not isinstance(fake, torch.Tensor):
            raise TraceError(at_user_line(f"only tensors can be shared between traces; {describe_node(proxy.node)} is "
                                          f"{describe(fake)} (index it first)"))
        marker = self.graph.attach(torch.zeros(fake.shape, dtype=fake.dtype))
        self._attachment_fakes.append(torch.empty_like(fake, device="meta"))
        self.externals[marker.index] = proxy
        proxy.save()
        return marker

    def resolve_externals(self) -> None:
        """Fill the attachments imported from earlier traces with their values (after those traces ran)."""
        for index, proxy in self.externals.items():
            value, want = proxy.value, self._attachment_fakes[index]
            if not isinstance(value, torch.Tensor) or value.shape != want.shape or value.dtype != want.dtype:
                raise TraceError(f"{describe_node(proxy.node)} came back as {describe(value)}, not {describe(want)} "
                                 "as traced")
            self.graph.attachments[index] = value.detach().cpu().contiguous()

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


class TracedShape(tuple):
    """``proxy.shape``: a tuple of ints that tells the tracer which dims user code read (indexing one dim marks that
    dim; iterating, comparing or ``numel()`` mark all), so a later invoke that changes one of them is an error
    rather than a stale constant in the graph. Reads by C code (``torch.zeros(h.shape)``) are not seen."""

    def __new__(cls, sizes: tuple, on_read: Callable[[int], None]) -> "TracedShape":
        shape = super().__new__(cls, sizes)
        shape._on_read = on_read
        return shape

    def _mark(self, dims: range | list) -> None:
        for dim in dims:
            self._on_read(dim)

    def __getitem__(self, index: Any) -> Any:
        dims = range(len(self))
        self._mark(dims[index] if isinstance(index, slice) else [dims[index]])
        result = tuple.__getitem__(self, index)
        return torch.Size(result) if isinstance(index, slice) else result

    def __iter__(self):
        self._mark(range(len(self)))
        return tuple.__iter__(self)

    def __eq__(self, other: Any) -> bool:
        self._mark(range(len(self)))
        return tuple(tuple.__iter__(self)) == other

    def __ne__(self, other: Any) -> bool:
        return not self == other

    __hash__ = tuple.__hash__

    def numel(self) -> int:
        self._mark(range(len(self)))
        out = 1
        for size in tuple.__iter__(self):
            out *= size
        return out

    def __repr__(self) -> str:
        return f"torch.Size({list(tuple.__iter__(self))})"


class Proxy:
    """A traced value: node :attr:`node_id` of the graph, with a fake meta value (:attr:`fake`)."""

    __slots__ = ("_builder", "node_id")

    def __init__(self, builder: GraphBuilder, node_id: int) -> None:
        self._builder = builder
        self.node_id = node_id

    @property
    def fake(self) -> Any:
        """The meta value (same shape, dtype and structure as the real one will have)."""
        return self._builder.fakes[self.node_id]

    @property
    def node(self) -> Node:
        return self._builder.graph.nodes[self.node_id]

    @property
    def saved(self) -> bool:
        return self.node.save

    def save(self) -> "Proxy":
        """Mark this node's value to be returned to the client; returns the proxy itself."""
        self.node.save = True
        return self

    @property
    def value(self) -> Any:
        """The saved value, after the trace has run. Raises TraceError before, or if the node was not saved."""
        return self._builder.value_of(self.node_id)

    @property
    def bound(self) -> bool:
        """Whether the trace produced this node's value (False before it ran, or for a step that never ran)."""
        return self._builder.values is not None and self.node_id in self._builder.values

    # ---- static facts -------------------------------------------------------------------------------------

    def _tensor_fake(self, what: str) -> torch.Tensor:
        fake = self.fake
        if not isinstance(fake, torch.Tensor):
            raise TraceError(at_user_line(f"{what} needs a tensor, but {describe_node(self.node)} is "
                                          f"{describe(fake)}; index it first (e.g. out[0])"))
        return fake

    def _read(self, dim: int) -> None:
        fake = self._tensor_fake(".shape")
        self._builder.note_read(self.node_id, dim, fake.shape[dim])

    def _size(self, dim: int | None = None) -> Any:
        fake = self._tensor_fake(".size()")
        if dim is None:
            return TracedShape(tuple(fake.shape), self._read)
        dim = range(fake.ndim)[dim]
        self._read(dim)
        return fake.shape[dim]

    def _dim(self) -> int:
        return self._tensor_fake(".dim()").ndim

    def _attribute(self, name: str) -> Any:
        fake = self._tensor_fake(f".{name}")
        if name == "shape":
            return TracedShape(tuple(fake.shape), self._read)
        if name == "dtype":
            return fake.dtype
        if name == "ndim":
            return fake.ndim
        if fake.ndim <= 2:  # name == "T"
            return self._builder.record("method", target="t", args=(self,))
        return self._builder.record("method", target="permute", args=(self, *reversed(range(fake.ndim))))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        fake = self.fake
        fields = getattr(type(fake), "__match_args__", ())
        if isinstance(fake, tuple) and name in fields:  # torch.return_types: topk(...).values
            return self[fields.index(name)]
        if name in ops.ATTRIBUTES:
            return self._attribute(name)
        if name in ("size", "dim"):
            return self._size if name == "size" else self._dim
        if name in ops.METHODS and not name.startswith("__"):
            return _Method(self, name)
        hint = "; saved values come back to the client on CPU" if name in ("cpu", "cuda", "numpy", "tolist") else ""
        raise DisallowedOpError(at_user_line(f"tensor method or attribute {name!r} is not in the whitelist{hint}; "
                                             f"allowed methods: {', '.join(sorted(ops.METHODS))}"))

    # ---- indexing -------------------------------------------------------------------------------------------

    def __getitem__(self, index: Any) -> "Proxy":
        return self._builder.record("operator", target="getitem", args=(self, index))

    def __setitem__(self, index: Any, value: Any) -> None:
        self._builder.record("operator", target="setitem", args=(self, index, value))

    def __len__(self) -> int:
        fake = self.fake
        if isinstance(fake, tuple):
            return len(fake)
        if not isinstance(fake, torch.Tensor) or fake.ndim == 0:
            raise TraceError(at_user_line(f"len() of {describe(fake)} is not defined"))
        self._read(0)
        return fake.shape[0]

    def __iter__(self):
        fake = self.fake
        if isinstance(fake, tuple):  # unpacking: vals, idx = torch.topk(x, 5)
            return iter([self[i] for i in range(len(fake))])
        raise TraceError(at_user_line(f"iterating over a traced tensor is not supported: {_DATA_DEPENDENT}; index "
                                      "rows explicitly (h[0], h[1]) if you need them"))

    def __bool__(self) -> bool:
        raise TraceError(at_user_line(f"bool() of a traced value (if/while/and/or/not): {_DATA_DEPENDENT}"))

    def _no_number(self, *args: Any) -> Any:
        raise TraceError(at_user_line(f"converting a traced value to a Python number: {_DATA_DEPENDENT}"))

    __int__ = __float__ = __index__ = __complex__ = _no_number

    def __contains__(self, item: Any) -> bool:
        raise TraceError(at_user_line(f"`in` on a traced value: {_DATA_DEPENDENT}"))

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TraceError(at_user_line(f"converting a traced value to numpy: {_DATA_DEPENDENT}"))

    def __repr__(self) -> str:
        return f"<Proxy %{self.node_id} {describe_node(self.node)}: {describe(self.fake)}>"

    __hash__ = object.__hash__

    # ---- torch functions ------------------------------------------------------------------------------------

    @classmethod
    def __torch_function__(cls, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        builder = _find_builder((args, kwargs))
        name = ops.function_name(func)
        if name is not None:
            return builder.record("function", target=name, args=args, kwargs=kwargs)
        operator_name = _TENSOR_OPERATORS.get(func)
        if operator_name is not None and not kwargs:  # steer + h: a tensor on the left of an operator
            return builder.record("operator", target=operator_name, args=args)
        method = getattr(func, "__name__", "")
        if method in ops.METHODS and getattr(torch.Tensor, method, None) is func and isinstance(args[0], Proxy):
            return builder.record("method", target=method, args=args, kwargs=kwargs)
        shown = f"torch.{method}" if method else repr(func)
        raise DisallowedOpError(at_user_line(f"torch function {shown!r} is not in the whitelist; allowed: "
                                             f"{', '.join(sorted(ops.FUNCTIONS))}"))


def _binary(name: str, reflected: bool = False) -> Callable:
    def op(self: Proxy, other: Any) -> Proxy:
        return self._builder.record("operator", target=name, args=(other, self) if reflected else (self, other))
    return op


def _unary(name: str) -> Callable:
    def op(self: Proxy) -> Proxy:
        return self._builder.record("operator", target=name, args=(self,))
    return op


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and_", "or_", "xor"):
    setattr(Proxy, f"__{_name.rstrip('_')}__", _binary(_name))
    setattr(Proxy, f"__r{_name.rstrip('_')}__", _binary(_name, reflected=True))
for _name in ("lt", "le", "gt", "ge", "eq", "ne", "iadd", "isub", "imul", "itruediv"):
    setattr(Proxy, f"__{_name}__", _binary(_name))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(Proxy, f"__{_name}__", _unary(_name))
Proxy.__hash__ = object.__hash__  # __eq__ records a node, so hashing stays by identity

_TENSOR_OPERATORS: dict[Callable, str] = {}
for _attr, _op in {"add": "add", "sub": "sub", "mul": "mul", "div": "truediv", "__truediv__": "truediv",
                   "__floordiv__": "floordiv", "remainder": "mod", "__mod__": "mod", "__pow__": "pow",
                   "matmul": "matmul", "__matmul__": "matmul", "lt": "lt", "le": "le", "gt": "gt", "ge": "ge",
                   "eq": "eq", "ne": "ne", "__and__": "and_", "__or__": "or_", "__xor__": "xor",
                   "__getitem__": "getitem", "__setitem__": "setitem"}.items():
    if getattr(torch.Tensor, _attr, None) is not None:
        _TENSOR_OPERATORS[getattr(torch.Tensor, _attr)] = _op


def _find_builder(value: Any) -> GraphBuilder:
    if isinstance(value, Proxy):
        return value._builder
    if isinstance(value, TupleProxy):
        value = value.items
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _find_builder(item)
            if found is not None:
                return found
    return None


class _Method:
    """``proxy.softmax`` before it is called."""

    __slots__ = ("_proxy", "_name")

    def __init__(self, proxy: Proxy, name: str) -> None:
        self._proxy, self._name = proxy, name

    def __call__(self, *args: Any, **kwargs: Any) -> Proxy:
        if self._name == "to":
            try:
                ops.check_to_args(args, kwargs)
            except DisallowedOpError as e:
                raise DisallowedOpError(at_user_line(str(e))) from None
        return self._proxy._builder.record("method", target=self._name, args=(self._proxy, *args), kwargs=kwargs)


class TupleProxy:
    """One invoke's rows of a module value that is a tuple (``self_attn.output``): a client-side tuple of element
    proxies (or constants such as None). It is not a node; used as an argument it becomes a tuple of its elements."""

    def __init__(self, items: list | tuple) -> None:
        self.items = tuple(items)

    def __getitem__(self, index: int | slice) -> Any:
        return TupleProxy(self.items[index]) if isinstance(index, slice) else self.items[index]

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def saved(self) -> bool:
        return all(item.saved for item in self.items if isinstance(item, Proxy))

    def save(self) -> "TupleProxy":
        for item in self.items:
            if isinstance(item, Proxy):
                item.save()
        return self

    @property
    def value(self) -> tuple:
        return tuple(item.value if isinstance(item, Proxy) else item for item in self.items)

    @property
    def bound(self) -> bool:
        return all(item.bound for item in self.items if isinstance(item, Proxy))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        raise DisallowedOpError(at_user_line(f"{name!r} of a tuple value; index it first (e.g. out[0].{name})"))

    def __repr__(self) -> str:
        return f"<TupleProxy {self.items!r}>"
