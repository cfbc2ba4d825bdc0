"""Every answer carries what the node committed to: a fingerprint of its span's output bound to the request id and
its peer id (``swarm.commitments``); recomputed from the exact tensors the nodes sent, each hop's digest matches, and
a chained (hybrid) forward returns one per node in route order. Each is signed with the node's identity key, so a
third party holding its public key can verify it, and no change to it verifies."""

from __future__ import annotations

import pytest
import torch

import hybrid
from swarm import SwarmModel
from swarm.commitments import fingerprint, signature_valid
from swarm.identity import load_identity

pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_hop_commits_to_its_output(tiny_checkpoint_factory, swarm_factory, tmp_path):
    path = tiny_checkpoint_factory("llama", num_layers=4)
    swarm = swarm_factory()
    keys = [tmp_path / "first.key", tmp_path / "second.key"]  # identity files, so the test knows the public keys
    swarm.start(path, "--blocks", "0:2", "--identity-path", str(keys[0]))
    swarm.start(path, "--blocks", "2:4", "--identity-path", str(keys[1]), initial_peers=swarm.initial_peers)
    public = {(identity := load_identity(key)).peer_id: identity.private_key.get_public_key().to_bytes()
              for key in keys}
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
        # Signed with the node's identity key: a third party holding the public key its peer id names can check it;
        # a changed digest, request id or peer, or another node's key, fails.
        for commitment in (first, second):
            key = public[commitment["peer"]]
            assert signature_valid(commitment, key)
            changed = "0" if commitment["digest"][0] != "0" else "1"
            assert not signature_valid({**commitment, "digest": changed + commitment["digest"][1:]}, key)
            assert not signature_valid({**commitment, "request_id": "another request"}, key)
            other = next(k for p, k in public.items() if p != commitment["peer"])
            assert not signature_valid(commitment, other)
            assert not signature_valid({**commitment, "peer": next(p for p in public if p != commitment["peer"])},
                                       other)

        lm = hybrid.LanguageModel(str(path), initial_peers=swarm.initial_peers)
        try:
            with lm.trace(torch.tensor([[5, 9, 11, 3]]), placement="hybrid") as tracer:
                lm.lm_head.output[:, -1].save()
            commitments = tracer.stats["commitments"]
            assert [c["peer"] for c in commitments] == tracer.stats["route"]
            assert len({c["request_id"] for c in commitments}) == 1 and all(len(c["digest"]) == 32 for c in commitments)
            assert all(signature_valid(c, public[c["peer"]]) for c in commitments)  # relayed along the chain
            with lm.trace(torch.tensor([[5, 9, 11, 4]]), placement="hybrid") as again:
                lm.lm_head.output[:, -1].save()
            assert [c["digest"] for c in again.stats["commitments"]] != [c["digest"] for c in commitments]
        finally:
            lm.close()
