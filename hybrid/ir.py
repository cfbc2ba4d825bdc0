"""The intervention graph IR: pure data, JSON for the structure plus binary tensor attachments. No pickle.

A :class:`Graph` is a list of :class:`Node` in topological order (a node only refers to earlier nodes).

Node ops
    ``getter``   value of a module call: ``module`` path (``model.layers.7.mlp``), ``kind`` ``"output"`` or
                 ``"input"`` (the first positional argument), ``call`` index (0 = first call of that module in
                 the request; generation step *k* is call *k*). No args.
    ``setter``   replace that module call's output / first input with ``args[0]``.
    ``function`` call ``target`` from the torch function whitelist (``"torch.softmax"``) with ``args``/``kwargs``.
    ``method``   call tensor method ``target`` (``"softmax"``) on ``args[0]`` with ``args[1:]``/``kwargs``.
    ``operator`` Python operator ``target`` (``"add"``, ``"getitem"``, ``"setitem"``, ``"neg"``, ...).
    ``load``     a value an earlier trace of the same session kept on the node: ``target`` is its key (no args).
    ``module``   apply the model's own module ``module`` (e.g. ``lm_head``, ``model.norm``) to ``args``: runs on
                 the executor that holds that module's weights (the logit lens: ``lm_head(norm(h))``).
    ``backward`` backward pass ``call`` (0, 1, ... in graph order) from ``args[0]`` (a scalar, or with
                 ``args[1]`` the gradient of it), ``kwargs`` ``{"retain_graph": bool}``. No value.
    ``grad``     the gradient of ``args[0]``'s value in backward pass ``call``, as the backward computes it; in-place
                 writes into it change the gradient that flows on (``x.grad[:] = 0``).
    ``grad_set`` replace the gradient of ``args[0]`` in backward pass ``call`` by ``args[1]`` (``x.grad = v``).
                 No value.
A node with ``save=True`` is returned to the client.

Argument encoding (:func:`encode_value` / :func:`decode_value`): JSON scalars as themselves; a node reference
``{"ref": id}``; a tensor attachment ``{"tensor": index}``; ``{"slice": [start, stop, step]}``;
``{"ellipsis": true}``; ``{"tuple": [...]}``; lists as JSON arrays; ``{"dtype": "float32"}``;
non-finite floats ``{"float": "inf" | "-inf" | "nan"}``; ``{"dict": {...}}`` for string-keyed dicts.

Wire form (:meth:`Graph.to_bytes`): ``b"HYIR" + u32 version + u64 len(json) + json + safetensors(attachments)``.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .blobs import parse_entries
from .errors import InvalidGraphError, LimitExceededError

IR_VERSION = 1
MAGIC = b"HYIR"
OPS = ("getter", "setter", "function", "method", "operator", "module", "load", "backward", "grad", "grad_set")
#: Ops without a value: nothing may refer to them.
VALUELESS = ("setter", "backward", "grad_set")
KINDS = ("output", "input")


@dataclass(frozen=True)
class Ref:
    """A reference to the value of node ``id``."""

    id: int


@dataclass(frozen=True)
class Attachment:
    """The tensor attachment ``index`` of the graph (``{"tensor": index}`` in JSON)."""

    index: int


JSON_BYTES_PER_OP = 1024
"""A node parses at most this many bytes of graph JSON per op it allows (``max_ops``); tensors travel as
attachments."""


@dataclass(frozen=True)
class Limits:
    """Budgets that travel with a graph; the node enforces them and answers a violation with a typed error.

    On the wire, fields added after version 1 are optional (a graph from an older client gets the defaults) and
    unknown fields are ignored (an older node reads a newer client's graph)."""

    max_ops: int = 10_000
    """Most graph nodes in one request."""
    max_attachment_bytes: int = 64 << 20
    """Most bytes of tensor attachments."""
    max_elements: int = 1 << 28
    """Most tensor elements one op may create."""
    max_wall_s: float = 60.0
    """Most seconds of interpreter time per request on one node."""
    max_live_bytes: int = 8 << 30
    """Most bytes of values the graph holds at once on one executor (module values it reads, results of its ops,
    values carried to it), checked before each op allocates."""
    max_save_bytes: int = 4 << 30
    """Most bytes of saved values of one request (as sent back: views count in full)."""

    def to_json(self) -> dict:
        return {"max_ops": self.max_ops, "max_attachment_bytes": self.max_attachment_bytes,
                "max_elements": self.max_elements, "max_wall_s": self.max_wall_s,
                "max_live_bytes": self.max_live_bytes, "max_save_bytes": self.max_save_bytes}

    @classmethod
    def from_json(cls, value: Any) -> "Limits":
        if not isinstance(value, dict):
            raise InvalidGraphError(f"limits must be an object; got {type(value).__name__}")
        try:
            return cls(max_ops=int(value["max_ops"]), max_attachment_bytes=int(value["max_attachment_bytes"]),
                       max_elements=int(value["max_elements"]), max_wall_s=float(value["max_wall_s"]),
                       max_live_bytes=int(value.get("max_live_bytes", cls.max_live_bytes)),
                       max_save_bytes=int(value.get("max_save_bytes", cls.max_save_bytes)))
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise InvalidGraphError(f"malformed limits {value!r}: {e}") from None


@dataclass
class Node:
    id: int
    op: str
    target: str | None = None
    """Function/method/operator name (not for getter/setter)."""
    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    module: str | None = None
    """Module path, for getter/setter."""
    kind: str | None = None
    """``output`` or ``input``, for getter/setter."""
    call: int | None = None
    """Call index of the module, for getter/setter."""
    save: bool = False
    site: str | None = None
    """Where the user traced this op (``file.py:line``), for error messages; None when unknown."""

    def refs(self) -> list[int]:
        """Ids of the nodes this node reads."""
        return [v.id for v in leaves((self.args, self.kwargs)) if isinstance(v, Ref)]


def attachments_bytes(tensors: list[torch.Tensor]) -> bytes:
    """``tensors`` as one safetensors blob (``b""`` for none). Tensors that share memory (a value and a view of it,
    e.g. ``model.norm.output`` and ``lm_head.input`` in generation) are stored as copies, as safetensors needs."""
    if not tensors:
        return b""
    seen: set[int] = set()
    unshared = []
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        unshared.append(t.clone() if ptr in seen else t)
        seen.add(ptr)
    return st_save({str(i): t for i, t in enumerate(unshared)})


@dataclass
class Graph:
    nodes: list[Node] = field(default_factory=list)
    attachments: list[torch.Tensor] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    blobs: list[dict] = field(default_factory=list)
    """Attachments named by content hash (:mod:`hybrid.blobs`), as received; resolved by the node."""

    def add(self, op: str, **fields) -> Node:
        node = Node(id=len(self.nodes), op=op, **fields)
        self.nodes.append(node)
        return node

    def attach(self, tensor: torch.Tensor) -> "Attachment":
        """Add a tensor attachment; use the returned marker as an argument."""
        self.attachments.append(tensor.detach().cpu().contiguous())
        return Attachment(len(self.attachments) - 1)

    def saved(self) -> list[int]:
        return [n.id for n in self.nodes if n.save]

    # ---- JSON + attachments ---------------------------------------------------------------------------

    def to_json(self) -> dict:
        nodes = []
        for n in self.nodes:
            optional = (("target", n.target), ("args", encode_value(n.args)), ("kwargs", encode_value(n.kwargs)),
                        ("module", n.module), ("kind", n.kind), ("call", n.call), ("save", n.save), ("site", n.site))
            nodes.append({"id": n.id, "op": n.op, **{k: v for k, v in optional
                                                      if v is not None and v is not False and v != [] and v != {}}})
        return {"version": IR_VERSION, "limits": self.limits.to_json(), "nodes": nodes}

    def to_bytes(self, blobs: list[dict] | None = None) -> bytes:
        """The wire form; ``blobs`` (:func:`hybrid.blobs.entries_for`) sends those attachments by hash (an empty
        placeholder each) or inline to be kept."""
        doc = self.to_json()
        attachments = list(self.attachments)
        if blobs:
            doc["blobs"] = blobs
            for entry in blobs:
                if not entry["keep"]:
                    attachments[entry["index"]] = attachments[entry["index"]].new_empty(0)
        text = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
        return MAGIC + struct.pack("<IQ", IR_VERSION, len(text)) + text + attachments_bytes(attachments)

    @classmethod
    def from_bytes(cls, data: bytes, *, max_attachment_bytes: int | None = None,
                   max_json_bytes: int | None = None) -> "Graph":
        """Parse the wire form. Raises InvalidGraphError on anything malformed (never anything else), and
        LimitExceededError, before parsing, for attachments or JSON over ``max_attachment_bytes``/``max_json_bytes``
        (parsing JSON holds the GIL: a node bounds it so its event loop keeps answering pings)."""
        if len(data) < 16 or data[:4] != MAGIC:
            raise InvalidGraphError("payload is not an intervention graph (bad magic)")
        version, length = struct.unpack("<IQ", data[4:16])
        if version != IR_VERSION:
            raise InvalidGraphError(f"graph IR version {version} is not supported; this node speaks {IR_VERSION}")
        if 16 + length > len(data):
            raise InvalidGraphError("graph JSON length exceeds the payload")
        if max_json_bytes is not None and length > max_json_bytes:
            raise LimitExceededError(f"graph JSON is {length} bytes; this node parses at most {max_json_bytes} "
                                     f"({JSON_BYTES_PER_OP} per op of its op limit): send fewer ops or literals "
                                     f"as attachments")
        blob = data[16 + length:]
        if max_attachment_bytes is not None and len(blob) > max_attachment_bytes:
            raise LimitExceededError(f"graph attachments are {len(blob)} bytes; the limit is {max_attachment_bytes}")
        try:
            doc = json.loads(data[16:16 + length])
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, huge int literals
            raise InvalidGraphError(f"graph JSON does not parse: {e}") from None
        try:
            tensors = st_load(blob) if blob else {}
        except Exception as e:
            raise InvalidGraphError(f"graph attachments do not parse as safetensors: {e}") from None
        attachments = [tensors[str(i)] for i in range(len(tensors))] if all(
            str(i) in tensors for i in range(len(tensors))) else None
        if attachments is None:
            raise InvalidGraphError("graph attachments must be named 0..n-1")
        return cls.from_json(doc, attachments)

    @classmethod
    def from_json(cls, doc: Any, attachments: list[torch.Tensor]) -> "Graph":
        if not isinstance(doc, dict) or doc.get("version") != IR_VERSION or not isinstance(doc.get("nodes"), list):
            raise InvalidGraphError("graph must be {'version': 1, 'limits': {...}, 'nodes': [...]}")
        graph = cls(attachments=list(attachments), limits=Limits.from_json(doc.get("limits")),
                    blobs=parse_entries(doc.get("blobs"), len(attachments)))
        for i, raw in enumerate(doc["nodes"]):
            if not isinstance(raw, dict) or raw.get("id") != i:
                raise InvalidGraphError(f"node {i} must be an object with id {i}")
            try:
                node = Node(id=i, op=raw["op"], target=raw.get("target"), args=decode_value(raw.get("args", [])),
                            kwargs=decode_value(raw.get("kwargs", {})), module=raw.get("module"),
                            kind=raw.get("kind"), call=raw.get("call"), save=bool(raw.get("save", False)),
                            site=_site(raw.get("site")))
            except KeyError as e:
                raise InvalidGraphError(f"node {i} lacks field {e}") from None
            graph.nodes.append(node)
        return graph


def _site(value: Any) -> str | None:
    """A node's ``site`` as sent: a short string, else None (it only ever decorates error messages)."""
    return value if isinstance(value, str) and len(value) <= 200 else None


def encode_value(value: Any) -> Any:
    if isinstance(value, Ref):
        return {"ref": value.id}
    if isinstance(value, Attachment):
        return {"tensor": value.index}
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, slice):
        return {"slice": [encode_value(value.start), encode_value(value.stop), encode_value(value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, tuple):
        return {"tuple": [encode_value(v) for v in value]}
    if isinstance(value, list):
        return [encode_value(v) for v in value]
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise InvalidGraphError("only string-keyed dicts can be encoded")
        if any(k in ("ref", "tensor", "slice", "ellipsis", "tuple", "dtype", "float", "dict") for k in value):
            return {"dict": {k: encode_value(v) for k, v in value.items()}}
        return {k: encode_value(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        raise InvalidGraphError("attach tensors with Graph.attach before encoding")
    raise InvalidGraphError(f"cannot encode a value of type {type(value).__name__} in a graph")


_DTYPES = {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"}


def decode_value(value: Any) -> Any:
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    if not isinstance(value, dict):
        if isinstance(value, (int, float, str, bool)) or value is None:
            return value
        raise InvalidGraphError(f"unexpected JSON value {value!r}")
    if len(value) == 1:
        (key, inner), = value.items()
        if key == "ref":
            if not isinstance(inner, int) or isinstance(inner, bool):
                raise InvalidGraphError(f"bad node reference {inner!r}")
            return Ref(inner)
        if key == "tensor":
            if not isinstance(inner, int) or isinstance(inner, bool):
                raise InvalidGraphError(f"bad attachment index {inner!r}")
            return Attachment(inner)
        if key == "slice":
            if not isinstance(inner, list) or len(inner) != 3:
                raise InvalidGraphError(f"bad slice {inner!r}")
            return slice(*(decode_value(v) for v in inner))
        if key == "ellipsis":
            return Ellipsis
        if key == "tuple":
            if not isinstance(inner, list):
                raise InvalidGraphError(f"bad tuple {inner!r}")
            return tuple(decode_value(v) for v in inner)
        if key == "dtype":
            if not isinstance(inner, str) or inner not in _DTYPES:
                raise InvalidGraphError(f"dtype {inner!r} is not allowed; use one of {sorted(_DTYPES)}")
            return getattr(torch, inner)
        if key == "float":
            if inner not in ("inf", "-inf", "nan"):
                raise InvalidGraphError(f"bad float {inner!r}")
            return float(inner)
        if key == "dict":
            if not isinstance(inner, dict):
                raise InvalidGraphError(f"bad dict {inner!r}")
            return {str(k): decode_value(v) for k, v in inner.items()}
    return {str(k): decode_value(v) for k, v in value.items()}


def leaves(value: Any) -> Iterator[Any]:
    """The leaves of an argument tree (lists, tuples, dict values, slice bounds), in order."""
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from leaves(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from leaves(v)
    elif isinstance(value, slice):
        yield from leaves((value.start, value.stop, value.step))
    else:
        yield value
