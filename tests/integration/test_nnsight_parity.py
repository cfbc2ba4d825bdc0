"""nnsight code researchers already have, unchanged, in every placement: the root model's output (``lm.output.logits``
/ ``lm.output["logits"]``), a sparse autoencoder written as an ``nn.Module`` (random weights, 8×d features) encoding
and decoding layer 12's output where that layer runs, and pure functions from its forward (``F.linear``, ``F.relu``,
``F.one_hot``). Values equal real nnsight 0.8.1 run locally (fp32, max abs diff <= 1e-5); ``hybrid`` moves only the
inputs, the graph and the saved values over the client's link."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hybrid

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PLACEMENTS = ["local", "hybrid", "centralized", "swarm"]
PROMPTS = ["The Eiffel Tower is located in the city of", "Big Ben is located in the city of"]
D, TOL = 576, 1e-5


class SAE(nn.Module):
    """A sparse autoencoder as researchers write one."""

    def __init__(self, d: int, features: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.W_enc = nn.Parameter(torch.randn(features, d, generator=generator) / d ** 0.5)
        self.b_enc = nn.Parameter(torch.zeros(features))
        self.W_dec = nn.Parameter(torch.randn(d, features, generator=generator) / features ** 0.5)
        self.b_dec = nn.Parameter(torch.randn(d, generator=generator) * 0.01)

    def forward(self, x):
        features = F.relu(F.linear(x - self.b_dec, self.W_enc, self.b_enc))
        return F.linear(features, self.W_dec, self.b_dec), features


SAE_12 = SAE(D, 8 * D)


def root_output(lm, **placement):
    with lm.trace(PROMPTS, **placement) as tracer:
        last = lm.output.logits[:, -1].save()
        whole = lm.output["logits"].save()
    return (last, whole), tracer


def sae_features(lm, **placement):
    """Encode layer 12's output, keep the 3 strongest features per position, splice the reconstruction back."""
    with lm.trace(PROMPTS, **placement) as tracer:
        h = lm.model.layers[12].output
        recon, features = SAE_12(h)
        top = features.topk(3, dim=-1)
        active = F.one_hot(top.indices[:, -1, 0], num_classes=8 * D).sum(0).save()
        strongest = top.values.save()
        lm.model.layers[12].output = recon
        logits = lm.lm_head.output[:, -1].save()
    return (active, strongest, logits), tracer


def close(got, want, what):
    got, want = (got.detach(), want.detach())
    assert got.shape == want.shape, f"{what}: {tuple(got.shape)} != {tuple(want.shape)}"
    assert (got.float() - want.float()).abs().max().item() <= TOL, what


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_root_output_logits(placement, lm_for, ns):
    (want_last, want_whole), _ = root_output(ns)
    (last, whole), tracer = root_output(lm_for(placement), placement=placement)
    close(last, want_last, "lm.output.logits[:, -1]")
    close(whole, want_whole, "lm.output['logits']")
    assert tracer.stats["head_positions"] == "all"


@pytest.mark.parametrize("placement", ["local", "hybrid", "centralized"])
def test_sae_module_runs_where_the_layer_is(placement, lm_for, ns):
    want, _ = sae_features(ns)
    got, tracer = sae_features(lm_for(placement), placement=placement)
    for g, w, what in zip(got, want, ("one_hot counts", "top feature values", "logits after splicing")):
        close(g, w, what)
    if placement == "hybrid":  # the SAE ran on the node of layer 12: only saves came back, one call
        stats = tracer.stats
        saved = got[0].numel() * 8 + got[1].numel() * 4 + got[2].numel() * 4
        # one call, or two the first time the SAE's weights meet these nodes (named by hash, then sent to be kept)
        assert stats["round_trips"] <= 2 and stats["client_bytes_received"] < saved + 64 * 1024, stats


def test_sae_weights_travel_once_then_by_hash(remote_lm, ns):
    """The SAE's 21 MB of weights cross the client's link (and each node link) in the first trace only; the second
    trace names them by content hash, which every node of the route checked and kept. Results equal nnsight's."""
    global SAE_12
    first_sae, SAE_12 = SAE_12, SAE(D, 8 * D)
    with torch.no_grad():
        for p in SAE_12.parameters():
            p.add_(0.01)  # other weights than any earlier test uploaded
    try:
        want, _ = sae_features(ns)
        weights = sum(p.numel() * p.element_size() for p in SAE_12.parameters() if p.numel() * 4 >= 1 << 20)
        sent = []
        for _ in range(2):
            got, tracer = sae_features(remote_lm, placement="hybrid")
            for g, w, what in zip(got, want, ("one_hot counts", "top feature values", "logits after splicing")):
                close(g, w, what)
            sent.append((tracer.stats["client_bytes_sent"], tracer.stats["node_bytes"], tracer.stats["round_trips"]))
        print(f"SAE weights {weights} B; first trace sent {sent[0]}, second {sent[1]} (client bytes, node bytes, calls)")
        assert sent[0][0] > weights and sent[0][2] == 2  # refused by hash once, then sent inline to be kept
        assert sent[1][0] < weights / 100 and sent[1][1] < weights / 10 and sent[1][2] == 1
    finally:
        SAE_12 = first_sae


def skip_then_stop(lm, **placement):
    """Skip layer 3 (its output is its input), read layer 10, stop: nothing after ``tracer.stop()`` runs."""
    after_stop = []
    with lm.trace(PROMPTS, **placement) as tracer:
        lm.model.layers[3].skip(lm.model.layers[3].input)
        h = lm.model.layers[10].output[:, -1].save()
        tracer.stop()
        after_stop.append(lm.model.layers[20].output.save())  # never reached
    return (h, after_stop), tracer


@pytest.mark.parametrize("placement", ["local", "hybrid"])
def test_skip_and_early_stop(placement, lm_for, ns):
    (want, want_after), _ = skip_then_stop(ns)
    (got, after), _ = skip_then_stop(lm_for(placement), placement=placement)
    close(got, want, "layer 10 after skipping layer 3")
    assert after == want_after == []
