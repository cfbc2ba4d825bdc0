"""The entries of a full ``tracer.cache()`` that no node records, built on the gateway from the ones the nodes did.

nnsight's full cache (``tracer.cache()`` with no ``modules``) holds, besides every submodule, three entries that no
stage of the swarm produces as a module output: the rotary embedding's ``(cos, sin)`` (``model.model.rotary_emb``: it
runs on every node, outside any stage), the inner model's ``BaseModelOutputWithPast`` (``model.model``) and the root's
``CausalLMOutputWithPast`` (``model``). Each is a function of entries the full cache already brought back, so the
gateway builds them exactly as transformers does, and ships no extra hidden state:

- ``rotary_emb``: the model family's rotary module, built from the config, applied to the embedding's output at
  positions ``0..T-1`` (what the stages and transformers use in a forward without past);
- ``past_key_values`` (a ``DynamicCache(config=...)``, the one object both outputs hold, as in transformers): per
  layer, the keys are ``k_proj``'s output (``k_norm``'s, where the family has one) in ``(B, heads, T, head_dim)`` with
  the family's ``apply_rotary_pos_emb``, the values ``v_proj``'s output; all recorded after the interventions, as the
  forward used them;
- ``model.model``: ``last_hidden_state`` = ``model.norm``'s output; ``model``: ``logits`` = ``lm_head``'s output.

What cannot be built exactly is refused (:class:`~ndif_compat.errors.BadRequestError`), never left out: a cache over a
generation (each step's positions and the growing KV cache would have to be reproduced from the node's generation
state), and a cache where a module these entries need did not run (a skipped layer).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from .errors import BadRequestError

ROTARY, INNER, ROOT = "model.model.rotary_emb", "model.model", "model"


def add_root_entries(entries: dict[str, list], skeleton: Any, entry_type: type) -> dict[str, list]:
    """``entries`` (nnsight's keys, in call order) with the three root entries inserted where nnsight puts them:
    ``rotary_emb`` after ``embed_tokens``, ``model.model`` after ``norm``, ``model`` last."""
    from transformers.cache_utils import DynamicCache
    from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

    if any(len(calls) != 1 for calls in entries.values()):
        raise BadRequestError(
            "a full tracer.cache() over a generation is not served by the swarm backend: its model.model.rotary_emb, "
            "model.model and model entries (each step's positions and the KV cache of the whole generation) cannot be "
            "rebuilt exactly from what the nodes record. Pass the modules you need: "
            "tracer.cache(modules=[lm.model.layers[3], ...]).")
    config, inner = skeleton.config, skeleton.module("model")
    embedded = _output(entries, "model.model.embed_tokens")
    rotary_module = type(inner.rotary_emb)(config=config)
    positions = torch.arange(embedded.shape[1]).unsqueeze(0)
    with torch.no_grad():
        cos, sin = rotary_module(embedded, positions)  # (1, T, head_dim) each
    past = DynamicCache(config=config)
    for i in range(config.num_hidden_layers):
        attention = skeleton.module(f"model.layers.{i}.self_attn")
        head_dim = attention.head_dim
        prefix = f"model.model.layers.{i}.self_attn"
        keys = _output(entries, f"{prefix}.k_norm") if hasattr(attention, "k_norm") else None
        if keys is None:
            keys = _output(entries, f"{prefix}.k_proj")
            keys = keys.view(*keys.shape[:-1], -1, head_dim)
        keys = keys.transpose(1, 2)                                            # (B, kv_heads, T, head_dim)
        values = _output(entries, f"{prefix}.v_proj")
        values = values.view(*values.shape[:-1], -1, head_dim).transpose(1, 2)  # (B, kv_heads, T, head_dim)
        rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        _, keys = rotate(keys, keys, cos, sin)
        past.update(keys, values, i)
    built = {ROTARY: (cos, sin),
             INNER: BaseModelOutputWithPast(last_hidden_state=_output(entries, "model.model.norm"),
                                            past_key_values=past),
             ROOT: CausalLMOutputWithPast(logits=_output(entries, "model.lm_head"), past_key_values=past)}
    out: dict[str, list] = {}
    for key, calls in entries.items():
        if key == "model.lm_head":
            out[INNER] = [entry_type(output=built[INNER])]
        out[key] = calls
        if key == "model.model.embed_tokens":
            out[ROTARY] = [entry_type(output=built[ROTARY])]
    out[ROOT] = [entry_type(output=built[ROOT])]
    return out


def _output(entries: dict[str, list], key: str) -> torch.Tensor:
    calls = entries.get(key)
    if not calls or not isinstance(calls[0].output, torch.Tensor):
        raise BadRequestError(
            f"tracer.cache(): {key} did not run (a skipped module?), and the full cache's model.model / model / "
            "rotary_emb entries are built from it on the swarm backend; they cannot be given exactly. Pass the "
            "modules you need: tracer.cache(modules=[...]).")
    return calls[0].output
