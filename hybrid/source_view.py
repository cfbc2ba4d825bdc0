"""The tracing side of ``module.source`` (:mod:`hybrid.source`): the views a trace addresses operations by
(``lm.model.layers[5].self_attn.source.self_o_proj_0.output``), and the skeleton's events for them.

An operation is checked on the client before anything is sent: its name (against the module class's own forward,
:func:`hybrid.source.check_op`), its order among the model's events and its fake value (the skeleton runs the modules
a trace used ``.source`` of instrumented, :func:`recording`), and that its value can be in a graph at all
(:func:`check_readable`).
"""

from __future__ import annotations

from contextlib import contextmanager
from types import MethodType
from typing import Any, Callable, Iterator

import torch

from .errors import DisallowedOpError, TraceError
from .source import MAX_OPS, Report, check_op, op_names, op_path, run_instrumented, split_op_path


@contextmanager
def recording(model: torch.nn.Module, paths: Iterator[str] | set[str], events: list, values: dict,
              first_input: Callable[[tuple, dict], Any]) -> Iterator[None]:
    """While active, the modules at ``paths`` of ``model`` (the client's meta skeleton) run instrumented and append
    each operation's ``(op path, "input")`` / ``(op path, "output")`` event and fake value to ``events``/``values``
    (first firing only), between their module events."""
    def recorder(path: str) -> Report:
        def report(label: str, callee: Callable, args: tuple, kwargs: dict) -> Any:
            where = op_path(path, label)
            if (where, "input") not in values:
                events.append((where, "input"))
                values[(where, "input")] = first_input(args, kwargs)
            value = callee(*args, **kwargs)
            if (where, "output") not in values:
                events.append((where, "output"))
                values[(where, "output")] = value
            return value
        return report

    installed: list[tuple[torch.nn.Module, Any]] = []
    try:
        for path in sorted(paths):
            module = model.get_submodule(path)
            report = recorder(path)
            installed.append((module, module.__dict__.get("forward")))
            module.forward = MethodType(lambda self, *a, _r=report, **k: run_instrumented(self, a, k, _r), module)
        yield
    finally:
        for module, before in installed:
            if before is None:
                del module.forward
            else:
                module.forward = before


def check_readable(name: str, fake: Any) -> None:
    """Refuse an operation's value that cannot travel in a graph (a function, a module, a cache object): only
    tensors, numbers, strings, None and tuples/lists of them are values."""
    def ok(value: Any) -> bool:
        if isinstance(value, (list, tuple)):
            return all(ok(v) for v in value)
        return value is None or isinstance(value, (torch.Tensor, bool, int, float, str))
    if not ok(fake):
        raise TraceError(f"{name} is a {type(fake).__name__}, not a tensor (or a tuple of tensors); only values can "
                         "be read or set in a graph")


def source_order(events: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
    """Position of each event for the tracer's order checks: a module event's rank among module events, an
    operation's a fraction after the module event before it. A module keeps its rank whichever modules are
    instrumented, so positions taken before a trace first used ``.source`` still compare right after it."""
    order: dict[tuple[str, str], float] = {}
    rank, inner = -1, 0
    for event in events:
        if split_op_path(event[0]):
            inner += 1
            order[event] = rank + inner / (4 * MAX_OPS + 2)
        else:
            rank, inner = rank + 1, 0
            order[event] = rank
    return order


class SourceView:
    """``module.source``: the operations of the module's forward by name (``source.self_o_proj_0``); printing it
    lists them in execution order. Unknown names raise UnknownSourceOpError (an AttributeError) listing the valid
    ones."""

    def __init__(self, path: str, module: torch.nn.Module, tracer_getter: Callable[[], Any]) -> None:
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_tracer_getter", tracer_getter)

    @property
    def names(self) -> tuple[str, ...]:
        return op_names(self._module)

    def __getattr__(self, name: str) -> "SourceOp":
        if name.startswith("__"):
            raise AttributeError(name)
        if not self._path:
            raise DisallowedOpError("the root model's forward has no addressable operations; use a module's .source")
        check_op(self._path, self._module, name)
        return SourceOp(self._path, name, self._tracer_getter)

    def __iter__(self) -> Iterator["SourceOp"]:
        return iter([SourceOp(self._path, name, self._tracer_getter) for name in self.names])

    def __repr__(self) -> str:
        return f"{self._path}.source ({type(self._module).__name__}.forward):\n" + "\n".join(
            f"  {name}" for name in self.names)


class SourceOp:
    """One operation of a module's forward: ``.output`` (its value) and ``.input`` (its first argument), read or
    replaced (by assignment) like a module's, in the current invoke and step."""

    def __init__(self, module_path: str, name: str, tracer_getter: Callable[[], Any]) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "path", op_path(module_path, name))
        object.__setattr__(self, "_module_path", module_path)
        object.__setattr__(self, "_tracer_getter", tracer_getter)

    def _tracer(self, kind: str) -> Any:
        tracer = self._tracer_getter()
        if tracer is None:
            raise TraceError(f"{self.path}.{kind} can only be used inside `with lm.trace(...)`")
        if self._module_path not in tracer.skeleton.sourced:
            tracer.skeleton.sourced.add(self._module_path)
        if tracer._batch:  # a value that is no tensor (the attention function itself) cannot be in a graph
            check_readable(f"{self.path}.{kind}", tracer._shape_info(tracer.call).fake(self.path, kind))
        return tracer

    @property
    def output(self) -> Any:
        return self._tracer("output").read_module(self.path, "output")

    @output.setter
    def output(self, value: Any) -> None:
        self._tracer("output").write_module(self.path, "output", value)

    @property
    def input(self) -> Any:
        return self._tracer("input").read_module(self.path, "input")

    @input.setter
    def input(self, value: Any) -> None:
        self._tracer("input").write_module(self.path, "input", value)

    @property
    def inputs(self) -> Any:
        raise DisallowedOpError(f"{self.path}.inputs: the full (args, kwargs) of an operation is not addressable in "
                                "a graph (its arguments include the module and the attention function); use .input "
                                "(its first argument) or the .output of the operations that made the others")

    @property
    def source(self) -> Any:
        raise DisallowedOpError(f"{self.path}.source: drilling into the function an operation calls is not supported "
                                "(it is resolved from a live value at run time, so the node cannot check it before "
                                "running); use the module's own operations or a submodule's .source")

    def skip(self, replacement: Any) -> None:
        raise DisallowedOpError(f"{self.path}.skip(...) is not supported; set {self.path}.output instead (the "
                                "operation then runs, and its value is replaced)")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("output", "input"):
            object.__setattr__(self, name, value)
            return
        raise TraceError(f"cannot set {self.path}.{name}: only .output and .input of an operation can be assigned")

    def __repr__(self) -> str:
        return f"SourceOp({self.path!r})"


def graph_ops(graph: Any) -> set[tuple[str, str]]:
    """``(module path, op)`` of every operation a graph's getters and setters name."""
    return {parts for node in graph.nodes if node.op in ("getter", "setter") and isinstance(node.module, str)
            for parts in [split_op_path(node.module)] if parts}


def instrument_for(skeleton: Any, graph: Any) -> None:
    """Make ``skeleton`` (a :class:`hybrid.envoy.ModelSkeleton`) instrument the modules whose operations ``graph``
    names, so its events (which the planner orders the graph by) have them: a graph recorded by another process (a
    gateway's request worker) or trace. Raises UnknownModuleError / UnknownSourceOpError for a name it lacks."""
    for module_path, op in sorted(graph_ops(graph)):
        check_op(module_path, skeleton.module(module_path), op)
        skeleton.sourced.add(module_path)
