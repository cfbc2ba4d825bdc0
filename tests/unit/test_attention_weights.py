"""Which attention calls run eagerly (:mod:`hybrid.attention_weights`), and the mask the eager call uses
(:mod:`swarm.attention`): equal to transformers' own eager mask, padded rows and a KV cache offset included."""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import causal_mask_function, eager_mask, sdpa_mask

from hybrid.attention_weights import is_attention, weight_reads
from hybrid.tracing import ModelSkeleton, Tracer, root_envoy
from swarm.attention import eager_mask_from_sdpa
from tests.tiny_checkpoints import tiny_config


@pytest.fixture(scope="module")
def skeleton() -> ModelSkeleton:
    return ModelSkeleton(tiny_config("llama", num_layers=2))


def graph_of(skeleton, body, prompts=((5, 6, 7), (8, 9))):
    def tokenize(rows):
        width = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (width - len(r)) + list(r) for r in rows])
        return ids, (ids != 0).long()
    root = root_envoy(skeleton)
    tracer = Tracer(skeleton, tokenize, lambda *a: None, [list(p) for p in prompts])
    with tracer:
        body(root)
    return tracer.graph


def flagged(skeleton, graph):
    return weight_reads(graph, lambda path: is_attention(skeleton.module(path)))


def test_only_reads_of_the_weights_run_eagerly(skeleton):
    attn = "model.layers.1.self_attn"
    output_only = graph_of(skeleton, lambda lm: lm.model.layers[1].self_attn.output[0].save())
    assert flagged(skeleton, output_only) == set()
    weights = graph_of(skeleton, lambda lm: lm.model.layers[1].self_attn.output[1][:, 0].save())
    assert flagged(skeleton, weights) == {(attn, 0)}
    whole = graph_of(skeleton, lambda lm: lm.model.layers[1].self_attn.output.save())
    assert flagged(skeleton, whole) == {(attn, 0)}


@pytest.mark.parametrize("q, kv, padded", [(5, 5, True), (5, 5, False), (1, 6, True), (1, 6, False), (3, 7, True)])
def test_eager_mask_from_sdpa_equals_transformers_eager_mask(q, kv, padded):
    padding = torch.ones(2, kv, dtype=torch.bool)
    if padded:
        padding[1, :2] = False  # row 1 left-padded by two
    kwargs = dict(batch_size=2, q_length=q, kv_length=kv, q_offset=kv - q, mask_function=causal_mask_function,
                  attention_mask=padding)
    want = eager_mask(dtype=torch.float32, **kwargs)
    sdpa = sdpa_mask(allow_is_causal_skip=True, **kwargs)
    assert (sdpa is None) == (not padded)  # SDPA skips a purely causal mask; the eager call must rebuild it
    query, key = torch.zeros(2, 3, q, 4), torch.zeros(2, 1, kv, 4)
    got = eager_mask_from_sdpa(sdpa, query, key)
    assert torch.equal(got.expand_as(want), want)


@pytest.mark.parametrize("family", ["mistral", "qwen3"])  # llama: SmolLM2 in the integration tests
def test_eager_calls_equal_transformers_eager(family, tmp_path):
    """Every layer's call asked for weights: the weights (and the logits at real positions) equal transformers' own
    eager model with output_attentions, left padding and mistral's sliding window (24 tokens > 16) included."""
    from transformers import AutoModelForCausalLM

    from swarm.attention import WEIGHTS_KWARG
    from swarm.stages import Span, SpanModel
    from tests.tiny_checkpoints import make_tiny_checkpoint

    path = make_tiny_checkpoint(family, tmp_path / family)
    model = SpanModel.load(path, Span(0, 4, embed=True, head=True))
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    weights = {}
    for i in range(4):
        attn = model.model.layers[str(i)].self_attn
        attn.register_forward_pre_hook(lambda m, args, kwargs: (args, {**kwargs, WEIGHTS_KWARG: True}),
                                       with_kwargs=True)
        attn.register_forward_hook(lambda m, args, out, i=i: weights.__setitem__(i, out[1]))
    with torch.no_grad():
        logits = model(ids, embed=True, head=True, attention_mask=mask)
        want = ref(input_ids=ids, attention_mask=mask, output_attentions=True)
    for i in range(4):
        assert (weights[i] - want.attentions[i]).abs().max() <= 1e-6, f"layer {i}"
    assert (logits - want.logits)[mask.bool()].abs().max() <= 1e-5
