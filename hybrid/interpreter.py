"""The interpreter: runs one executor's share of a planned graph as module events happen.

It is driven by module events (``on_input`` / ``on_output`` for ``(path, call)``), on a node through the span
hook and on the client through the same hooks on its local stages. At each event it records getter values, runs
every assigned node whose inputs now all exist (in graph order), and applies the setters of that event.
:meth:`Interpreter.finish` returns the values that leave this executor (carried onward or saved).

Every op is checked against the whitelist here again (the node never trusts the client), and the request's
limits are enforced: op count, attachment bytes (at parse), wall time, and memory *before* it is allocated:

- at each event, before running anything, the ops that are now ready are run on meta values in the order they will
  run (:mod:`hybrid.meta`), with values freed as they will be; an op whose result has too many elements, would push
  the live values past ``max_live_bytes`` or the saves past ``max_save_bytes``, or computes a huge Python integer or
  sequence (:mod:`hybrid.budget`), refuses the request before the first of them runs;
- an op whose size depends on data seen at run time (after ``x.item()``) is checked the same way just before it
  runs;
- each value is dropped after its last use here, unless it is saved, carried onward or kept for the session, so a
  long chain costs the memory of its widest point (:attr:`Interpreter.peak_live_bytes`).
"""

from __future__ import annotations

import contextlib
import time
from itertools import islice
from typing import Any, Iterable

import torch
from torch.func import functional_call

from . import ops
from .attention_weights import is_attention, weight_reads
from swarm.span_hook import active_hook

from .budget import Ledger, check_python_op, check_python_value, mib, refusal, sent_bytes, tensors
from .errors import (DisallowedOpError, HybridError, InvalidGraphError, LimitExceededError, OrderError,
                     SessionValueError, UnknownModuleError)
from .ir import Attachment, Graph, Node, Ref
from .gradients import BackwardPasses
from .meta import UNKNOWN, has_unknown, meta_params, module_call_key, run_on_fakes, to_fake
from .planner import Plan, is_inplace
from .source import owner_path, split_op_path
from .values import conform, to_device

_INPLACE_RESULT = {("operator", "setitem"), ("method", "__setitem__")}
"""Ops that return None in Python but whose graph value is their first argument, written in place."""


class Interpreter(BackwardPasses):
    """Executes the nodes assigned to executor ``me`` of ``plan``.

    Args:
        carried: values of earlier executors (and session values loaded here), by node id.
        retain: node ids whose values must outlive their last use here besides ``plan.carry[me]`` (values kept for
            a later trace of the session).

    Raises:
        LimitExceededError: the carried values alone exceed ``max_live_bytes`` (or their saves ``max_save_bytes``).
    """

    def __init__(self, graph: Graph, plan: Plan, me: int, carried: dict[int, Any], *, device: torch.device | str = "cpu",
                 limits=None, modules: dict[str, torch.nn.Module] | None = None, retain: Iterable[int] = (),
                 started: float | None = None):
        self.graph, self.plan, self.me = graph, plan, me
        self.limits = limits or graph.limits
        self.device = torch.device(device)
        self.modules = modules or {}
        self.mine = [n for n in graph.nodes if plan.assignment[n.id] == me]
        self._retain = set(plan.carry[me]) | set(retain) | set(plan.bcarry[me] if plan.bcarry else ())
        self._refs: dict[int, tuple[int, ...]] = {n.id: tuple(n.refs()) for n in self.mine}
        """Node id -> the ids it reads, for the nodes here (the graph does not change while it runs; the ready scans
        read these on every event)."""
        self._readers: dict[int, int] = {}
        """Value id -> how many nodes here have yet to read it (nodes run when ready, not in graph order)."""
        for node in self.mine:
            for ref in set(self._refs[node.id]):
                self._readers[ref] = self._readers.get(ref, 0) + 1
        self.values: dict[int, Any] = {}
        self.ledger = Ledger()
        """Bytes of the tensors the live values hold."""
        self.saved_bytes = 0
        """Bytes of saved values here (carried in or made here), as they will be sent."""
        self._ahead: dict[int, tuple[Any, int]] = {}
        """Node id -> (meta result, bytes it adds) from the check before this event's ops ran."""
        self._meta_modules: dict[str, dict[str, torch.Tensor]] = {}
        self._meta_results: dict[tuple, torch.Tensor] = {}
        """:func:`hybrid.meta.module_call_key` -> the meta result of that module call."""
        for k, v in carried.items():
            value = to_device(v, self.device)
            self.values[k] = value
            self.ledger.add(k, value)
            if graph.nodes[k].save:
                self.saved_bytes += sent_bytes(value)
        if self.ledger.total > self.limits.max_live_bytes:
            raise LimitExceededError(f"The values carried to this executor are {mib(self.ledger.total)}; the "
                                     f"request's memory budget is {mib(self.limits.max_live_bytes)}.")
        if self.saved_bytes > self.limits.max_save_bytes:
            raise LimitExceededError(f"The saved values carried to this executor are {mib(self.saved_bytes)}; the "
                                     f"limit on saves is {mib(self.limits.max_save_bytes)}.")
        self.done: set[int] = set(self.values)
        for k in list(self.values):
            if k not in self._readers and k not in self._retain:
                self._free(k)
        self._getters: dict[tuple[str, str, int], list[Node]] = {}
        self._setters: dict[tuple[str, str, int], list[Node]] = {}
        for node in self.mine:
            if node.op == "getter":
                self._getters.setdefault((node.module, node.kind, node.call), []).append(node)
            elif node.op == "setter":
                self._setters.setdefault((node.module, node.kind, node.call), []).append(node)
        self._pending = [n for n in self.mine if n.op not in ("getter", "setter", "load", "grad", "grad_set")]
        self.sourced = {(owner_path(key[0]), key[2]) for key in (*self._getters, *self._setters)
                        if split_op_path(key[0])}
        """``(path, call)`` of the module calls here whose forward runs instrumented: the graph uses operations inside
        it (``module.source``, :mod:`hybrid.source`)."""
        self.skips = {key for key, nodes in self._setters.items() if any(n.kwargs.get("skip") for n in nodes)}
        """``(path, "output", call)`` of the module calls the graph skips here (``module.skip(value)``)."""
        self.attention_weights = weight_reads(graph, lambda path: is_attention(self.modules.get(path))) & {
            (n.module, n.call) for n in self.mine if n.op == "getter"}
        """``(path, call)`` of the attention calls here that must run eagerly: the graph reads their weights."""
        self._init_backward(carried)
        self._park = not self.grad_mode
        """Whether batchable module calls may wait for their siblings (:meth:`_run_ready`); not with backward passes,
        whose roots must exist when the forward reaches them."""
        unloaded = [n for n in self.mine if n.op == "load" and n.id not in self.done]
        if unloaded:
            raise SessionValueError(f"session value {unloaded[0].target!r} was not provided to this executor")
        self.started = time.monotonic() if started is None else started
        """When the wall-time limit started counting (``time.monotonic()``; a node passes the request's arrival)."""
        self.ops_run = 0
        self.module_calls = 0
        """Calls of the model's modules made for ``module`` nodes (batched calls count once)."""
        self._run_ready()

    @property
    def peak_live_bytes(self) -> int:
        """The most bytes the live values held at once (carried values included)."""
        return self.ledger.peak

    # ---- events -------------------------------------------------------------------------------------------

    def wants(self, path: str) -> bool:
        return any(key[0] == path for key in self._getters) or any(key[0] == path for key in self._setters)

    def on_event(self, path: str, kind: str, call: int, value: Any) -> Any:
        """A module's input (first argument) or output is ``value``; return what the model should use."""
        key = (path, kind, call)
        # Getters and setters of one event in graph order: a getter recorded after a setter reads the new value.
        for node in sorted(self._getters.get(key, []) + self._setters.get(key, []), key=lambda n: n.id):
            if node.op == "getter":
                self._charge(node, value, self.ledger.added_bytes(value), self.ledger, self.saved_bytes)
                self._store(node, value)
            else:
                self._run_ready()
                if any(r not in self.values for r in self._reads(node)):
                    self._run_ready(flush=True)  # a parked call feeds it
                (arg,) = node.args
                if any(r not in self.values for r in self._reads(node)):  # fed by a later module (the client's planner
                    raise OrderError(f"Setter node {node.id} on {path}.{kind} needs a value not computed yet at "
                                     f"that point (it depends on a later module or call).")  # refuses this too)
                value = conform(self._resolve(arg), value, f"{path}.{kind}")
            self._release(node)
            self.done.add(node.id)
        self._run_ready()
        return value

    def skip_output(self, path: str, call: int) -> tuple | None:
        """``(replacement,)`` when the graph skips ``path``'s call ``call`` (the module must not run), else None.
        The replacement must exist before the module would run (e.g. its own input), as in nnsight."""
        key = (path, "output", call)
        if key not in self.skips:
            return None
        node = next(n for n in self._setters[key] if n.kwargs.get("skip"))
        self._run_ready()
        if any(r not in self.values for r in self._reads(node)):
            self._run_ready(flush=True)  # a parked call feeds it
        if any(r not in self.values for r in self._reads(node)):
            raise OrderError(f"Node {node.id} skips {path} with a value not computed before {path} runs (it depends "
                             "on that module's own output or on a later module); skip with a value computed earlier, "
                             "e.g. the module's own .input.")
        value = self._resolve(node.args[0])
        if not all(isinstance(v, torch.Tensor) or v is None for v in (value if isinstance(value, tuple) else (value,))):
            raise InvalidGraphError(f"Node {node.id} skips {path} with a {type(value).__name__}; a skipped module's "
                                    "output must be a tensor (or a tuple of tensors and None), like its own.")
        return (value,)

    def finish(self) -> dict[int, Any]:
        """Values leaving this executor: carried to later executors and saved ones."""
        self._run_ready(flush=True)
        missing = [n.id for n in self.mine if n.id not in self.done and n.id not in self._backward_time]
        self._refuse_missing(missing)
        return {k: self.values[k] for k in self.plan.carry[self.me] if k in self.values}

    def _refuse_missing(self, missing: list[int]) -> None:
        if missing:
            node = self.graph.nodes[missing[0]]
            where = f"{node.module}.{node.kind} (call {node.call})" if node.module else f"node {node.id}"
            raise OrderError(f"{len(missing)} op(s) assigned here never ran, first {where}: the module was not "
                             f"called in this request (wrong call index, or a module outside the forward pass).")

    # ---- execution ------------------------------------------------------------------------------------------

    def _run_ready(self, flush: bool = False) -> None:
        """Run every pending node whose inputs exist. Without ``flush``, calls of a position-wise module wait
        (*parked*, with everything that reads them) while another call of that module here still waits for its
        input: the logit lens's ``lm_head(norm(h_i))`` of the layers this executor runs become ready one layer at a
        time, and parking lets them run as one batched call with the carried ones once the last layer's exists.
        Parked nodes run at :meth:`finish` and before a setter or skip that needs them."""
        ready = []
        for node in self._pending:  # graph order: a node's inputs come before it, so one pass finds every chain
            if all(r in self.done for r in self._reads(node)):
                ready.append(node)
                self.done.add(node.id)
        if ready and not flush and self._park:
            ready = self._unparked(ready)
        if not ready:
            return
        ready_ids = {n.id for n in ready}
        self._pending = [n for n in self._pending if n.id not in ready_ids]
        self.done.difference_update(ready_ids)
        batches = self._batches(ready)
        self._check_ahead([node for group in batches for node in group])  # in the order they run
        for group in batches:
            if len(group) == 1:
                self._execute(group[0])
            else:
                self._execute_batched(group)

    def _batchable(self, node: Node) -> bool:
        return (node.op == "module" and not node.kwargs and len(node.args) == 1 and isinstance(node.args[0], Ref)
                and _positionwise(self.modules.get(node.module)))

    def _unparked(self, ready: list[Node]) -> list[Node]:
        """``ready`` less the batchable module calls whose module has a call here still waiting for its input, and
        the nodes that read them (they stay pending, and are no longer counted as done)."""
        ready_ids = {n.id for n in ready}
        waiting = {n.module for n in self._pending if n.id not in ready_ids and self._batchable(n)}
        if not waiting:
            return ready
        parked: set[int] = set()
        for node in ready:  # graph order: a reader comes after what it reads
            if (node.module in waiting and self._batchable(node)) or any(r in parked for r in self._reads(node)):
                parked.add(node.id)
        self.done.difference_update(parked)
        return [n for n in ready if n.id not in parked]

    def _batches(self, ready: list[Node]) -> list[list[Node]]:
        """``ready`` in execution order, calls of one position-wise module on inputs that are all ready grouped (the
        logit lens: 30 ``lm_head(norm(h_i))`` become one ``norm`` and one ``lm_head`` call). Other ops run first,
        as soon as their inputs exist, so that every call of a module whose input they make joins its group (the
        ``[:, -1]`` of the layer that arrived last before the parked calls of the others). Pure ops only: with an
        in-place write or a backward pass among them, graph order is kept."""
        if not any(self._batchable(n) for n in ready) or any(is_inplace(n) or n.op == "backward" for n in ready):
            return [[n] for n in ready]
        ids = {n.id for n in ready}
        made: set[int] = set()
        order: list[list[Node]] = []
        remaining = ready
        while remaining:
            progress = False
            for node in remaining:  # graph order: a chain of other ops runs in one pass
                if not self._batchable(node) and all(r not in ids or r in made for r in self._reads(node)):
                    order.append([node])
                    made.add(node.id)
                    progress = True
            if not progress:  # only module calls can run now: each module's once, on all its ready inputs
                groups: dict[str, list[Node]] = {}
                for node in remaining:
                    if self._batchable(node) and all(r not in ids or r in made for r in self._reads(node)):
                        groups.setdefault(node.module, []).append(node)
                for group in groups.values():
                    order.append(group)
                    made.update(n.id for n in group)
            remaining = [n for n in remaining if n.id not in made]
        return order

    def _execute_batched(self, group: list[Node]) -> None:
        """One call of a position-wise module on the stacked inputs of ``group``; falls back to one call each when
        the inputs differ in shape or dtype."""
        inputs = [self.values[n.args[0].id] for n in group]
        first = inputs[0]
        if not all(isinstance(x, torch.Tensor) and x.shape == first.shape and x.dtype == first.dtype for x in inputs):
            for node in group:
                self._execute(node)
            return
        if time.monotonic() - self.started > self.limits.max_wall_s:
            raise LimitExceededError(f"The graph ran longer than its wall-time limit of {self.limits.max_wall_s} s.")
        for node in group:
            ahead = self._ahead.pop(node.id, None)
            if ahead is not None and ahead[0] is not UNKNOWN:
                self._charge(node, ahead[0], ahead[1], self.ledger, self.saved_bytes)
        grad = contextlib.nullcontext() if self.grad_mode else torch.no_grad()
        try:
            with grad, active_hook(None):
                outputs = self.modules[group[0].module](torch.stack(inputs)).unbind(0)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            raise InvalidGraphError(f"Node {group[0].id} ({group[0].module}) failed: {type(e).__name__}: {e}") from None
        self.module_calls += 1
        for node, result in zip(group, outputs):
            self._store(node, result)
            self.done.add(node.id)
            self.ops_run += 1
            self._release(node)

    def _check_ahead(self, ready: list[Node]) -> None:
        """Run ``ready`` on meta values in order, freeing as the real run will, and refuse the request if any op
        would break a budget; remember each result's size for :meth:`_execute`."""
        memo: dict[int, torch.Tensor] = {}
        alias: dict[int, int] = {}  # id(fake of a real tensor) -> id(real tensor)
        ledger = self.ledger.copy(key=lambda t: alias.get(id(t), id(t)))
        fakes: dict[int, Any] = {}  # kept until the end, so ids of fakes stay unique
        saved = self.saved_bytes
        readers = dict(self._readers)

        def fake(ref: int) -> Any:
            if ref in fakes:
                return fakes[ref]
            known = len(memo)
            value = to_fake(self.values[ref], memo)
            alias.update((id(f), real) for real, f in islice(reversed(memo.items()), len(memo) - known))
            return value

        for node in ready:
            args = [self._resolve(a, fake) for a in node.args]
            kwargs = {k: self._resolve(v, fake) for k, v in node.kwargs.items()}
            if has_unknown(args) or has_unknown(kwargs):
                fakes[node.id] = UNKNOWN  # sized just before it runs
                continue
            result = self._infer(node, args, kwargs)
            fakes[node.id] = result
            if result is UNKNOWN:
                continue
            added = ledger.added_bytes(result)
            self._charge(node, result, added, ledger, saved)
            self._ahead[node.id] = (result, added)
            ledger.add(node.id, result)
            if node.save:
                saved += sent_bytes(result)
            for ref in self._dead_after(node, readers):
                ledger.drop(ref)

    def _execute(self, node: Node) -> None:
        if time.monotonic() - self.started > self.limits.max_wall_s:
            raise LimitExceededError(f"The graph ran longer than its wall-time limit of {self.limits.max_wall_s} s.")
        args = [self._resolve(a) for a in node.args]
        kwargs = {k: self._resolve(v) for k, v in node.kwargs.items()}
        ahead = self._ahead.pop(node.id, None)
        if ahead is None:  # its size depends on values computed in this event (x.item()): size it now
            memo: dict[int, torch.Tensor] = {}
            fake_args, fake_kwargs = to_fake(args, memo), to_fake(kwargs, memo)
            result = self._infer(node, fake_args, fake_kwargs)
            inputs = {id(t) for t in tensors((fake_args, fake_kwargs))}
            ahead = (result, 0 if result is UNKNOWN else sum(
                t.numel() * t.element_size() for t in {id(t): t for t in tensors(result)}.values()
                if id(t) not in inputs))
        if ahead[0] is not UNKNOWN:
            self._charge(node, ahead[0], ahead[1], self.ledger, self.saved_bytes)
        try:
            if node.op == "module":
                module = self.modules.get(node.module)
                if module is None:
                    raise UnknownModuleError(f"Module {node.module!r} is not held here ({self.plan.executors[self.me].name}).")
                grad = contextlib.nullcontext() if self.grad_mode else torch.no_grad()
                with grad, active_hook(None):  # the module's own span hooks must not fire again
                    result = module(*args, **kwargs)
                self.module_calls += 1
            elif node.op == "backward":
                self.backward(node.call, [args[0]], args[1:] or None, bool(node.kwargs.get("retain_graph")))
                result = None
            elif node.op == "function":
                result = ops.function(node.target)(*args, **kwargs)
            elif node.op == "operator":
                check_python_op(node, args, kwargs)
                result = ops.operator_fn(node.target)(*args, **kwargs)
                if node.target == "setitem":
                    result = args[0]
            else:
                target = self._method_target(node, args, kwargs)
                result = getattr(target, node.target)(*args[1:], **kwargs)
                if node.target == "__setitem__":
                    result = target
        except (DisallowedOpError, LimitExceededError, UnknownModuleError):
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, ArithmeticError) as e:
            raise InvalidGraphError(f"Node {node.id} ({node.op} {node.target}) failed: {type(e).__name__}: {e}") from None
        check_python_value(node, result)
        for tensor in tensors(result):  # the meta check's backstop
            if tensor.numel() > self.limits.max_elements:
                raise LimitExceededError(f"Node {node.id} ({node.target}) made a tensor of {tensor.numel()} elements; "
                                         f"the limit is {self.limits.max_elements}.")
        self._store(node, result)
        self.done.add(node.id)
        self.ops_run += 1
        self._release(node)

    def _infer(self, node: Node, args: list, kwargs: dict) -> Any:
        """The meta value ``node`` will compute from the fake ``args``/``kwargs`` (:data:`UNKNOWN` for a Python
        value read from tensor data). Raises what running the op would raise, or LimitExceededError for a Python
        value too large to compute."""
        try:
            if node.op == "module":
                module = self.modules.get(node.module)
                if module is None:
                    raise UnknownModuleError(f"Module {node.module!r} is not held here ({self.plan.executors[self.me].name}).")
                key = None if self.grad_mode else module_call_key(node.module, args, kwargs)
                if key is not None and key in self._meta_results:  # the lens: one module on 30 equal shapes
                    return torch.empty_like(self._meta_results[key])
                params = self._meta_modules.get(node.module)
                if params is None:
                    params = self._meta_modules[node.module] = meta_params(module)
                with torch.no_grad(), active_hook(None):
                    result = functional_call(module, params, tuple(args), kwargs)
                if key is not None and isinstance(result, torch.Tensor):
                    self._meta_results[key] = result
                return result
            if node.op == "backward":
                return None
            if node.op == "operator":
                check_python_op(node, args, kwargs)
                if not any(True for _ in tensors((args, kwargs))):  # plain Python values: bounded, so just compute
                    result = ops.operator_fn(node.target)(*args, **kwargs)
                    check_python_value(node, result)
                    return args[0] if node.target == "setitem" else result
            if node.op == "method":
                self._method_target(node, args, kwargs)
                if node.target == "item":
                    return UNKNOWN
            if node.op == "function" and node.target == "torch.allclose":
                return UNKNOWN
            result = run_on_fakes(node.op, node.target, args, kwargs)
            return args[0] if (node.op, node.target) in _INPLACE_RESULT else result
        except HybridError:
            raise
        except Exception as e:  # what the op would raise on the real values (or a size that needs the data)
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            hint = ("; its result's size would depend on tensor values, which this node must know before running it"
                    if isinstance(e, NotImplementedError) or "data-dependent" in text or "nonzero" in text else "")
            raise InvalidGraphError(f"Node {node.id} ({node.op} {node.target}) failed: {type(e).__name__}: "
                                    f"{text}{hint}") from None

    @staticmethod
    def _method_target(node: Node, args: list, kwargs: dict) -> torch.Tensor:
        ops.check_method(node.target)
        if node.target == "to":
            ops.check_to_args(tuple(args[1:]), kwargs)
        target = args[0]
        if not isinstance(target, torch.Tensor):
            raise DisallowedOpError(f"Method {node.target!r} is called on a {type(target).__name__}, not a tensor.")
        if isinstance(target, torch.nn.Parameter) and node.target.endswith("_"):
            raise DisallowedOpError(f"Method {node.target!r} would change a weight of the model; weights are "
                                    "read-only (and never require grad).")
        return target

    # ---- budgets ------------------------------------------------------------------------------------------

    def _charge(self, node: Node, value: Any, added: int, ledger: Ledger, saved: int) -> None:
        """Refuse ``node`` if its ``value`` (real or meta) breaks a budget on top of ``ledger`` and ``saved``."""
        limits = self.limits
        if node.op != "getter":  # a module's own value is the model's business (the server bounds batch x tokens)
            for t in tensors(value):
                if t.numel() > limits.max_elements:
                    raise refusal(node, f"it would make a {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} "
                                        f"tensor of {t.numel()} elements; the limit is {limits.max_elements}")
        if ledger.total + added > limits.max_live_bytes:
            raise refusal(node, f"its result ({mib(added)}) on top of the {mib(ledger.total)} this request holds "
                                f"would pass its memory budget of {mib(limits.max_live_bytes)}")
        if node.save and saved + sent_bytes(value) > limits.max_save_bytes:
            raise refusal(node, f"saving its {mib(sent_bytes(value))} would bring the request's saves to "
                                f"{mib(saved + sent_bytes(value))}; the limit is {mib(limits.max_save_bytes)}")

    def _reads(self, node: Node) -> tuple[int, ...]:
        """The ids ``node`` reads (cached for the nodes here)."""
        refs = self._refs.get(node.id)
        return refs if refs is not None else tuple(node.refs())

    def _store(self, node: Node, value: Any) -> None:
        self.values[node.id] = value
        self.ledger.add(node.id, value)
        if node.save:
            self.saved_bytes += sent_bytes(value)

    def _dead_after(self, node: Node, readers: dict[int, int]) -> list[int]:
        """Values no longer needed here once ``node`` ran (counting down ``readers``): inputs it was the last to
        read, and itself if nothing reads it."""
        dead = []
        for r in set(self._reads(node)):
            readers[r] = readers.get(r, 0) - 1
            if readers[r] == 0 and r not in self._retain:
                dead.append(r)
        if readers.get(node.id, 0) == 0 and node.id not in self._retain:
            dead.append(node.id)
        return dead

    def _release(self, node: Node) -> None:
        for ref in self._dead_after(node, self._readers):
            self._free(ref)

    def _free(self, ref: int) -> None:
        self.values.pop(ref, None)
        self.ledger.drop(ref)

    def _resolve(self, value: Any, lookup=None) -> Any:
        """An argument with node references replaced by ``lookup(id)`` (default: the value) and attachments by
        their tensors (on this device; as meta fakes when ``lookup`` gives fakes)."""
        if isinstance(value, Ref):
            return self.values[value.id] if lookup is None else lookup(value.id)
        if isinstance(value, Attachment):
            tensor = self.graph.attachments[value.index]
            return tensor.to(self.device) if lookup is None else torch.empty_like(tensor, device="meta")
        if isinstance(value, list):
            return [self._resolve(v, lookup) for v in value]
        if isinstance(value, tuple):
            return tuple(self._resolve(v, lookup) for v in value)
        if isinstance(value, slice):
            return slice(self._resolve(value.start, lookup), self._resolve(value.stop, lookup),
                         self._resolve(value.step, lookup))
        if isinstance(value, dict):
            return {k: self._resolve(v, lookup) for k, v in value.items()}
        return value


def _positionwise(module: torch.nn.Module | None) -> bool:
    """Whether ``module`` maps each position on its own (so inputs stacked on a new leading dim give the same rows)."""
    if module is None:
        return False
    name = type(module).__name__
    return isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm)) or name.endswith(
        ("RMSNorm", "MLP"))
