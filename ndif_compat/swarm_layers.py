"""The gateway's model for the ``swarm`` backend: nnsight's own model tree whose decoder layers call the swarm.

The embedding, final norm and head are local (as in Petals); ``model.layers[i]`` are :class:`SwarmLayer` modules.
Before a request runs, :func:`touched_layers` reads its code and the stack is cut only at the layers it names:
a run of untouched layers is one swarm call (the first layer of the run calls the swarm for the whole run, the
others pass the state through), so hidden states reach the gateway only where the program touches them.
Code that names layers in a way the analysis cannot bound (a loop over layers, a computed index) cuts at every
layer: slower, still exact.
"""

from __future__ import annotations

import ast
import logging
from typing import Iterable

import torch
from torch import nn

logger = logging.getLogger(__name__)


def touched_layers(sources: Iterable[str], num_layers: int) -> set[int] | None:
    """Layer indices the code names as ``<x>.layers[<int>]``; ``None`` when it reaches layers any other way."""
    found: set[int] = set()
    for source in sources:
        tree = ast.parse(source)
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
                if not isinstance(value, int) or not -num_layers <= value < num_layers:
                    return None
                found.add(value % num_layers)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "layers" and id(node) not in subscripted:
                return None
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "layers" in node.value:
                return None
    return found


class SwarmStack:
    """Shared state of the swarm layers for one forward: where the stack is cut, the 2-D mask and positions."""

    def __init__(self, client, num_layers: int):
        self.client, self.num_layers = client, num_layers
        self.starts: dict[int, int] = {0: num_layers}
        self.attention_mask: torch.Tensor | None = None
        self.position_ids: torch.Tensor | None = None

    def cut_at(self, layers: set[int] | None) -> None:
        """Segments for a program touching ``layers`` (``None``: every layer)."""
        n = self.num_layers
        cuts = set(range(n + 1)) if layers is None else {0, n} | set(layers) | {k + 1 for k in layers}
        cuts = sorted(c for c in cuts if 0 <= c <= n)
        self.starts = {a: b for a, b in zip(cuts, cuts[1:])}

    def capture_inputs(self, module, args, kwargs) -> None:
        """Forward pre-hook on the decoder stack: keep the 2-D mask and positions for the swarm calls."""
        self.attention_mask = kwargs.get("attention_mask")
        self.position_ids = kwargs.get("position_ids")


class SwarmLayer(nn.Module):
    """Decoder layer ``index``: runs layers ``[index, end)`` on the swarm when a segment starts here, else passes the
    hidden state through (a later part of a segment already run)."""

    def __init__(self, index: int, stack: SwarmStack):
        super().__init__()
        self.index = index
        self._stack = [stack]  # a list keeps it out of the module tree

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        stack = self._stack[0]
        end = stack.starts.get(self.index)
        if end is None:
            return hidden_states
        mask = stack.attention_mask
        if mask is not None and (mask.ndim != 2 or mask.shape[-1] != hidden_states.shape[1]):
            mask = None if mask.ndim != 2 else mask
        client = stack.client
        out, _ = client.loop.run(client.sequence.forward(
            hidden_states.detach().contiguous(), attention_mask=mask, position_ids=stack.position_ids,
            start=self.index, end=end))
        return out.to(hidden_states.dtype)


class Unreachable(nn.Module):
    """Stands in for a submodule inside a decoder layer, which the swarm backend's gateway does not hold."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.path} is inside a decoder layer served by the swarm; gateway execution reaches "
                           "only layer inputs/outputs, the embedding and the head")


def build_swarm_model(path, initial_peers, dtype=torch.float32):
    """``(nnsight LanguageModel, SwarmModel client, SwarmStack)`` for the checkpoint at ``path``."""
    import nnsight
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from swarm.checkpoint import load_config
    from swarm.model import SwarmModel

    client = SwarmModel.from_pretrained(str(path), list(initial_peers), dtype=dtype)
    config = load_config(path)
    config._attn_implementation = "sdpa"
    n = config.num_hidden_layers
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    local = client.local
    hf.model.embed_tokens = local.model.embed_tokens
    hf.model.norm = local.model.norm
    hf.lm_head = local.lm_head
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=config)
    stack = SwarmStack(client, n)
    hf.model.layers = nn.ModuleList([SwarmLayer(i, stack) for i in range(n)])
    hf.model.register_forward_pre_hook(stack.capture_inputs, with_kwargs=True)
    try:
        hf.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass
    hf.generation_config.use_cache = False  # every step re-runs the sequence through the swarm (no gateway KV cache)
    hf.eval().requires_grad_(False)
    leftover = [name for name, p in hf.named_parameters() if p.is_meta] + [n_ for n_, b in hf.named_buffers() if b.is_meta]
    if leftover:
        raise RuntimeError(f"gateway swarm model left tensors unloaded: {leftover[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = nnsight.LanguageModel(hf, tokenizer=tokenizer)
    return lm, client, stack
