"""Every answer carries what the node committed to: a fingerprint of its span's output bound to the request id and
its peer id (``swarm.commitments``); recomputed from the exact tensors the nodes sent, each hop's digest matches, and
a chained (hybrid) forward returns one per node in route order."""

from __future__ import annotations

import pytest
import torch

import hybrid
from swarm import SwarmModel
from swarm.commitments import fingerprint
from tests.integration.conftest import start_split

pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_hop_commits_to_its_output(tiny_checkpoint_factory, swarm_factory):
    path = tiny_checkpoint_factory("llama", num_layers=4)
    swarm = start_split(swarm_factory(), path, [(0, 2), (2, 4)])
    with SwarmModel.from_pretrained(str(path), initial_peers=swarm.initial_peers) as client:
        x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
        out, trail = client.loop.run(client.sequence.forward(x, keep_hop_inputs=True))
        first, second = list(client.sequence.commitments)[-2:]
        assert [first["peer"], second["peer"]] == [hop.peer_id for hop, _ in trail]
        outputs = [trail[1][1], out]  # hop 0's output is hop 1's input
        for commitment, output in zip((first, second), outputs):
            assert commitment["digest"] == fingerprint(output, commitment["request_id"], commitment["peer"])
            assert commitment["digest"] != fingerprint(output, "another request", commitment["peer"])
            assert commitment["digest"] != fingerprint(output + 1e-3, commitment["request_id"], commitment["peer"])
        assert first["request_id"] != second["request_id"]  # one request per hop here

        lm = hybrid.LanguageModel(str(path), initial_peers=swarm.initial_peers)
        try:
            with lm.trace(torch.tensor([[5, 9, 11, 3]]), placement="hybrid") as tracer:
                lm.lm_head.output[:, -1].save()
            commitments = tracer.stats["commitments"]
            assert [c["peer"] for c in commitments] == tracer.stats["route"]
            assert len({c["request_id"] for c in commitments}) == 1 and all(len(c["digest"]) == 32 for c in commitments)
            with lm.trace(torch.tensor([[5, 9, 11, 4]]), placement="hybrid") as again:
                lm.lm_head.output[:, -1].save()
            assert [c["digest"] for c in again.stats["commitments"]] != [c["digest"] for c in commitments]
        finally:
            lm.close()
