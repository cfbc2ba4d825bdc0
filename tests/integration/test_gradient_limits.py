"""A node bounds what a gradient request holds: past ``--max-backward-bytes`` of saved autograd state the request gets
a typed CapacityError before the backward runs; a gradient that would have to cross nodes through a carried value is
refused (OrderError), never returned short of that path; the node then serves gradient and plain requests exactly,
with its weights unchanged (its outputs still equal a fresh local model's)."""

from __future__ import annotations

import pytest
import torch

import hybrid
from hybrid.errors import OrderError
from swarm.errors import CapacityError

pytestmark = pytest.mark.usefixtures("one_thread")

IDS_SMALL = torch.tensor([[5, 9, 11, 3]])
IDS_BIG = torch.randint(1, 100, (8, 64), generator=torch.Generator().manual_seed(0))


def gradient_of_layer1(lm, ids, **placement):
    with lm.trace(ids, **placement):
        h = lm.model.layers[1].output
        with lm.lm_head.output[:, -1, 3].sum().backward():
            g = h.grad.save()
        logits = lm.lm_head.output.save()
    return g, logits


def test_backward_state_over_budget_is_refused_and_the_node_keeps_serving(swarm_factory, tiny_checkpoint_factory):
    path = tiny_checkpoint_factory("llama", num_layers=4)
    swarm = swarm_factory()
    swarm.start(path, "--blocks", "0:2", "--max-backward-bytes", str(2 << 20))
    swarm.start(path, "--blocks", "2:4", "--max-backward-bytes", str(2 << 20), initial_peers=swarm.initial_peers)
    local = hybrid.LanguageModel(str(path))
    with hybrid.LanguageModel(str(path), initial_peers=swarm.initial_peers) as lm:
        with pytest.raises(CapacityError, match="--max-backward-bytes"):
            gradient_of_layer1(lm, IDS_BIG, placement="hybrid")
        with pytest.raises(OrderError, match="carried here"):
            with lm.trace(IDS_SMALL, placement="hybrid"):
                h0 = lm.model.layers[0].output  # on the first node
                with (lm.lm_head.output.sum() + h0.sum()).backward():  # the loss on the second adds it
                    h0.grad.save()
        got, logits = gradient_of_layer1(lm, IDS_SMALL, placement="hybrid")
        want, want_logits = gradient_of_layer1(local, IDS_SMALL)
        assert (got - want).abs().max() <= 1e-5 and want.abs().max() > 0
        assert (logits - want_logits).abs().max() <= 1e-5
        with lm.trace(IDS_BIG, placement="hybrid"):  # no gradients: the budget does not apply
            big = lm.lm_head.output.save()
        with local.trace(IDS_BIG):
            big_want = local.lm_head.output.save()
        assert (big - big_want).abs().max() <= 1e-5


def test_only_saved_gradients_reach_the_client(tiny_node):
    """The node that runs the embedding sends back no gradient of its input: the client gets the saves only."""
    path, node, _ = tiny_node
    ids = torch.randint(1, 100, (4, 32), generator=torch.Generator().manual_seed(1))
    with hybrid.LanguageModel(str(path), initial_peers=node.maddrs) as lm:
        with lm.trace(ids, placement="hybrid") as plain:
            lm.lm_head.output[:, -1, 3].sum().save()
        with lm.trace(ids, placement="hybrid") as tracer:
            h = lm.model.layers[1].output
            with lm.lm_head.output[:, -1, 3].sum().backward():
                h.grad[:, -1, 0].save()
    extra = tracer.stats["client_bytes_received"] - plain.stats["client_bytes_received"]
    hidden_bytes = ids.numel() * 64 * 4  # what a gradient of the embedding output would cost
    assert extra < hidden_bytes / 4, (extra, hidden_bytes)
