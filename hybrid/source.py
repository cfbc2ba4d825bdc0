"""``module.source``: the operations inside a module's ``forward``, addressable like modules (nnsight 0.8.1's names).

nnsight rewrites a module's ``forward`` so that every call ``f(...)`` and every assignment ``x = ...`` reports its
arguments and its value; each is named ``<dotted callee or target, joined by _>_<k>``, ``k`` counting per name in
execution order (inner calls first; a call and an assignment of one name share the counter), so the attention call of
a Llama attention module is ``attention_interface_1`` (``attention_interface_0`` is the assignment that picks the
function) and its output projection ``self_o_proj_0``. This module builds the same names and an instrumented copy of
the forward from the module *class*'s own source, on whichever side runs it:

- the client (:func:`op_names`, and the skeleton's meta forward: :mod:`hybrid.source_view`) learns the names and the fake
  value of each operation, so a trace checks the name, the order and the shapes before anything is sent;
- the node runs the instrumented copy of *its own* class (:func:`run_instrumented`), built from the source of the
  code it loaded and cached per code object. The request names only the call site (``model.layers.0.self_attn``,
  ``self_o_proj_0``, ``input``/``output``); no code travels and none from a request is compiled.

In the graph an operation is a module path of its own, ``<module>.source.<op>`` (:func:`op_path`), with the kinds
``input`` (the first argument, nnsight's ``.input``) and ``output``; getters and setters on it work as on a module.
An operation that fires more than once in one call of its module (inside a loop) is refused, not guessed.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import threading
from dataclasses import dataclass
from types import CellType, CodeType, FunctionType
from typing import Any, Callable

import torch

from .errors import DisallowedOpError, UnknownSourceOpError

SOURCE = ".source."
"""Separator of a module path and an operation name in an operation's path (``model.layers.0.mlp.source.x_0``)."""
_OP = "__hybrid_source_op__"
_BIND = "__hybrid_source_bind__"
_SHELL = "__hybrid_source_shell__"
MAX_OPS = 4096
"""The most operations one forward may have (a bound on what a node compiles and keeps per class)."""


def op_path(module_path: str, op: str) -> str:
    return f"{module_path}{SOURCE}{op}"


def split_op_path(path: str) -> tuple[str, str] | None:
    """``(module path, op name)`` of an operation's path, None for a module's path."""
    module_path, sep, op = path.rpartition(SOURCE)
    return (module_path, op) if sep and module_path and op else None


def owner_path(path: str) -> str:
    """The module an event's path belongs to: itself for a module, its module for an operation."""
    parts = split_op_path(path)
    return parts[0] if parts else path


def _bind(value: Any) -> Any:
    """The callee of an assignment operation: the identity (its input and output are the assigned value)."""
    return value


@dataclass(frozen=True)
class Instrumented:
    """One class's forward with its operations reported: the names in execution order and the rewritten function."""

    names: tuple[str, ...]
    function: Callable
    """Takes ``(module, *args, **kwargs)`` like the class's ``forward``."""


class _Rewriter(ast.NodeTransformer):
    """Route calls through ``_OP(label, callee, *args, **kwargs)`` and assignments through ``_OP(label, _BIND, value)``,
    numbering each name's occurrences in execution order (a node's children are visited before it gets its number)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.names: list[str] = []

    @staticmethod
    def _chain(expr: ast.expr) -> tuple[list[str], bool]:
        parts: list[str] = []
        while isinstance(expr, (ast.Attribute, ast.Subscript)):
            if isinstance(expr, ast.Attribute):
                parts.insert(0, expr.attr)
            expr = expr.value
        if isinstance(expr, ast.Name):
            return [expr.id, *parts], True
        return parts, False

    def _report(self, name: str, callee: ast.expr, args: list, keywords: list, at: ast.AST) -> ast.Call:
        k = self.counts.get(name, 0)
        self.counts[name] = k + 1
        label = f"{name}_{k}"
        self.names.append(label)
        call = ast.Call(func=ast.Name(id=_OP, ctx=ast.Load()), args=[ast.Constant(label), callee, *args],
                        keywords=keywords)
        return ast.copy_location(call, at)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        if isinstance(node.func, ast.Name) and node.func.id == "super" and not node.args and not node.keywords:
            return node  # zero-argument super() needs the frame it is written in
        self.generic_visit(node)
        parts, _ = self._chain(node.func)
        return self._report("_".join(parts) or "call", node.func, node.args, node.keywords, node)

    def _bound(self, target: ast.expr, value: ast.expr, at: ast.AST) -> ast.expr:
        if isinstance(target, (ast.Tuple, ast.List)) and isinstance(value, (ast.Tuple, ast.List)):
            pairs = [*target.elts, *value.elts]
            if len(target.elts) == len(value.elts) and not any(isinstance(e, ast.Starred) for e in pairs):
                value.elts = [self._bound(t, v, at) for t, v in zip(target.elts, value.elts)]
            return value
        parts, named = self._chain(target)
        if not named:
            return value
        return self._report("_".join(parts), ast.Name(id=_BIND, ctx=ast.Load()), [value], [], at)

    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        node.value = self.visit(node.value)  # the value runs before the targets
        node.targets = [self.visit(t) for t in node.targets]
        if len(node.targets) == 1:
            node.value = self._bound(node.targets[0], node.value, node)
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        if node.value is not None:
            node.value = self._bound(node.target, self.visit(node.value), node)
        return node


def _innermost(function: FunctionType) -> tuple[FunctionType, list[tuple[FunctionType, int]]]:
    """Peel decorators whose wrapper calls the function it closes over (one such closure cell, called by name, e.g.
    transformers' checkpointing wrapper of decoder layers): the function itself and the wrappers, outermost first."""
    chain: list[tuple[FunctionType, int]] = []
    while function.__closure__:
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(function.__code__)))
        except (OSError, TypeError, SyntaxError):
            break
        called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        cells = [i for i, (name, cell) in enumerate(zip(function.__code__.co_freevars, function.__closure__))
                 if name in called and isinstance(_contents(cell), FunctionType)]
        if len(cells) != 1 or any(function is f for f, _ in chain):
            break
        chain.append((function, cells[0]))
        function = function.__closure__[cells[0]].cell_contents
    return function, chain


def _contents(cell: CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:
        return None


def _compile(function: FunctionType, op: Callable) -> tuple[tuple[str, ...], FunctionType]:
    code = function.__code__
    try:
        lines, first = inspect.getsourcelines(code)
    except (OSError, TypeError) as e:
        raise DisallowedOpError(f"{function.__qualname__} has no Python source to read its operations from") from e
    tree = ast.parse(textwrap.dedent("".join(lines)))
    definition = tree.body[0]
    if not isinstance(definition, ast.FunctionDef):
        raise DisallowedOpError(f"{function.__qualname__} is not a plain function; it has no source operations")
    definition.decorator_list = []
    rewriter = _Rewriter()
    rewriter.visit(tree)
    if len(rewriter.names) > MAX_OPS:
        raise DisallowedOpError(f"{function.__qualname__} has {len(rewriter.names)} operations; at most {MAX_OPS}")
    # compiled inside a shell whose parameters are the free variables, so they stay free variables (closure cells)
    shell = ast.FunctionDef(name=_SHELL, args=ast.arguments(posonlyargs=[], args=[ast.arg(arg=v) for v in
                                                                                   code.co_freevars],
                                                             kwonlyargs=[], kw_defaults=[], defaults=[]),
                            body=[definition, ast.Return(ast.Name(id=definition.name, ctx=ast.Load()))],
                            decorator_list=[])
    tree.body[0] = ast.copy_location(shell, definition)
    ast.increment_lineno(tree, first - 1)
    ast.fix_missing_locations(tree)
    module = compile(tree, code.co_filename, "exec")
    shell_code = next(c for c in module.co_consts if isinstance(c, CodeType) and c.co_name == _SHELL)
    new_code = next(c for c in shell_code.co_consts if isinstance(c, CodeType) and c.co_name == code.co_name)
    cells = dict(zip(code.co_freevars, function.__closure__ or ()))
    closure = tuple(cells[v] for v in new_code.co_freevars) or None
    built = _function_like(function, new_code, closure, {_OP: op, _BIND: _bind})
    return tuple(rewriter.names), built


def _function_like(function: FunctionType, code: CodeType, closure: tuple | None, extra: dict) -> FunctionType:
    new = FunctionType(code, {**function.__globals__, **extra}, function.__name__, function.__defaults__, closure)
    new.__kwdefaults__ = function.__kwdefaults__
    new.__qualname__ = function.__qualname__
    return new


_cache: dict[FunctionType, Instrumented] = {}
"""Per forward function (not per code object: a decorator's wrapper shares one code object across classes)."""
_cache_lock = threading.Lock()
_active = threading.local()


def instrumented(cls: type) -> Instrumented:
    """The instrumented forward of ``cls`` (cached per forward function). Raises DisallowedOpError when
    the forward has no Python source."""
    forward = getattr(cls, "forward", None)
    if not isinstance(forward, FunctionType):
        raise DisallowedOpError(f"{cls.__name__}.forward is not a Python function; it has no source operations")
    with _cache_lock:
        found = _cache.get(forward)
        if found is None:
            inner, chain = _innermost(forward)
            names, function = _compile(inner, _dispatch)
            for wrapper, index in reversed(chain):  # rebuild the decorators around the copy, not in place
                cells = list(wrapper.__closure__)
                cells[index] = CellType(function)
                function = _function_like(wrapper, wrapper.__code__, tuple(cells), {})
            found = _cache[forward] = Instrumented(names, function)
        return found


def op_names(module: torch.nn.Module) -> tuple[str, ...]:
    """Names of the operations of ``module``'s forward, in execution order (nnsight 0.8.1's)."""
    return instrumented(type(module)).names


def check_op(module_path: str, module: torch.nn.Module, op: str) -> None:
    """Raise UnknownSourceOpError, listing the valid names, unless ``op`` is an operation of ``module``'s forward."""
    names = op_names(module)
    if op not in names:
        raise UnknownSourceOpError(f"{module_path}.source has no operation {op!r} ({type(module).__name__}.forward); "
                                   f"its operations are: {', '.join(names) or '(none)'}")


Report = Callable[[str, Callable, tuple, dict], Any]
"""``report(op, callee, args, kwargs)``: run one operation (``callee(*args, **kwargs)``) and return its value."""


def _dispatch(label: str, callee: Callable, *args: Any, **kwargs: Any) -> Any:
    stack = getattr(_active, "stack", None)
    if not stack:
        return callee(*args, **kwargs)
    return stack[-1](label, callee, args, kwargs)


def run_instrumented(module: torch.nn.Module, args: tuple, kwargs: dict, report: Report) -> Any:
    """Run ``module``'s forward (its class's, instrumented) with every operation going through ``report``."""
    function = instrumented(type(module)).function
    stack = _active.__dict__.setdefault("stack", [])
    stack.append(report)
    try:
        return function(module, *args, **kwargs)
    finally:
        stack.pop()


def call_op(callee: Callable, args: tuple, kwargs: dict, on_input: Callable[[Any], Any] | None,
            on_output: Callable[[Any], Any] | None) -> Any:
    """Run one operation with its first argument passed through ``on_input`` and its value through ``on_output``
    (either may replace it); nnsight's ``.input`` is the first positional argument, else the first keyword one."""
    if on_input is not None:
        if args:
            args = (on_input(args[0]), *args[1:])
        elif kwargs:
            name = next(iter(kwargs))
            kwargs = {**kwargs, name: on_input(kwargs[name])}
        else:
            on_input(None)
    value = callee(*args, **kwargs)
    return value if on_output is None else on_output(value)
