"""Generation stops at the end of the answer (issue 15): SmolLM2's end of turn ``<|im_end|>`` ends a row, which then
emits the pad token, exactly as transformers' ``generate`` on the same checkpoint (greedy) does."""

from __future__ import annotations

import pytest
import torch

from swarm.tokens import checkpoint_stop_tokens, load_tokenizer
from swarm.checkpoint import load_config

from .conftest import local_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["The Eiffel Tower is located in the city of", "Once upon a time"]
"""Row 0 answers " Paris, France." and ends its turn after 5 tokens; row 1 runs on to the limit."""
MAX_NEW = 12


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    """transformers' greedy generate on the left-padded batch, stopping at the checkpoint's stop tokens, with the
    default pad (the first EOS) and with pad 0 (so padding is told apart from the EOS)."""
    tokenizer = load_tokenizer(smollm2_dir)
    stop = checkpoint_stop_tokens(smollm2_dir, load_config(smollm2_dir), tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop.eos
    ref = local_model(smollm2_dir)
    encoded = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        run = {pad: ref.generate(**encoded, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=list(stop.eos),
                                 pad_token_id=pad) for pad in (stop.pad, 0)}
        alone = ref.generate(tokenizer(PROMPTS[0], return_tensors="pt").input_ids, max_new_tokens=MAX_NEW,
                             do_sample=False, eos_token_id=list(stop.eos), pad_token_id=stop.pad)
    width = encoded.input_ids.shape[1]
    assert run[0][0, width + 5:].eq(0).all() and run[0][0, width + 4] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert alone.shape[1] < encoded.input_ids.shape[1] + MAX_NEW   # stopped early
    return encoded, run, alone, stop


def test_swarm_model_generate_stops_as_transformers(smollm2_dir, smollm2_swarm, client_factory, reference):
    encoded, run, alone, stop = reference
    client = client_factory(smollm2_dir, smollm2_swarm)
    assert client.stop_tokens == stop and client.tokenizer.padding_side == "left"
    ids = client.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    assert torch.equal(client.generate(ids, max_new_tokens=MAX_NEW), alone)
    got = client.generate(encoded.input_ids, attention_mask=encoded.attention_mask, max_new_tokens=MAX_NEW,
                          pad_token_id=0)
    assert torch.equal(got, run[0])
    assert "Paris, France." in client.tokenizer.decode(alone[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("which", ["local", "hybrid"])
def test_lm_generate_stops_as_transformers(which, local_lm, remote_lm, reference):
    encoded, run, alone, stop = reference
    lm = local_lm if which == "local" else remote_lm
    with lm.generate(PROMPTS, max_new_tokens=MAX_NEW) as tracer:
        ids = tracer.result.save()
    assert torch.equal(ids, run[stop.pad])
    with lm.generate(PROMPTS[0], max_new_tokens=MAX_NEW) as tracer:
        ids = tracer.result.save()
    assert torch.equal(ids, alone)
