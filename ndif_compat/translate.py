"""Run an nnsight request as a hybrid intervention graph pushed to the nodes, when it can be expressed as one.

Our tracing API mirrors nnsight's, so the request's own block (already checked by the guardrails) is executed
once more, with its model, envoy and tracer names bound to :class:`hybrid.LanguageModel`'s counterparts inside
``hybrid_lm.trace(inputs, placement="hybrid")``. Reads, saves, slice assignment, arithmetic and whitelisted torch
functions record a graph; the graph is planned over the route and pushed to the nodes; only the saved values come
back to the gateway. Anything the hybrid tracer cannot record (sessions, generation, Python control flow on
values, unknown functions) raises while tracing, before anything ran on the swarm: the caller then falls back to
gateway execution and says why in the response log.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import torch

logger = logging.getLogger(__name__)


class NotTranslatable(Exception):
    """The request cannot run as a hybrid graph; the message says why (shown in the response log)."""


def _hybrid_value(value: Any, hybrid_lm, tracer) -> Any:
    """The hybrid counterpart of a value shipped with the request (model, envoy, tracer), or the value itself."""
    from nnsight.intervention.envoy import Envoy
    from nnsight.intervention.tracer import InterleavingTracer

    if isinstance(value, InterleavingTracer):
        return tracer
    if isinstance(value, Envoy):
        path = value.path.removeprefix("model")
        target = hybrid_lm
        for part in [p for p in path.split(".") if p]:
            target = target[int(part)] if part.isdigit() else getattr(target, part)
        return target
    if isinstance(value, (torch.Tensor, int, float, str, bool, type(None), tuple, list, dict)):
        return value
    if callable(value) and hasattr(value, "__code__"):
        return value
    if type(value).__name__ == "module" and value.__name__.split(".")[0] in ("torch", "math"):
        return value
    raise NotTranslatable(f"the block uses {type(value).__name__}, which the hybrid tracer does not know")


def translate_and_run(tracer, hybrid_lm, builtins: dict) -> tuple[dict[str, Any], dict]:
    """Run ``tracer``'s block as a hybrid graph. Returns ``(saved values by variable name, TraceStats dict)``.

    Raises:
        NotTranslatable: the request is not a single ``lm.trace(inputs)`` the hybrid tracer can record.
    """
    from nnsight.intervention.tracer import InterleavingTracer
    from hybrid.proxy import Proxy, TupleProxy

    if type(tracer) is not InterleavingTracer:
        raise NotTranslatable(f"{type(tracer).__name__} (sessions) are not translated")
    fn_name = getattr(tracer.fn, "__name__", "")
    if fn_name != "_call":
        raise NotTranslatable(f"{fn_name or 'this call'} (generation) is not translated")
    if tracer.kwargs or len(tracer.args) > 1:
        raise NotTranslatable("trace arguments beyond the inputs are not translated")
    inputs = tracer.args[0] if tracer.args else None
    if not (inputs is None or isinstance(inputs, str) or isinstance(inputs, torch.Tensor)
            or isinstance(inputs, list) and all(isinstance(x, str) for x in inputs)):
        raise NotTranslatable(f"inputs of type {type(inputs).__name__} are not translated")
    frame = tracer.info.frame
    # The scope lives in a namespace object: hybrid binds saved values into dicts among the caller's locals,
    # and we want to read the proxies themselves.
    box = SimpleNamespace(scope={}, before=set())
    try:
        with hybrid_lm.trace(inputs, placement="hybrid") as hybrid_tracer:
            box.scope = {name: _hybrid_value(v, hybrid_lm, hybrid_tracer)
                         for name, v in {**frame.f_globals, **frame.f_locals}.items() if name != "__builtins__"}
            box.scope["__builtins__"] = builtins
            box.before = set(box.scope)
            exec(tracer.info.code, box.scope)
    except NotTranslatable:
        raise
    except Exception as e:  # the hybrid tracer refused something: fall back
        raise NotTranslatable(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    saves = {}
    for name, value in box.scope.items():
        if isinstance(value, (Proxy, TupleProxy)) and value.saved and value.bound:
            saves[name] = value.value
        elif name not in box.before and isinstance(value, (list, dict)) and value:
            raise NotTranslatable(f"{name!r} is a container built in the block; not translated")
    return saves, dict(hybrid_tracer.stats)
