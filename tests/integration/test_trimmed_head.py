"""The head on the last position alone (``trim_head``) gives SmolLM2's logits bit for bit (issue 16, requirement 3).

A GEMM's rows are not bit-identical across row counts and strides (hybrid.node_plugin.last_rows_padded): the
earlier trim (a strided ``[:, -1:]`` view, B rows) moved logits by ~2.5e-5. Padded to a regular row count it takes
the full head's kernel path, so every value equals the full-sequence head's exactly."""

import torch

from hybrid.node_plugin import last_rows_padded


def test_the_trimmed_head_equals_the_full_head_bit_for_bit(local_lm):
    ids = torch.randint(3, 1000, (8, 32))
    results = {}
    for trim in (False, True):
        local_lm.trim_head = trim
        try:
            with local_lm.trace(ids) as tracer:
                logits = local_lm.lm_head.output[:, -1].save()
        finally:
            local_lm.trim_head = True  # the default
        results[trim] = (logits, tracer.stats["head_positions"])
    assert results[False][1] == "all" and results[True][1] == "last"
    assert torch.equal(results[True][0], results[False][0])
    head = local_lm.local_model.get_submodule("lm_head")
    hidden = torch.randn(3, 20, head.in_features)
    with torch.no_grad():  # a batch of 3 (3 rows alone would take another path) is padded and still exact
        assert torch.equal(head(last_rows_padded(hidden))[:3, 0], head(hidden)[:, -1])


def test_the_client_runs_its_head_when_the_logits_rows_are_what_comes_back(remote_lm, local_lm):
    """Saving ``lm_head.output[:, -1]`` on the 3-node swarm: the last node sends its last hidden state (B, 1, D)
    instead of the logits (B, V) and the client runs its own head; saving only an argmax of them, the node does."""
    ids = torch.randint(3, 1000, (8, 32))
    with torch.no_grad():
        want = local_lm.local_model(ids, start=0, end=local_lm.config.num_hidden_layers, embed=True, head=True)[:, -1]
    with remote_lm.trace(ids, placement="hybrid") as tracer:
        logits = remote_lm.lm_head.output[:, -1].save()
    stats = tracer.stats
    assert stats["head_on"] == "client" and stats["head_positions"] == "last", stats
    assert (logits - want).abs().max().item() <= 1e-5
    logits_bytes = want.numel() * 4
    assert stats["client_bytes_received"] < logits_bytes / 20, stats  # (8, 576) hidden, not (8, 49152) logits
    with remote_lm.trace(ids, placement="hybrid") as tracer:
        top = remote_lm.lm_head.output[:, -1].argmax(-1).save()
    assert tracer.stats["head_on"] == "node" and torch.equal(top, want.argmax(-1)), tracer.stats
