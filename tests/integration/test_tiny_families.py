"""1-, 2- and 3-node splits of a tiny model of every family equal plain transformers: logits, greedy tokens, grads."""

import pytest
import torch

from tests.integration.conftest import local_generate, local_model, start_split
from tests.tiny_checkpoints import FAMILIES

SPLITS = {1: [(0, 6)], 2: [(0, 3), (3, 6)], 3: [(0, 2), (2, 4), (4, 6)]}


@pytest.mark.parametrize("nodes", [1, 2, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_split_equals_local(family, nodes, tiny_checkpoint_factory, swarm_factory, client_factory):
    path = tiny_checkpoint_factory(family, num_layers=6, tie_embeddings=family == "qwen3")
    swarm = start_split(swarm_factory(), path, SPLITS[nodes])
    ref = local_model(path)
    client = client_factory(path, swarm)
    assert [(h.start, h.end) for h in client.route()] == SPLITS[nodes]

    torch.manual_seed(0)
    ids = torch.randint(3, 128, (2, 24))  # longer than mistral's sliding window of 16
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in the second row
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
    got = client(ids, attention_mask=mask).logits
    assert (got - want).abs().max().item() <= 1e-5

    prompt = ids[:1, :8]
    want_tokens = local_generate(ref, prompt, 20)
    assert torch.equal(client.generate(prompt, max_new_tokens=20, eos_token_id=None), want_tokens)

    embeds = ref.model.embed_tokens(ids).detach()
    x_remote, x_local = embeds.clone().requires_grad_(True), embeds.clone().requires_grad_(True)
    weights = torch.randn(want.shape)
    (client(inputs_embeds=x_remote, attention_mask=mask).logits * weights).sum().backward()
    (ref(inputs_embeds=x_local, attention_mask=mask).logits * weights).sum().backward()
    assert x_local.grad.abs().max() > 0
    assert (x_remote.grad - x_local.grad).abs().max().item() <= 1e-5


def test_remote_embedding_and_head(tiny_checkpoint_factory, swarm_factory, client_factory):
    path = tiny_checkpoint_factory("llama", num_layers=6)
    swarm = start_split(swarm_factory(), path, SPLITS[2])
    client = client_factory(path, swarm, remote_stages=True)
    ref = local_model(path)
    ids = torch.randint(3, 128, (3, 10))
    with torch.no_grad():
        want = ref(ids).logits
    want_tokens = local_generate(ref, ids, 12)
    assert (client(ids).logits - want).abs().max().item() <= 1e-5
    assert torch.equal(client.generate(ids, max_new_tokens=12, eos_token_id=None), want_tokens)


def test_sampling_is_reproducible_with_a_generator(tiny_checkpoint_factory, swarm_factory, client_factory):
    path = tiny_checkpoint_factory("llama", num_layers=6)
    swarm = start_split(swarm_factory(), path, SPLITS[2])
    client = client_factory(path, swarm)
    ids = torch.randint(3, 128, (1, 6))
    runs = [client.generate(ids, max_new_tokens=15, do_sample=True, temperature=1.5, top_k=20, eos_token_id=None,
                            generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    other = client.generate(ids, max_new_tokens=15, do_sample=True, temperature=1.5, top_k=20, eos_token_id=None,
                            generator=torch.Generator().manual_seed(8))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], other)
