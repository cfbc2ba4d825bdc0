"""The embedded SmolLM2-135M on a real 3-node swarm: the right answer, local-equal logits, span-sized memory."""

import pytest
import torch
from transformers import AutoTokenizer

from tests.integration.conftest import local_generate, local_model, start_split

pytestmark = pytest.mark.slow
THIRDS = [(0, 10), (10, 20), (20, 30)]


def test_three_node_smollm2_answers_paris_and_equals_local(smollm2_dir, swarm_factory, client_factory):
    swarm = start_split(swarm_factory(), smollm2_dir, THIRDS)
    client = client_factory(smollm2_dir, swarm)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt").input_ids
    ref = local_model(smollm2_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the nodes run one thread each; the same reduction order gives the same floats
    try:
        with torch.no_grad():
            want = ref(ids).logits
        got = client(ids).logits
    finally:
        torch.set_num_threads(threads)
    assert (got - want).abs().max().item() <= 1e-5
    assert tokenizer.decode(got[0, -1].argmax()) == " Paris"
    assert torch.equal(client.generate(ids, max_new_tokens=8, eos_token_id=None), local_generate(ref, ids, 8))


def test_node_memory_follows_its_span(smollm2_dir, swarm_factory):
    """A node holding a third of the layers stays well under one holding the whole model."""
    swarm = swarm_factory()
    whole = swarm.start(smollm2_dir, "--blocks", "0:30")
    third = swarm.start(smollm2_dir, "--blocks", "10:20", initial_peers=swarm.initial_peers)
    whole_rss, third_rss = whole.info["peak_rss_bytes"], third.info["peak_rss_bytes"]
    whole_weights, third_weights = whole.info["weight_bytes"], third.info["weight_bytes"]
    print(f"peak RSS: whole {whole_rss / 1e6:.0f} MB ({whole_weights / 1e6:.0f} MB weights), "
          f"third {third_rss / 1e6:.0f} MB ({third_weights / 1e6:.0f} MB weights)")
    assert third_weights < 0.3 * whole_weights
    # Weights are read from the memory-mapped checkpoint, so untouched pages (e.g. embedding rows never looked up)
    # stay out of RSS; the whole-model node must still be ahead by at least half the extra weights.
    assert whole_rss - third_rss > 0.5 * (whole_weights - third_weights)
