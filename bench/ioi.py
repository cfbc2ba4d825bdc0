"""Indirect-object identification (IOI) prompts from a template, and the activation-patching experiment on them.

A *clean* prompt names the indirect object (IO) once and the subject (S) twice and ends where the IO should come:
"When Mary and John went to the store, John gave a drink to" → " Mary". Its *corrupted* twin swaps which name
repeats, so the answer flips. Patching layer ``l``'s output at the second subject position from the clean run into
the corrupted run and reading the logit difference (IO − S) at the last position shows where the model moves
the name information.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

NAMES = (" Mary", " John", " Tom", " James", " Anna", " Sarah", " David", " Paul", " Lisa", " Mark", " Kate", " Jack",
         " Emma", " Peter", " Alice", " Bob", " Michael", " Laura", " Daniel", " Rachel")
TEMPLATE = "When{A} and{B} went to the store,{B} gave a drink to"


@dataclass(frozen=True)
class IOIBatch:
    """``2 n`` prompts: rows ``[0, n)`` clean, rows ``[n, 2n)`` their corrupted twins, all of one length."""

    prompts: list[str]
    io_tokens: torch.Tensor
    """(n,) token id of each clean prompt's answer (the IO name)."""
    s_tokens: torch.Tensor
    """(n,) token id of the repeated subject name."""
    s2_position: int
    """Token position of the second subject mention (the patched position)."""


def ioi_batch(tokenizer, pairs: int = 16, seed: int = 0) -> IOIBatch:
    """Build ``pairs`` clean/corrupted prompt pairs (so a batch of ``2 * pairs``), every name a single token."""
    rng = random.Random(seed)
    clean, corrupt, io, s = [], [], [], []
    template = TEMPLATE
    for _ in range(pairs):
        a, b = rng.sample(NAMES, 2)
        clean.append(template.format(A=a, B=b))        # answer a
        corrupt.append(template.format(A=b, B=a))      # answer b: the subject repeats the other name
        io.append(_single_token(tokenizer, a))
        s.append(_single_token(tokenizer, b))
    lengths = {len(tokenizer(p).input_ids) for p in clean + corrupt}
    if len(lengths) != 1:
        raise ValueError(f"IOI prompts must tokenize to one length; got {sorted(lengths)}")
    parts = template.split("{B}")
    prefix = parts[0] + "{B}" + parts[1] + "{B}"  # through the second mention of B
    s2 = len(tokenizer(prefix.format(A=" Mary", B=" John")).input_ids) - 1  # position of the second B token
    return IOIBatch(clean + corrupt, torch.tensor(io), torch.tensor(s), s2)


def _single_token(tokenizer, name: str) -> int:
    ids = tokenizer(name).input_ids
    if len(ids) != 1:
        raise ValueError(f"name {name!r} is not a single token")
    return ids[0]


def patch_and_measure(lm, batch: IOIBatch, layer: int, *, placement: str):
    """Patch ``layer``'s output at S2 from clean into corrupted rows; return (per-pair logit diffs, stats).

    The logit difference IO − S (of the clean answer) is computed where the logits are, and only that (n,)
    vector comes back.
    """
    import hybrid

    n = len(batch.io_tokens)
    pick = torch.stack([batch.io_tokens, batch.s_tokens], dim=1)  # (n, 2)
    with lm.trace(batch.prompts, placement=placement) as tracer:
        h = lm.model.layers[layer].output
        h[n:, batch.s2_position, :] = h[:n, batch.s2_position, :]
        last = lm.lm_head.output[n:, -1, :]                        # (n, V) corrupted rows
        pair = last.gather(1, pick)                                # (n, 2)
        diff = hybrid.save(pair[:, 0] - pair[:, 1])
    return diff, tracer.stats


def attribution_patching(lm, batch: IOIBatch, *, placement: str):
    """Attribution patching (gradient × activation difference) for every layer's output at every position, in one
    trace: the clean and corrupted rows run together; per layer ``delta = h[:n] - h[n:]`` (clean − corrupt) is taken
    in the forward, then the backward of the corrupted rows' logit difference (IO − S, last position, summed)
    gives ``attr[L] = (delta[L] * h[L].grad[n:]).sum(-1)``, an estimate of how much patching that layer's output
    at each position from clean into corrupt would move the metric.

    Returns:
        ``(attributions, stats)``: a list of ``(n, T)`` tensors, index ``L`` for layer ``L``, and ``tracer.stats``.
        In ``hybrid`` only these come back; the deltas and gradients stay on the nodes.
    """
    import hybrid

    n = len(batch.io_tokens)
    layers = lm.config.num_hidden_layers
    pick = torch.stack([batch.io_tokens, batch.s_tokens], dim=1)  # (n, 2)
    attr = [None] * layers
    with lm.trace(batch.prompts, placement=placement) as tracer:
        acts, deltas = [], []
        for layer in range(layers):
            h = lm.model.layers[layer].output                      # (2n, T, D)
            acts.append(h)
            deltas.append(h[:n] - h[n:])                           # (n, T, D) clean − corrupt
        pair = lm.lm_head.output[n:, -1, :].gather(1, pick)        # (n, 2) corrupted rows
        metric = (pair[:, 0] - pair[:, 1]).sum()
        with metric.backward():                                    # gradients in reverse module order
            for layer in reversed(range(layers)):
                attr[layer] = hybrid.save((deltas[layer] * acts[layer].grad[n:]).sum(-1))   # (n, T)
    return attr, tracer.stats
