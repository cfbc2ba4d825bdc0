"""Backward passes while tracing: ``with loss.backward():``, ``x.grad`` and ``x.grad = v``, as in nnsight 0.8.

::

    with lm.trace(prompt) as tracer:
        h = lm.model.layers[3].output
        h.requires_grad_(True)                          # accepted (every hidden state already requires grad)
        metric = lm.lm_head.output[0, -1, paris]
        with metric.backward(retain_graph=True):        # backward pass 0
            g = h.grad.save()                           # grad node: the gradient of h in pass 0
            lm.model.layers[5].output.grad[:] = 0       # an edit: every earlier layer's gradient changes
        with metric.backward():                         # pass 1 (needs retain_graph=True on pass 0, as in torch)
            g1 = h.grad.save()

A ``backward`` node is recorded when ``.backward()`` is called (like ``loss.backward()`` in torch, it runs whether or
not its ``with`` block is used); ``.grad`` reads and writes are allowed only inside the block, and belong to that
pass. Gradients arrive in reverse module order, so a write into a gradient may only use values that exist when that
gradient is computed; the planner's rule is applied while tracing, at the user's line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .errors import TraceError
from .proxy import at_user_line, describe

if TYPE_CHECKING:
    from .graph_builder import GraphBuilder
    from .proxy import Proxy


class Backward:
    """What ``loss.backward(...)`` returns: the pass is already recorded; ``with`` scopes its ``.grad`` accesses."""

    def __init__(self, builder: "GraphBuilder", index: int) -> None:
        self._builder, self.index = builder, index

    def __enter__(self) -> "Backward":
        if self._builder.backward_pass is not None:
            raise TraceError(at_user_line("backward blocks cannot be nested"))
        self._builder.backward_pass = self.index
        return self

    def __exit__(self, *exc: Any) -> bool:
        self._builder.backward_pass = None
        return False


class BackwardRecorder:
    """The builder's gradient state: passes recorded, the open pass, one ``grad`` node per (value, pass)."""

    def __init__(self, builder: "GraphBuilder") -> None:
        self.builder = builder
        self.passes = 0
        self.allowed: str | None = None
        """Why backward passes are refused in this trace (e.g. in generation), or None."""
        self._grads: dict[tuple[int, int], "Proxy"] = {}

    def backward(self, root: "Proxy") -> Any:
        def call(gradient: Any = None, retain_graph: bool | None = None, **unexpected: Any) -> Backward:
            if self.allowed is not None:
                raise TraceError(at_user_line(self.allowed))
            if unexpected:
                raise TraceError(at_user_line(f".backward() takes gradient and retain_graph; got {sorted(unexpected)}"))
            args = (root,) if gradient is None else (root, gradient)
            self.builder.record("backward", args=args, kwargs={"retain_graph": bool(retain_graph)}, call=self.passes)
            self.passes += 1
            return Backward(self.builder, self.passes - 1)
        return call

    def grad(self, value: "Proxy") -> "Proxy":
        index = self._open_pass(".grad")
        key = (value.node_id, index)
        if key not in self._grads:
            self._grads[key] = self.builder.record("grad", args=(value,), call=index)
        return self._grads[key]

    def set_grad(self, value: "Proxy", new: Any) -> None:
        index = self._open_pass(".grad = ...")
        self.builder.record("grad_set", args=(value, new), call=index)
        self._grads.pop((value.node_id, index), None)  # a later read sees the gradient as replaced

    def _open_pass(self, what: str) -> int:
        if self.builder.backward_pass is None:
            raise TraceError(at_user_line(f"{what} can only be used inside `with loss.backward():` (gradients exist "
                                          "only during a backward pass)"))
        return self.builder.backward_pass


def backward_fake(args: list) -> None:
    """Check a ``backward`` node's fakes as torch would, at the user's line."""
    root = args[0]
    if not isinstance(root, torch.Tensor) or not root.is_floating_point():
        raise TraceError(at_user_line(f".backward() needs a floating-point tensor; got {describe(root)}"))
    if len(args) == 1 and root.numel() != 1:
        raise TraceError(at_user_line(f"grad can be implicitly created only for scalar outputs; {describe(root)} "
                                      "has more elements: reduce it (.sum()) or pass gradient=..."))
    if len(args) == 2 and (not isinstance(args[1], torch.Tensor) or args[1].shape != root.shape):
        raise TraceError(at_user_line(f"gradient must be a tensor shaped like the root {describe(root)}; got "
                                      f"{describe(args[1])}"))


def grad_fake(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TraceError(at_user_line(f".grad exists only for floating-point tensors; this value is {describe(value)}"))
    return torch.empty_like(value, device="meta")
