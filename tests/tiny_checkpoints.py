"""Tiny random-weight checkpoints of each supported family, for tests that must not wait for a real model.

Every family shares one shape: 4 layers (by default), d=64, 4 query heads and 2 KV heads of dim 16 (grouped-
query attention), MLP 128, vocab 128, 256 positions. Family quirks are kept so they get exercised:

- ``llama``: the plain decoder.
- ``mistral``: sliding-window attention with a window of 16 tokens, so inputs longer than 16 differ from full
  attention.
- ``qwen2``: biases on q/k/v projections.
- ``qwen3``: RMS norms on q and k per head.

Weights are drawn at unit-ish scale (linear layers ~ N(0, 1/fan_in), embeddings ~ N(0, 1), a tied embedding
~ N(0, 1/d), norm weights 1 ± 0.1, biases ~ N(0, 0.1)) so activations and logits are O(1) rather than the
near-zero outputs of the default 0.02 init.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import transformers

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

_SHAPE = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    vocab_size=128,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
MISTRAL_SLIDING_WINDOW = 16
_SHARD_BYTES = 200_000  # a 4-layer model is ~0.6 MB in float32, so shard=True gives several shards


def tiny_config(family: str, *, num_layers: int = 4, tie_embeddings: bool = False) -> transformers.PretrainedConfig:
    """The config :func:`make_tiny_checkpoint` uses.

    Raises:
        ValueError: ``family`` is not one of :data:`FAMILIES`.
    """
    common = dict(_SHAPE, num_hidden_layers=num_layers, tie_word_embeddings=tie_embeddings)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=MISTRAL_SLIDING_WINDOW)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "qwen3":
        return transformers.Qwen3Config(**common)
    raise ValueError(f"Unknown family {family!r}; expected one of {FAMILIES}.")


def make_tiny_checkpoint(
    family: str,
    path: Path,
    *,
    num_layers: int = 4,
    seed: int = 0,
    tie_embeddings: bool = False,
    shard: bool = False,
) -> Path:
    """Build a random-weight checkpoint of ``family`` and save it with ``save_pretrained`` (safetensors).

    Args:
        family: one of :data:`FAMILIES`.
        path: directory to write (created if needed).
        num_layers: decoder layers.
        seed: the weights are a function of ``(family, num_layers, seed, tie_embeddings)``.
        tie_embeddings: tie ``lm_head`` to ``embed_tokens`` (then the file has no ``lm_head.weight``).
        shard: force several shards, so ``model.safetensors.index.json`` exists.

    Raises:
        ValueError: unknown family.

    Returns:
        ``path``.
    """
    config = tiny_config(family, num_layers=num_layers, tie_embeddings=tie_embeddings)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    max_shard_size = _SHARD_BYTES if shard else "50GB"
    model.save_pretrained(path, safe_serialization=True, max_shard_size=max_shard_size)
    return path


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter at unit-ish scale, in name order, from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    tied = bool(model.config.tie_word_embeddings)
    with torch.no_grad():
        # A tied lm_head is the same Parameter as embed_tokens and is listed once, under the embedding's name.
        for name, param in sorted(model.named_parameters()):
            if name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            elif "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif "embed_tokens" in name:  # tied, it is also the LM head: keep the logits O(1) there too
                scale = 1.0 / math.sqrt(param.shape[-1]) if tied else 1.0
                param.copy_(scale * torch.randn(param.shape, generator=generator))
            else:  # linear weight (out, in)
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[-1]))
