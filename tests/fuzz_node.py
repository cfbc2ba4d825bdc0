"""Where fuzzed requests run: a node's hybrid path in this process (:class:`InProcessNode`), and the verdict on each
answer (:func:`verdict`) shared with the live-node fuzz.

A verdict is ``"ok"`` (a result), ``"typed"`` (a :class:`~swarm.errors.SwarmError` that names what the request did
wrong or what budget it broke) or ``"untyped"``: any other exception, an :class:`~swarm.errors.InternalNodeError`,
or a :class:`~swarm.errors.HookError` that only wraps an unexpected Python exception (``Span hook failed ...``) —
each of those is a node bug.
"""

from __future__ import annotations

import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import hybrid.node_plugin as node_plugin
from hybrid.session_store import SessionStore
from swarm.errors import HookError, InternalNodeError, SwarmError
from swarm.span_hook import HookBudgets, HookContext, active_hook, install_dispatch
from swarm.stages import Span, SpanModel

LAYERS = 4
INPUT_IDS = torch.tensor([[5, 6, 7]])
#: Budgets of the fuzzed node: low, so that huge requests meet them (as ``swarm-node serve`` with these flags).
BUDGETS = HookBudgets(max_request_memory_mb=64, max_save_mb=8)
WALL_S = 2.0


def verdict(error: BaseException | None) -> str:
    """``"ok"``, ``"typed"`` or ``"untyped"`` for a request that ended with ``error`` (None: a result)."""
    if error is None:
        return "ok"
    if isinstance(error, InternalNodeError) or not isinstance(error, SwarmError):
        return "untyped"
    if isinstance(error, HookError) and "Span hook failed" in str(error):
        return "untyped"  # an unexpected exception inside the hook, wrapped on its way out
    return "typed"


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        items = [_clone(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def before(self, path, args, kwargs):
        self.events.append(("before", path, _clone(args), _clone(kwargs)))

    def after(self, path, output):
        self.events.append(("after", path, _clone(output)))
        return output

    def result(self) -> bytes:
        return b""


class _Spy:
    """Passes module events to ``hook`` and keeps the first exception that is not a SwarmError (the node's own
    dispatch would wrap it in a HookError)."""

    def __init__(self, hook) -> None:
        self.hook, self.bug = hook, None

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except SwarmError:
            raise
        except BaseException as e:
            self.bug = self.bug or e
            raise

    def before(self, path, args, kwargs):
        return self._call(self.hook.before, path, args, kwargs)

    def after(self, path, output):
        return self._call(self.hook.after, path, output)

    def run(self, path, args, kwargs):  # operations inside a module's forward (module.source)
        return self._call(self.hook.run, path, args, kwargs)


class InProcessNode:
    """A node's hybrid path without the network, for a tiny Llama served whole (stages 0..5).

    :meth:`run` builds the request's hook exactly as ``swarm-node serve`` does (:func:`hybrid.node_plugin.
    build_graph_hook`, with ``budgets`` (default :data:`BUDGETS`) and a wall limit of :data:`WALL_S`), then feeds it the module events of
    one forward — replayed from a recorded forward (fast; values cloned per request), or, with ``real=True``, from
    running the model with the hook active — and asks for its result bytes. The session store is a small private
    one, so kept values stay bounded.
    """

    def __init__(self, path: Path, store_bytes: int = 4 << 20, budgets: HookBudgets = BUDGETS) -> None:
        self.model = SpanModel.load(path, Span(0, LAYERS, embed=True, head=True))
        install_dispatch(self.model)
        recorder = _Recorder()
        with torch.no_grad(), active_hook(recorder):
            self.model(INPUT_IDS, embed=True, head=True)
        self.events = recorder.events
        self.limits = replace(node_plugin.node_limits(budgets), max_wall_s=WALL_S)
        self.context = HookContext(model=self.model, start=0, end=LAYERS, embed=True, head=True, step=0)
        self.store = SessionStore(max_bytes=store_bytes)
        self.store.put("fuzz:a", torch.arange(12.0).view(3, 4))

    def run(self, payload: bytes, *, real: bool = False, carry: bytes = b"") -> tuple[str, str | None, list[str]]:
        """``(verdict, detail, executed)`` of one request: ``detail`` is the traceback of an untyped failure,
        ``executed`` the ops that ran to completion (``op:target``, or ``setter``/``module``/``load``)."""
        spy, hook, shared = None, None, node_plugin.STORE
        node_plugin.STORE = self.store
        try:
            hook = node_plugin.build_graph_hook(payload, replace(self.context, carry=carry), node=self.limits)
            with torch.no_grad():
                if real:
                    spy = _Spy(hook)
                    with active_hook(spy):
                        self.model(INPUT_IDS, embed=True, head=True)
                else:
                    self._replay(hook)
                hook.result()
            error = None
        except BaseException as e:  # noqa: BLE001 -- classified below; KeyboardInterrupt is re-raised
            if isinstance(e, KeyboardInterrupt):
                raise
            error = spy.bug if spy is not None and spy.bug is not None else e
        finally:
            node_plugin.STORE = shared
        kind = verdict(error)
        executed = [] if hook is None else [
            f"{n.op}:{n.target}" if n.op in ("function", "method", "operator") else n.op
            for n in hook.interpreter.graph.nodes if n.id in hook.interpreter.done and n.op != "getter"]
        return kind, None if kind != "untyped" else "".join(traceback.format_exception(error)), executed

    def _replay(self, hook) -> None:
        wants = hook.interpreter.wants
        for event in self.events:
            if not wants(event[1]):
                continue
            if event[0] == "before":
                hook.before(event[1], _clone(event[2]), _clone(event[3]))
            else:
                hook.after(event[1], _clone(event[2]))
