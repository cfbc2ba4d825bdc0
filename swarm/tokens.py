"""The checkpoint's tokenizer, and the tokens that end a generation.

A model comes with its tokenizer (``SwarmModel.tokenizer``, ``hybrid.LanguageModel.tokenizer``), loaded from the same
local checkpoint directory as the weights, so the ids a researcher feeds in are the ids the nodes were built for.

Generation stops where transformers' ``generate`` stops on the same checkpoint: at the generation config's
``eos_token_id`` (an int or a list). Chat checkpoints often name only one of their end markers there, so the
tokenizer's own EOS and the end-of-turn markers of common chat templates (:data:`END_OF_TURN`, where the vocabulary has
them) stop it too; without them a chat model's answer runs on into ``<|im_end|>\\n<|im_start|>assistant ...``. A row
that has stopped emits ``pad_token_id`` until every row has, as transformers pads finished rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger(__name__)

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
"""End-of-turn markers of common chat templates (ChatML, Llama 3, Gemma, Phi-3); each stops a generation where the
checkpoint's tokenizer has it as a token."""


def load_tokenizer(path: Path) -> Any:
    """The tokenizer stored with the checkpoint at ``path``, padding on the left (as decoder-only generation needs),
    its pad token the EOS where it has none; None for a checkpoint without tokenizer files (token ids only)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        logger.debug("no tokenizer in %s: %s", path, e)
        return None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass(frozen=True)
class StopTokens:
    """Which tokens end a row (``eos``) and what a finished row emits afterwards (``pad``)."""

    eos: tuple[int, ...] = ()
    """Empty: never stop early."""
    pad: int | None = None

    @classmethod
    def of(cls, eos: int | Sequence[int] | None, pad: int | None) -> "StopTokens":
        """From ``generate``'s ``eos_token_id`` (an int, a list, or None for never) and ``pad_token_id`` (None: the
        first EOS, as transformers does)."""
        ids = () if eos is None else (int(eos),) if isinstance(eos, int) else tuple(int(i) for i in eos)
        return cls(ids, pad if pad is not None else (ids[0] if ids else None))


def checkpoint_stop_tokens(path: Path, config: Any, tokenizer: Any) -> StopTokens:
    """The stop tokens of the checkpoint at ``path`` (see the module doc): its generation config's EOS (else the model
    config's), the tokenizer's EOS and any :data:`END_OF_TURN` marker the tokenizer knows; pad from the generation
    config, the model config or the tokenizer, else the first EOS."""
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):
        generation = GenerationConfig()
    eos: list[int] = []
    for source in (generation.eos_token_id if generation.eos_token_id is not None else config.eos_token_id,
                   tokenizer.eos_token_id if tokenizer is not None else None):
        for i in ([] if source is None else [source] if isinstance(source, int) else source):
            if int(i) not in eos:
                eos.append(int(i))
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        eos += [vocab[t] for t in END_OF_TURN if t in vocab and vocab[t] not in eos]
    pad = next((p for p in (generation.pad_token_id, getattr(config, "pad_token_id", None),
                            tokenizer.pad_token_id if tokenizer is not None else None) if p is not None), None)
    return StopTokens.of(eos, pad)
