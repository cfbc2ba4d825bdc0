"""The interpreter: runs one executor's share of a planned graph as module events happen.

It is driven by module events (``on_input`` / ``on_output`` for ``(path, call)``), on a node through the span
hook and on the client through the same hooks on its local stages. At each event it records getter values, runs
every assigned node whose inputs now all exist (in graph order), and applies the setters of that event.
:meth:`Interpreter.finish` returns the values that leave this executor (carried onward or saved).

Every op is checked against the whitelist here again (the node never trusts the client), and the request's
limits are enforced: op count, attachment bytes (at parse), elements per result, wall time.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from . import ops
from swarm.span_hook import active_hook

from .errors import (DisallowedOpError, InvalidGraphError, LimitExceededError, OrderError, SessionValueError,
                     UnknownModuleError)
from .ir import Attachment, Graph, Node, Ref
from .planner import Plan


class Interpreter:
    """Executes the nodes assigned to executor ``me`` of ``plan``."""

    def __init__(self, graph: Graph, plan: Plan, me: int, carried: dict[int, Any], *, device: torch.device | str = "cpu",
                 limits=None, modules: dict[str, torch.nn.Module] | None = None):
        self.graph, self.plan, self.me = graph, plan, me
        self.limits = limits or graph.limits
        self.device = torch.device(device)
        self.modules = modules or {}
        self.values: dict[int, Any] = {k: _to(v, self.device) for k, v in carried.items()}
        self.mine = [n for n in graph.nodes if plan.assignment[n.id] == me]
        self.done: set[int] = set(self.values)
        self._getters: dict[tuple[str, str, int], list[Node]] = {}
        self._setters: dict[tuple[str, str, int], list[Node]] = {}
        for node in self.mine:
            if node.op == "getter":
                self._getters.setdefault((node.module, node.kind, node.call), []).append(node)
            elif node.op == "setter":
                self._setters.setdefault((node.module, node.kind, node.call), []).append(node)
        self._pending = [n for n in self.mine if n.op not in ("getter", "setter", "load")]
        unloaded = [n for n in self.mine if n.op == "load" and n.id not in self.values]
        if unloaded:
            raise SessionValueError(f"session value {unloaded[0].target!r} was not provided to this executor")
        self._started = time.monotonic()
        self.ops_run = 0
        self._run_ready()

    # ---- events -------------------------------------------------------------------------------------------

    def wants(self, path: str) -> bool:
        return any(key[0] == path for key in self._getters) or any(key[0] == path for key in self._setters)

    def on_event(self, path: str, kind: str, call: int, value: Any) -> Any:
        """A module's input (first argument) or output is ``value``; return what the model should use."""
        key = (path, kind, call)
        # Getters and setters of one event in graph order: a getter recorded after a setter reads the new value.
        for node in sorted(self._getters.get(key, []) + self._setters.get(key, []), key=lambda n: n.id):
            if node.op == "getter":
                self.values[node.id] = value
            else:
                self._run_ready()
                (arg,) = node.args
                value = _conform(self._resolve(arg), value, f"{path}.{kind}")
            self.done.add(node.id)
        self._run_ready()
        return value

    def finish(self) -> dict[int, Any]:
        """Values leaving this executor: carried to later executors and saved ones."""
        self._run_ready()
        missing = [n.id for n in self.mine if n.id not in self.done]
        if missing:
            node = self.graph.nodes[missing[0]]
            where = f"{node.module}.{node.kind} (call {node.call})" if node.module else f"node {node.id}"
            raise OrderError(f"{len(missing)} op(s) assigned here never ran, first {where}: the module was not "
                             f"called in this request (wrong call index, or a module outside the forward pass).")
        return {k: self.values[k] for k in self.plan.carry[self.me] if k in self.values}

    # ---- execution ------------------------------------------------------------------------------------------

    def _run_ready(self) -> None:
        progress = True
        while progress:
            progress = False
            for node in list(self._pending):
                if all(r in self.done for r in node.refs()):
                    self._execute(node)
                    self._pending.remove(node)
                    progress = True

    def _execute(self, node: Node) -> None:
        if time.monotonic() - self._started > self.limits.max_wall_s:
            raise LimitExceededError(f"The graph ran longer than its wall-time limit of {self.limits.max_wall_s} s.")
        args = [self._resolve(a) for a in node.args]
        kwargs = {k: self._resolve(v) for k, v in node.kwargs.items()}
        try:
            if node.op == "module":
                module = self.modules.get(node.module)
                if module is None:
                    raise UnknownModuleError(f"Module {node.module!r} is not held here ({self.plan.executors[self.me].name}).")
                with torch.no_grad(), active_hook(None):  # the module's own span hooks must not fire again
                    result = module(*args, **kwargs)
            elif node.op == "function":
                result = ops.function(node.target)(*args, **kwargs)
            elif node.op == "operator":
                result = ops.operator_fn(node.target)(*args, **kwargs)
                if node.target == "setitem":
                    result = args[0]
            else:
                ops.check_method(node.target)
                if node.target == "to":
                    ops.check_to_args(tuple(args[1:]), kwargs)
                target = args[0]
                if not isinstance(target, torch.Tensor):
                    raise DisallowedOpError(f"Method {node.target!r} is called on a {type(target).__name__}, not a tensor.")
                result = getattr(target, node.target)(*args[1:], **kwargs)
                if node.target == "__setitem__":
                    result = target
        except (DisallowedOpError, LimitExceededError, UnknownModuleError):
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            raise InvalidGraphError(f"Node {node.id} ({node.op} {node.target}) failed: {type(e).__name__}: {e}") from None
        for tensor in _tensors(result):
            if tensor.numel() > self.limits.max_elements:
                raise LimitExceededError(f"Node {node.id} ({node.target}) made a tensor of {tensor.numel()} elements; "
                                         f"the limit is {self.limits.max_elements}.")
        self.values[node.id] = result
        self.done.add(node.id)
        self.ops_run += 1

    def _resolve(self, value: Any) -> Any:
        if isinstance(value, Ref):
            return self.values[value.id]
        if isinstance(value, Attachment):
            return self.graph.attachments[value.index].to(self.device)
        if isinstance(value, list):
            return [self._resolve(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self._resolve(v) for v in value)
        if isinstance(value, slice):
            return slice(self._resolve(value.start), self._resolve(value.stop), self._resolve(value.step))
        if isinstance(value, dict):
            return {k: self._resolve(v) for k, v in value.items()}
        return value


def _conform(new: Any, old: Any, where: str) -> Any:
    """``new`` shaped like the module's ``old`` value (same structure, broadcast tensors, same dtype/device)."""
    if isinstance(old, torch.Tensor):
        if isinstance(new, (int, float, bool)) and not isinstance(new, bool):
            new = torch.full_like(old, new)
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
        return tuple(_conform(n, o, f"{where}[{i}]") for i, (n, o) in enumerate(zip(new, old)))
    if old is None:
        if new is not None:
            raise InvalidGraphError(f"Setting {where}: the module's value is None here.")
        return None
    raise InvalidGraphError(f"Setting {where}: values of type {type(old).__name__} cannot be set.")


def _tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        items = [_to(v, device) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value
