"""The root model's inputs (``lm.inputs``), ``lm.generator.output``, statements after an open step loop, and attention
weights in generation steps after the first, against real nnsight 0.8.1 run locally (and plain transformers' eager
attention with ``output_attentions``), in each placement.

- ``lm.inputs`` is nnsight's ``((), {"input_ids", "attention_mask"[, "position_ids"]})``, narrowed per invoke; the
  client knows it, so in ``hybrid`` it adds nothing to the link (one round trip, saves only back).
- ``lm.generator.output`` is the generated ids, as ``tracer.result`` (nnsight gives the same tensor), per invoke.
- nnsight never runs what follows ``for step in tracer.all():`` in its invoke (it warns and skips it): we refuse
  such a statement with ``TraceError``; a bounded loop followed by ``tracer.result`` runs in both, equal.
- ``self_attn.output[1]`` at step ``s >= 1`` is ``(B, H, 1, T + s)`` and equals transformers' eager weights.
"""

from __future__ import annotations

import warnings

import nnsight
import pytest
import torch
from transformers import AutoModelForCausalLM

import hybrid
from hybrid.errors import DisallowedOpError, TraceError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PROMPTS = ["The Eiffel Tower is located in the city of", "Big Ben is in"]  # left-padded together
TOL = 1e-5
LINK_SLACK = 16 * 1024
"""Bytes of framing and graph a small request adds over its saved values (a hidden state of the batch is 46 KB)."""


def root_inputs(lm, **placement):
    with lm.trace(**placement) as tracer:
        with tracer.invoke(PROMPTS[0]):
            first = lm.inputs.save()
            top = lm.lm_head.output[:, -1].argmax(-1).save()
        with tracer.invoke(PROMPTS[1]):
            last_ids = lm.inputs[1]["input_ids"][:, -1].save()
        with tracer.invoke():
            whole = lm.inputs.save()
    return (first, last_ids, whole, top), tracer


def generated(lm, **placement):
    with lm.generate(max_new_tokens=3, **placement) as tracer:
        with tracer.invoke(PROMPTS[0]):
            first = lm.generator.output.save()
        with tracer.invoke(PROMPTS[1]):
            second = lm.generator.output.save()
        with tracer.invoke():
            both = lm.generator.output.save()
    return (first, second, both), tracer


def same_structure(got, want, what):
    assert type(got) is type(want), f"{what}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got, want), f"{what}: {got} != {want}"
    elif isinstance(want, dict):
        assert list(got) == list(want), f"{what}: keys {list(got)} != {list(want)}"
        for key in want:
            same_structure(got[key], want[key], f"{what}[{key!r}]")
    elif isinstance(want, tuple):
        assert len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want)):
            same_structure(g, w, f"{what}[{i}]")
    else:
        assert got == want, what


def assert_only_saves_crossed(stats, saved_bytes, calls):
    """Inputs and graph out, saves back, one call per forward: no hidden state crossed the client's link."""
    assert stats["round_trips"] == calls, stats
    assert stats["client_bytes_sent"] < LINK_SLACK * calls, stats
    assert stats["client_bytes_received"] < saved_bytes + LINK_SLACK * calls, stats


@pytest.fixture(scope="module")
def ns_inputs(ns):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return root_inputs(ns)[0]


@pytest.fixture(scope="module")
def ns_generated(ns):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return generated(ns)[0]


@pytest.mark.parametrize("placement", ["local", "hybrid"])  # bound on the client before any placement runs
def test_root_inputs_equal_nnsight(placement, lm_for, ns_inputs):
    got, tracer = root_inputs(lm_for(placement), placement=placement)
    for g, w, what in zip(got, ns_inputs, ("invoke 0's lm.inputs", "invoke 1's last token ids",
                                           "the empty invoke's lm.inputs", "invoke 0's top token")):
        same_structure(g, w, what)
    assert "position_ids" in got[2][1]  # the batch is left-padded: nnsight supplies positions
    if placement == "hybrid":
        assert_only_saves_crossed(tracer.stats, got[3].numel() * 8, 1)


def test_root_inputs_in_generation_say_why(local_lm):
    with pytest.raises(DisallowedOpError, match="KV cache"):
        with local_lm.generate(PROMPTS[0], max_new_tokens=1):
            local_lm.inputs.save()


@pytest.mark.parametrize("placement", ["local", "hybrid", "centralized", "swarm"])
def test_generator_output_equals_nnsight(placement, lm_for, ns_generated):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        got, tracer = generated(lm_for(placement), placement=placement)
    for g, w, what in zip(got, ns_generated, ("invoke 0's rows", "invoke 1's rows", "every row")):
        same_structure(g, w, f"lm.generator.output, {what}")
    if placement == "hybrid":
        assert_only_saves_crossed(tracer.stats, 0, 3)  # greedy, head on the node: only each step's token back


def test_modules_after_generator_output_are_out_of_order(local_lm):
    """nnsight raises OutOfOrderError there: the generator's output exists once every step ran."""
    with pytest.raises(TraceError, match="before lm.generator.output"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with local_lm.generate(PROMPTS[0], max_new_tokens=2):
            lm_ids = local_lm.generator.output.save()
            local_lm.model.layers[2].output.save()


def loop_then_result(lm, steps, **placement):
    """A loop over ``steps``, then ``tracer.result``: what nnsight runs after the loop depends on the selection."""
    with lm.generate(PROMPTS[0], max_new_tokens=2, **placement) as tracer:
        seen = hybrid.save([]) if isinstance(lm, hybrid.LanguageModel) else nnsight.save([])
        for step in steps(tracer):
            seen.append(lm.model.layers[2].output[:, -1])
        ids = tracer.result.save()
    return seen, ids


def test_statements_after_an_open_loop_are_refused_as_nnsight_skips_them(ns, remote_lm):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(NameError):  # nnsight: the loop is cut short, `ids = ...` never ran
            loop_then_result(ns, lambda tracer: tracer.all())
    assert any("cut short" in str(w.message) for w in caught)
    with pytest.raises(TraceError, match=r"follows a loop over every remaining generation step.*tracer\.iter\[:max"):
        loop_then_result(remote_lm, lambda tracer: tracer.all(), placement="hybrid")
    # the loop bounded to the steps made: both run what follows it, with the same values
    want_seen, want_ids = loop_then_result(ns, lambda tracer: tracer.iter[:2])
    seen, ids = loop_then_result(remote_lm, lambda tracer: tracer.iter[:2], placement="hybrid")
    assert torch.equal(ids, want_ids) and len(seen) == len(want_seen) == 2
    for got, want in zip(seen, want_seen):
        assert (got - want).abs().max().item() <= TOL


@pytest.fixture(scope="module")
def eager_steps(smollm2_dir, local_lm):
    """Plain transformers, eager attention: each generation step's attention weights (``output_attentions``)."""
    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ref.generation_config.eos_token_id = None
    ids, mask = local_lm.tokenize(PROMPTS)
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                           output_attentions=True, return_dict_in_generate=True)
    return out.sequences, out.attentions


@pytest.mark.parametrize("placement", ["local", "hybrid", "centralized"])
def test_attention_weights_in_later_steps_equal_eager(placement, lm_for, eager_steps):
    lm = lm_for(placement)
    sequences, attentions = eager_steps
    length = sequences.shape[1] - 3  # the prompts' tokens
    with lm.generate(PROMPTS, max_new_tokens=3, eos_token_id=None, placement=placement) as tracer:
        early, late, keys = hybrid.save([]), hybrid.save([]), []
        for step in tracer.iter[:3]:
            early.append(lm.model.layers[5].self_attn.output[1])
            keys.append(early[-1].shape[-1])  # the key length, known while tracing
            late.append(lm.model.layers[25].self_attn.output[1][:, :, -1, length - 1])  # to the prompt's last token
        ids = tracer.result.save()
    assert keys == [length, length + 1, length + 2]
    assert torch.equal(ids, sequences)
    for step in range(3):
        queries = length if step == 0 else 1
        assert early[step].shape == (2, lm.config.num_attention_heads, queries, length + step)
        for got, want, what in ((early[step], attentions[step][5], "layer 5"),
                                (late[step], attentions[step][25][:, :, -1, length - 1], "layer 25, last query")):
            assert got.shape == want.shape, f"step {step} {what}: {tuple(got.shape)} != {tuple(want.shape)}"
            assert (got - want).abs().max().item() <= TOL, f"step {step} {what}"
    if placement == "hybrid":
        saved = 4 * sum(t.numel() for t in (*early, *late))
        assert_only_saves_crossed(tracer.stats, saved, 3)
