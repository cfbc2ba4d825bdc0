"""Attention that is SDPA unless one call asks for its weights: then that call alone runs the eager implementation.

Why: SDPA never materialises the attention pattern, so a module's ``(attn_output, attn_weights)`` has ``None`` for
the weights. A request that reads them (``self_attn.output[1]``) needs eager attention, but only in the attention
modules it reads and only for itself: the node keeps serving every other request, and the other layers of this one,
with SDPA. ``config._attn_implementation`` is shared by every layer and every thread, so switching it per request
would leak into concurrent requests. Instead the span's config names :data:`IMPLEMENTATION`, a registered
transformers attention function that picks per call: a call whose keyword arguments carry
``{WEIGHTS_KWARG: True}`` (a span hook adds it in the attention module's pre-hook) runs the model family's own
``eager_attention_forward``, any other call ``sdpa_attention_forward``. Keyword arguments flow from the attention
module's ``forward(**kwargs)`` into the attention function in every supported family, so nothing global changes.

Masks: :data:`IMPLEMENTATION` builds SDPA's masks (a boolean ``(B, 1, q, kv)`` mask, or ``None`` for a plain causal
one). The eager call turns them into eager's additive float mask exactly as ``masking_utils.eager_mask`` does
(``0`` where attended, the dtype's minimum elsewhere; ``None`` becomes the causal pattern), so the weights equal
transformers' eager attention with the same attention mask, padded rows included.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

IMPLEMENTATION = "swarm_sdpa"
"""The name a span's config uses for :func:`attention_forward` (and SDPA's masks)."""
WEIGHTS_KWARG = "swarm_attention_weights"
"""Keyword argument of an attention module's call: ``True`` runs that call eagerly, with its weights returned."""


def eager_mask_from_sdpa(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """SDPA's mask as eager's additive float mask ``(B or 1, 1, q, kv)``, as ``masking_utils.eager_mask`` makes it."""
    dtype = query.dtype
    if mask is None:  # SDPA skipped a purely causal mask: query i (at kv position kv - q + i) sees keys 0..that
        q, kv = query.shape[2], key.shape[2]
        mask = (torch.arange(q, device=query.device)[:, None] + (kv - q)
                >= torch.arange(kv, device=query.device)[None, :]).view(1, 1, q, kv)
    if mask.dtype != torch.bool:
        return mask  # already additive
    return torch.where(mask, torch.zeros((), device=mask.device, dtype=dtype), torch.finfo(dtype).min)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """SDPA, or the module's family's eager attention (weights returned) when ``kwargs[WEIGHTS_KWARG]`` is true."""
    if not kwargs.pop(WEIGHTS_KWARG, False):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"{type(module).__name__} has no eager attention to materialise its weights with")
    return eager(module, query, key, value, eager_mask_from_sdpa(attention_mask, query, key), **kwargs)


def register() -> str:
    """Register :data:`IMPLEMENTATION` with transformers (idempotent); returns the name for ``_attn_implementation``."""
    if IMPLEMENTATION not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(IMPLEMENTATION, attention_forward)
    if IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    return IMPLEMENTATION
