"""The span hook that runs intervention graphs on a node. ``swarm-node serve`` loads it through the entry point
``swarm.span_hooks: hybrid = hybrid.node_plugin:register``, so every volunteer node serves it by default."""

from __future__ import annotations

import time
from dataclasses import replace
from functools import partial
from typing import Any

import torch

from swarm.attention import WEIGHTS_KWARG
from swarm.span_hook import HookBudgets, HookContext, HookRegistry

from .errors import HybridError, InvalidGraphError, UnknownModuleError
from .envoy import first_input
from .interpreter import Interpreter
from .validation import validate
from .ir import JSON_BYTES_PER_OP, Limits
from .request import HOOK_KIND, HOOK_VERSION, decode_request
from .blobs import resolve as resolve_blobs
from .session_store import STORE
from .source import call_op, check_op, op_path, run_instrumented, split_op_path
from .values import pack_values, unpack_values
from .watchdog import WATCHDOG


def node_limits(budgets: HookBudgets) -> Limits:
    """The most a request may ask of a node with these budgets (``swarm-node serve --max-request-memory-mb``...)."""
    return Limits(max_live_bytes=budgets.max_request_memory_mb << 20, max_save_bytes=budgets.max_save_mb << 20)


#: The most a request may ask of a node started with the default budgets, whatever its own limits say.
NODE_LIMITS = node_limits(HookBudgets())


def cap_limits(limits: Limits, node: Limits = NODE_LIMITS) -> Limits:
    """``limits`` lowered to the node's ``node`` limits, field by field."""
    return replace(limits, max_ops=min(limits.max_ops, node.max_ops),
                   max_attachment_bytes=min(limits.max_attachment_bytes, node.max_attachment_bytes),
                   max_elements=min(limits.max_elements, node.max_elements),
                   max_wall_s=min(limits.max_wall_s, node.max_wall_s),
                   max_live_bytes=min(limits.max_live_bytes, node.max_live_bytes),
                   max_save_bytes=min(limits.max_save_bytes, node.max_save_bytes))


#: The head runs on the last position alone (``Plan.head_last``) when the full head would see at least this many rows
#: (batch × positions), padded to at least this many (see last_rows_padded); a smaller head runs whole (it is cheap,
#: and a full head that small may take another GEMM path than the trimmed one).
TRIM_MIN_ROWS = 16


def trims_head(plan, input_ids: torch.Tensor) -> bool:
    """Whether the head runs on the last position alone for these inputs (what ``TraceStats.head_positions`` says)."""
    return bool(plan.head_last) and input_ids.ndim == 2 and input_ids.numel() >= TRIM_MIN_ROWS


def last_rows_padded(x: torch.Tensor) -> torch.Tensor:
    """The head's input for the last position only, ``(M, 1, D)``: the last position's rows made contiguous and
    padded with zero rows to ``M = max(TRIM_MIN_ROWS, B rounded up to 4)``.

    Why: a GEMM's rows are not bit-identical across row counts. On CPU (MKL/oneDNN) a strided input, or one with
    few rows (1–3; 5–11 with 2 threads), takes another kernel path and changes logits by float rounding (~2.5e-5 on
    SmolLM2), while contiguous inputs of 12+ rows (multiples of 4) give each row exactly the bits the full
    ``(B·T, D)`` head gives it. Padding keeps the trimmed head on that path, so trimming changes no value on these
    machines (tests/integration/test_trimmed_head.py); other BLAS libraries or GPUs may differ by rounding.
    """
    rows = x[:, -1].contiguous()
    count = max(TRIM_MIN_ROWS, -(-rows.shape[0] // 4) * 4)
    return torch.cat([rows, rows.new_zeros(count - rows.shape[0], rows.shape[1])]).unsqueeze(1)


class InterpreterHook:
    """A :class:`swarm.span_hook.SpanHook` that feeds module events to an :class:`Interpreter`.

    Its work runs under the :data:`~hybrid.watchdog.WATCHDOG` with the interpreter's wall-time limit, counted from
    the interpreter's start (on a node: the request's arrival), so a request cannot overrun it inside long work."""

    def __init__(self, interpreter: Interpreter, call: int = 0, keep: dict[int, str] | None = None, owner: str = "",
                 last_hidden: bool = False):
        self.interpreter, self.call = interpreter, call
        self.last_hidden = last_hidden
        """The span's input is the last position's hidden state alone (the client's head after a node sent only it):
        the head is padded as a trimmed one (last_rows_padded), whatever the row count."""
        self.keep = keep or {}
        """Node id -> session key of values to store here for a later trace (:mod:`hybrid.session_store`)."""
        self.owner = owner
        """The client the kept values are charged to (its own share of the store)."""
        self._skip_inputs: dict[str, Any] = {}
        self._trimmed: int | None = None
        """The batch size while the head runs on padded last-position rows (:func:`last_rows_padded`)."""

    def _guard(self):
        limit_s = self.interpreter.limits.max_wall_s
        return WATCHDOG.guard(self.interpreter.started + limit_s, limit_s)

    # ---- gradients (the span_hook protocol's optional part) -------------------------------------------------

    def wants_grad(self) -> bool:
        """Whether the span must run with autograd: the graph has backward passes."""
        return self.interpreter.grad_mode

    def track_input(self, inputs: torch.Tensor) -> None:
        """The span's input hidden states (a leaf that requires grad): their gradients go to the previous hop."""
        self.interpreter.span_input = inputs

    def backward(self, outputs: torch.Tensor, grads: dict[int, torch.Tensor], downstream: bytes
                 ) -> tuple[dict[int, torch.Tensor], bytes]:
        """Run each backward pass through this span from ``grads`` (pass -> gradient of ``outputs``, as the next hop
        computed it), after the passes rooted here ran during the forward. ``downstream`` is what the later hops
        sent back (or this hop's own result, on the last hop). Returns the gradients of the span's input per pass
        and ``downstream`` with this hop's backward values added."""
        with self._guard():
            interpreter = self.interpreter
            values = unpack_values(downstream) if downstream else {}
            interpreter.receive(values)
            for node in interpreter.passes:
                grad = grads.get(node.call)
                if grad is not None and outputs.requires_grad:
                    if grad.shape != outputs.shape:
                        raise InvalidGraphError(f"the next hop's gradient is {tuple(grad.shape)}; this span's output "
                                                f"is {tuple(outputs.shape)}")
                    interpreter.backward(node.call, [outputs], [grad.to(outputs.device, outputs.dtype)],
                                         bool(node.kwargs.get("retain_graph")))
            values.update(interpreter.finish_backward())
            return dict(interpreter.input_grads), pack_values(values)

    # ---- module events ---------------------------------------------------------------------------------------

    def before(self, path: str, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if path == "lm_head" and self.interpreter.plan.head_last and args and args[0].ndim == 3 \
                and (args[0].shape[0] * args[0].shape[1] >= TRIM_MIN_ROWS or self.last_hidden):
            self._trimmed = args[0].shape[0]  # only the last position's logits are read
            return (last_rows_padded(args[0]), *args[1:]), kwargs
        if not self.interpreter.wants(path):
            return None
        with self._guard():
            replaced = self._before(path, args, kwargs)
        if (path, "output", self.call) in self.interpreter.skips:  # the input the replacement must fit (see skip)
            first = (replaced or (args, kwargs))
            self._skip_inputs[path] = first_input(*first)
        if (path, self.call) not in self.interpreter.attention_weights:
            return replaced
        args, kwargs = replaced or (args, kwargs)  # the graph reads this call's attention weights: run it eagerly
        return args, {**kwargs, WEIGHTS_KWARG: True}

    def _before(self, path: str, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            new = self._checked(path, self.interpreter.on_event(path, "input", self.call, args[0]))
            return None if new is args[0] else ((new, *args[1:]), kwargs)
        if kwargs:
            name = next(iter(kwargs))
            new = self._checked(path, self.interpreter.on_event(path, "input", self.call, kwargs[name]))
            return None if new is kwargs[name] else (args, {**kwargs, name: new})
        return None

    def _checked(self, path: str, value: Any) -> Any:
        """``value``, the input of module ``path`` after the graph's writes, if the module can take it: token ids
        of an embedding must be in its vocabulary (else the model, not the graph, would fail)."""
        module = self.interpreter.modules.get(path)
        if isinstance(module, torch.nn.Embedding) and isinstance(value, torch.Tensor) and value.numel() and (
                value.min() < 0 or value.max() >= module.num_embeddings):
            raise InvalidGraphError(f"The graph wrote token ids outside 0..{module.num_embeddings - 1} into the input "
                                    f"of {path} (min {value.min().item()}, max {value.max().item()}).")
        return value

    def skip(self, path: str) -> tuple | None:
        """``(output,)`` for a module the graph skips (``module.skip(value)``): the node does not run it."""
        if not self.interpreter.skips:
            return None
        with self._guard():
            replaced = self.interpreter.skip_output(path, self.call)
            if replaced is not None:
                _check_skip(path, self.interpreter.modules.get(path), self._skip_inputs.get(path), replaced[0])
            return replaced

    def run(self, path: str, args: tuple, kwargs: dict) -> tuple | None:
        """``(output,)`` of ``path``'s call when the graph uses operations inside its forward (``module.source``):
        the module runs its own class's forward, instrumented here (:mod:`hybrid.source`), and each operation the
        graph names passes its first argument and its value through the interpreter. None: the forward runs as is."""
        if (path, self.call) not in self.interpreter.sourced:
            return None
        interpreter, fired = self.interpreter, set()

        def event(where: str, kind: str):
            def handle(value: Any) -> Any:
                with self._guard():
                    return interpreter.on_event(where, kind, self.call, value)
            return handle

        def report(label: str, callee, op_args: tuple, op_kwargs: dict) -> Any:
            where = op_path(path, label)
            if not interpreter.wants(where):
                return callee(*op_args, **op_kwargs)
            if where in fired:
                raise InvalidGraphError(f"{where} runs more than once in one call of {path} (inside a loop); its "
                                        "calls cannot be told apart, so it cannot be read or set")
            fired.add(where)
            return call_op(callee, op_args, op_kwargs, event(where, "input"), event(where, "output"))

        return (run_instrumented(interpreter.modules[path], args, kwargs, report),)

    def after(self, path: str, output: Any) -> Any:
        if path == "lm_head" and self._trimmed is not None:
            output, self._trimmed = output[:self._trimmed], None  # the padding rows (see last_rows_padded) go
        if path == "model.embed_tokens" and self.interpreter.grad_mode and isinstance(output, torch.Tensor):
            # gradients start here: the hidden states require grad from the embedding on, as when the model's own
            # weights require grad (nnsight's default), while the weights themselves never do
            output = output.detach().requires_grad_(True)  # no earlier hop: its gradient goes nowhere
        if not self.interpreter.wants(path):
            return output
        if (path, self.call) in self.interpreter.attention_weights and not (
                isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor)):
            raise HybridError(f"{path} ran without materialising its attention weights, which the graph reads: this "
                              "model's attention implementation cannot switch to eager per call (load its stages "
                              "with swarm.stages.SpanModel, attn_implementation='sdpa')")
        with self._guard():
            return self.interpreter.on_event(path, "output", self.call, output)

    def result(self) -> bytes:
        with self._guard():
            values = self.interpreter.finish()
            packed = pack_values(values)
        for node_id, key in self.keep.items():  # outside the guard: the store is shared
            STORE.put(key, self.interpreter.values[node_id], owner=self.owner)
        return packed


def _check_skip(path: str, module: torch.nn.Module | None, first: Any, replacement: Any) -> None:
    """Refuse a skipped module's replacement that cannot be its output, before the model uses it (the next module
    would fail instead): its (first) tensor must have the shape the module maps its first input to (a Linear's or an
    Embedding's own width last; every other module this swarm serves keeps the input's shape)."""
    out = replacement[0] if isinstance(replacement, tuple) and replacement else replacement
    if not isinstance(first, torch.Tensor) or not isinstance(out, torch.Tensor):
        return
    shape = tuple(first.shape)
    if isinstance(module, torch.nn.Linear):
        shape = shape[:-1] + (module.out_features,)
    elif isinstance(module, torch.nn.Embedding):
        shape = shape + (module.embedding_dim,)
    if tuple(out.shape) != shape:
        raise InvalidGraphError(f"The graph skips {path} with a {tuple(out.shape)} value; its output would be "
                                f"{shape}. Skip it with a value of the module output's shape.")


def build_graph_hook(payload: bytes, context: HookContext, node: Limits = NODE_LIMITS) -> InterpreterHook:
    """Decode and check a hybrid request, and build the hook running this node's share of it, within the ``node``
    limits. The wall-time limit counts from here (decoding a huge graph counts), and the work runs under the
    :data:`~hybrid.watchdog.WATCHDOG`."""
    started = time.monotonic()
    with WATCHDOG.guard(started + node.max_wall_s, node.max_wall_s):
        graph, plan, hop_offset, call, keep = decode_request(payload, max_attachment_bytes=node.max_attachment_bytes,
                                                             max_json_bytes=node.max_ops * JSON_BYTES_PER_OP)
    limits = cap_limits(graph.limits, node)
    with WATCHDOG.guard(started + limits.max_wall_s, limits.max_wall_s):
        return _build(graph, plan, hop_offset, call, keep, context, limits, started)


def _build(graph, plan, hop_offset: int, call: int, keep: dict[int, str], context: HookContext, limits: Limits,
           started: float) -> InterpreterHook:
    validate(graph, lambda _: limits)  # inline attachments only: those named by hash are held in the bounded store
    if graph.blobs:
        resolve_blobs(graph.attachments, graph.blobs, STORE, context.client)
    me = hop_offset + context.hop
    if not 0 <= me < len(plan.executors):
        raise InvalidGraphError(f"plan has no executor for chain position {context.hop}")
    modules = dict(context.model.named_modules())
    for node in graph.nodes:
        if plan.assignment[node.id] == me and node.op in ("getter", "setter") and split_op_path(node.module):
            owner, op = split_op_path(node.module)  # an operation inside the forward of a module held here
            if owner not in modules:
                raise UnknownModuleError(f"Module {owner!r} is not served by this node (span {context.start}:"
                                         f"{context.end}); the plan does not match the route.")
            check_op(owner, modules[owner], op)
        elif plan.assignment[node.id] == me and node.op in ("getter", "setter") and node.module not in modules:
            raise UnknownModuleError(f"Module {node.module!r} is not served by this node (span "
                                     f"{context.start}:{context.end}); the plan does not match the route.")
    device = next(context.model.parameters()).device
    carried = unpack_values(context.carry)
    if any(not 0 <= k < len(graph.nodes) for k in carried):
        raise InvalidGraphError(f"the carried values name node ids {sorted(carried)} of a graph of "
                                f"{len(graph.nodes)} nodes")
    for node in graph.nodes:
        if node.op == "load" and plan.assignment[node.id] == me:
            carried[node.id] = STORE.get(node.target)
    keep = {k: v for k, v in keep.items() if plan.assignment[k] == me}
    if any(graph.nodes[k].op == "setter" for k in keep):
        raise InvalidGraphError("a setter has no value to keep for a later trace; keep the value it writes instead")
    interpreter = Interpreter(graph, plan, me, carried, device=device, limits=limits, modules=modules, retain=keep,
                              started=started)
    return InterpreterHook(interpreter, call, keep, owner=context.client)


def register(registry: HookRegistry) -> None:
    """Serve hybrid graphs within the registry's per-request budgets (:func:`node_limits`), with the session store
    bounded by its ``max_store_mb`` in all and ``max_client_store_mb`` per client."""
    STORE.configure(max_bytes=registry.budgets.max_store_mb << 20,
                    max_owner_bytes=registry.budgets.max_client_store_mb << 20)
    registry.register(HOOK_KIND, HOOK_VERSION, partial(build_graph_hook, node=node_limits(registry.budgets)))
