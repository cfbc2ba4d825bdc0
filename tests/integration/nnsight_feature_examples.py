"""One small example per row of docs/nnsight_features.md, in nnsight 0.8.1's spelling, run by
tests/integration/test_nnsight_features.py in each placement. Each takes ``(lm, placement)`` and returns nothing: a
row marked supported must run, a row marked unsupported must raise the error the table names."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import hybrid

PROMPT = "The Eiffel Tower is located in the city of"
OTHER = "Big Ben is located in the city of the"


def trace_read_patch(lm, placement):
    with lm.trace([PROMPT, OTHER], placement=placement):
        h = lm.model.layers[4].output
        h[1, -1, :] = h[0, -1, :]
        out = lm.lm_head.output[:, -1].save()
    assert out.shape[0] == 2


def submodule(lm, placement):
    with lm.trace(PROMPT, placement=placement):
        mlp = lm.model.layers[3].mlp.output[:, -1].save()
    assert mlp.shape == (1, lm.config.hidden_size)


def root_output(lm, placement):
    with lm.trace(PROMPT, placement=placement):
        logits = lm.output.logits[:, -1].save()
    assert logits.shape == (1, lm.config.vocab_size)


def root_inputs(lm, placement):
    with lm.trace(PROMPT, placement=placement):
        inputs = lm.inputs.save()
    assert inputs[0] == () and inputs[1]["input_ids"].shape == (1, 10)


def generator_output(lm, placement):
    with lm.generate(PROMPT, max_new_tokens=2, placement=placement):
        ids = lm.generator.output.save()
    assert ids.shape == (1, 12)


def generation_loop(lm, placement):
    with lm.generate(PROMPT, max_new_tokens=2, placement=placement) as tracer:
        probs = hybrid.save([])
        for step in tracer.iter[:2]:
            lm.model.layers[4].output[:, -1] *= 1.1
            probs.append(lm.lm_head.output[:, -1].softmax(-1).max(-1).values)
        ids = tracer.result.save()
    assert len(probs) == 2 and ids.shape[1] >= 2


def block_forms(lm, placement):
    with lm.generate(PROMPT, max_new_tokens=2, placement=placement) as tracer:
        probs = hybrid.save([])
        with tracer.iter[0:1]:
            lm.model.layers[4].output[:, -1] *= 1.1
        with tracer.all():
            probs.append(lm.lm_head.output[:, -1].softmax(-1).max(-1).values)
    assert len(probs) == 2


def session_values(lm, placement):
    with lm.session():
        with lm.trace(PROMPT, placement=placement):
            h = lm.model.layers[4].output
        with lm.trace(OTHER, placement=placement):
            lm.model.layers[4].output[:, -1] = (h * 2)[:, -1]
            out = lm.lm_head.output[:, -1].save()
    assert out.shape == (1, lm.config.vocab_size)


def barrier(lm, placement):
    with lm.trace(placement=placement) as tracer:
        meet = tracer.barrier(2)
        with tracer.invoke(PROMPT):
            h = lm.model.layers[4].output[:, -1]
            meet()
        with tracer.invoke(OTHER):
            meet()
            lm.model.layers[4].output[:, -1] = h
            out = lm.lm_head.output[:, -1].save()
    assert out.shape == (1, lm.config.vocab_size)


def early_stop(lm, placement):
    with lm.trace(PROMPT, placement=placement) as tracer:
        h = lm.model.layers[2].output.save()
        tracer.stop()
    assert h.shape[0] == 1


def skip(lm, placement):
    with lm.trace(PROMPT, placement=placement):
        lm.model.layers[3].skip(lm.model.layers[3].input)
        out = lm.lm_head.output[:, -1].save()
    assert out.shape == (1, lm.config.vocab_size)


class _Sae(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.enc = nn.Parameter(torch.randn(4 * d, d, generator=g) / d ** 0.5)
        self.dec = nn.Parameter(torch.randn(d, 4 * d, generator=g) / (4 * d) ** 0.5)

    def forward(self, x):
        return F.linear(F.relu(F.linear(x, self.enc)), self.dec)


def user_module(lm, placement):
    sae = _Sae(lm.config.hidden_size)
    with lm.trace(PROMPT, placement=placement):
        lm.model.layers[4].output = sae(lm.model.layers[4].output)
        out = lm.lm_head.output[:, -1].save()
    assert out.shape == (1, lm.config.vocab_size)


def gradients(lm, placement):
    with lm.trace(PROMPT, placement=placement):
        h = lm.model.layers[4].output
        h.requires_grad_(True)
        logits = lm.lm_head.output[:, -1]
        with logits.max().backward():
            g = h.grad.save()
    assert g.shape == (1, 10, lm.config.hidden_size)


def attention_weights(lm, placement):
    with lm.trace(PROMPT, placement=placement):
        weights = lm.model.layers[2].self_attn.output[1].save()
    heads = lm.config.num_attention_heads
    assert weights.shape == (1, heads, 10, 10) and torch.allclose(weights.sum(-1), torch.ones(1, heads, 10))


def cache(lm, placement):
    with lm.trace(PROMPT, placement=placement) as tracer:
        cached = tracer.cache(modules=[lm.model.layers[3], "model.model.layers.3.mlp"])
    assert cached["model.model.layers.3"].output.shape == (1, 10, lm.config.hidden_size)
    assert cached.model.model.layers[3].mlp.output.shape == (1, 10, lm.config.hidden_size)


def scan(lm, placement):
    with lm.scan(PROMPT):
        shape = tuple(lm.model.layers[2].output.shape)
    assert shape == (1, 10, lm.config.hidden_size)


def edit(lm, placement):
    with lm.edit() as (tracer, edited):
        edited.model.layers[2].output[:] = 0
    with edited.trace(PROMPT, placement=placement):
        zeroed = edited.model.layers[2].output.save()
    edited.clear_edits()
    with edited.trace(PROMPT, placement=placement):
        clean = edited.model.layers[2].output.save()
    assert zeroed.abs().max() == 0 and clean.abs().max() > 0


def source(lm, placement):
    with lm.trace(PROMPT, placement=placement):
        attn = lm.model.layers[2].self_attn.source
        call = attn.attention_interface_1.output[0].save()
        o_in = attn.self_o_proj_0.input.save()
        attn.self_o_proj_0.output = attn.self_o_proj_0.output * 0.5
    heads = lm.config.num_attention_heads
    assert call.shape == (1, 10, heads, lm.config.hidden_size // heads)
    assert torch.equal(o_in, call.reshape(1, 10, -1))


EXAMPLES = {f.__name__: f for f in (
    trace_read_patch, submodule, root_output, root_inputs, generator_output, generation_loop, block_forms,
    session_values, barrier, early_stop, skip, user_module, gradients, attention_weights, cache, scan, edit, source)}
