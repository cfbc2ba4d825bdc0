"""Gradients through a chained forward, on the nodes: the span-hook side of a request that asks for them.

A span hook may ask for gradients (``hook.wants_grad()``). The node then runs its span with autograd, its input
hidden states a leaf that requires grad (:meth:`SpanHook.track_input`), and keeps that autograd state only while the
rest of the chain runs: when the next hop answers, the answer carries, per backward pass ``k``, the gradient of this
hop's output (tensor ``grad_in_<k>`` of the next hop), and the hook backpropagates through this span
(``hook.backward(outputs, grads, downstream)``), then answers the previous hop with the gradients of its own input and
its hook result merged into the downstream one. No backward request exists on its own, so a node never holds
autograd state for a forward that is over, and no one can ask for another client's. The state is bounded by
``--max-backward-bytes`` (tensors autograd saves, counted as they are saved) and by the chain's deadline.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.graph import saved_tensors_hooks

from .errors import BadRequestError, CapacityError

GRAD_PREFIX = "grad_in_"
"""Answer tensors ``grad_in_<k>``: the gradient of the answering hop's input in backward pass ``k``."""
MAX_PASSES = 64


def wants_grad(hook: Any) -> bool:
    return hook is not None and callable(getattr(hook, "wants_grad", None)) and bool(hook.wants_grad())


class SavedTensorBudget(saved_tensors_hooks):
    """Counts the bytes autograd saves for the backward (weights excluded: they are shared and never copied) and
    refuses the request with CapacityError past ``max_bytes``, as the forward goes."""

    def __init__(self, max_bytes: int, weight_storages: set[int]) -> None:
        self.max_bytes, self.used = max_bytes, 0
        seen: set[int] = set(weight_storages)

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                self.used += storage.nbytes()
                if self.used > self.max_bytes:
                    raise CapacityError(
                        f"This request's backward state passed {self.used >> 20} MiB; this node keeps at most "
                        f"{self.max_bytes >> 20} MiB per request (--max-backward-bytes). Use a smaller batch or "
                        "fewer tokens, or a node with a larger budget.")
            return tensor

        super().__init__(pack, lambda tensor: tensor)


def weight_storages(model: torch.nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}


def forward_with_grad(run, hook: Any, inputs: torch.Tensor, budget: SavedTensorBudget) -> torch.Tensor:
    """``run(inputs)`` with autograd; hidden-state inputs become a leaf that requires grad, given to the hook."""
    if inputs.is_floating_point():
        inputs = inputs.detach().requires_grad_(True)
        hook.track_input(inputs)
    with torch.enable_grad(), budget:
        return run(inputs)


def grads_of(named: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """The next hop's ``grad_in_<k>`` tensors by pass. Raises BadRequestError for malformed names."""
    grads = {}
    for name, tensor in named.items():
        if name.startswith(GRAD_PREFIX):
            suffix = name[len(GRAD_PREFIX):]
            if not suffix.isdigit() or int(suffix) >= MAX_PASSES:
                raise BadRequestError(f"Malformed gradient name {name!r} in the next hop's answer.")
            grads[int(suffix)] = tensor
    return grads


def backward_reply(hook: Any, outputs: torch.Tensor, tensors: list[torch.Tensor], meta: dict
                   ) -> tuple[list[torch.Tensor], dict]:
    """This hop's answer after its backward: the downstream answer with its ``grad_in_*`` replaced by this hop's and
    its hook result merged (runs in the compute executor)."""
    named = dict(zip(meta["names"], tensors))
    result = named.pop("hook_result", None)
    downstream = result.numpy().tobytes() if result is not None else b""
    with torch.enable_grad():
        grads_in, merged = hook.backward(outputs, grads_of(named), downstream)
    kept = {n: t for n, t in named.items() if not n.startswith(GRAD_PREFIX)}
    kept["hook_result"] = torch.frombuffer(bytearray(merged), dtype=torch.uint8) if merged else torch.empty(0, dtype=torch.uint8)
    for k, grad in grads_in.items():
        kept[f"{GRAD_PREFIX}{k}"] = grad.detach().cpu()
    return list(kept.values()), {**meta, "names": list(kept)}
