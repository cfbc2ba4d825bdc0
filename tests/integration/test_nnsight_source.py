"""``module.source`` (operations inside a module's forward) in every placement that can reach them, against real
nnsight 0.8.1 run locally on the same SmolLM2 (fp32, <= 1e-5).

The experiment reads the attention call (``attention_interface_1``) and the output projection's input inside layer 5's
attention (node 1 of the hybrid swarm), halves that projection's output (a setter inside the forward), and reads the
MLP's activation inside layer 25 (node 3) and the logits downstream, so both reading and setting are checked and the
setter's effect travels on. In ``hybrid`` only the inputs, the graph and the saved values cross the client's link.
A greedy generation does the same in every step (later steps run with the nodes' KV cache)."""

from __future__ import annotations

import pytest
import torch

import hybrid
from hybrid.errors import DisallowedOpError, UnknownModuleError, UnknownSourceOpError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PROMPT = "The Eiffel Tower is located in the city of"
TOL = 1e-5


def experiment(lm, **placement):
    with lm.trace(PROMPT, **placement) as tracer:
        attn = lm.model.layers[5].self_attn.source
        call = attn.attention_interface_1.output[0].save()
        o_in = attn.self_o_proj_0.input.save()
        attn.self_o_proj_0.output = attn.self_o_proj_0.output * 0.5
        act = lm.model.layers[25].mlp.source.self_act_fn_0.output[:, -1].save()
        logits = lm.lm_head.output[:, -1].save()
    return (call, o_in, act, logits), tracer


@pytest.fixture(scope="module")
def reference(ns, one_thread):
    """The experiment's values in real nnsight, and the logits without the setter."""
    want, _ = experiment(ns)
    with ns.trace(PROMPT):
        clean = ns.lm_head.output[:, -1].save()
    return want, clean


@pytest.mark.parametrize("placement", ["local", "hybrid", "centralized"])
def test_source_equals_nnsight(placement, lm_for, reference):
    lm = lm_for(placement)
    got, tracer = experiment(lm, placement=placement)
    want, clean = reference
    for name, g, w in zip(("attention_interface_1[0]", "self_o_proj_0.input", "mlp act_fn", "logits"), got, want):
        assert g.shape == w.shape, f"{name}: {tuple(g.shape)} != {tuple(w.shape)}"
        assert (g - w).abs().max().item() <= TOL, name
    assert (got[3] - clean).abs().max() > 1e-3  # the setter inside layer 5's attention changed the logits
    if placement == "hybrid":  # inputs, graph and saves over the client's link: no hidden states
        saved = sum(4 * v.numel() for v in got)
        assert tracer.stats["round_trips"] == 1 and tracer.stats["client_bytes_received"] < saved + 16 * 1024
        assert tracer.stats["client_bytes_sent"] < 32 * 1024


def test_source_names_and_refusals(lm_for):
    lm = lm_for("hybrid")
    names = [op.name for op in lm.model.layers[0].self_attn.source]
    assert names[names.index("attention_interface_0"):][:3] == ["attention_interface_0", "attention_interface_1",
                                                                "attn_output_reshape_0"]
    with pytest.raises(UnknownSourceOpError, match="self_o_proj_0") as refused:  # the valid names are listed
        lm.model.layers[0].self_attn.source.o_proj_0
    assert isinstance(refused.value, (UnknownModuleError, AttributeError))
    with pytest.raises(DisallowedOpError, match="swarm"):  # Petals-style: the client cannot reach inside a layer
        with lm.trace(PROMPT, placement="swarm"):
            lm.model.layers[5].self_attn.source.self_o_proj_0.output.save()
    with pytest.raises(Exception, match="function"):  # the attention function itself is no value
        with lm.trace(PROMPT, placement="hybrid"):
            lm.model.layers[5].self_attn.source.attention_interface_0.output.save()


def generation(lm, **placement):
    """Every step of a greedy generation: the attention call's last position read, the output projection scaled."""
    with lm.generate(PROMPT, max_new_tokens=3, do_sample=False, **placement) as tracer:
        calls = list().save() if not placement else hybrid.save([])
        for step in tracer.iter[:3]:
            attn = lm.model.layers[7].self_attn.source
            calls.append(attn.attention_interface_1.output[0][:, -1])
            attn.self_o_proj_0.output = attn.self_o_proj_0.output * 0.9
        ids = tracer.result.save()
    return calls, ids


def test_source_in_generation_steps_equals_nnsight(lm_for, ns):
    """Steps after the first run with the node's KV cache (one new position): the same operations, the same values."""
    got, ids = generation(lm_for("hybrid"), placement="hybrid")
    want, want_ids = generation(ns)
    assert ids.tolist() == want_ids.tolist() and len(got) == len(want) == 3
    for step, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and (g - w).abs().max().item() <= TOL, f"step {step}"
