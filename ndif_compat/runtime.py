"""What a worker process holds: the model for its backend, and how it runs one request on it.

- ``local``: nnsight's ``LanguageModel`` on the whole checkpoint, in this process (the centralized deployment).
- ``swarm``: nnsight's model tree with decoder layers on the swarm (:mod:`ndif_compat.swarm_layers`), plus a
  :class:`hybrid.LanguageModel` on the same swarm: a request that translates into our graph runs pushed to the
  nodes (:mod:`ndif_compat.translate`); otherwise the gateway runs it. The response log says which.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any, Callable

import torch
import zstandard

from .config import BackendSpec
from .eager_attention import attention_names, eager_attention, names_attention
from .errors import ExecutionError, FusedSegmentError, ParametersModifiedError, UnreachableModuleError
from .execution import Outcome, _Printer, encode_result, forget, load_request, run_tracer
from .gradients import check_tensor_class, needs_gradients
from .guardrails import SAFE_BUILTINS, AuditGuard, ParameterSeal
from .module_paths import check_module_paths
from .swarm_layers import Unreachable, guard_fused_reads, touched_layers

logger = logging.getLogger(__name__)

WARMUP_PROMPT = "The Eiffel Tower is located in the city of"
INSIDE_LAYER = re.compile(r"model\.model\.layers\.(\d+)\.([A-Za-z_][\w.]*?)\.(output|inputs|input)\b")
"""A location inside a decoder layer, as nnsight names it in its errors."""
CACHE_CALL = re.compile(r"\.cache\s*\(")
"""``tracer.cache(...)`` in a request's source: served on the swarm backend only pushed to the nodes (on the gateway
path the modules inside decoder layers never run at the gateway, so the cache would silently miss them)."""


class _SwarmObjects(dict):
    """Persistent objects of the swarm model; ids of submodules inside decoder layers resolve to placeholders."""

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key) or isinstance(key, str) and key.startswith("Module:model.model.layers.")

    def __missing__(self, key: str) -> Any:
        module = self[key] = Unreachable(key.removeprefix("Module:model."))
        return module


def _rehearsal_trace(lm, backend) -> None:
    with lm.trace(WARMUP_PROMPT, backend=backend):
        lm.model.layers[0].output.save()


class Runtime:
    """The model of one worker and the request executor. Build with :meth:`load` (does the I/O)."""

    def __init__(self, spec: BackendSpec, lm, client=None, stack=None, hybrid_lm=None, calls=None):
        self.spec, self.lm, self.client, self.stack, self.hybrid_lm = spec, lm, client, stack, hybrid_lm
        self.calls = calls
        """Sandboxed swarm backend: the :class:`~ndif_compat.broker.BrokerCalls` whose link the cell sets."""
        self.seal: ParameterSeal | None = None
        """Set by :meth:`warm_up` (after the warm-up traces, which must not count as writes)."""
        self._objects: dict | None = None
        """The model's persistent objects payloads resolve to; built once, by :meth:`warm_up`."""
        self._attention_names = attention_names(lm._module)
        """The attribute names of the model's attention modules: a request that names one runs eagerly (local)."""

    @classmethod
    def load(cls, spec: BackendSpec, threads: int | None = None, brokered: bool = False) -> "Runtime":
        """Load and warm up the backend with ``threads`` torch threads (default ``spec.threads``). ``brokered``
        (the sandboxed template of the swarm backend): no swarm connection here; swarm calls go through the cell's
        broker link (:mod:`ndif_compat.broker`)."""
        import nnsight

        torch.set_num_threads(spec.threads if threads is None else threads)
        if spec.kind == "local":
            lm = nnsight.TransformersModel(str(spec.model_path), task="text-generation", dispatch=True,
                                           dtype=torch.float32)  # LanguageModel is deprecated in nnsight 0.8
            lm._module.requires_grad_(False)
            runtime = cls(spec, lm)
        elif spec.kind == "swarm" and brokered:
            from swarm.stages import Span, SpanModel

            from .broker import BrokerCalls, brokered_language_model
            from .swarm_layers import build_swarm_model

            calls = BrokerCalls()
            hybrid_lm = brokered_language_model(spec.model_path, calls) if spec.hybrid else None
            local = SpanModel.load(spec.model_path, Span(0, 0, embed=True, head=True), dtype=torch.float32)
            lm, stack = build_swarm_model(spec.model_path, local, calls)
            guard_fused_reads(stack)
            runtime = cls(spec, lm, None, stack, hybrid_lm, calls)
        elif spec.kind == "swarm":
            import hybrid
            from swarm.model import SwarmModel

            from .swarm_layers import ClientCalls, build_swarm_model

            # one swarm connection per worker: the gateway path's layers use the hybrid model's client
            hybrid_lm = hybrid.LanguageModel(str(spec.model_path), initial_peers=list(spec.initial_peers)) \
                if spec.hybrid else None
            client = hybrid_lm.client if hybrid_lm is not None else \
                SwarmModel.from_pretrained(str(spec.model_path), list(spec.initial_peers), dtype=torch.float32)
            lm, stack = build_swarm_model(spec.model_path, client.local, ClientCalls(client))
            guard_fused_reads(stack)
            runtime = cls(spec, lm, client, stack, hybrid_lm)
        else:
            raise ValueError(f"backend must be 'local' or 'swarm'; got {spec.kind!r}")
        runtime.warm_up()
        return runtime

    def warm_up(self) -> None:
        """One trace and one short generation, so lazy imports and file reads happen before any guard is armed.
        Brokered, the decoder layers answer with their input meanwhile (the values are thrown away)."""
        if self.calls is not None:
            from .broker import RehearsalLink
            self.calls.link = RehearsalLink()
        try:
            self._warm_up_traces()
        finally:
            if self.calls is not None:
                self.calls.link = None
        self.seal = ParameterSeal(self.lm._module)
        objects = self.lm._remoteable_persistent_objects()
        self._objects = _SwarmObjects(objects) if self.spec.kind == "swarm" else objects

    def _warm_up_traces(self) -> None:
        with self.lm.trace(WARMUP_PROMPT):
            self.lm.lm_head.output.save()
        with self.lm.generate(WARMUP_PROMPT, max_new_tokens=2):
            self.lm.lm_head.output.save()
        if self.hybrid_lm is not None:
            self._record(lambda: self.hybrid_lm.trace(WARMUP_PROMPT, placement="hybrid"))
            self._record(lambda: self.hybrid_lm.generate(WARMUP_PROMPT, max_new_tokens=2, placement="hybrid"))

    def _record(self, context) -> None:
        from .broker import BrokerError

        try:
            with context():
                self.hybrid_lm.lm_head.output.save()
        except BrokerError:  # brokered: the graph was recorded (imports, the generation config), not run
            if self.calls is None:
                raise

    def rehearse(self) -> None:
        """Run one request through the whole request path (unpickling, checks, nnsight's executor, encoding), so
        the lazy imports and caches it fills are filled here, in the template, and not in every cell."""
        from nnsight.schema.request import RequestModel
        from nnsight.tracing.backend import Backend

        class Capture(Backend):
            def __call__(self, tracer):
                self.blob = RequestModel.serialize(tracer, compress=True)

        capture = Capture()
        _rehearsal_trace(self.lm, capture)
        if self.calls is not None:
            from .broker import RehearsalLink
            self.calls.link = RehearsalLink()
        try:
            self.execute(zstandard.ZstdDecompressor().decompress(capture.blob), True, "rehearsal", lambda text: None)
        finally:
            if self.calls is not None:
                self.calls.link = None

    def seal_weights(self) -> None:
        """Move the model's parameters and buffers into sealed read-only memory (any write then faults), and
        fingerprint them again (their storage moved)."""
        from .sealed_weights import seal_weights

        self._weights = seal_weights(self.lm._module)
        self.seal = ParameterSeal(self.lm._module)

    def traffic(self) -> tuple[int, int, int]:
        if self.client is None:
            return (0, 0, 0)
        t = self.client.sequence.traffic  # the one connection both execution paths use
        return t.bytes_sent, t.bytes_received, t.calls

    def execute(self, data: bytes, compress: bool, request_id: str, log: Callable[[str], None]) -> tuple[Outcome, dict]:
        """Run one decompressed payload; returns the outcome and metadata (path, bytes to the swarm).

        Raises:
            GatewayError: typed; :class:`ParametersModifiedError` when a parameter was written (the caller then replaces
                this worker, restoring the weights).
        """
        from . import guardrails

        before = self.traffic()
        sources: list[str] = []
        guardrails.SHIPPED_SOURCES.set(sources)
        edits: list[str] = []
        guardrails.SHIPPED_EDITS.set(edits)
        tracer, source = load_request(data, request_id, self._objects)
        sources.insert(0, source)
        gradients = needs_gradients(sources)
        path = "gateway"
        try:
            frame = tracer.info.frame  # a typo in a module path: our typed error, before anything runs
            check_module_paths(sources, {**frame.f_globals, **frame.f_locals})
            saves, reason = None, ("this gateway runs every request there (--no-hybrid)" if self.stack is not None
                                   else "the --local backend runs every request there, on its own copy of the model")
            if self.hybrid_lm is not None:  # gradients and lm.edit() too (hybrid.backward, hybrid.edits)
                saves, path, reason = self._try_hybrid(tracer, source, log, edits)
            if saves is None:
                saves = self._run_gateway(data, tracer, sources, request_id, log, reason, gradients)
        finally:
            forget(tracer.info.frame.f_code.co_filename)
            changed = self.seal.changed()
            check_tensor_class()
        if changed:
            raise ParametersModifiedError(f"the request modified model parameters ({', '.join(changed[:3])}); parameters "
                                     "are read-only on this gateway. The worker was replaced to restore them.")
        after = self.traffic()
        meta = {"path": path, "reason": reason if path == "gateway" else "", "gradients": gradients,
                "request": _request_kind(tracer),
                "swarm_bytes_sent": after[0] - before[0],
                "swarm_bytes_received": after[1] - before[1], "swarm_calls": after[2] - before[2]}
        return Outcome(encode_result(saves, compress)), meta

    def _run_gateway(self, data: bytes, tracer, sources: list[str], request_id: str, log, reason: str,
                     gradients: bool = False) -> dict:
        """The request with nnsight's tracer here; on the swarm backend, cut where :func:`touched_layers` says, and
        when the program reads a layer value inside a fused segment after all, run it again with every layer cut.
        ``reason``: why the request is not pushed to the nodes (for the error a submodule inside a layer gets).
        ``gradients``: run with gradient tracking, the parameters guarded (:mod:`ndif_compat.gradients`)."""
        model = self.lm._module if gradients else None
        tracking = ", with gradient tracking" if gradients else ""
        if self.stack is None:
            eager = names_attention(sources, self._attention_names)
            log(f"execution path: gateway (local model{tracking}{', eager attention' if eager else ''})")
            with eager_attention(self.lm._module) if eager else contextlib.nullcontext():
                return run_tracer(tracer, log, model)
        if any(CACHE_CALL.search(s) for s in sources):
            raise UnreachableModuleError(
                "tracer.cache() on the swarm backend is served only pushed to the nodes as an intervention graph: on "
                "the gateway path the decoder layers run on the swarm, so the modules inside them never run at the "
                f"gateway and the cache would miss them. This request runs on the gateway path because {reason}; "
                "change that, or save the modules' outputs you need with `.save()`.")
        try:
            return self._run_on_stack(data, tracer, sources, request_id, log, model)
        except ExecutionError as e:
            reached = INSIDE_LAYER.search(str(e))
            if reached is None:
                raise
            layer, sub, kind = reached.groups()
            raise UnreachableModuleError(
                f"the program reads model.layers.{layer}.{sub}.{kind}, inside decoder layer {layer}. On the swarm "
                "backend's gateway path the decoder layers run on the swarm, so only their inputs and outputs, the "
                f"embedding, the final norm and the head are reachable. This request runs on that path because "
                f"{reason}; without that it would be pushed to the nodes as an intervention graph, where submodules "
                "are reachable.") from None

    def _run_on_stack(self, data: bytes, tracer, sources: list[str], request_id: str, log, model) -> dict:
        cuts = touched_layers(sources, self.stack.num_layers)
        self.stack.cut_at(cuts)
        where = "every layer" if cuts is None else f"layer boundaries {sorted(cuts)}"
        tracking = "; gradients through the nodes' backward RPC" if model is not None else ""
        log(f"execution path: gateway (decoder layers on the swarm; hidden states cross at {where}{tracking})")
        try:
            return run_tracer(tracer, log, model)
        except FusedSegmentError as e:
            if cuts is None:
                raise
            log(f"{e} (the program names layers in a way the source analysis missed); running it again with "
                "every layer cut")
        again, _ = load_request(data, f"{request_id}-every-layer", self._objects)
        self.stack.cut_at(None)
        try:
            return run_tracer(again, log, model)
        finally:
            forget(again.info.frame.f_code.co_filename)

    def _try_hybrid(self, tracer, source: str, log, edits: list[str]) -> tuple[dict | None, str, str]:
        """``(saves, "hybrid", "")``, or ``(None, "gateway", why it cannot be pushed to the nodes)``."""
        from .translate import NotTranslatable, translate_and_run

        logs: list[str] = []
        builtins = {**SAFE_BUILTINS, "print": _Printer(logs.append)}
        try:
            with AuditGuard.install():
                saves, stats = translate_and_run(tracer, source, self.hybrid_lm, builtins, edits)
        except NotTranslatable as e:
            logger.info("request runs on the gateway: %s", e)
            log(f"execution path: gateway (not expressible as an intervention graph: {e})")
            return None, "gateway", f"it is not expressible as an intervention graph ({e})"
        for line in logs:
            log(line)
        log(f"execution path: hybrid (intervention graph pushed to the nodes; route {stats.get('route')})")
        return saves, "hybrid", ""


def _request_kind(tracer) -> str:
    """What the request's outer block is, for the gateway's request log: ``trace``, ``generate`` or ``session``."""
    fn = getattr(getattr(tracer, "fn", None), "__name__", "")
    return {"_call": "trace", "generate": "generate"}.get(fn, "session" if type(tracer).__name__ == "Tracer" else
                                                          type(tracer).__name__.lower()[:16])
