"""Synthetic Llama checkpoints with random weights, from ~10M parameters up to ~1B, for the model-size workloads
(setup time and patching runtime vs size). Each is built once and kept in ``<cache_dir>/bench-synthetic/<name>``.

Random weights are fine here: the workloads time loading and forwards, not answers. Each directory also gets a
word-level tokenizer sized to the vocabulary (``write_tokenizer``), so :class:`hybrid.LanguageModel` opens it.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import BenchConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyntheticModel:
    """Shape of one synthetic Llama (head_dim 64, untied embeddings)."""

    name: str
    hidden_size: int
    num_layers: int
    intermediate_size: int
    vocab_size: int
    num_kv_heads: int | None = None
    """None = as many as attention heads."""

    @property
    def num_heads(self) -> int:
        return self.hidden_size // 64

    def params(self) -> int:
        """Parameter count (embedding + head + layers + norms)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = (self.num_kv_heads or self.num_heads) * 64
        layer = d * d * 2 + 2 * d * kv + 3 * d * f + 2 * d
        return 2 * v * d + self.num_layers * layer + d


SIZES = {m.name: m for m in (
    SyntheticModel("llama-10m", 256, 4, 688, 16000),
    SyntheticModel("llama-40m", 512, 8, 1376, 16000),
    SyntheticModel("llama-150m", 768, 12, 2048, 32000),
    SyntheticModel("llama-500m", 1280, 20, 3456, 32000),
    SyntheticModel("llama-1b", 2048, 16, 5632, 32000, num_kv_heads=8),
)}
"""From ~10M to ~1B parameters (fp32: 40 MB to 3.6 GB); 1B is what a 2-core, 24 GB machine holds twice over."""


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """Save a word-level tokenizer with ``vocab_size`` entries (``<unk>``, ``<s>``, ``</s>``, ``t3``, ``t4`` …) in
    ``path``; ``</s>`` doubles as padding. Enough for token-id workloads on models without a real tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="</s>")
    tokenizer.save_pretrained(str(path))


def synthetic_checkpoint(name: str, cache_dir: Path, seed: int = 0) -> Path:
    """The directory of synthetic model ``name``, built on first use (random init with ``seed``, safetensors).

    Raises:
        BenchConfigError: ``name`` is not in :data:`SIZES`.
    """
    if name not in SIZES:
        raise BenchConfigError(f"unknown synthetic model {name!r}; known: {', '.join(SIZES)}")
    spec = SIZES[name]
    path = Path(cache_dir) / "bench-synthetic" / name
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    logger.info("building synthetic checkpoint %s (%.0fM parameters) in %s", name, spec.params() / 1e6, path)
    config = LlamaConfig(hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
                         intermediate_size=spec.intermediate_size, vocab_size=spec.vocab_size,
                         num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads or spec.num_heads,
                         head_dim=64, max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.float32)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), max_shard_size="20GB")
    write_tokenizer(tmp, spec.vocab_size)
    os.replace(tmp, path)
    return path
