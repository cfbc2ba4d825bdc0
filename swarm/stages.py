"""Model stages: the part of a decoder LM that one node holds, loaded from only its own tensors.

A decoder LM is an ordered list of stages: ``embed``, ``layers[0..L-1]``, ``head`` (final norm + LM head).
:class:`SpanModel` holds a contiguous run of them and runs any sub-range exactly as the transformers model
does (same modules, same mask construction, same rotary embedding), so remote results equal local ones.

Submodules keep their Hugging Face paths (``model.layers.7.mlp``, ``model.norm``, ``lm_head``), which is what
span hooks and interventions refer to.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from . import attention
from .checkpoint import TensorIndex, load_config
from .errors import BadRequestError, ModelNotFoundError

logger = logging.getLogger(__name__)

#: Model families whose decoder follows the Llama layout (embed_tokens, rotary_emb, layers, norm, lm_head).
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Span:
    """A contiguous run of stages: layers ``[start, end)`` plus optionally the embedding and the head."""

    start: int
    """First decoder layer held (inclusive)."""
    end: int
    """Last decoder layer held (exclusive)."""
    embed: bool = False
    """Holds ``model.embed_tokens`` (only meaningful when ``start == 0``)."""
    head: bool = False
    """Holds ``model.norm`` and ``lm_head`` (only meaningful when ``end`` is the number of layers)."""

    def __str__(self) -> str:
        parts = (["embed"] if self.embed else []) + [f"layers[{self.start}:{self.end}]"] + (["head"] if self.head else [])
        return "+".join(parts)

    @property
    def num_layers(self) -> int:
        return self.end - self.start


def check_family(config: PretrainedConfig) -> None:
    """Raise :class:`ModelNotFoundError` unless the checkpoint is a decoder family we can split."""
    if config.model_type not in SUPPORTED_FAMILIES:
        raise ModelNotFoundError(
            f"Model family {config.model_type!r} is not supported; supported families: {', '.join(SUPPORTED_FAMILIES)}."
        )


def layer_type(config: PretrainedConfig, index: int) -> str:
    """The attention pattern of layer ``index``: ``"full_attention"`` or ``"sliding_attention"``."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[index]
    return "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"


class SpanModel(nn.Module):
    """The stages of one span with the module tree of the transformers model (only the held parts exist).

    Build with :meth:`load`; the constructor does no I/O.
    """

    def __init__(self, config: PretrainedConfig, span: Span, embed: nn.Module | None, layers: dict[int, nn.Module],
                 rotary: nn.Module, norm: nn.Module | None, lm_head: nn.Module | None):
        super().__init__()
        self.config = config
        self.span = span
        self.model = nn.Module()
        if embed is not None:
            self.model.embed_tokens = embed
        self.model.layers = nn.ModuleDict({str(i): layer for i, layer in layers.items()})
        self.model.rotary_emb = rotary
        if norm is not None:
            self.model.norm = norm
        if lm_head is not None:
            self.lm_head = lm_head

    @classmethod
    def load(cls, path: Path, span: Span, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
             attn_implementation: str = "sdpa") -> "SpanModel":
        """Load only the tensors of ``span`` from the safetensors checkpoint at ``path``. ``"sdpa"`` attention is
        :mod:`swarm.attention`'s: SDPA, except in the calls a request asks for attention weights (eager there).

        Raises:
            ModelNotFoundError: unsupported family or tensors missing from the checkpoint.
            BadRequestError: the span does not fit the model.
        """
        config = load_config(path)
        check_family(config)
        config._attn_implementation = attention.register() if attn_implementation == "sdpa" else attn_implementation
        num_layers = config.num_hidden_layers
        if not (0 <= span.start <= span.end <= num_layers):
            raise BadRequestError(f"Span {span.start}:{span.end} does not fit a model with {num_layers} layers.")
        stages_only = span.start == span.end  # a client's local embedding/head, no layers
        if span.embed and span.start != 0 and not stages_only:
            raise BadRequestError("A span can hold the embedding only if it starts at layer 0.")
        if span.head and span.end != num_layers and not stages_only:
            raise BadRequestError(f"A span can hold the head only if it ends at layer {num_layers}.")

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
        index = TensorIndex.open(path)
        tied = bool(getattr(config, "tie_word_embeddings", False))

        def materialize(module: nn.Module, prefix: str, source_prefix: str | None = None) -> nn.Module:
            names = {f"{prefix}.{n}": f"{source_prefix or prefix}.{n}" for n, _ in module.named_parameters()}
            names.update({f"{prefix}.{n}": f"{source_prefix or prefix}.{n}" for n, _ in module.named_buffers()
                          if n in module.state_dict()})
            tensors = index.load(sorted(set(names.values())), dtype=dtype)
            state = {k[len(prefix) + 1:]: tensors[v] for k, v in names.items()}
            module.load_state_dict(state, strict=True, assign=True)
            return module.to(device)

        inner = skeleton.model
        embed = materialize(inner.embed_tokens, "model.embed_tokens") if span.embed else None
        layers = {i: materialize(inner.layers[i], f"model.layers.{i}") for i in range(span.start, span.end)}
        for i, layer in layers.items():
            layer.self_attn.layer_idx = i - span.start  # the node's KV cache is indexed within its span
        norm = lm_head = None
        if span.head:
            norm = materialize(inner.norm, "model.norm")
            if "lm_head.weight" in index.names():
                lm_head = materialize(skeleton.lm_head, "lm_head")
            elif tied and embed is not None:
                lm_head = skeleton.lm_head
                lm_head.weight = embed.weight
            elif tied:
                lm_head = materialize(skeleton.lm_head, "lm_head", source_prefix="model.embed_tokens")
            else:
                raise ModelNotFoundError(f"Checkpoint {path} has no lm_head.weight and does not tie embeddings.")
        rotary = type(inner.rotary_emb)(config=config).to(device)
        model = cls(config, span, embed, layers, rotary, norm, lm_head).eval()
        model.requires_grad_(False)
        leftover = [n for n, p in model.named_parameters() if p.is_meta]
        if leftover:
            raise ModelNotFoundError(f"Checkpoint {path} left parameters unloaded: {leftover[:5]}")
        return model

    def weight_bytes(self) -> int:
        """Bytes held by this span's parameters (shared tensors counted once)."""
        seen = {p.data_ptr(): p.numel() * p.element_size() for p in self.parameters()}
        return sum(seen.values())

    def layer(self, index: int) -> nn.Module:
        return self.model.layers[str(index)]

    def forward(self, inputs: torch.Tensor, *, start: int | None = None, end: int | None = None,
                embed: bool = False, head: bool = False, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: DynamicCache | None = None,
                logits_to_keep: int = 0, between_layers: Callable[[], None] | None = None) -> torch.Tensor:
        """Run layers ``[start, end)`` (default: the whole span), optionally the embedding before and the head after.

        Args:
            inputs: token ids ``(B, T)`` when ``embed`` else hidden states ``(B, T, D)``.
            attention_mask: 2D padding mask ``(B, past + T)`` (1 = attend), or None for no padding.
            position_ids: ``(B or 1, T)``; default ``past + arange(T)``.
            cache: the session's KV cache (indexed by layer position within this span), or None.
            logits_to_keep: with ``head``, apply ``lm_head`` to the last ``logits_to_keep`` positions only (0: all),
                as transformers does; its ``generate`` keeps 1, so ``lm_head``'s input and output have one position.
            between_layers: called between two consecutive layers (the node hands its compute slot to other waiting
                requests there, see :mod:`swarm.compute_slot`).
        Returns:
            hidden states ``(B, T, D)``, or logits ``(B, T or logits_to_keep, V)`` when ``head``.
        """
        start = self.span.start if start is None else start
        end = self.span.end if end is None else end
        hidden = self.model.embed_tokens(inputs) if embed else inputs  # (B, T, D)
        if start < end:
            local_first = start - self.span.start
            past = cache.get_seq_length(local_first) if cache is not None else 0
            if position_ids is None:
                position_ids = torch.arange(past, past + hidden.shape[1], device=hidden.device).unsqueeze(0)
            mask_kwargs = dict(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                               past_key_values=cache, position_ids=position_ids, layer_idx=local_first)
            masks = {}
            position_embeddings = self.model.rotary_emb(hidden, position_ids)
            for i in range(start, end):
                if between_layers is not None and i > start:
                    between_layers()
                kind = layer_type(self.config, i)
                if kind not in masks:
                    build = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
                    masks[kind] = build(**mask_kwargs)
                hidden = self.layer(i)(hidden, attention_mask=masks[kind], position_ids=position_ids,
                                       past_key_values=cache, use_cache=cache is not None,
                                       position_embeddings=position_embeddings)
        if head:
            hidden = self.lm_head(self.model.norm(hidden)[:, -logits_to_keep:])  # (B, T, V); -0: every position
        return hidden
