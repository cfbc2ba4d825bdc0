"""``module.skip(value)`` really skips: the module (and everything inside it) does not run, its output is the value,
and the numbers equal real nnsight 0.8.1 run locally (fp32, exactly: the same ops run). Using a skipped module's
insides is an error, as in nnsight."""

from __future__ import annotations

import pytest
import torch

from hybrid.errors import TraceError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PROMPTS = ["The Eiffel Tower is located in the city of", "Big Ben is in"]
TOL = 1e-5


def skip_layer_and_mlp(lm, inner: bool = True, **placement):
    """Layer 3 skipped (its output is its input); layer 6's MLP skipped (half its input instead)."""
    with lm.trace(PROMPTS, **placement) as tracer:
        lm.model.layers[3].skip(lm.model.layers[3].input)
        skipped = lm.model.layers[3].output.save()
        if inner:
            lm.model.layers[6].mlp.skip(lm.model.layers[6].post_attention_layernorm.output * 0.5)
        hidden = lm.model.layers[10].output[:, -1].save()
        logits = lm.lm_head.output[:, -1].save()
    return (skipped, hidden, logits), tracer


def close(got, want, what):
    assert got.shape == want.shape, f"{what}: {tuple(got.shape)} != {tuple(want.shape)}"
    assert (got - want).abs().max().item() <= TOL, what


@pytest.mark.parametrize("placement", ["local", "hybrid", "centralized", "swarm"])
def test_skip_equals_nnsight(placement, lm_for, ns):
    inner = placement != "swarm"  # Petals-style reaches layer boundaries only: it skips whole layers
    want, _ = skip_layer_and_mlp(ns, inner)
    got, _ = skip_layer_and_mlp(lm_for(placement), inner, placement=placement)
    for g, w, what in zip(got, want, ("layer 3 output (= its input)", "layer 10, last position", "logits")):
        close(g, w, what)


def test_skipped_modules_do_not_run(local_lm):
    model = local_lm.local_model
    ran: list[str] = []
    watched = {"model.layers.3.self_attn": model.model.layers["3"].self_attn,
               "model.layers.3.mlp": model.model.layers["3"].mlp,
               "model.layers.6.mlp.act_fn": model.model.layers["6"].mlp.act_fn,
               "model.layers.6.self_attn": model.model.layers["6"].self_attn}
    handles = [m.register_forward_hook(lambda *a, name=name: ran.append(name)) for name, m in watched.items()]
    try:
        skip_layer_and_mlp(local_lm, placement="local")
    finally:
        for handle in handles:
            handle.remove()
    assert ran == ["model.layers.6.self_attn"]  # layer 3 and layer 6's MLP never ran


@pytest.mark.parametrize("order", ["after", "before"])
def test_using_inside_a_skipped_module_is_an_error(order, local_lm, ns):
    def misuse(lm):
        with lm.trace(PROMPTS):
            if order == "before":
                previous = lm.model.layers[2].output
                lm.model.layers[3].mlp.output.save()
                lm.model.layers[3].skip(previous)
            else:
                lm.model.layers[3].skip(lm.model.layers[3].input)
                lm.model.layers[3].mlp.output.save()
    with pytest.raises(TraceError, match="model.layers.3.mlp.output"):
        misuse(local_lm)
    if order == "after":  # nnsight: the model already ran past it
        with pytest.raises(Exception, match="mlp.output"):
            misuse(ns)
