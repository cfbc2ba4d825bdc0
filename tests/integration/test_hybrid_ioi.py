"""IOI activation patching (``bench.ioi``) on a real 3-node SmolLM2 swarm (spans 0:10, 10:20, 20:30): the ``hybrid``
and ``swarm`` placements give identical numbers, equal to the local model; hybrid moves hundreds of times fewer bytes
over the client's link; and the model solves IOI (patching S2 early flips the corrupted answer).
"""

from __future__ import annotations

import pytest
import torch

from bench.ioi import ioi_batch, patch_and_measure

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

LAYERS = (2, 15)  # on the first and on the middle node


@pytest.fixture(scope="module")
def batch(local_lm):
    batch = ioi_batch(local_lm.tokenizer, pairs=16)
    assert len(batch.prompts) == 32
    return batch


def link_bytes(stats: dict) -> int:
    """Bytes over the client's link, both directions."""
    return stats["client_bytes_sent"] + stats["client_bytes_received"]


@pytest.mark.parametrize("layer", LAYERS)
def test_patching_is_identical_in_hybrid_and_swarm_placements(layer, remote_lm, local_lm, batch):
    local, _ = patch_and_measure(local_lm, batch, layer, placement="local")
    pushed, hybrid_stats = patch_and_measure(remote_lm, batch, layer, placement="hybrid")
    pulled, swarm_stats = patch_and_measure(remote_lm, batch, layer, placement="swarm")
    assert pushed.shape == pulled.shape == local.shape == (16,)
    assert torch.equal(pushed, pulled)
    assert (pushed - local).abs().max().item() <= 1e-5

    ratio = link_bytes(swarm_stats) / link_bytes(hybrid_stats)
    print(f"\nIOI patch at layer {layer}, batch 32: client link bytes hybrid {link_bytes(hybrid_stats)} "
          f"(sent {hybrid_stats['client_bytes_sent']}, received {hybrid_stats['client_bytes_received']}, "
          f"node->node {hybrid_stats['node_bytes']}, {hybrid_stats['round_trips']} round trip), "
          f"swarm {link_bytes(swarm_stats)} (sent {swarm_stats['client_bytes_sent']}, received "
          f"{swarm_stats['client_bytes_received']}, {swarm_stats['round_trips']} round trips); "
          f"ratio swarm/hybrid {ratio:.0f}; mean logit diff {pushed.mean().item():+.3f}")
    assert hybrid_stats["round_trips"] == 1
    assert hybrid_stats["client_bytes_received"] < 10_000  # the (16,) vector, not hidden states
    assert ratio > 50


def test_the_model_solves_ioi(remote_lm, batch):
    """Unpatched: clean prompts prefer the IO name, corrupted ones the other name; patching S2 from the clean run at
    an early layer makes the corrupted prompts prefer the clean IO again."""
    n = len(batch.io_tokens)
    pick = torch.stack([batch.io_tokens, batch.s_tokens], dim=1).repeat(2, 1)  # (2n, 2): clean IO, clean S
    with remote_lm.trace(batch.prompts, placement="hybrid"):
        pair = remote_lm.lm_head.output[:, -1, :].gather(1, pick)
        diff = (pair[:, 0] - pair[:, 1]).save()
    clean, corrupted = diff[:n], diff[n:]
    patched, _ = patch_and_measure(remote_lm, batch, 2, placement="hybrid")
    print(f"\nIOI mean logit diff (IO - S): clean {clean.mean().item():+.3f}, corrupted "
          f"{corrupted.mean().item():+.3f}, corrupted with S2 patched at layer 2 {patched.mean().item():+.3f}")
    assert clean.mean() > 0
    assert corrupted.mean() < 0
    assert patched.mean() > 0
