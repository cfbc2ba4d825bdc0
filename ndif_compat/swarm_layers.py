"""The gateway's model for the ``swarm`` backend: nnsight's own model tree whose decoder layers call the swarm.

The embedding, final norm and head are local (as in Petals); ``model.layers[i]`` are :class:`SwarmLayer` modules.
Before a request runs, :func:`touched_layers` reads its code and the stack is cut only at the layers it names:
a run of untouched layers is one swarm call (the first layer of the run calls the swarm for the whole run, the
others pass the state through), so hidden states reach the gateway only where the program touches them.
Code that names layers in a way the analysis cannot bound (a loop over layers, a computed index) cuts at every
layer: slower, still exact. A segment whose input requires grad is one autograd node whose backward is the nodes'
backward RPC (:class:`_SwarmSegment`), so ``.grad`` of layer outputs, gradient edits and ``retain_graph`` work as
with local autograd.
"""

from __future__ import annotations

import ast
import logging
from typing import Any, Iterable

import torch
from torch import nn

logger = logging.getLogger(__name__)


def touched_layers(sources: Iterable[str], num_layers: int) -> set[int] | None:
    """Cut points of the decoder stack that the code needs: ``k`` for ``layers[k].input``, ``k + 1`` for
    ``layers[k].output``, both for anything else under ``layers[k]``. ``None`` when the code reaches layers in a
    way this cannot bound (a computed index, a loop over ``layers``, a path in a string): then cut everywhere."""
    cuts: set[int] = set()
    for source in sources:
        tree = ast.parse(source)
        parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        subscripted = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "layers":
                subscripted.add(id(node.value))
                index = node.slice
                if isinstance(index, ast.UnaryOp) and isinstance(index.op, ast.USub) and isinstance(index.operand, ast.Constant):
                    value = -index.operand.value
                elif isinstance(index, ast.Constant):
                    value = index.value
                else:
                    return None
                if not isinstance(value, int) or isinstance(value, bool) or not -num_layers <= value < num_layers:
                    return None
                k = value % num_layers
                parent = parents.get(id(node))
                attr = parent.attr if isinstance(parent, ast.Attribute) else None
                cuts |= {k + 1} if attr == "output" else {k} if attr in ("input", "inputs") else {k, k + 1}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "layers" and id(node) not in subscripted:
                return None
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "layers" in node.value:
                return None
    return cuts


LAYERS_PREFIX = "model.model.layers."


def guard_fused_reads(stack: SwarmStack) -> None:
    """Exact or error, whatever :func:`touched_layers` decided: in this process (a gateway worker or cell of the
    swarm backend), nnsight's interleaver raises :class:`~ndif_compat.errors.FusedSegmentError` instead of handing
    any intervention or cache a decoder layer's value that the swarm computed inside a fused segment."""
    from nnsight.intervention.interleaver import Interleaver

    from .errors import FusedSegmentError

    if getattr(Interleaver.handle, "_fused_guard", False):
        return
    handle = Interleaver.handle

    def guarded(self, provider: str, value: Any) -> Any:
        if provider.startswith(LAYERS_PREFIX) and (self._ready(provider) or self.observers.get(provider)) \
                and not stack.computed(provider):
            raise FusedSegmentError(f"the program reads {provider}, which the swarm computed inside a fused segment")
        return handle(self, provider, value)

    guarded._fused_guard = True
    Interleaver.handle = guarded


class ClientCalls:
    """The swarm calls of the decoder stack, made on an open swarm connection (``SwarmModel``): a stateless forward of
    layers ``[start, end)``, or the next step of a KV-cache session per segment while a generation runs."""

    def __init__(self, client):
        self.client = client
        self.sessions: dict[tuple[int, int], Any] = {}

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None, start: int,
                end: int) -> torch.Tensor:
        out, _ = self.client.loop.run(self.client.sequence.forward(hidden, attention_mask=mask, position_ids=positions,
                                                                   start=start, end=end))
        return out

    def backward(self, hidden: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor | None,
                 positions: torch.Tensor | None, start: int, end: int) -> torch.Tensor:
        """The gradient w.r.t. ``hidden`` (the input of layers ``[start, end)``) given ``grad`` w.r.t. their output,
        through the nodes' backward RPC (each node recomputes its part's forward; a segment that spans several nodes
        is run forward once more to get each node's input)."""
        loop, sequence = self.client.loop, self.client.sequence
        hops = loop.run(sequence.route(start, end))
        if len(hops) == 1:
            trail = [(hops[0], hidden)]
        else:
            _, trail = loop.run(sequence.forward(hidden, attention_mask=mask, position_ids=positions, start=start,
                                                 end=end, keep_hop_inputs=True))
        return loop.run(sequence.backward(trail, grad.contiguous(), attention_mask=mask, position_ids=positions))

    def step(self, hidden: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None, start: int,
             end: int, max_length: int) -> torch.Tensor:
        from swarm.inference_session import InferenceSession

        loop, sequence = self.client.loop, self.client.sequence
        if (start, end) not in self.sessions:
            hops = loop.run(sequence.route(start, end))
            self.sessions[(start, end)] = InferenceSession(sequence, hops, batch_size=hidden.shape[0],
                                                           max_length=max_length, embed=False, head=False)
        return loop.run(self.sessions[(start, end)].step(hidden, attention_mask=mask, position_ids=positions))

    def close(self) -> None:
        sessions, self.sessions = self.sessions, {}
        for session in sessions.values():
            try:
                self.client.loop.run(session.close())
            except Exception as e:  # the step already answered; a failed close only leaks a node's cache slot
                logger.warning("closing a swarm session failed: %s", e)


class SwarmStack:
    """Shared state of the swarm layers: where the stack is cut, the 2-D mask and positions of the forward in
    progress, and whether a cached generation runs (its steps then send only the new tokens' hidden states, exactly
    as transformers' cached generation computes them). The swarm calls themselves are ``calls``
    (:class:`ClientCalls`, or in a sandboxed cell :class:`ndif_compat.broker.BrokerCalls`)."""

    def __init__(self, calls, num_layers: int):
        self.calls, self.num_layers = calls, num_layers
        self.starts: dict[int, int] = {0: num_layers}
        self.attention_mask: torch.Tensor | None = None
        self.position_ids: torch.Tensor | None = None
        self.max_new_tokens: int | None = None
        """While ``generate`` runs: its ``max_new_tokens``."""

    def generate_wrapper(self, generate):
        """Wrap the model's ``generate`` so the layers know a cached generation is running (and its length)."""
        def wrapped(*args, **kwargs):
            config = kwargs.get("generation_config")
            new = kwargs.get("max_new_tokens") or getattr(config, "max_new_tokens", None) or 64
            self.max_new_tokens = int(new)
            try:
                return generate(*args, **kwargs)
            finally:
                self.max_new_tokens = None
                self.calls.close()
        return wrapped

    def run(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Layers ``[start, end)`` on the swarm: a stateless forward, or the next step of this segment's session."""
        mask = self.attention_mask if self.attention_mask is not None and self.attention_mask.ndim == 2 else None
        if self.max_new_tokens is None:
            return self.calls.forward(hidden, mask, self.position_ids, start, end)
        return self.calls.step(hidden, mask, self.position_ids, start, end,
                               max_length=hidden.shape[1] + self.max_new_tokens + 1)

    def differentiable(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """:meth:`run` as one autograd node: its backward asks the nodes (:meth:`ClientCalls.backward`) with the
        mask and positions of this forward."""
        if self.max_new_tokens is not None:   # HF generate runs under no_grad; only a request re-enabling it gets here
            from .errors import GradientUnsupportedError
            raise GradientUnsupportedError(
                "a gradient through a generation's decoder layers: on the swarm backend each generation step is one "
                "step of a KV-cache session on the nodes, which keeps no autograd state (and transformers' generate "
                "runs without gradients, as local nnsight does). Take gradients in a trace (lm.trace) instead.")
        mask = self.attention_mask if self.attention_mask is not None and self.attention_mask.ndim == 2 else None
        return _SwarmSegment.apply(hidden, self, mask, self.position_ids, start, end)

    def computed(self, provider: str) -> bool:
        """Whether the value nnsight offers at ``provider`` (``model.model.layers.<k>.input|output``) is the one
        computed there: a layer's input exists only where a segment starts, its output only where one ends."""
        rest = provider.removeprefix(LAYERS_PREFIX)
        index, _, kind = rest.partition(".")
        if not index.isdigit() or kind not in ("input", "output"):
            return True                     # not a decoder layer's own value (submodules are Unreachable)
        k = int(index)
        return (k in self.starts) if kind == "input" else (k + 1 in self.starts or k + 1 == self.num_layers)

    def cut_at(self, cuts: set[int] | None) -> None:
        """Segments between the cut points of :func:`touched_layers` (``None``: one segment per layer)."""
        n = self.num_layers
        cuts = set(range(n + 1)) if cuts is None else {0, n} | set(cuts)
        cuts = sorted(c for c in cuts if 0 <= c <= n)
        self.starts = {a: b for a, b in zip(cuts, cuts[1:])}

    def capture_inputs(self, module, args, kwargs) -> None:
        """Forward pre-hook on the decoder stack: keep the 2-D mask and positions for the swarm calls."""
        self.attention_mask = kwargs.get("attention_mask")
        self.position_ids = kwargs.get("position_ids")


class SwarmLayer(nn.Module):
    """Decoder layer ``index``: runs layers ``[index, end)`` on the swarm when a segment starts here, else passes the
    hidden state through (a later part of a segment already run)."""

    def __init__(self, index: int, stack: SwarmStack, module_tree: nn.Module | None = None):
        super().__init__()
        self.index = index
        self._stack = [stack]  # a list keeps it out of the module tree
        self._tree = [module_tree]

    @property
    def module_tree(self) -> nn.Module | None:
        """A decoder layer of the model on the meta device (no weights): the submodules this layer has on the nodes,
        so a request's module paths are checked against them (:mod:`ndif_compat.module_paths`)."""
        return self._tree[0]

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        stack = self._stack[0]
        end = stack.starts.get(self.index)
        if end is None:
            return hidden_states
        if torch.is_grad_enabled() and hidden_states.requires_grad:
            return stack.differentiable(hidden_states.contiguous(), self.index, end).to(hidden_states.dtype)
        return stack.run(hidden_states.detach().contiguous(), self.index, end).to(hidden_states.dtype)


class _SwarmSegment(torch.autograd.Function):
    """Layers ``[start, end)`` on the swarm, differentiable w.r.t. their input: the forward keeps only that input
    (a ``(B, T, D)`` tensor the gateway already holds); the backward sends it with the output's gradient to the nodes,
    which recompute the segment and return the input's gradient. Stateless on the nodes, so a backward may run
    twice (``retain_graph=True``) or after a node was replaced."""

    @staticmethod
    def forward(ctx, hidden, stack, mask, positions, start: int, end: int):
        ctx.stack, ctx.mask, ctx.positions, ctx.span = stack, mask, positions, (start, end)
        ctx.save_for_backward(hidden)
        return stack.calls.forward(hidden.detach(), mask, positions, start, end)

    @staticmethod
    def backward(ctx, grad):
        (hidden,) = ctx.saved_tensors
        start, end = ctx.span
        with torch.no_grad():
            grad_in = ctx.stack.calls.backward(hidden.detach(), grad.contiguous(), ctx.mask, ctx.positions, start,
                                               end)
        return grad_in.to(hidden.dtype), None, None, None, None, None


class Unreachable(nn.Module):
    """Stands in for a submodule inside a decoder layer, which the swarm backend's gateway does not hold."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.path} is inside a decoder layer served by the swarm; gateway execution reaches "
                           "only layer inputs/outputs, the embedding and the head")


def build_swarm_model(path, local, calls, dtype=torch.float32):
    """``(nnsight LanguageModel, SwarmStack)`` for the checkpoint at ``path``: ``local`` holds the embedding, norm
    and head (a ``SpanModel`` with ``embed`` and ``head``, e.g. ``SwarmModel.local``); the decoder layers make their
    swarm calls through ``calls`` (:class:`ClientCalls` or :class:`ndif_compat.broker.BrokerCalls`)."""
    import nnsight
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from swarm.checkpoint import load_config

    config = load_config(path)
    config._attn_implementation = "sdpa"
    n = config.num_hidden_layers
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    hf.model.embed_tokens = local.model.embed_tokens
    hf.model.norm = local.model.norm
    hf.lm_head = local.lm_head
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=config)
    stack = SwarmStack(calls, n)
    hf.model.layers = nn.ModuleList([SwarmLayer(i, stack, hf.model.layers[i]) for i in range(n)])
    hf.model.register_forward_pre_hook(stack.capture_inputs, with_kwargs=True)
    try:
        hf.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass
    hf.generate = stack.generate_wrapper(hf.generate)
    hf.eval().requires_grad_(False)
    leftover = [name for name, p in hf.named_parameters() if p.is_meta] + [n_ for n_, b in hf.named_buffers() if b.is_meta]
    if leftover:
        raise RuntimeError(f"gateway swarm model left tensors unloaded: {leftover[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = nnsight.TransformersModel(hf, task="text-generation", tokenizer=tokenizer)  # not the deprecated LanguageModel
    return lm, stack
