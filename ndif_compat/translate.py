"""Run an nnsight request as hybrid intervention graphs pushed to the nodes, when it can be expressed as them.

Our tracing API mirrors nnsight's, so the request's own block (already checked by the guardrails) is executed
once more, with its model, envoy and tracer names bound to :class:`hybrid.LanguageModel`'s counterparts, inside
the matching hybrid context:

- ``lm.trace(inputs)``     → ``hybrid_lm.trace(inputs, placement="hybrid")``
- ``lm.generate(inputs, max_new_tokens=N)`` (greedy) → ``hybrid_lm.generate(...)``: each step one chained call
- ``lm.session()``         → ``hybrid_lm.session()``; its inner ``lm.trace``/``lm.generate`` become hybrid traces, and a
  value of an earlier trace used by a later one stays on the node that computed it where it can.

Before it runs, the block is rewritten in two nnsight idioms our tracer spells differently: ``x.save()`` on any
object (nnsight mounts ``save`` on every object, so ``list().save()`` is a container) becomes ``hybrid.save(x)``,
and the deprecated ``with tracer.all():`` / ``with tracer.iter[...]:`` becomes the ``for`` loop it means.

Reads, saves, slice assignment, arithmetic, whitelisted torch functions, the root model's output
(``lm.output.logits``), ``module.skip``, ``tracer.stop()``, ``tracer.barrier(n)``, ``tracer.invoke`` and gradients
(``requires_grad_``, ``with loss.backward():``, ``.grad``) record graphs; the graphs are planned
over the route and pushed to the nodes; only the saved values come back to the gateway. Anything the hybrid
tracer cannot record (sampling, Python control flow on values, unknown functions, statements after an open
``tracer.all()`` loop, whose nnsight semantics skip them) raises while tracing, before anything ran on the swarm:
the caller then falls back to gateway execution and says why in the response log.
"""

from __future__ import annotations

import ast
import logging
import re
from types import SimpleNamespace
from typing import Any

import torch

from hybrid import cache as hybrid_cache  # imported here: the request's audit guard refuses imports while it runs

from .cache_roots import add_root_entries
from .errors import BadRequestError, UnknownModuleError

logger = logging.getLogger(__name__)

_MISSING_MODULE = re.compile(r"module '[\w.<>]+' (\(\w+\) has no submodule|has \d+ entries; index -?\d+ is out of range)")
"""How :mod:`hybrid.envoy` refuses a module path the model does not have."""

SAVE = "__hybrid_save__"
"""The name the rewritten block calls instead of ``.save()``."""

GREEDY_KWARGS = {"max_new_tokens", "eos_token_id", "pad_token_id"}
"""``lm.generate`` arguments translated (with ``do_sample=False``); sampling stays on the gateway, whose RNG the
client's nnsight semantics refer to."""


class NotTranslatable(Exception):
    """The request cannot run as hybrid graphs; the message says why (shown in the response log)."""


# ---- the block's source, in our tracer's spelling ----------------------------------------------------------------

def _is_steps(node: ast.expr) -> tuple[bool, bool]:
    """Whether ``node`` is ``X.all()`` or ``X.iter[...]``, and whether that selection is open (runs to the end)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "all" \
            and not node.args and not node.keywords:
        return True, True
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "iter":
        key = node.slice
        return True, isinstance(key, ast.Slice) and key.upper is None
    return False, False


class _Rewrite(ast.NodeTransformer):
    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.func, ast.Attribute) and node.func.attr == "save" and not node.args \
                and not node.keywords:
            return ast.copy_location(ast.Call(ast.Name(SAVE, ast.Load()), [node.func.value], []), node)
        return node

    def visit_With(self, node: ast.With) -> ast.AST:
        self.generic_visit(node)
        if len(node.items) == 1 and _is_steps(node.items[0].context_expr)[0]:
            target = node.items[0].optional_vars or ast.Name("_step", ast.Store())
            return ast.copy_location(ast.For(target, node.items[0].context_expr, node.body, [], type_comment=None),
                                     node)
        return node


def _check_open_loops(tree: ast.Module) -> None:
    """nnsight ends a trace's block at an open step loop (``tracer.all()``, ``tracer.iter[a:]``): what follows it in
    that trace never runs there. Our tracer would run it, so such blocks are not translated."""
    lines = sorted({n.lineno for n in ast.walk(tree) if isinstance(n, ast.stmt)})

    def walk(node: ast.AST, block_end: float) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.With) and any(
                    isinstance(i.context_expr, ast.Call) and isinstance(i.context_expr.func, ast.Attribute)
                    and i.context_expr.func.attr in ("trace", "generate") for i in child.items):
                walk(child, child.end_lineno)      # an inner trace of a session: its own block
                continue
            loop = child.iter if isinstance(child, ast.For) else \
                child.items[0].context_expr if isinstance(child, ast.With) else None
            if loop is not None and _is_steps(loop)[1]:
                after = [n for n in lines if child.end_lineno < n <= block_end]
                if after:
                    raise NotTranslatable(f"line {after[0]} follows an open tracer.all()/iter[a:] loop; nnsight "
                                          "never runs it")
            walk(child, block_end)

    walk(tree, float("inf"))


def rewrite(source: str, filename: str) -> Any:
    """``source`` compiled with nnsight's ``.save()`` and ``with tracer.all()`` in our tracer's spelling."""
    tree = ast.parse(source)
    _check_open_loops(tree)
    tree = ast.fix_missing_locations(_Rewrite().visit(tree))
    return compile(tree, filename, "exec")


# ---- the names the block uses -----------------------------------------------------------------------------------

def _hybrid_value(value: Any, hybrid_lm, tracer, edited: dict | None = None) -> Any:
    """The hybrid counterpart of a value shipped with the request (model, envoy, tracer), or the value itself.
    ``edited``: ``{id(root envoy): hybrid copy carrying its edits}`` (:func:`_edited_models`)."""
    from nnsight.intervention.envoy import Envoy
    from nnsight.intervention.tracer import InterleavingTracer

    if isinstance(value, InterleavingTracer):
        if tracer is None:
            raise NotTranslatable("the block names a tracer outside its own trace")
        return tracer
    if edited and id(value) in edited:
        return edited[id(value)]
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


def _edited_models(tracer, hybrid_lm, builtins: dict, edits: list, run_block) -> dict:
    """``{id(envoy): hybrid copy}`` for each ``lm.edit()``ed root model the request carries: each edit block (its
    source, checked when it was loaded) is recorded once more, in our tracer's spelling, by
    ``hybrid_lm.edit()`` (:mod:`hybrid.edits`), so the edit heads every trace of the copy and runs on the nodes.

    Raises:
        NotTranslatable: an edit the request carries is not on a root model (nnsight replays an edit stored on a
            submodule's envoy only when that submodule is traced), or the hybrid tracer cannot record it.
    """
    from nnsight.intervention.envoy import Envoy

    frame = tracer.info.frame
    roots = {id(v): v for v in [getattr(tracer, "envoy", None), *frame.f_globals.values(), *frame.f_locals.values()]
             if isinstance(v, Envoy) and v.__dict__.get("_edits") and v.path == "model"}
    if sum(len(v._edits) for v in roots.values()) != len(edits):
        raise NotTranslatable("an lm.edit() stored on a submodule's envoy (or not on a model the block names) is not "
                              "translated")
    models = {}
    for key, envoy in roots.items():
        target = None
        for mediator in envoy._edits:
            source = getattr(mediator, "source", None)
            if source is None:
                raise NotTranslatable("an edit without its source")
            context = hybrid_lm.edit() if target is None else target.edit(inplace=True)
            with context as bound:
                edit_tracer, target = bound if target is None else (bound, target)
                scope = {name: _hybrid_value(v, target, edit_tracer)
                         for name, v in {**mediator.glbls, **dict(mediator.lcls)}.items() if name != "__builtins__"}
                run_block(source, f"<lm.edit() block {len(models)}>", scope)
        models[key] = target
    return models


def _inputs(inputs: Any) -> Any:
    """The trace's inputs in a form :class:`hybrid.LanguageModel` batches as nnsight does: prompts, token ids
    (``list[int]``, ``list[list[int]]``, left-padded as nnsight pads them, or an integer tensor), or nnsight's dict form
    ``{"input_ids": ..., "attention_mask": ...}`` whose mask has no padding (a padded mask the caller wrote may differ
    from the one our tokenizer would make: not translated)."""
    if isinstance(inputs, dict) and "input_ids" in inputs and set(inputs) <= {"input_ids", "attention_mask"}:
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        ids = ids if isinstance(ids, torch.Tensor) else torch.tensor(ids) if isinstance(ids, list) else None
        if ids is None or ids.is_floating_point() or ids.ndim not in (1, 2):
            raise NotTranslatable("input_ids that are not an integer tensor or list are not translated")
        if mask is not None and not bool(torch.as_tensor(mask).all()):
            raise NotTranslatable("inputs with a padded attention_mask of the caller's are not translated")
        return ids
    if inputs is None or isinstance(inputs, (str, torch.Tensor)):
        return inputs
    if isinstance(inputs, list) and inputs and (
            all(isinstance(x, str) for x in inputs)
            or all(type(x) is int for x in inputs)
            or all(isinstance(x, list) and x and all(type(t) is int for t in x) for x in inputs)):
        return inputs
    raise NotTranslatable(f"inputs of type {type(inputs).__name__} are not translated")


def _context(tracer, hybrid_lm):
    """The hybrid context for the request's outer nnsight tracer."""
    from nnsight.intervention.tracer import InterleavingTracer
    from nnsight.tracing.tracer import Tracer as NnsightTracer

    if type(tracer) is NnsightTracer:     # lm.session(): a plain tracer whose block holds the traces
        if getattr(tracer, "args", None) or getattr(tracer, "kwargs", None):
            raise NotTranslatable("session arguments are not translated")
        return hybrid_lm.session()
    if type(tracer) is not InterleavingTracer:
        raise NotTranslatable(f"{type(tracer).__name__} is not translated")
    fn_name = getattr(tracer.fn, "__name__", "")
    inputs = tracer.args[0] if tracer.args else None
    if len(tracer.args) > 1:
        raise NotTranslatable("trace arguments beyond the inputs are not translated")
    inputs = _inputs(inputs)
    if fn_name == "_call":
        if tracer.kwargs:
            raise NotTranslatable(f"trace arguments {sorted(tracer.kwargs)} are not translated")
        return hybrid_lm.trace(inputs, placement="hybrid")
    if fn_name == "generate":
        kwargs = dict(tracer.kwargs)
        if kwargs.pop("do_sample", False):
            raise NotTranslatable("sampled generation (do_sample=True) is not translated")
        unknown = sorted(set(kwargs) - GREEDY_KWARGS)
        if unknown:
            raise NotTranslatable(f"generate arguments {unknown} are not translated")
        try:
            return hybrid_lm.generate(inputs, placement="hybrid", **kwargs)
        except Exception as e:  # e.g. max_new_tokens=0
            raise NotTranslatable(f"{type(e).__name__}: {e}") from None
    raise NotTranslatable(f"{fn_name or 'this call'} is not translated")


def translate_and_run(tracer, source: str, hybrid_lm, builtins: dict,
                      edits: list | None = None) -> tuple[dict[str, Any], dict]:
    """Run the request's block as hybrid graphs. Returns ``(saved values by variable name, stats)``: the stats of
    the trace, or for a session ``{"route": ..., "traces": [stats of each trace]}``. ``edits``: the sources of the
    ``lm.edit()`` blocks the request carries (:data:`~ndif_compat.guardrails.SHIPPED_EDITS`); each is recorded into
    a hybrid copy of the model that the block's traces of the edited model use.

    Raises:
        NotTranslatable: the block cannot be expressed as hybrid graphs (refused while recording, before anything
            ran on the swarm), or the swarm failed while running them; the caller runs the request on the gateway.
    """
    from hybrid import save as hybrid_save
    from hybrid.proxy import Proxy, TupleProxy
    from hybrid.client_values import ClientValue
    from hybrid.session import Session
    from hybrid.tracing import _bound

    frame = tracer.info.frame
    try:
        code = rewrite(source, frame.f_code.co_filename)
    except SyntaxError as e:
        raise NotTranslatable(f"the block does not parse on its own ({e.msg})") from None
    containers: set[int] = set()

    def save(value: Any) -> Any:
        if type(value) in (list, dict):
            containers.add(id(value))
        elif not isinstance(value, (Proxy, TupleProxy, ClientValue)):
            raise NotTranslatable(f"{type(value).__name__}.save() is not translated")
        return hybrid_save(value)

    def printer(*args: Any, **kwargs: Any) -> None:
        if any(isinstance(a, (Proxy, TupleProxy)) for a in args):
            raise NotTranslatable("print() of a traced value (its value exists only on the nodes while they run)")
        builtins["print"](*args, **kwargs)

    def run_block(text: str, filename: str, scope: dict) -> None:
        try:
            block = rewrite(text, filename)
        except SyntaxError as e:
            raise NotTranslatable(f"the edit block does not parse on its own ({e.msg})") from None
        scope.update({"__builtins__": {**builtins, "print": printer}, SAVE: save})
        exec(block, scope)

    try:
        edited = _edited_models(tracer, hybrid_lm, builtins, edits, run_block) if edits else {}
    except NotTranslatable:
        raise
    except Exception as e:  # the hybrid tracer refused the edit block
        raise NotTranslatable(f"lm.edit() block: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") \
            from None
    context = _context(tracer, edited.get(id(getattr(tracer, "envoy", None)), hybrid_lm))
    session = isinstance(context, Session)
    # The scope lives in a namespace object: hybrid binds saved values into the caller's variables, and we want to
    # read the proxies themselves.
    box = SimpleNamespace(scope={})
    try:
        with context:
            box.scope = {name: _hybrid_value(v, hybrid_lm, None if session else context, edited)
                         for name, v in {**frame.f_globals, **frame.f_locals}.items() if name != "__builtins__"}
            box.scope.update({"__builtins__": {**builtins, "print": printer}, SAVE: save})
            exec(code, box.scope)
    except NotTranslatable:
        raise
    except (AttributeError, IndexError) as e:
        if _MISSING_MODULE.match(str(e)) and not _nnsight_only(str(e), tracer):
            # a path the model lacks: nnsight would fail too, only less clearly
            raise UnknownModuleError(f"{e}. Check the module path against the model (print the model to see its "
                                     "modules).") from None
        logger.info("hybrid translation ended with %s: %s", type(e).__name__, e)
        raise NotTranslatable(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    except Exception as e:  # the hybrid tracer refused something, or the swarm failed while running the graphs
        logger.info("hybrid translation ended with %s: %s", type(e).__name__, e)
        raise NotTranslatable(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    saves = {}
    for name, value in box.scope.items():
        if isinstance(value, hybrid_cache.CacheView):
            saves[name] = nnsight_cache(value)
        elif isinstance(value, (Proxy, TupleProxy, ClientValue)):
            if value.saved and value.bound:
                saves[name] = value.value
        elif id(value) in containers:
            saves[name] = _bound(value, 0)
    if not session:
        return saves, dict(context.stats)
    traces = [dict(t.stats) for t in context.traces]
    return saves, {"route": traces[0].get("route") if traces else [], "traces": traces}


def _nnsight_only(message: str, tracer) -> bool:
    """Whether the name our envoy refused is one nnsight's model envoy has that is not a module (``lm.generator``): not
    a typo, only a name the hybrid tracer has no counterpart for (the gateway runs the request)."""
    from nnsight.intervention.envoy import Envoy

    missing = re.search(r"has no submodule '(\w+)'", message)
    if missing is None:
        return False
    frame = tracer.info.frame
    roots = [v for v in [getattr(tracer, "envoy", None), *frame.f_globals.values(), *frame.f_locals.values()]
             if isinstance(v, Envoy) and v.path == "model"]
    return any(hasattr(root, missing.group(1)) for root in roots)


def nnsight_cache(view: "hybrid_cache.CacheView") -> Any:
    """nnsight's ``CacheView`` (what the client's ``tracer.cache()`` is bound to) holding the values the hybrid cache
    recorded on the nodes, keyed as nnsight keys them (``model.model.layers.3``).

    Raises:
        BadRequestError: ``include_inputs=True``: nnsight's entries hold every argument of each call (``.inputs``),
            the nodes' graphs only the first (``.input``); a partial ``.inputs`` would be a wrong answer. Raised, not
            :class:`NotTranslatable`: the gateway path cannot answer it either (no fallback).
    """
    from nnsight.intervention.cache import Cache, CacheView, Entry

    cache = view._cache
    if cache.include_inputs:
        raise BadRequestError(
            "tracer.cache(include_inputs=True) is not served by the swarm backend: nnsight's cache entries hold every "
            "argument of each call (.inputs), and the nodes record only the first. Cache the outputs "
            "(include_inputs=False) and save the inputs you need with `module.input.save()`.")
    out = Cache(None, modules=None, device=cache.device, dtype=cache.dtype, include_output=cache.include_output,
                include_inputs=False)
    out.entries = {f"{hybrid_cache.ROOT}.{path}".rstrip("."): [Entry(output=cache._moved(hybrid_cache._value(e.output)))
                                                              for e in entries]
                   for path, entries in cache.entries.items()}
    if cache.everything and cache.include_output:  # nnsight's full cache also holds the root, model.model, rotary_emb
        out.entries = add_root_entries(out.entries, cache, Entry)
    return CacheView(out, None)
