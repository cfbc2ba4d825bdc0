"""Gradients in gateway requests: which requests take them, and the guard that keeps the model's weights out of them.

    gradients = needs_gradients(sources)             # the block and every shipped function, read, not run
    with GradientGuard(model) if gradients else torch.no_grad():
        ...run the request...
    check_tensor_class()                             # after it: torch.Tensor's .grad/.requires_grad are torch's own

A request that never names a gradient (``.grad``, ``requires_grad``, ``backward``, ``enable_grad``, ``autograd``,
as an attribute, an import or a string) runs under ``torch.no_grad()``, as fast as before. One that does runs with gradient tracking
inside :class:`GradientGuard`, a :class:`~torch.overrides.TorchFunctionMode` that sees every tensor operation,
property read and write of the request's thread and refuses, with :class:`~ndif_compat.errors.ParameterGradientError`:

- ``requires_grad_(True)`` / ``requires_grad = True`` / ``register_hook`` / ``retain_grad`` / ``.grad`` on a
  parameter or buffer of the model, and ``torch.autograd.grad``/``backward`` with one of them as ``inputs``.
  The weights never require grad (they are frozen when loaded; the seal checks it after each request), so no
  backward ever writes into them or accumulates a ``.grad`` beside them.

and, with :class:`~ndif_compat.errors.GradientUnavailableError`, a ``.grad`` read *by the request's own code* that
finds no gradient outside a ``with loss.backward():`` block (nnsight serves gradients only inside that block; local
PyTorch would hand back ``None`` and warn, and the researcher would see ``None`` saved).
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
from typing import Any, Iterable

import torch
from torch.overrides import TorchFunctionMode

from .errors import GradientUnavailableError, ParameterGradientError, ParametersModifiedError

GRADIENT_NAME = re.compile(r"grad|backward")
"""An attribute, imported name or imported module matching this (``.grad``, ``.requires_grad_``, ``.backward``,
``enable_grad``, ``torch.autograd``) makes a request run with gradient tracking."""

GRADIENT_STRING = re.compile(r"^(grad|backward)$|_grad|grad_|autograd")
"""So does a string matching this (``operator.attrgetter("requires_grad")``), but not a prompt that says
"graduated" or a variable named ``backwards``."""

REQUEST_FILE_MARK = " [request "
"""Request code is compiled under a file name with this mark (:func:`ndif_compat.execution.load_request`)."""

_BASE = torch._C.TensorBase.__dict__
_GRAD, _REQUIRES_GRAD = _BASE["grad"], _BASE["requires_grad"]
_PARAMETER_METHODS = frozenset({"requires_grad_", "register_hook", "retain_grad", "register_post_accumulate_grad_hook"})
_BACKWARDS = (torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward)


def needs_gradients(sources: Iterable[str]) -> bool:
    """Whether the code may take a gradient (:data:`GRADIENT_NAME`, :data:`GRADIENT_STRING`). Code that does not
    runs under ``torch.no_grad()``. Code that reaches autograd in a way this misses (names built from pieces) runs
    without the guard, but a parameter it made require grad fails the seal after the run (``requires_grad`` is in
    the fingerprint): :class:`~ndif_compat.errors.ParametersModifiedError`, no result, the worker replaced. Never a
    gradient of a weight."""
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if GRADIENT_STRING.search(node.value):
                    return True
                continue
            name = node.attr if isinstance(node, ast.Attribute) else node.name if isinstance(node, ast.alias) else \
                node.module if isinstance(node, ast.ImportFrom) else None
            if name and GRADIENT_NAME.search(name):
                return True
    return False


class GradientGuard(TorchFunctionMode):
    """Gradient tracking on, parameters and buffers of ``module`` out of reach of autograd (see the module doc).

    Enter it on the thread that runs the request (nnsight runs a request's code and its backward hooks there)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.names = {id(t): (name, t) for items in (module.named_parameters(), module.named_buffers())
                      for name, t in items}
        self._grad_mode = None

    def __enter__(self):
        self._grad_mode = torch.enable_grad()
        self._grad_mode.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._grad_mode.__exit__(*exc)

    def _parameter(self, value: Any) -> str | None:
        found = self.names.get(id(value)) if isinstance(value, torch.Tensor) else None
        return found[0] if found is not None and found[1] is value else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = getattr(func, "__self__", None)
        if args:
            parameter = self._parameter(args[0])
            if parameter is not None:
                self._check_parameter(parameter, name, target, args, kwargs)
        if func in _BACKWARDS or name == "backward":  # nnsight replaces Tensor.backward once imported
            inputs = kwargs.get("inputs", args[1] if func is torch.autograd.grad and len(args) > 1 else None)
            for value in inputs if isinstance(inputs, (list, tuple)) else (inputs,):
                parameter = self._parameter(value)
                if parameter is not None:
                    _refuse(parameter, f"{getattr(func, '__qualname__', name)}(inputs=...)")
        result = func(*args, **kwargs)
        if target is _GRAD and name == "__get__" and result is None and _called_by_request():
            raise GradientUnavailableError(
                "`.grad` was read outside a `with loss.backward():` block, where no gradient exists (local PyTorch "
                "would give None). Read and edit gradients inside the block: `with metric.backward(): "
                "g = h.grad.save()`, after `h.requires_grad_(True)` on the value in the forward.")
        return result

    def _check_parameter(self, parameter: str, name: str, target, args: tuple, kwargs: dict) -> None:
        if name == "requires_grad_" and not (args[1] if len(args) > 1 else kwargs.get("requires_grad", True)):
            return                                             # already False: a no-op
        if target is _REQUIRES_GRAD and name == "__set__" and not args[1]:
            return
        if name in _PARAMETER_METHODS:
            _refuse(parameter, ".grad" if name == "register_hook" else f".{name}()")
        if target in (_GRAD, _REQUIRES_GRAD) and name == "__set__":
            _refuse(parameter, f".{'grad' if target is _GRAD else 'requires_grad'} = ...")
        if target is _GRAD:
            _refuse(parameter, ".grad")


def _refuse(parameter: str, what: str) -> None:
    raise ParameterGradientError(
        f"the request asks for the gradient of the model parameter {parameter!r} ({what}): gradients of weights are "
        "not served on this gateway (its weights are read-only and never require grad). Take gradients of "
        "activations instead: `h = lm.model.layers[k].output; h.requires_grad_(True)`, then `h.grad` inside "
        "`with metric.backward():`.")


def _called_by_request() -> bool:
    """Whether the Python frame that triggered the current torch function is the request's own code."""
    frame = sys._getframe(2)
    return REQUEST_FILE_MARK in frame.f_code.co_filename


def check_tensor_class() -> None:
    """After a request: ``torch.Tensor.grad`` and ``.requires_grad`` are torch's own descriptors (nnsight swaps
    ``grad`` only while a backward block runs and puts it back). A request that replaced one (``T = torch.Tensor;
    T.grad = ...``) changed every later request's tensors.

    Raises:
        ParametersModifiedError: the worker is then replaced.
    """
    for attribute, descriptor in (("grad", _GRAD), ("requires_grad", _REQUIRES_GRAD)):
        if inspect.getattr_static(torch.Tensor, attribute) is not descriptor:
            raise ParametersModifiedError(f"the request replaced torch.Tensor.{attribute}, which every request "
                                          "shares; the worker was replaced to restore it.")
