"""Shape inference: a whitelisted op run on meta values (shape and dtype, no data).

The tracer runs every recorded op this way so a mistake is reported at the user's line; the node runs every op of a
request this way before it runs it for real, so a value too large for the request's budgets is refused before it is
allocated (:mod:`hybrid.budget`).
"""

from __future__ import annotations

from typing import Any

import torch

from . import ops
from .ir import leaves


class Unknown:
    """The fake of a value that depends on tensor data (``x.item()``, ``torch.allclose``): known only once computed."""

    def __repr__(self) -> str:
        return "<unknown until computed>"


UNKNOWN = Unknown()


def module_call_key(module: str, args: list | tuple, kwargs: dict) -> tuple | None:
    """What the meta result of calling ``module`` depends on, when its arguments are tensors alone (their shape,
    strides, dtype and grad flag): equal keys give equal-shape results, so a graph calling one module on many
    equal-shape values (the logit lens's ``norm`` and ``lm_head`` of every layer) infers it once. None when kwargs or
    other values may steer the module: such calls are always run."""
    if kwargs or not args or not all(isinstance(a, torch.Tensor) for a in args):
        return None
    return (module, *((tuple(a.shape), a.stride(), a.dtype, a.requires_grad) for a in args))


def run_on_fakes(op: str, target: str, args: list, kwargs: dict) -> Any:
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
    raise ValueError(f"unknown op {op!r}")


def to_fake(value: Any, memo: dict[int, torch.Tensor]) -> Any:
    """``value`` with every tensor replaced by a meta tensor of its shape and dtype (the same tensor by the same
    fake: ``memo`` maps ``id(tensor)`` to its fake). Lists, tuples and dicts are rebuilt, so an op run on the fake
    never mutates the real value; namedtuples and ``torch.Size`` keep their type."""
    if isinstance(value, torch.Tensor):
        fake = memo.get(id(value))
        if fake is None:
            fake = memo[id(value)] = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                                                         device="meta")  # strides too: an expanded view stays one
        return fake
    if isinstance(value, torch.Size):
        return value
    if isinstance(value, tuple):
        items = [to_fake(v, memo) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [to_fake(v, memo) for v in value]
    if isinstance(value, dict):
        return {k: to_fake(v, memo) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(to_fake(value.start, memo), to_fake(value.stop, memo), to_fake(value.step, memo))
    return value


def has_unknown(value: Any) -> bool:
    return any(v is UNKNOWN for v in leaves(value))


def meta_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters and buffers as meta tensors (for ``torch.func.functional_call``; no data copied)."""
    named = dict(module.named_parameters())
    named.update(module.named_buffers())
    return {name: t.to("meta") for name, t in named.items()}
