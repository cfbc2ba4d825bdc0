"""``tracer.cache(...)`` against real nnsight 0.8.1 run locally: the same keys (less the three nnsight has and the
stages never build: the root's and ``model.model``'s output objects and the rotary embedding), the same values
(fp32, exactly: the same ops ran), recorded after the interventions, per invoke and per generation step."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PROMPTS = ["The Eiffel Tower is located in the city of", "Big Ben is in"]
NOT_BUILT = {"model", "model.model", "model.model.rotary_emb"}


def same(got, want, what):
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want)):
            same(g, w, f"{what}[{i}]")
    elif want is None:
        assert got is None, what
    else:
        assert got.shape == want.shape and (got - want).abs().max().item() <= 1e-5, what


def everything(lm, **placement):
    with lm.trace(PROMPTS, **placement) as tracer:
        cache = tracer.cache()
    return cache


def selected(lm, inside: bool, **placement):
    """Layer 1 (zeroed by the trace, so cached as zeros) and layer 2 (or its MLP), inputs included."""
    modules = [lm.model.layers[1], "model.model.layers.2.mlp" if inside else "model.model.layers.2"]
    with lm.trace(PROMPTS, **placement) as tracer:
        cache = tracer.cache(modules=modules, include_inputs=True)
        lm.model.layers[1].output[:] = 0
        logits = lm.lm_head.output[:, -1].save()
    return cache, logits, tracer


def test_cache_everything_equals_nnsight(local_lm, ns):
    want, got = everything(ns), everything(local_lm, placement="local")
    assert set(want.keys()) - set(got.keys()) == NOT_BUILT and set(got.keys()) <= set(want.keys())
    for key in got.keys():
        same(got[key].output, want[key].output, key)
    same(got.model.model.layers[7].self_attn.o_proj.output, want.model.model.layers[7].self_attn.o_proj.output,
         "navigation")


@pytest.mark.parametrize("placement", ["local", "hybrid", "centralized", "swarm"])
def test_cache_selected_after_interventions(placement, lm_for, ns):
    inside = placement != "swarm"  # Petals-style reaches layer boundaries only
    want, want_logits, _ = selected(ns, inside)
    got, logits, tracer = selected(lm_for(placement), inside, placement=placement)
    assert got.keys() == want.keys()
    for key in want.keys():
        same(got[key].output, want[key].output, f"{key}.output")
        same(got[key].input, want[key].input, f"{key}.input")
    assert got["model.model.layers.1"].output.abs().max() == 0  # recorded after the write
    same(logits, want_logits, "logits")
    if placement == "hybrid":
        assert tracer.stats["round_trips"] == 1


def test_cache_per_invoke_and_per_step(local_lm, ns):
    def per_invoke(lm, **placement):
        with lm.trace(**placement) as tracer:
            with tracer.invoke(PROMPTS[0]):
                pass
            with tracer.invoke(PROMPTS[1]):
                cache = tracer.cache(modules=[lm.model.layers[4]])
        return cache

    def per_step(lm, **placement):
        with lm.generate(PROMPTS[0], max_new_tokens=3, **placement) as tracer:
            cache = tracer.cache(modules=[lm.model.layers[4].mlp])
        return cache
    got, want = per_invoke(local_lm, placement="local"), per_invoke(ns)
    same(got.model.model.layers[4].output, want.model.model.layers[4].output, "invoke 1's rows")
    got, want = per_step(local_lm, placement="local"), per_step(ns)
    assert len(got["model.model.layers.4.mlp"]) == len(want["model.model.layers.4.mlp"]) == 3
    same(tuple(got["model.model.layers.4.mlp"].output), tuple(want["model.model.layers.4.mlp"].output), "steps")


def test_cache_after_a_read_is_refused_like_nnsight(local_lm, ns):
    for lm in (ns, local_lm):
        with pytest.raises(ValueError, match="before reading or modifying"):
            with lm.trace(PROMPTS) as tracer:
                lm.model.layers[1].output
                tracer.cache()
