"""The tracing front end: an nnsight-style ``with`` block becomes a :class:`hybrid.ir.Graph`.

::

    with Tracer(skeleton, tokenize, execute, ["a prompt", "another"]) as tracer:   # lm.trace(prompts)
        h = root.model.layers[8].output            # getter (B, T, D)
        h[1, 3, :] = h[0, 3, :]                    # in-place setitem on the module's real output
        p = root.lm_head.output[:, -1].softmax(-1).save()
    p                                              # a plain tensor now

What is recorded (see ``hybrid.ir`` for the node ops and ``hybrid.proxy`` for operators, methods and functions):

- A getter: one ``getter`` node per ``(module, kind, call)`` (``call`` is the forward call: the generation step,
  chosen by looping over ``tracer.iter[...]`` / ``tracer.all()``, else 0), reused while the
  module's value is unchanged. After a setter, a read returns the assigned value itself when it is a traced tensor
  of exactly the module's shape and dtype (the module then holds that very tensor); otherwise the next read records
  a new getter, which must read the value as replaced (getters and setters of one module event apply in graph
  order). A setter's value must conform to the module's value as the interpreter requires (numbers and tensors
  that broadcast to it, tuples part by part, None for None); this is checked while tracing.
- A single implicit invoke (``lm.trace(prompts)``) or an empty ``tracer.invoke()`` sees the whole batch: reads are
  the getter itself, ``.output = v`` is ``setter [v]``.
- Invoke *k* of several (``with tracer.invoke(prompts):``) owns rows ``[start, stop)`` of the batch, in invoke
  order, exactly as nnsight 0.8 narrows: a read is the shared full getter, then ``getitem [Ref(getter),
  slice(start, stop)]`` for a tensor whose dim 0 is the batch (other tensors pass whole); a tuple value is read as
  a :class:`~hybrid.proxy.TupleProxy` of ``getitem [Ref(getter), i]`` elements narrowed the same way. In-place
  writes (``h[:] = 0``) go through that row view, so they touch only these rows. ``.output = v`` records nnsight's
  ``widen``: ``torch.cat([getter[:start], v, getter[stop:]], dim=0)`` then ``setter [Ref(cat)]`` (element-wise for
  a tuple: ``setter [(Ref(cat_0), None)]``); ``v`` must have the rows' exact shape.

Batch: each invoke's inputs become rows (a prompt, a list of prompts, token ids ``list[int]`` / ``list[list[int]]``
or a ``(B, T)`` int tensor). ``tokenize`` is called once per invoke when it starts (to know its rows and tokens for
the fake shapes) and once at the end on all rows of all invokes in order, which must left-pad them together, as
nnsight 0.8 does (it tokenizes every prompt and pads all rows of all invokes to the longest, on the left for causal
LMs). While tracing, shapes use the batch known so far; when a later invoke widens it, every fake is recomputed, and a
size user code already read that changed is reported (:meth:`~hybrid.graph_builder.GraphBuilder.repropagate`).
"""

from __future__ import annotations

import ctypes
import numbers
import os
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .barrier import Barrier
from .client_values import ClientValue
from .envoy import Envoy, ModelSkeleton, ShapeInfo, first_input, root_envoy
from .root_inputs import RootInputs
from .steps import GeneratedTokens, Steps
from .errors import DisallowedOpError, HybridError, OrderError, TraceError
from .planner import Executor, plan_graph
from .ir import Graph
from .graph_builder import GraphBuilder
from .proxy import Proxy, TracedShape, TupleProxy, at_user_line, describe

__all__ = ["Envoy", "ModelSkeleton", "Proxy", "ShapeInfo", "TracedShape", "Tracer", "TupleProxy", "current_tracer",
           "first_input", "nnsight_position_ids", "root_envoy", "save"]

Tokenize = Callable[[Any], "tuple[torch.Tensor, torch.Tensor]"]
Execute = Callable[[Graph, torch.Tensor, torch.Tensor], "dict[int, Any]"]

_HYBRID_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_active = threading.local()


def current_tracer(skeleton: ModelSkeleton | None = None) -> "Tracer | None":
    """The innermost tracer inside its ``with`` block on this thread (of ``skeleton``, if given), else None."""
    for tracer in reversed(getattr(_active, "stack", [])):
        if skeleton is None or tracer.skeleton is skeleton:
            return tracer
    return None


def save(value: Any) -> Any:
    """nnsight's ``nnsight.save(x)``: mark a traced value (or each traced value in a list/tuple) to come back;
    returns ``value``. A list or dict saved inside a trace is a container: every traced value in it when the trace
    ends comes back (``hs = save([])`` then ``hs.append(h)`` in a generation loop). Other values are returned
    unchanged."""
    if type(value) in (list, dict):
        tracer = current_tracer()
        if tracer is not None and not any(c is value for c in tracer._containers):
            tracer._containers.append(value)
    return _save_items(value)


def _save_items(value: Any) -> Any:
    if isinstance(value, (Proxy, TupleProxy, ClientValue)):
        return value.save()
    if isinstance(value, (list, tuple, dict)):
        for item in (value.values() if isinstance(value, dict) else value):
            _save_items(item)
    return value


def nnsight_position_ids(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """The ``position_ids`` nnsight 0.8 passes for a left-padded batch (``processing.supply_position_ids``): each
    left-padded row counted from its first real token. None when no row is padded (the model's own count is right).
    Pass it to the forward to get nnsight's numbers for batches of prompts of different lengths."""
    mask = attention_mask.long()
    if bool(mask.all()):
        return None
    counted = (mask.cumsum(-1) - 1).clamp(min=0)
    plain = torch.arange(mask.shape[-1]).expand_as(mask)
    positions = torch.where((mask.diff(dim=-1) >= 0).all(-1, keepdim=True), counted, plain)
    return None if bool((positions == torch.arange(mask.shape[-1])).all()) else positions


@dataclass
class _Invoke:
    rows: list
    start: int
    stop: int
    narrow: bool
    encoded: tuple | None = None
    last: tuple[tuple[int, int], str] | None = None
    """((call, event index), name) of the latest module event this invoke used."""
    views: dict = field(default_factory=dict)
    result: GeneratedTokens | None = None
    """``tracer.result`` read in this invoke: its rows of the generated ids."""
    inputs: RootInputs | None = None
    """``lm.inputs`` read in this invoke: its rows of the root model's inputs."""
    ended: int | None = None
    """The line of a loop over every remaining step that ended this invoke, where its source could not be checked."""


class Tracer:
    """Records one traced forward as a graph, runs it with ``execute`` on exit, and binds the saved values.

    Args:
        skeleton: the model's :class:`ModelSkeleton`.
        tokenize: ``rows -> (input_ids, attention_mask)``, both ``(B, T)`` int64, left-padded; ``rows`` is a
            ``list[str]`` or a ``list[list[int]]``.
        execute: ``(graph, input_ids, attention_mask) -> {node_id: value}`` for every saved node, or None when it
            defers the run (inside ``lm.session()``) and calls :meth:`bind_values` later.
        inputs: prompts for one implicit invoke (``lm.trace(prompts)``); None to use ``tracer.invoke(...)``.
        steps: forward calls the execution makes (generation steps: ``max_new_tokens``); 1 for a trace. Module
            reads and writes bind to call 0, or to each step while looping over :attr:`iter` / :meth:`all`.
        generation: whether this traces ``lm.generate`` (``execute`` then also binds :attr:`result`).

    Attributes:
        graph: the graph recorded so far.
        stats: free for the executor's caller (timings, bytes); ``{}`` by default.
    """

    def __init__(self, skeleton: ModelSkeleton, tokenize: Tokenize, execute: Execute, inputs: Any = None, *,
                 steps: int = 1, generation: bool = False) -> None:
        self.skeleton = skeleton
        self.stats: dict = {}
        self.steps, self.generation = steps, generation
        self.call = 0
        """The forward call (generation step) module reads and writes bind to now."""
        self._result = GeneratedTokens()
        self._root_inputs = RootInputs()
        self._containers: list = []
        self._finalizers: list[Callable[[], None]] = []
        """Called when the block ends, before the graph runs (``tracer.cache()`` records its getters then)."""
        self._barriers: list[Barrier] = []
        self._tokenize, self._execute, self._inputs = tokenize, execute, inputs
        self._builder = GraphBuilder(self._getter_fake, skeleton.module)
        self._builder.check_order = self._check_order
        if generation:
            self._builder.gradients.allowed = ("backward passes run in lm.trace(...), not in lm.generate(...): "
                                               "trace the forward you want gradients of")
        self._invokes: list[_Invoke] = []
        self._current: _Invoke | None = None
        self._row_kind: str | None = None
        self._batch = self._tokens = 0
        self._full: dict[tuple, Proxy] = {}
        self._state = "new"

    @property
    def graph(self) -> Graph:
        return self._builder.graph

    def fake(self, node_id: int) -> Any:
        """The meta value (shape, dtype, structure) node ``node_id`` has for the current batch shape."""
        return self._builder.fakes[node_id]

    # ---- the with block -------------------------------------------------------------------------------------

    def __enter__(self) -> "Tracer":
        if self._state != "new":
            raise TraceError("a Tracer can be entered only once; call lm.trace(...) again")
        if current_tracer(self.skeleton) is not None:
            raise TraceError(at_user_line("traces of one model cannot be nested"))
        _active.__dict__.setdefault("stack", []).append(self)
        self._state = "tracing"
        if self._inputs is not None:
            try:
                self._current = self._add_invoke(self._inputs, narrow=False)
            except BaseException:
                self._close()
                raise
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        stopped = exc_type is _Stop and exc is not None and exc.tracer is self
        try:
            if exc_type is None or stopped:
                self._run()
                _bind_locals(_user_frame())
        finally:
            self._close()
        return stopped

    def stop(self) -> None:
        """nnsight's ``tracer.stop()``: the rest of the ``with`` block is not run (no more ops are recorded); what was
        recorded runs and saved values are bound as usual."""
        if self._state != "tracing":
            raise TraceError(at_user_line("tracer.stop() can only be called inside its `with` block"))
        raise _Stop(self)

    def barrier(self, n: int) -> Barrier:
        """nnsight's ``tracer.barrier(n)``: a meeting point for ``n`` invokes (see :mod:`hybrid.barrier`); call it
        from each of them. Invokes are recorded in the order they are written, so values made above it are there for
        later-written invokes."""
        if self._state != "tracing":
            raise TraceError(at_user_line("tracer.barrier(n) can only be created inside its `with` block"))
        barrier = Barrier(self, n)
        self._barriers.append(barrier)
        return barrier

    @property
    def iter(self) -> Steps:
        """Select generation steps: ``for step in tracer.iter[:3]:`` binds module reads and writes in the loop body
        to steps 0, 1, 2 (``[a:b]``, ``[i]`` and ``[[i, j]]`` work as in nnsight; steps past the last are left out
        with a warning). nnsight's deprecated block form ``with tracer.iter[...]:`` runs its body once per step.
        A ``for`` over every remaining step (``[a:]``, or steps past the last) ends its invoke, as in nnsight: a
        statement after it in the invoke is refused (``TraceError``), since nnsight never runs it."""
        return Steps(self)

    def all(self) -> Steps:
        """Every generation step: ``for step in tracer.all():`` (``tracer.iter[:]``; ``with tracer.all():`` too)."""
        return Steps(self)[:]

    @property
    def result(self) -> GeneratedTokens:
        """What the traced call returns: for ``lm.generate``, the prompt and new token ids ``(B, T + N)``; inside
        ``tracer.invoke(...)``, that invoke's rows, as in nnsight. ``.save()`` it; it becomes a tensor after the
        block."""
        if self._state != "tracing":
            raise TraceError(at_user_line("tracer.result can only be used inside its `with` block"))
        if not self.generation:
            raise TraceError(at_user_line("tracer.result is the token ids of lm.generate(...); in lm.trace(...) read "
                                          "the logits as lm.lm_head.output"))
        invoke = self._current
        self._after_generation(invoke, "tracer.result")
        if invoke is None or not invoke.narrow:
            return self._result
        if invoke.result is None:
            invoke.result = GeneratedTokens(self._result, slice(invoke.start, invoke.stop))
        return invoke.result

    def generator_output(self) -> GeneratedTokens:
        """nnsight's ``lm.generator.output`` (deprecated there in favour of ``tracer.result``, which it equals):
        the prompt and new token ids ``(B, T + N)``, an invoke's rows inside ``tracer.invoke(...)``."""
        if self._state != "tracing":
            raise TraceError(at_user_line("lm.generator.output can only be used inside its `with lm.generate(...)` "
                                          "block"))
        if not self.generation:
            raise TraceError(at_user_line("lm.generator.output is the token ids of lm.generate(...); lm.trace(...) "
                                          "generates nothing (read the logits as lm.output.logits)"))
        warnings.warn("model.generator.output is deprecated; use tracer.result instead", DeprecationWarning,
                      stacklevel=3)
        self._after_generation(self._current, "lm.generator.output")
        return self.result

    def ended_by_loop(self, line: int | None) -> None:
        """A loop over every remaining step ended the current invoke (:mod:`hybrid.steps`) where its source could not
        be read to check what follows: nnsight runs nothing after it there, so its next use is refused."""
        if self._current is not None:
            self._current.ended = line or 0

    def _check_not_ended(self, invoke: "_Invoke | None", name: str) -> None:
        if invoke is not None and invoke.ended is not None:
            raise TraceError(at_user_line(
                f"{name} follows a loop over every remaining generation step (line {invoke.ended}); nnsight 0.8.1 "
                "never runs what follows such a loop in its invoke, so it is refused here. Loop over "
                "`tracer.iter[:max_new_tokens]` to run code after the loop, or put it in another `tracer.invoke()`"))

    def _after_generation(self, invoke: "_Invoke | None", name: str) -> None:
        """``name`` is known only when the generation has ended, as in nnsight: modules this invoke uses after it are
        out of order (:meth:`_use`)."""
        self._check_not_ended(invoke, name)
        if invoke is not None:
            after = (self.steps, -1)
            if invoke.last is None or invoke.last[0] < after:
                invoke.last = (after, name)

    def root_inputs(self) -> RootInputs:
        """``lm.inputs``: the root model's ``(args, kwargs)`` in this invoke (see :mod:`hybrid.root_inputs`)."""
        if self._state != "tracing":
            raise TraceError(at_user_line("lm.inputs can only be used inside `with lm.trace(...)`"))
        if self.generation:
            raise DisallowedOpError(at_user_line(
                "lm.inputs in lm.generate(...): nnsight gives each step's forward arguments there, which hold the KV "
                "cache, and that stays on the nodes; read the prompt's inputs as lm.inputs in lm.trace(...), the "
                "generated ids as tracer.result, or a step's token ids as lm.model.embed_tokens.input"))
        invoke = self._current
        if invoke is None:
            raise TraceError(at_user_line("lm.inputs is used outside any invoke: in `lm.trace()` without inputs, "
                                          "use it inside `with tracer.invoke(prompts):`"))
        if invoke.last is not None and invoke.last[0] > (0, -1):  # the root's inputs come before every module
            raise TraceError(at_user_line(f"lm.inputs (the root model's inputs) come before {invoke.last[1]}, which "
                                          "this invoke already used; read lm.inputs first (or in another invoke)"))
        if not invoke.narrow:
            return self._root_inputs
        if invoke.inputs is None:
            invoke.inputs = RootInputs(self._root_inputs, slice(invoke.start, invoke.stop))
        return invoke.inputs

    def cache(self, modules: list | None = None, **options: Any) -> Any:
        """nnsight's ``tracer.cache(modules=None, device=cpu, dtype=None, include_output=True,
        include_inputs=False, ...)``: every selected module's value (after the interventions), saved; see
        :mod:`hybrid.cache`."""
        from .cache import declare
        return declare(self, modules, **options)

    def invoke(self, inputs: Any = None) -> "_InvokeContext":
        """A ``with`` block whose module reads and writes see only the rows of ``inputs`` (nnsight's invoker).
        ``inputs=None`` is an empty invoke that sees the whole batch of the other invokes."""
        return _InvokeContext(self, inputs)

    def _close(self) -> None:
        stack = getattr(_active, "stack", [])
        if self in stack:
            stack.remove(self)
        self._state, self._current, self._builder.closed = "done", None, True

    # ---- invokes and the batch ------------------------------------------------------------------------------

    def _enter_invoke(self, inputs: Any) -> None:
        if self._state != "tracing":
            raise TraceError(at_user_line("tracer.invoke(...) must be used inside its `with lm.trace()` block"))
        if self._inputs is not None:
            raise TraceError(at_user_line("this trace already has inputs (lm.trace(prompts)); to batch several "
                                          "invokes, call lm.trace() without inputs"))
        if self._current is not None:
            raise TraceError(at_user_line("invokes cannot be nested"))
        self._current = self._add_invoke(inputs, narrow=True)

    def _add_invoke(self, inputs: Any, *, narrow: bool) -> _Invoke:
        if inputs is None:
            invoke = _Invoke(rows=[], start=self._batch, stop=self._batch, narrow=False)
            self._invokes.append(invoke)
            return invoke
        rows, kind = _rows(inputs)
        if self._row_kind not in (None, kind):
            raise TraceError(at_user_line(f"this invoke passes {kind} but an earlier one passed {self._row_kind}; "
                                          "use the same kind of input in every invoke"))
        self._row_kind = kind
        encoded = self._tokenize_rows(rows)
        invoke = _Invoke(rows=rows, start=self._batch, stop=self._batch + len(rows), narrow=narrow, encoded=encoded)
        self._invokes.append(invoke)
        self._resize(invoke.stop, max(self._tokens, encoded[0].shape[1]), f"invoke {len(self._invokes) - 1}")
        return invoke

    def _tokenize_rows(self, rows: list) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self._tokenize(rows)
        if not (isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor) and ids.ndim == 2
                and ids.shape == mask.shape and ids.shape[0] == len(rows)):
            raise HybridError(f"tokenize must return (input_ids, attention_mask) of shape ({len(rows)}, T) for "
                              f"{len(rows)} rows; got {describe((ids, mask))}")
        return ids, mask

    def _resize(self, batch: int, tokens: int, cause: str) -> None:
        if (batch, tokens) == (self._batch, self._tokens):
            return
        self._batch, self._tokens = batch, tokens
        if self.graph.nodes:
            try:
                self._builder.repropagate()
            except TraceError as e:
                raise TraceError(at_user_line(f"{cause} made the batch {batch} rows x {tokens} tokens, and the graph "
                                              f"traced so far no longer fits: {e}")) from None

    def _shape_info(self, call: int = 0) -> ShapeInfo:
        """Shapes of forward call ``call``: the prompt's tokens in call 0, one new token per later call."""
        if self._batch == 0:
            raise TraceError(at_user_line("no inputs yet: modules can be used once an invoke with inputs has started"))
        ids = torch.empty((self._batch, self._tokens if call == 0 else 1), dtype=torch.long, device="meta")
        past = self._tokens + call - 1 if call else 0  # the prompt and the tokens of the steps before, in the cache
        return self.skeleton.shapes(ids, ids, logits_to_keep=1 if self.generation else 0, past=past)

    def _check_order(self) -> None:
        """Apply the planner's order rules to the graph so far (after a write into a gradient), at the user's line."""
        layers = self.skeleton.config.num_hidden_layers
        try:
            plan_graph(self.graph, self._shape_info(0).events, layers, [Executor("local", 0, layers + 1)])
        except OrderError as e:
            raise TraceError(at_user_line(str(e))) from None

    def _getter_fake(self, path: str, kind: str, call: int) -> Any:
        return self._shape_info(call).fake(path, kind)

    def _run(self) -> None:
        rows = [row for invoke in self._invokes for row in invoke.rows]
        if not rows:
            raise TraceError("the trace has no inputs: pass prompts to lm.trace(...) or add "
                             "`with tracer.invoke(prompts):` blocks")
        for barrier in self._barriers:
            barrier.check()
        with_rows = [invoke for invoke in self._invokes if invoke.rows]
        ids, mask = with_rows[0].encoded if len(with_rows) == 1 else self._tokenize_rows(rows)
        self._resize(self._batch, ids.shape[1], "tokenizing all invokes together")
        for finalize in self._finalizers:
            finalize()
        for container in self._containers:
            _save_items(container)
        self._root_inputs.bind(ids, mask, nnsight_position_ids(mask))
        values = self._execute(self.graph, ids, mask)
        if values is not None:  # None: deferred to the end of its lm.session(), which calls bind_values
            self.bind_values(values)

    def bind_values(self, values: dict[int, Any]) -> None:
        """Give the saved proxies their values (``{node_id: value}`` for every saved node)."""
        missing = [i for i in self.graph.saved() if i not in values]
        if missing and self.steps == 1:
            raise HybridError(f"execute returned no value for saved nodes {missing}")
        if missing:  # generation stopped early (every row reached EOS): later steps never ran
            warnings.warn(f"{len(missing)} saved value(s) belong to generation steps that never ran (every row ended "
                          "with the EOS token first); they are left unbound.", stacklevel=3)
        self._builder.values = dict(values)

    # ---- module reads and writes (called by Envoy) ----------------------------------------------------------

    def call_module(self, path: str, args: tuple, kwargs: dict) -> Proxy:
        """Apply the model's module ``path`` to traced values (e.g. ``lm.lm_head(lm.model.norm(h))``); it runs
        where that module's weights are."""
        return self._builder.record("module", module=path, args=args, kwargs=kwargs)

    def read_module(self, path: str, kind: str, call: int | None = None) -> Proxy | TupleProxy:
        """The value of ``path``'s ``kind`` (``"output"`` / ``"input"``) in the current invoke, in forward call
        ``call`` (default: :attr:`call`)."""
        call = self.call if call is None else call
        invoke = self._use(path, kind, call)
        full = self._full_getter(path, kind, call)
        if not invoke.narrow:
            return full
        key = (path, kind, call)
        if key not in invoke.views:
            invoke.views[key] = self._narrow(full, invoke, f"{path}.{kind}")
        return invoke.views[key]

    def write_module(self, path: str, kind: str, value: Any, call: int | None = None, *, skip: bool = False) -> None:
        """Replace ``path``'s ``kind`` with ``value`` (for the current invoke's rows) in forward call ``call``.
        ``skip``: the module is not run at all (``module.skip(value)``, see :meth:`hybrid.envoy.Envoy.skip`); inside
        an invoke of some rows only, the module still runs for the other rows, and ``value`` replaces its rows."""
        call = self.call if call is None else call
        last = self._current.last if self._current is not None else None
        invoke = self._use(path, kind, call)
        try:
            if invoke.narrow:
                value = self._widen(self._full_getter(path, kind, call), invoke, value, f"{path}.{kind}")
            before = self._builder.module_fake(path, kind, call)
            self._builder.record("setter", module=path, kind=kind, call=call, args=(value,),
                                 kwargs={"skip": True} if skip and not invoke.narrow else None)
        except TraceError:
            invoke.last = last  # a refused write does not count as using the module
            raise
        key = (path, kind, call)
        for other in self._invokes:
            other.views.pop(key, None)
        if isinstance(value, Proxy) and _same_tensor_meta(value.fake, before):
            self._full[key] = value  # the module now holds this very tensor: later reads use it
        else:
            self._full.pop(key, None)  # the next read records a new getter, after the setter

    def _use(self, path: str, kind: str, call: int) -> _Invoke:
        """The current invoke, after checking that ``path.kind`` does not come before what it already used."""
        if self._state != "tracing":
            raise TraceError(at_user_line(f"{path}.{kind} can only be used inside `with lm.trace(...)`"))
        invoke = self._current
        if invoke is None:
            raise TraceError(at_user_line(f"{path}.{kind} is used outside any invoke: in `lm.trace()` without "
                                          "inputs, use modules inside `with tracer.invoke(prompts):`"))
        self._check_not_ended(invoke, f"{path}.{kind}")
        index = (call, self._shape_info(call).index(path, kind))
        name = f"{path}.{kind}" + (f" (step {call})" if self.steps > 1 else "")
        if invoke.last is not None and index < invoke.last[0]:
            raise TraceError(at_user_line(
                f"{name} is computed before {invoke.last[1]}, which this invoke already used; within one invoke, "
                "use modules in the order the model runs them (or use the earlier module in another invoke)"))
        if invoke.last is None or index > invoke.last[0]:
            invoke.last = (index, name)
        return invoke

    def _full_getter(self, path: str, kind: str, call: int) -> Proxy:
        key = (path, kind, call)
        if key not in self._full:
            self._full[key] = self._builder.record("getter", module=path, kind=kind, call=call)
        return self._full[key]

    def _batched(self, fake: Any) -> bool:
        return isinstance(fake, torch.Tensor) and fake.ndim > 0 and fake.shape[0] == self._batch

    def _narrow(self, full: Proxy, invoke: _Invoke, name: str) -> Proxy | TupleProxy:
        rows = slice(invoke.start, invoke.stop)
        fake = full.fake
        if isinstance(fake, torch.Tensor):
            return full[rows] if self._batched(fake) else full
        if not isinstance(fake, tuple):
            raise TraceError(at_user_line(f"{name} is a {type(fake).__name__}, which cannot be split into invoke "
                                          "rows; use a module whose value is a tensor or a tuple"))
        items: list = []
        for i, part in enumerate(fake):
            items.append(None if part is None else full[i][rows] if self._batched(part) else full[i])
        return TupleProxy(items)

    def _widen(self, full: Proxy, invoke: _Invoke, value: Any, name: str) -> Any:
        fake = full.fake
        if isinstance(fake, torch.Tensor):
            return self._widen_tensor(full, fake, invoke, value, name)
        if not isinstance(fake, tuple):
            raise TraceError(at_user_line(f"{name} is a {type(fake).__name__}; it cannot be replaced per invoke"))
        parts = _tuple_parts(value, len(fake), name)
        return tuple(self._widen_tensor(full[i], f, invoke, parts[i], f"{name}[{i}]")
                     if self._batched(f) and parts[i] is not None else parts[i] for i, f in enumerate(fake))

    def _widen_tensor(self, full: Proxy, fake: torch.Tensor, invoke: _Invoke, value: Any, name: str) -> Any:
        if not self._batched(fake):
            return value
        want = (invoke.stop - invoke.start, *fake.shape[1:])
        got = value.fake if isinstance(value, Proxy) else value
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != want:
            raise TraceError(at_user_line(
                f"inside an invoke, `{name} = value` replaces this invoke's rows {invoke.start}:{invoke.stop}, so "
                f"the value must have shape {want}; got {describe(got)}. To broadcast a value into the rows, "
                f"assign in place: `{name}[:] = value`"))
        pieces = [full[: invoke.start], value, full[invoke.stop:]]
        return self._builder.record("function", target="torch.cat", args=(pieces,), kwargs={"dim": 0})


class _Stop(Exception):
    """Raised by :meth:`Tracer.stop` to leave the ``with`` block; the tracer catches its own."""

    def __init__(self, tracer: "Tracer") -> None:
        super().__init__("tracer.stop()")
        self.tracer = tracer


class _InvokeContext:
    def __init__(self, tracer: Tracer, inputs: Any) -> None:
        self.tracer, self.inputs = tracer, inputs

    def __enter__(self) -> "_InvokeContext":
        self.tracer._enter_invoke(self.inputs)
        return self

    def __exit__(self, *exc: Any) -> bool:
        self.tracer._current = None
        return False


def _rows(inputs: Any) -> tuple[list, str]:
    """One invoke's inputs as batch rows and their kind (``"text"`` or ``"token ids"``)."""
    if isinstance(inputs, str):
        return [inputs], "text"
    if isinstance(inputs, torch.Tensor) and not inputs.is_floating_point() and inputs.dtype != torch.bool \
            and inputs.ndim in (1, 2) and inputs.numel():
        return ([inputs.tolist()] if inputs.ndim == 1 else inputs.tolist()), "token ids"
    if isinstance(inputs, (list, tuple)) and inputs:
        if all(isinstance(x, str) for x in inputs):
            return list(inputs), "text"
        if all(_is_id(x) for x in inputs):
            return [[int(x) for x in inputs]], "token ids"
        if all(isinstance(x, (list, tuple, torch.Tensor)) and len(x) and all(_is_id(t) for t in x) for x in inputs):
            return [[int(t) for t in x] for x in inputs], "token ids"
    raise TraceError(at_user_line(
        f"cannot use {type(inputs).__name__} {str(inputs)[:60]!r} as trace inputs; pass a prompt, a list of prompts, "
        "token ids (list[int] or list[list[int]]) or a (batch, tokens) integer tensor"))


def _is_id(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _same_tensor_meta(a: Any, b: Any) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype)


def _tuple_parts(value: Any, length: int, name: str) -> list:
    if isinstance(value, Proxy) and isinstance(value.fake, tuple):
        value = [value[i] for i in range(len(value.fake))]
    if isinstance(value, (TupleProxy, tuple, list)) and len(value) == length:
        return list(value)
    raise TraceError(at_user_line(f"{name} is a tuple of {length}; assign a tuple of {length} (or write a part in "
                                  f"place: `{name}[0][:] = value`)"))


def _user_frame() -> Any:
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_HYBRID_DIR):
        frame = frame.f_back
    return frame


def _bind_locals(frame: Any) -> None:
    """Replace saved proxies in the caller's variables (and in lists, dicts and tuples there) by their values, as
    nnsight does after a trace."""
    if frame is None:
        return
    f_locals = frame.f_locals
    changed = False
    for name, value in list(f_locals.items()):
        bound = _bound(value, 0)
        if bound is not value:
            f_locals[name] = bound
            changed = True
    if changed and sys.version_info < (3, 13) and f_locals is not frame.f_globals:
        ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))


def _bound(value: Any, depth: int) -> Any:
    if isinstance(value, (Proxy, TupleProxy, ClientValue)):
        return value.value if value.saved and value.bound else value
    if depth >= 3:
        return value
    if type(value) is list:
        for i, item in enumerate(value):
            value[i] = _bound(item, depth + 1)
    elif type(value) is dict:
        for key, item in value.items():
            value[key] = _bound(item, depth + 1)
    elif type(value) is tuple:
        items = tuple(_bound(item, depth + 1) for item in value)
        if any(a is not b for a, b in zip(items, value)):
            return items
    return value
