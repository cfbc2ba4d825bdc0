"""Attention patterns (``self_attn.output[1]``) in every placement that can reach them, against real nnsight 0.8.1
run locally with ``attn_implementation="eager"`` and plain transformers' ``output_attentions=True``.

The nodes run SDPA; a request that reads an attention module's weights runs that module's call eagerly (and only
that one: the rest of the request, and every other request, stays SDPA). So the weights equal eager attention's
(fp32, <= 1e-5) and the hidden states stay SDPA's (<= 1e-5 at the prompts' real positions; at left-padding
positions, whose every key is masked, SDPA and eager legitimately differ, so those are compared for the weights only,
where eager makes them uniform in both)."""

from __future__ import annotations

import pytest
import torch

from hybrid.errors import DisallowedOpError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PROMPTS = ["The Eiffel Tower is located in the city of", "Big Ben is in"]  # left-padded together
TOL = 1e-5


@pytest.fixture(scope="module")
def ns_eager(smollm2_dir):
    """Real nnsight 0.8.1 on SmolLM2 with eager attention (its weights exist), fp32, locally."""
    import nnsight
    return nnsight.LanguageModel(str(smollm2_dir), dispatch=True, dtype=torch.float32, attn_implementation="eager")


def patterns(lm, **placement):
    """Layer 5's whole pattern, layer 25's last-query row (another node in the hybrid swarm), layer 5's output."""
    with lm.trace(PROMPTS, **placement) as tracer:
        early = lm.model.layers[5].self_attn.output[1].save()
        hidden = lm.model.layers[5].output.save()
        late = lm.model.layers[25].self_attn.output[1][:, :, -1].save()
    return (early, late, hidden), tracer


def per_invoke(lm, **placement):
    """Two invokes, each reading its own rows of layer 3's pattern (and the first also the attention output)."""
    with lm.trace(**placement) as tracer:
        with tracer.invoke(PROMPTS[0]):
            first = lm.model.layers[3].self_attn.output[1].save()
            out = lm.model.layers[3].self_attn.output[0].save()
        with tracer.invoke(PROMPTS[1]):
            second = lm.model.layers[3].self_attn.output[1].sum(-1).save()
    return (first, second, out), tracer


def close(got, want, what, tol=TOL):
    assert got.shape == want.shape, f"{what}: {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got.float() - want.float()).abs().max().item()
    assert diff <= tol, f"{what}: max abs diff {diff}"


@pytest.mark.parametrize("placement", ["local", "hybrid", "centralized"])
def test_attention_weights_equal_eager(placement, lm_for, ns, ns_eager):
    lm = lm_for(placement)
    (early, late, hidden), tracer = patterns(lm, placement=placement)
    (want_early, want_late, _), _ = patterns(ns_eager)
    close(early, want_early, "layer 5 attention weights")
    close(late, want_late, "layer 25 attention weights, last query")
    mask = lm.tokenize(PROMPTS)[1].bool()
    with ns.trace(PROMPTS):
        sdpa_hidden = ns.model.layers[5].output.save()
    close(hidden[mask], sdpa_hidden[mask], "layer 5 output (SDPA elsewhere), real positions")
    if placement == "local":  # plain transformers, eager, with the same mask and nnsight's positions
        from hybrid.tracing import nnsight_position_ids
        ids, attention_mask = lm.tokenize(PROMPTS)
        with torch.no_grad():
            ref = ns_eager._module(input_ids=ids, attention_mask=attention_mask, output_attentions=True,
                                  position_ids=nnsight_position_ids(attention_mask))
        close(early, ref.attentions[5], "layer 5 vs transformers output_attentions")
        close(late, ref.attentions[25][:, :, -1], "layer 25 vs transformers output_attentions")
    if placement == "hybrid":  # inputs, graph and saves over the client's link: no hidden states
        saved = 4 * (early.numel() + late.numel() + hidden.numel())
        assert tracer.stats["round_trips"] == 1 and tracer.stats["client_bytes_received"] < saved + 16 * 1024


@pytest.mark.parametrize("placement", ["local", "hybrid"])
def test_attention_weights_per_invoke(placement, lm_for, ns_eager):
    got, _ = per_invoke(lm_for(placement), placement=placement)
    want, _ = per_invoke(ns_eager)
    close(got[0], want[0], "invoke 0's pattern")
    close(got[1], want[1], "invoke 1's pattern, summed over keys")
    close(got[2], want[2], "invoke 0's attention output (its row has no padding)")


def test_attention_weights_swarm_placement_says_why(remote_lm):
    with pytest.raises(DisallowedOpError, match="self_attn.*inside a layer"):
        patterns(remote_lm, placement="swarm")
