"""The entries of a full ``tracer.cache()`` that no node records, built on the gateway from the ones the nodes did.

nnsight's full cache (``tracer.cache()`` with no ``modules``) holds, besides every submodule, three entries that no
stage of the swarm produces as a module output: the rotary embedding's ``(cos, sin)`` (``model.model.rotary_emb``: it
runs on every node, outside any stage), the inner model's ``BaseModelOutputWithPast`` (``model.model``) and the root's
``CausalLMOutputWithPast`` (``model``). Each is a function of entries the full cache already brought back, so the
gateway builds them exactly as transformers does, and ships no extra hidden state:

- ``rotary_emb``: the model family's rotary module, built from the config, applied to the embedding's output at
  nnsight's positions (below);
- ``past_key_values`` (a ``DynamicCache(config=...)``, the one object both outputs hold, as in transformers): per
  layer, the keys are ``k_proj``'s output (``k_norm``'s, where the family has one) in ``(B, heads, T, head_dim)`` with
  the family's ``apply_rotary_pos_emb``, the values ``v_proj``'s output; all recorded after the interventions, as the
  forward used them;
- ``model.model``: ``last_hidden_state`` = ``model.norm``'s output; ``model``: ``logits`` = ``lm_head``'s output.

Positions are nnsight's: ``0..T-1``, or for a left-padded batch each row counted from its first real token
(:func:`hybrid.tracing.nnsight_position_ids`).

What cannot be built exactly is refused (:class:`~ndif_compat.errors.BadRequestError`), never left out: a cache
declared inside one of several invokes (the root's output objects would have to be cut to that invoke's rows, which
is not done here), a cache over ``lm.generate`` (nnsight's then also holds ``model.generator`` and its streamer: the
ids the generation loop made, which no node records), and a cache where a module these entries need did not run (a
skipped layer).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from .errors import BadRequestError

ROTARY, INNER, ROOT = "model.model.rotary_emb", "model.model", "model"


def add_root_entries(entries: dict[str, list], cache: Any, entry_type: type) -> dict[str, list]:
    """``entries`` (nnsight's keys, in call order) with the three root entries inserted
    where nnsight puts them: ``rotary_emb`` after ``embed_tokens``, ``model.model`` before ``lm_head``, ``model``
    last. ``cache``: the hybrid cache (:class:`hybrid.cache.Cache`) the entries came from."""
    from transformers.cache_utils import DynamicCache
    from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

    from hybrid.tracing import nnsight_position_ids

    tracer, invoke = cache.tracer, cache.invoke
    if invoke.narrow or invoke.encoded is None or sum(bool(i.rows) for i in tracer._invokes) != 1:
        raise BadRequestError(
            "a full tracer.cache() inside one of several invokes is not served whole by the swarm backend: the "
            "model's and model.model's output objects (their KV cache) would have to be cut to that invoke's rows, "
            "which the gateway does not do. Declare the cache in a trace of one invoke, or pass the modules you need: "
            "tracer.cache(modules=[lm.model.layers[3], ...]).")
    if tracer.generation:
        raise BadRequestError(
            "a full tracer.cache() over lm.generate is not served by the swarm backend: nnsight's cache then also "
            "holds model.generator and model.generator.streamer (the ids the generation loop made and streamed), "
            "which no node records. Pass the modules you need: tracer.cache(modules=[lm.model.layers[3], ...]), "
            "and save tracer.result for the ids.")
    mask = invoke.encoded[1]                                                   # (B, T)
    skeleton = tracer.skeleton
    config, inner = skeleton.config, skeleton.module("model")
    positions = nnsight_position_ids(mask)
    positions = torch.arange(mask.shape[1]).unsqueeze(0) if positions is None else positions  # (B or 1, T)
    with torch.no_grad():
        cos, sin = type(inner.rotary_emb)(config=config)(_output(entries, "model.model.embed_tokens"), positions)
    past = DynamicCache(config=config)
    for i in range(config.num_hidden_layers):
        attention = skeleton.module(f"model.layers.{i}.self_attn")
        head_dim = attention.head_dim
        prefix = f"model.model.layers.{i}.self_attn"
        if hasattr(attention, "k_norm"):  # (B, T, kv_heads, head_dim) already
            keys = _output(entries, f"{prefix}.k_norm")
        else:
            keys = _output(entries, f"{prefix}.k_proj")
            keys = keys.view(*keys.shape[:-1], -1, head_dim)
        keys = keys.transpose(1, 2)                                            # (B, kv_heads, T, head_dim)
        values = _output(entries, f"{prefix}.v_proj")
        values = values.view(*values.shape[:-1], -1, head_dim).transpose(1, 2)  # (B, kv_heads, T, head_dim)
        rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        _, keys = rotate(keys, keys, cos, sin)
        past.update(keys, values, i)
    built = {ROTARY: entry_type(output=(cos, sin)),
             INNER: entry_type(output=BaseModelOutputWithPast(last_hidden_state=_output(entries, "model.model.norm"),
                                                              past_key_values=past)),
             ROOT: entry_type(output=CausalLMOutputWithPast(logits=_output(entries, "model.lm_head"),
                                                            past_key_values=past))}
    out: dict[str, list] = {}
    for key, calls in entries.items():
        if key == "model.lm_head":
            out[INNER] = [built[INNER]]
        out[key] = calls
        if key == "model.model.embed_tokens":
            out[ROTARY] = [built[ROTARY]]
    out[ROOT] = [built[ROOT]]
    return out


def _output(entries: dict[str, list], key: str) -> torch.Tensor:
    calls = entries.get(key)
    if not calls or not isinstance(calls[0].output, torch.Tensor):
        raise BadRequestError(
            f"tracer.cache(): {key} did not run (a skipped module?), and the full cache's model.model / model / "
            "rotary_emb entries are built from it on the swarm backend; they cannot be given exactly. Pass the "
            "modules you need: tracer.cache(modules=[...]).")
    return calls[0].output
