"""Packing graph values (tensors, tuples of them, Python scalars) into bytes: saves and carried values.

Same encoding as the IR's arguments (:func:`hybrid.ir.encode_value`), tensors as safetensors attachments.
Wire form: ``b"HYVL" + u64 len(json) + json + safetensors``, where json = ``{"<node id>": encoded value}``.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import torch
from safetensors.torch import load as st_load

from swarm.verification import agree as tensors_agree

from .errors import InvalidGraphError
from .ir import Attachment, attachments_bytes, decode_value, encode_value

MAGIC = b"HYVL"


def _lift(value: Any, tensors: list[torch.Tensor]) -> Any:
    """Replace tensors by attachment markers (namedtuples and torch.Size become tuples)."""
    if isinstance(value, torch.Tensor):
        tensors.append(value.detach().cpu().contiguous())
        return Attachment(len(tensors) - 1)
    if isinstance(value, (tuple, list)):
        items = [_lift(v, tensors) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def _lower(value: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(value, Attachment):
        if not 0 <= value.index < len(tensors):
            raise InvalidGraphError(f"value refers to missing tensor {value.index}")
        return tensors[value.index]
    if isinstance(value, (tuple, list)):
        items = [_lower(v, tensors) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def pack_values(values: dict[int, Any]) -> bytes:
    tensors: list[torch.Tensor] = []
    doc = {str(k): encode_value(_lift(v, tensors)) for k, v in values.items()}
    text = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    return MAGIC + struct.pack("<Q", len(text)) + text + attachments_bytes(tensors)


def unpack_values(data: bytes) -> dict[int, Any]:
    """Raises InvalidGraphError if ``data`` is not a packed value set."""
    if not data:
        return {}
    if data[:4] != MAGIC or len(data) < 12:
        raise InvalidGraphError("carried values are malformed (bad magic)")
    (length,) = struct.unpack("<Q", data[4:12])
    try:
        doc = json.loads(data[12:12 + length])
        raw = st_load(data[12 + length:]) if len(data) > 12 + length else {}
        tensors = [raw[str(i)] for i in range(len(raw))]
        if not isinstance(doc, dict):
            raise TypeError(f"expected an object of node ids, got {type(doc).__name__}")
        keys = [int(k) for k in doc]
    except Exception as e:
        raise InvalidGraphError(f"carried values do not parse: {e}") from None
    return {k: _lower(decode_value(v), tensors) for k, v in zip(keys, doc.values())}


def results_agree(a: bytes, b: bytes) -> bool:
    """Whether two routes' packed results (saves and carried values) mean the same: a spot check's comparison
    (:attr:`swarm.remote_sequence.HookRequest.agree`). Nodes on other hardware or thread counts round differently,
    so float tensors agree within :data:`swarm.verification.TOLERANCE` of their dtype; integer and bool tensors,
    shapes, dtypes, structure and Python values exactly. Malformed bytes agree with nothing."""
    if a == b:
        return True
    try:
        left, right = unpack_values(a), unpack_values(b)
    except InvalidGraphError:
        return False
    return left.keys() == right.keys() and all(_same(left[k], right[k]) for k in left)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and tensors_agree(a, b)
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return (type(a) is type(b) and len(a) == len(b)  # type: ignore[arg-type]
                and all(_same(x, y) for x, y in zip(a, b)))  # type: ignore[arg-type]
    return type(a) is type(b) and a == b


def value_nbytes(value: Any) -> int:
    """Bytes of the tensors inside ``value`` (for accounting)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(value_nbytes(v) for v in value)
    return 0


def conform(new: Any, old: Any, where: str) -> Any:
    """``new`` shaped like the module's ``old`` value (same structure, broadcast tensors, same dtype/device)."""
    if isinstance(old, torch.Tensor):
        if isinstance(new, (int, float, bool)) and not isinstance(new, bool):
            try:
                new = torch.full_like(old, new)
            except RuntimeError as e:  # e.g. 1e30 into int64 token ids
                raise InvalidGraphError(f"Setting {where}: {new!r} does not fit its {old.dtype}: {e}") from None
        if not isinstance(new, torch.Tensor):
            raise InvalidGraphError(f"Setting {where}: expected a tensor like {tuple(old.shape)}, got {type(new).__name__}.")
        try:
            new = new.expand_as(old) if new.shape != old.shape else new
        except RuntimeError:
            raise InvalidGraphError(f"Setting {where}: a {tuple(new.shape)} tensor does not broadcast to the "
                                    f"module's {tuple(old.shape)}.") from None
        return new.to(dtype=old.dtype, device=old.device)
    if isinstance(old, tuple):
        if not isinstance(new, (tuple, list)) or len(new) != len(old):
            raise InvalidGraphError(f"Setting {where}: expected a tuple of {len(old)} like the module's output.")
        return tuple(conform(n, o, f"{where}[{i}]") for i, (n, o) in enumerate(zip(new, old)))
    if old is None:
        if new is not None:
            raise InvalidGraphError(f"Setting {where}: the module's value is None here.")
        return None
    raise InvalidGraphError(f"Setting {where}: values of type {type(old).__name__} cannot be set.")


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        items = [to_device(v, device) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value
