"""``lm.scan(...)`` (shapes without running: fake values from the config, nothing sent) and ``lm.edit()`` /
``clear_edits()`` (an edit block every later trace starts with; in ``hybrid`` its nodes join each trace's graph and
run on the nodes), against real nnsight 0.8.1 run locally (fp32, exactly: the same ops run)."""

from __future__ import annotations

import pytest
import torch

from hybrid.errors import TraceError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PROMPTS = ["The Eiffel Tower is located in the city of", "Big Ben is in"]


def scan(lm):
    seen = []
    with lm.scan(PROMPTS):
        hidden = lm.model.layers[0].output
        seen += [tuple(hidden.shape), hidden.dtype, tuple(lm.model.layers[4].mlp.up_proj.output.shape)]
        logits = lm.lm_head.output.save()
    return seen, logits


def test_scan_shapes_without_running(remote_lm, ns):
    traffic = remote_lm.client.sequence.traffic
    before = (traffic.bytes_sent, traffic.calls)
    (got, logits), (want, want_logits) = scan(remote_lm), scan(ns)
    assert got == want == [(2, 10, 576), torch.float32, (2, 10, 1536)]
    assert logits.device.type == "meta" and logits.shape == want_logits.shape and logits.dtype == want_logits.dtype
    assert (traffic.bytes_sent, traffic.calls) == before  # nothing ran on the swarm


def edits(lm, **placement):
    """An edited copy (layer 0 zeroed, layer 2's MLP doubled), an in-place edit, clear_edits; the copy keeps its
    edit after the model's edits are cleared."""
    with lm.edit() as (tracer, edited):
        edited.model.layers[0].output[:] = 0
        edited.model.layers[2].mlp.output = edited.model.layers[2].mlp.output * 2
    with edited.trace(PROMPTS, **placement):
        zeroed = edited.model.layers[0].output.save()
        edited_logits = edited.lm_head.output[:, -1].save()
    try:
        with lm.trace(PROMPTS, **placement):
            clean = lm.model.layers[0].output[:, -1].save()
        with lm.edit(inplace=True):
            lm.model.layers[1].output[:, -1] = 1
        with lm.trace(PROMPTS, **placement):
            ones = lm.model.layers[1].output.save()
    finally:
        lm.clear_edits()
    with lm.trace(PROMPTS, **placement):
        cleared = lm.model.layers[1].output[:, -1].save()
    with edited.trace(PROMPTS, **placement):
        still = edited.lm_head.output[:, -1].save()
    return zeroed, edited_logits, clean, ones, cleared, still


@pytest.mark.parametrize("placement", ["local", "hybrid"])  # centralized runs the same merged graph on one node
def test_edits_persist_until_cleared(placement, lm_for, ns):
    want = edits(ns)
    got = edits(lm_for(placement), placement=placement)
    for g, w, what in zip(got, want, ("zeroed layer 0", "edited logits", "unedited model", "in-place edit",
                                      "after clear_edits", "the copy keeps its edit")):
        assert g.shape == w.shape and (g - w).abs().max().item() <= 1e-5, what
    assert got[0].abs().max() == 0 and got[3][:, -1].eq(1).all()


def test_an_edit_that_does_not_fit_a_trace_says_so(local_lm):
    with local_lm.edit() as (tracer, edited):
        edited.model.layers[0].output[:, 7] = 0  # position 7 exists on the stand-in batch, not in a 3-token trace
    with pytest.raises(TraceError, match="no longer fits"):
        with edited.trace([[1, 2, 3]], placement="local"):
            edited.model.layers[1].output.save()
