"""Traced values: a :class:`Proxy` is one graph node plus a fake (meta) value of what the node will compute.

Every operation on a proxy is recorded as a node by the :class:`~hybrid.graph_builder.GraphBuilder` *and* run at once on the fake values,
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

import os
import sys
from typing import TYPE_CHECKING, Any, Callable

import torch

from . import ops
from .errors import DisallowedOpError, TraceError
from .ir import Node

if TYPE_CHECKING:
    from .graph_builder import GraphBuilder

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
    if node.op in ("grad", "grad_set", "backward"):
        what = {"grad": ".grad", "grad_set": ".grad = ...", "backward": ".backward()"}[node.op]
        return f"{what} of node {node.args[0].id} (backward pass {node.call})"
    return {"function": f"{node.target}()", "method": f".{node.target}()", "module": f"{node.module}(...)"}.get(
        node.op, f"operator {node.target}")


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
        if name == "grad":
            return self._builder.grad_of(self)
        if name == "backward":
            return self._builder.backward_of(self)
        if name == "requires_grad":
            return self._tensor_fake(".requires_grad").requires_grad
        if name in ("size", "dim"):
            return self._size if name == "size" else self._dim
        if name in ops.METHODS and not name.startswith("__"):
            return _Method(self, name)
        hint = "; saved values come back to the client on CPU" if name in ("cpu", "cuda", "numpy", "tolist") else ""
        raise DisallowedOpError(at_user_line(f"tensor method or attribute {name!r} is not in the whitelist{hint}; "
                                             f"allowed methods: {', '.join(sorted(ops.METHODS))}"))

    def __setattr__(self, name: str, value: Any) -> None:
        if name in Proxy.__slots__:
            object.__setattr__(self, name, value)
        elif name == "requires_grad":  # nnsight accepts `h.requires_grad = True`
            self._builder.record("method", target="requires_grad_", args=(self, value))
        elif name == "grad":  # `h.grad = v` inside `with loss.backward():`
            self._builder.set_grad(self, value)
        else:
            raise TraceError(at_user_line(f"cannot set attribute {name!r} of a traced value; only .requires_grad and "
                                          ".grad (inside `with loss.backward():`) can be assigned"))

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
