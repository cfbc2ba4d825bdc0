"""Attention weights on the ``--local`` backend: a request that names an attention module runs with eager attention.

Why: the local backend holds transformers' model with SDPA attention, which never materialises the attention pattern,
so ``self_attn.output[1]`` would be ``None``. The swarm backend's nodes answer such a read with eager attention for
that call (:mod:`swarm.attention`); here a worker runs one request at a time, so the request that names an attention
module (``lm.model.layers[2].self_attn``, by the attribute name the model gives its attention modules) runs with the
model's ``_attn_implementation`` set to ``"eager"`` for its duration, and the weights equal transformers' (and
nnsight's) with ``attn_implementation="eager"``. Every other value of that request equals SDPA's within float
rounding (≤ 1e-6 at fp32). A request that never names the module (reaches it another way) gets what local nnsight
on an SDPA model gets: ``None``.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch


def attention_names(model: torch.nn.Module) -> frozenset[str]:
    """The attribute names under which ``model`` holds its attention modules (``{"self_attn"}`` for Llama)."""
    return frozenset(path.rsplit(".", 1)[-1] for path, module in model.named_modules()
                     if path and type(module).__name__.endswith("Attention"))


def names_attention(sources: list[str], names: frozenset[str]) -> bool:
    """Whether any of the request's sources names an attention module (as an identifier, not inside a longer one)."""
    if not names:
        return False
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(names))) + r")\b")
    return any(pattern.search(source) for source in sources)


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """``model`` runs eager attention (and eager's masks) inside the block; its implementation is restored after."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before
