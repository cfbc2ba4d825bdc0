"""Generation steps while tracing: ``tracer.iter[...]`` / ``tracer.all()`` and ``tracer.result``, as in nnsight 0.8.

::

    with lm.generate(prompt, max_new_tokens=3) as tracer:
        for step in tracer.iter[:2]:                    # steps 0 and 1
            lm.model.layers[5].output[:, -1] += steer   # each step's own getter/setter (call = step)
        ids = tracer.result.save()                      # (B, T + 3) after the block

Step ``s`` is forward call ``s`` of the generation: the prompt in step 0, one new token per later step.

The deprecated block form ``with tracer.iter[a:b]:`` / ``with tracer.all():`` runs its body once per selected step
that the generation makes, as nnsight 0.8.1 does: the first step inline, the others by running the block's compiled
body again in the caller's variables (which then hold the last step's values); the trace's block goes on after it, as
in nnsight (whose block form, unlike its ``for`` form, resumes after an open selection). A selection of no step the
generation makes skips the body.
"""

from __future__ import annotations

import ast
import ctypes
import linecache
import sys
import warnings
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any, Iterator

import torch

from .client_values import ClientValue
from .errors import TraceError

if TYPE_CHECKING:
    from .tracing import Tracer


class Steps:
    """A selection of generation steps; loop over it to bind module reads and writes to each step in turn."""

    def __init__(self, tracer: "Tracer", start: int = 0, stop: int | None = None, steps: list[int] | None = None):
        self._tracer, self.start, self.stop, self.steps = tracer, start, stop, steps

    def __getitem__(self, key: slice | int | list[int]) -> "Steps":
        if isinstance(key, slice):
            if key.step not in (None, 1):
                raise TraceError(f"tracer.iter[{key.start}:{key.stop}:{key.step}]: a step size is not supported; "
                                 "list the steps: tracer.iter[[0, 2, 4]]")
            return Steps(self._tracer, key.start or 0, key.stop)
        if isinstance(key, (list, tuple)):
            return Steps(self._tracer, steps=[int(k) for k in key])
        return Steps(self._tracer, int(key), int(key) + 1)

    def indices(self) -> list[int]:
        """The selected steps that the generation makes (``tracer.steps`` of them)."""
        wanted = self._wanted()
        if any(s < 0 for s in wanted):
            raise TraceError(f"generation steps cannot be negative; got {list(wanted)}")
        made = [s for s in wanted if s < self._tracer.steps]
        if len(made) < len(wanted):
            warnings.warn(f"steps {[s for s in wanted if s >= self._tracer.steps]} are past the last of the "
                          f"{self._tracer.steps} this run makes; the loop leaves them out", stacklevel=3)
        return made

    def __iter__(self) -> Iterator[int]:
        from .tracing import _user_frame

        previous = self._tracer.call
        made = self.indices()
        cut = self.stop is None and self.steps is None or len(made) < len(self._wanted())
        frame = _user_frame() if cut else None
        try:
            for step in made:
                self._tracer.call = step
                yield step
        finally:
            self._tracer.call = previous
        if cut and not _refuse_statements_after(frame):  # no source to read: refuse the next use of this invoke
            self._tracer.ended_by_loop(frame.f_lineno if frame is not None else None)

    # ---- the deprecated block form ----------------------------------------------------------------------------

    def __enter__(self) -> "Steps":
        from .tracing import _user_frame

        frame = _user_frame()
        self._frame, self._body = frame, _block_body(frame)
        warnings.warn_explicit("the `with tracer.iter[...]:` / `with tracer.all():` block form is deprecated in "
                               "nnsight; use `for step in tracer.iter[...]:`", DeprecationWarning,
                               frame.f_code.co_filename, frame.f_lineno)
        self._made = self.indices()
        self._previous = self._tracer.call
        if not self._made:
            _skip_body(frame)
        else:
            self._tracer.call = self._made[0]
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        frame, self._frame = self._frame, None
        if exc_type is _SkipBody:
            sys.settrace(exc.displaced)
            return True
        try:
            if exc_type is None:
                for step in self._made[1:]:
                    self._tracer.call = step
                    _run_in_frame(self._body, frame)
        finally:
            self._tracer.call = self._previous
        return False

    def _wanted(self) -> list[int]:
        return list(self.steps if self.steps is not None else range(self.start, self.stop or self._tracer.steps))


def _refuse_statements_after(frame: FrameType | None) -> bool:
    """The ``for`` loop ``frame`` runs asked for steps to the end of the generation (or past it): nnsight 0.8.1 ends
    that invoke's code there, never running what follows the loop in its block (it warns that the loop "was cut
    short"). Raise TraceError naming the first such statement, so nothing is silently skipped or run unlike nnsight.
    Returns False where the source cannot be read (nothing checked)."""
    if frame is None:
        return False
    filename, line = frame.f_code.co_filename, frame.f_lineno
    source = "".join(linecache.getlines(filename, frame.f_globals))
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    if not source:
        return False
    after, whole = _first_statement_after(tree, line)
    if after is not None:
        raise TraceError(
            f"{filename}:{after}: this statement follows a loop over every remaining generation step "
            f"(`for step in tracer.all():`, `tracer.iter[a:]`, or steps past max_new_tokens, at line {line}); nnsight "
            "0.8.1 never runs what follows such a loop in its invoke (it warns the loop was cut short and skips it), "
            "so it is refused here. Loop over the steps the generation makes, `tracer.iter[:max_new_tokens]`, to run "
            "code after the loop; or move the code before the loop or into its body; or put it in a separate "
            "`with tracer.invoke():` after this one")
    return whole


def _first_statement_after(tree: ast.AST, line: int) -> tuple[int | None, bool]:
    """The line of the first statement after the ``for`` loop at ``line`` in the block that ends with it (the
    innermost enclosing ``with ....trace/generate/invoke(...)`` or function), or None; and whether that block is the
    invoke's whole (a ``with``: False for a function, whose caller may go on in the invoke, or no loop found)."""
    def search(node: ast.AST, scopes: list[ast.AST]) -> tuple[int | None, bool] | None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.For) and line in (child.lineno, child.iter.lineno):
                if not scopes:
                    return None, False
                end = scopes[-1].end_lineno
                later = [n.lineno for n in ast.walk(scopes[-1]) if isinstance(n, ast.stmt)
                         and child.end_lineno < n.lineno <= end]
                return (min(later) if later else None), isinstance(scopes[-1], ast.With)
            scope = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) or isinstance(child, ast.With) and any(
                isinstance(i.context_expr, ast.Call) and isinstance(i.context_expr.func, ast.Attribute)
                and i.context_expr.func.attr in ("trace", "generate", "invoke") for i in child.items)
            found = search(child, scopes + [child] if scope else scopes)
            if found is not None:
                return found
        return None
    return search(tree, []) or (None, False)


class _SkipBody(Exception):
    """Raised at the first line of a step block that selects no step the generation makes; its ``__exit__`` ends it."""

    def __init__(self, displaced: Any) -> None:
        super().__init__("no selected step is made")
        self.displaced = displaced


def _skip_body(frame: FrameType) -> None:
    """Leave the ``with`` body ``frame`` is about to run: raise :class:`_SkipBody` at its first line event."""
    displaced = sys.gettrace()
    entry = frame.f_lineno

    def hook(f: FrameType, event: str, arg: Any) -> Any:
        if f is frame and event == "line" and f.f_lineno != entry:
            frame.f_trace = None
            raise _SkipBody(displaced)
        return hook

    frame.f_trace = hook
    sys.settrace(lambda *a: None)


def _block_body(frame: FrameType | None) -> CodeType:
    """The body of the ``with`` statement ``frame`` is entering, compiled to run again in that frame's variables."""
    if frame is None:
        raise TraceError("`with tracer.iter[...]:` needs the caller's frame; loop instead: "
                         "`for step in tracer.iter[...]:`")
    filename, line = frame.f_code.co_filename, frame.f_lineno
    source = "".join(linecache.getlines(filename, frame.f_globals))
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        tree = None
    blocks = [] if tree is None else [
        n for n in ast.walk(tree) if isinstance(n, ast.With)
        and (n.lineno == line or any(item.context_expr.lineno == line for item in n.items))]
    if not blocks:
        raise TraceError(f"cannot read the source of the `with tracer.iter[...]:` block at {filename}:{line}, which "
                         "runs once per step; loop instead: `for step in tracer.iter[...]:`")
    block = min(blocks, key=lambda n: n.end_lineno - n.lineno)
    if block.body[0].lineno == block.lineno:
        raise TraceError(f"{filename}:{line}: the body of `with tracer.iter[...]:` must start on its own line")
    module = ast.fix_missing_locations(ast.Module(body=block.body, type_ignores=[]))
    return compile(module, filename, "exec")


def _run_in_frame(code: CodeType, frame: FrameType) -> None:
    """Run ``code`` in ``frame``'s variables and write what it assigned back into the frame."""
    if frame.f_locals is frame.f_globals:  # module level: the variables are the globals
        exec(code, frame.f_globals)
        return
    scope = {**frame.f_globals, **frame.f_locals}
    exec(code, scope)
    names = frame.f_code.co_varnames + frame.f_code.co_cellvars + frame.f_code.co_freevars
    f_locals = frame.f_locals
    for name in names:
        if name in scope:
            f_locals[name] = scope[name]
    if sys.version_info < (3, 13):
        ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))


class Generator:
    """nnsight's ``lm.generator``: its ``.output`` is the generated ids, as :attr:`hybrid.tracing.Tracer.result`
    (nnsight 0.8.1 deprecates it for ``tracer.result`` and gives the same tensor)."""

    def __init__(self, tracer_getter: Any) -> None:
        self._tracer_getter = tracer_getter

    @property
    def output(self) -> "GeneratedTokens":
        tracer = self._tracer_getter()
        if tracer is None:
            raise TraceError("lm.generator.output can only be used inside `with lm.generate(...)`")
        return tracer.generator_output()


class GeneratedTokens(ClientValue):
    """``tracer.result``: the generated token ids ``(B, T + N)``; ``.save()`` it to use it after the block. Read in
    an invoke, it is that invoke's ``rows`` of the ``whole`` result."""

    @property
    def value(self) -> torch.Tensor:
        if self._whole is not None:
            return self._whole.value[self._rows]
        if self._value is None:
            raise TraceError("tracer.result has no value yet: it exists after the `with lm.generate(...)` block")
        return self._value

    def bind(self, tokens: torch.Tensor) -> None:
        self._value = tokens

    def __repr__(self) -> str:
        return f"<GeneratedTokens {'bound' if self.bound else 'pending'}>"
