"""The experiments a worker times, one repetition per :meth:`Experiment.run` call, the same in every placement.

Workload names follow :data:`bench.schema.WORKLOADS`; each maps to an experiment here (``setup_time`` and
``setup_time`` reuses ``remote_inference``; ``patching_vs_size`` and ``concurrency`` reuse ``patching``):

- ``remote_inference``: a plain forward of the batch; the client gets the last position's logits ``(B, V)``.
- ``patching``: activation patching at one layer (last position, clean rows → corrupted rows); the client gets
  the corrupted rows' last-position logits ``(B/2, V)``, as a Petals client that patches locally would.
- ``ioi_patching``: :func:`bench.ioi.patch_and_measure` (IOI batch 32 on SmolLM2; only logit diffs return).
- ``attribution_patching``: :func:`bench.ioi.attribution_patching` (IOI batch 32 on SmolLM2, one trace: forward of
  clean + corrupted rows, backward of the corrupted logit difference; only the ``(n, T)`` attribution of every
  layer's output comes back in ``hybrid``).
- ``logit_lens``: every layer's last-position hidden state through the final norm and LM head (on the node that
  holds the head in ``hybrid``: hidden states are carried there and decoded in one batch); top-k ids return.
- ``steering_generation``: greedy generation of ``new_tokens`` tokens (``lm.generate``, KV cache on the nodes) with
  a steering vector added to one layer's output at the last position of every step (``tracer.all()``).

Inputs are token ids (made from prompts or random with a seed), so the Petals worker can run the same batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .errors import BenchConfigError

EXPERIMENTS = ("remote_inference", "patching", "ioi_patching", "attribution_patching", "logit_lens",
               "steering_generation")
WORKLOAD_EXPERIMENT = {"setup_time": "remote_inference", "patching_vs_size": "patching", "concurrency": "patching",
                       **{name: name for name in EXPERIMENTS}}
"""Which experiment each workload times."""
IOI_EXPERIMENTS = ("ioi_patching", "attribution_patching")
"""Experiments on :func:`bench.ioi.ioi_batch` prompts (``batch // 2`` clean/corrupted pairs)."""


@dataclass(frozen=True)
class ExperimentConfig:
    """What one experiment runs on (resolved by the CLI, recorded in every result)."""

    experiment: str
    """One of :data:`EXPERIMENTS`."""
    batch: int = 2
    """Rows of the batch (even for patching: half clean, half corrupted)."""
    seq_len: int = 16
    """Tokens per row for token-id batches (IOI: set by the prompts)."""
    layer: int | None = None
    """Patched / steered layer; None = the middle layer."""
    top_k: int = 5
    """Logit lens: ids returned per layer."""
    new_tokens: int = 8
    """Steering: tokens generated."""
    steering_scale: float = 4.0
    """Steering: the norm of the vector added (a seeded random direction)."""
    seed: int = 0


def token_batch(vocab_size: int, batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``(batch, seq_len)`` random token ids in ``[3, vocab_size)`` (clear of special ids), reproducible by seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, seq_len), generator=generator)


class Experiment:
    """One workload prepared on one :class:`hybrid.LanguageModel`; :meth:`run` is one timed repetition."""

    def __init__(self, lm, config: ExperimentConfig):
        if config.experiment not in EXPERIMENTS:
            raise BenchConfigError(f"unknown experiment {config.experiment!r}; known: {', '.join(EXPERIMENTS)}")
        self.lm, self.config = lm, config
        self.num_layers = lm.config.num_hidden_layers
        self.layer = config.layer if config.layer is not None else self.num_layers // 2
        if not 0 <= self.layer < self.num_layers:
            raise BenchConfigError(f"layer {self.layer} is outside this model's 0..{self.num_layers - 1}")
        if config.experiment in IOI_EXPERIMENTS:
            from .ioi import ioi_batch
            self.ioi = ioi_batch(lm.tokenizer, pairs=config.batch // 2, seed=config.seed)
            self.ids, _ = lm.tokenize(self.ioi.prompts)
        else:
            if config.experiment == "patching" and config.batch % 2:
                raise BenchConfigError(f"patching needs an even batch (clean + corrupted rows); got {config.batch}")
            self.ids = token_batch(lm.config.vocab_size, config.batch, config.seq_len, config.seed)
        hidden = lm.config.hidden_size
        direction = torch.randn(hidden, generator=torch.Generator().manual_seed(config.seed + 1))
        self.steering = direction / direction.norm() * config.steering_scale

    @property
    def batch(self) -> int:
        return int(self.ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[1])

    def run(self, placement: str) -> tuple[dict, dict]:
        """One repetition in ``placement`` (``local`` for hpc); returns ``(tracer.stats, extra)``."""
        return getattr(self, "_" + self.config.experiment)(placement)

    def reference(self, placement: str) -> dict:
        """Timings the worker measures after a repetition, outside its wall time, for the figure to compare with.
        Logit lens: its *floor* in this placement, ``floor_s`` = ``plain_forward_s`` (a plain forward reading the
        last logits, as ``remote_inference``, link time included) + ``projection_s`` (one batched ``(layers × batch,
        hidden)`` projection through the final norm, the head and top-k here, what the lens adds at best). Other
        workloads: nothing."""
        if self.config.experiment != "logit_lens":
            return {}
        t0 = time.perf_counter()
        self._remote_inference(placement)
        plain_s = time.perf_counter() - t0
        model = self.lm.local_model if placement == "local" else self.lm.client.local
        norm, head = model.get_submodule("model.norm"), model.get_submodule("lm_head")
        hidden = torch.randn(self.num_layers * self.batch, self.lm.config.hidden_size,
                             generator=torch.Generator().manual_seed(self.config.seed), dtype=head.weight.dtype)
        t0 = time.perf_counter()
        with torch.no_grad():
            head(norm(hidden)).topk(self.config.top_k, dim=-1)
        projection_s = time.perf_counter() - t0
        return {"floor_s": plain_s + projection_s, "plain_forward_s": plain_s, "projection_s": projection_s}

    # ---- experiments ----------------------------------------------------------------------------------------

    def _remote_inference(self, placement):
        lm = self.lm
        with lm.trace(self.ids, placement=placement) as tracer:
            logits = lm.lm_head.output[:, -1].save()
        return tracer.stats, {"argmax": _value(logits).argmax(-1).tolist()}

    def _patching(self, placement):
        lm, n, layer = self.lm, self.batch // 2, self.layer
        with lm.trace(self.ids, placement=placement) as tracer:
            h = lm.model.layers[layer].output
            h[n:, -1, :] = h[:n, -1, :]
            logits = lm.lm_head.output[n:, -1].save()
        return tracer.stats, {"layer": layer, "argmax": _value(logits).argmax(-1).tolist()}

    def _ioi_patching(self, placement):
        from .ioi import patch_and_measure
        diff, stats = patch_and_measure(self.lm, self.ioi, self.layer, placement=placement)
        diff = _value(diff)
        return stats, {"layer": self.layer, "logit_diff_mean": float(diff.mean())}

    def _attribution_patching(self, placement):
        from .ioi import attribution_patching
        attr, stats = attribution_patching(self.lm, self.ioi, placement=placement)
        per_layer = torch.stack([_value(a).sum(0) for a in attr])          # (L, T): summed over pairs
        layer, position = divmod(int(per_layer.abs().argmax()), per_layer.shape[1])
        return stats, {"layers": len(attr), "s2_position": self.ioi.s2_position, "top_layer": layer,
                       "top_position": position, "top_attribution": float(per_layer[layer, position]),
                       "total_attribution": float(per_layer.sum())}

    def _logit_lens(self, placement):
        import hybrid
        lm, k = self.lm, self.config.top_k
        with lm.trace(self.ids, placement=placement) as tracer:
            tops = [hybrid.save(lm.lm_head(lm.model.norm(lm.model.layers[i].output[:, -1])).topk(k, dim=-1)[1])
                    for i in range(self.num_layers)]
        final = _value(tops[-1])[:, 0].tolist()
        return tracer.stats, {"top_k": k, "layers": self.num_layers, "final_top1": final}

    def _steering_generation(self, placement):
        lm, layer, vector = self.lm, self.layer, self.steering
        with lm.generate(self.ids, max_new_tokens=self.config.new_tokens, eos_token_id=None,
                         placement=placement) as tracer:
            for _ in tracer.iter[:self.config.new_tokens]:
                lm.model.layers[layer].output[:, -1] += vector
            ids = tracer.result.save()
        tokens = _value(ids)[:, self.seq_len:]
        return tracer.stats, {"layer": layer, "new_tokens": int(tokens.shape[1]), "tokens": tokens.tolist()}


def _value(x):
    """A saved value as a plain tensor (hybrid returns tensors; tolerate a ``.value`` wrapper)."""
    return getattr(x, "value", x)


def plain_inputs(model_dir, config: ExperimentConfig) -> dict:
    """The experiment's inputs as plain data, for a worker that cannot tokenize (the Petals venv's tokenizers is
    too old for our tokenizer files): ``ids`` (B, T) and, for IOI, the patch position and answer token ids."""
    from transformers import AutoConfig, AutoTokenizer

    model_config = AutoConfig.from_pretrained(model_dir)
    layer = config.layer if config.layer is not None else model_config.num_hidden_layers // 2
    if config.experiment in IOI_EXPERIMENTS:
        from .ioi import ioi_batch
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        batch = ioi_batch(tokenizer, pairs=config.batch // 2, seed=config.seed)
        ids = tokenizer(batch.prompts, return_tensors="pt").input_ids
        return {"ids": ids.tolist(), "layer": layer, "s2_position": batch.s2_position,
                "io_tokens": batch.io_tokens.tolist(), "s_tokens": batch.s_tokens.tolist()}
    ids = token_batch(model_config.vocab_size, config.batch, config.seq_len, config.seed)
    return {"ids": ids.tolist(), "layer": layer}
