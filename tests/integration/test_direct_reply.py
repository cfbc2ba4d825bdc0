"""A chained forward's answer reaches the client over one link (issue 16, requirement 1; swarm/direct_reply.py).

The session's 3-node SmolLM2 swarm runs the same chained forward twice, with the answer relayed back through the
chain (``direct_reply=False``, the old path) and straight from the last node. Per-link byte counts tell the paths
apart: relayed, the node → node links carry the hidden states forward *and* the answer back (4 frames of the hidden
states' size); direct, only the two forward frames, and the client's link carries the answer once.
"""

from __future__ import annotations

import pytest
import torch

from swarm.model import SwarmModel
from swarm.remote_sequence import ClientConfig
from tests.integration.conftest import local_model, start_split


def test_the_answer_of_a_chained_forward_comes_straight_from_the_last_node(smollm2_dir, smollm2_swarm):
    ref = local_model(smollm2_dir)
    clients = {direct: SwarmModel.from_pretrained(str(smollm2_dir), initial_peers=smollm2_swarm.initial_peers,
                                                  client_config=ClientConfig(direct_reply=direct))
               for direct in (True, False)}
    try:
        ids = torch.randint(3, 1000, (2, 48))
        with torch.no_grad():
            want = ref(ids, output_hidden_states=True).hidden_states[-1]  # after the final norm
        got = {}
        for direct, client in clients.items():
            hidden = client.local(ids, start=0, end=0, embed=True)
            before = (client.sequence.traffic.bytes_sent, client.sequence.traffic.bytes_received,
                      client.sequence.traffic.calls)
            out, _, route, reply = client.loop.run(client.sequence.forward_chain(hidden))
            traffic = client.sequence.traffic
            got[direct] = (out, route, reply, traffic.bytes_received - before[1], traffic.calls - before[2])
        frame = 2 * 48 * ref.config.hidden_size * 4  # one fp32 hidden-state frame's tensor bytes
        for direct, (out, route, reply, received, calls) in got.items():
            assert len(route) == 3, route
            assert (ref.model.norm(out) - want).abs().max().item() <= 1e-5
            assert calls == 1  # the collect stream is part of the one round trip
            assert frame <= received < 1.05 * frame  # the answer crossed the client's link once
            assert [c["peer"] for c in reply["commitments"]] == [h.peer_id for h in route]
            assert set(reply["compute_s"]) == {h.peer_id for h in route} and reply["direct"] is direct
            assert set(reply["read_s"]) == {h.peer_id for h in route}  # each hop's request read time, relayed or not
            assert all(0 <= s < reply["compute_s"][p] + 60 for p, s in reply["read_s"].items())
        direct_node, relayed_node = got[True][2]["node_bytes"], got[False][2]["node_bytes"]
        print(f"node->node bytes: relayed {relayed_node}, direct {direct_node} (one frame {frame})")
        assert 4 * frame <= relayed_node < 4.2 * frame  # hidden states forward twice, the answer back twice
        assert 2 * frame <= direct_node < 2.1 * frame  # only forward: the answer is no longer relayed
        assert torch.equal(got[True][0], got[False][0])  # the same nodes computed the same numbers
    finally:
        for client in clients.values():
            client.close()


def test_a_chained_generation_step_answers_straight_from_the_last_node(smollm2_dir, smollm2_swarm):
    """The same for a chained inference step (swarm.chained_session, hybrid generation): the answer crosses the
    client's link once and no node → node link on its way back; equal to the relayed step."""
    from swarm.chained_session import ChainedSession

    clients = {direct: SwarmModel.from_pretrained(str(smollm2_dir), initial_peers=smollm2_swarm.initial_peers,
                                                  client_config=ClientConfig(direct_reply=direct))
               for direct in (True, False)}
    try:
        ids = torch.randint(3, 1000, (2, 48))
        got = {}
        for direct, client in clients.items():
            hidden = client.local(ids, start=0, end=0, embed=True)
            session = client.loop.run(ChainedSession.create(client.sequence, batch_size=2, max_length=64))
            try:
                before = client.sequence.traffic.bytes_received
                out, _ = client.loop.run(session.step(hidden))
                received = client.sequence.traffic.bytes_received - before
                step, _ = client.loop.run(session.step(hidden[:, -1:]))  # a second step on the same caches
                got[direct] = (out, step, session.route, session.node_bytes, received, dict(session.compute_s))
            finally:
                client.loop.run(session.close())
        frame = 2 * 48 * 576 * 4  # one fp32 hidden-state frame (SmolLM2: hidden size 576)
        for direct, (out, step, route, node_bytes, received, compute_s) in got.items():
            assert len(route) == 3, route
            assert set(compute_s) == {h.peer_id for h in route}  # every hop's compute reaches the client
            assert frame <= received < 1.05 * frame  # the answer crossed the client's link once
        print(f"node->node bytes: relayed {got[False][3]}, direct {got[True][3]} (one frame {frame})")
        assert got[False][3] >= 4 * frame  # relayed: hidden states forward twice and the answer back twice
        assert got[True][3] < 2.2 * frame  # direct: forward only (plus the second, one-position step)
        assert torch.equal(got[True][0], got[False][0]) and torch.equal(got[True][1], got[False][1])
    finally:
        for client in clients.values():
            client.close()


def test_an_answer_too_large_for_the_mailbox_is_refused_typed_and_the_node_keeps_serving(
        tiny_checkpoint_factory, swarm_factory, client_factory):
    """``--max-mailbox-bytes``: a direct answer the node cannot hold reaches the client as MailboxFullError, never
    relayed or dropped in silence; the next request that fits is answered directly and equals the local model; no
    bytes stay held (the node's info RPC reports them). One node: its mailbox is the one a chain's last node uses
    (the chained session's rebuild after such a refusal: tests/unit/test_chained_session_stale.py)."""
    from swarm.errors import MailboxFullError
    from swarm.transport import ping

    path = tiny_checkpoint_factory("llama", num_layers=2)
    swarm = start_split(swarm_factory(), path, [(0, 2)], "--max-mailbox-bytes", "16384")
    client = client_factory(path, swarm)
    ref = local_model(path)
    seq = client.sequence
    big = torch.randint(3, 128, (4, 32))  # (4, 32, 64) fp32 hidden states: 32 KiB, twice the mailbox
    with pytest.raises(MailboxFullError, match=r"larger than this node's mailbox \(16384 bytes, --max-mailbox-bytes"):
        client.loop.run(seq.forward_chain(client.local(big, start=0, end=0, embed=True)))
    small = big[:1, :8]  # 2 KiB: fits
    with torch.no_grad():
        want = ref(small, output_hidden_states=True).hidden_states[-1]
    out, _, route, reply = client.loop.run(seq.forward_chain(client.local(small, start=0, end=0, embed=True)))
    assert reply["direct"] and (ref.model.norm(out) - want).abs().max().item() <= 1e-5
    _, info = client.loop.run(ping(seq.p2p, route[-1].peer_id))
    assert info["mailbox_bytes"] == 0
    # hop by hop (the swarm placement), the same too-large answer is taken on the request's own stream instead
    with torch.no_grad():
        want = ref(big, output_hidden_states=True).hidden_states[-1]
    out, _ = client.loop.run(seq.forward(client.local(big, start=0, end=0, embed=True)))
    assert (ref.model.norm(out) - want).abs().max().item() <= 1e-5
    # and a hop-by-hop session's opening step: the node closed the session it could not answer; it is reopened
    from swarm.inference_session import InferenceSession
    session = client.loop.run(InferenceSession.create(seq, batch_size=4, max_length=64))
    try:
        first = client.loop.run(session.step(client.local(big, start=0, end=0, embed=True)))
        token = torch.randint(3, 128, (4, 1))
        second = client.loop.run(session.step(client.local(token, start=0, end=0, embed=True)))
    finally:
        client.loop.run(session.close())
    with torch.no_grad():
        want = ref(torch.cat([big, token], 1), output_hidden_states=True).hidden_states[-1]
    assert (ref.model.norm(first) - want[:, :32]).abs().max().item() <= 1e-5
    assert (ref.model.norm(second) - want[:, 32:]).abs().max().item() <= 1e-5
    _, info = client.loop.run(ping(seq.p2p, route[-1].peer_id))
    assert info["mailbox_bytes"] == 0


@pytest.fixture
def pulls(monkeypatch) -> list[int]:
    """The stream count of every collect call the client makes (``pull``), in order."""
    import swarm.remote_sequence as remote_sequence

    made: list[int] = []
    real_call = remote_sequence.call

    async def recording_call(p2p, peer_id, handle, tensors, meta, **kw):
        if handle == remote_sequence.COLLECT:
            made.append(kw.get("pull", 1))
        return await real_call(p2p, peer_id, handle, tensors, meta, **kw)

    monkeypatch.setattr(remote_sequence, "call", recording_call)
    return made


def test_hop_by_hop_answers_are_collected_striped_and_equal_the_relayed_ones(smollm2_dir, smollm2_swarm, pulls):
    """The swarm placement's hop-by-hop forward and backward collect each hop's answer like a chain's last hop: a
    (4, 48, 576) fp32 answer (432 KiB, over a fresh stream's 256 KiB window) over 2 collect streams, a small one over
    1; hidden states and gradients equal the answers taken on the request's stream (and the local model's)."""
    ref = local_model(smollm2_dir)
    clients = {direct: SwarmModel.from_pretrained(str(smollm2_dir), initial_peers=smollm2_swarm.initial_peers,
                                                  client_config=ClientConfig(direct_reply=direct, verify=0.0))
               for direct in (True, False)}
    try:
        got = {}
        for rows, positions in ((4, 48), (1, 8)):
            ids = torch.randint(3, 1000, (rows, positions))
            with torch.no_grad():
                want = ref(ids, output_hidden_states=True).hidden_states[-1]
            grad = torch.randn(rows, positions, 576, generator=torch.Generator().manual_seed(rows))
            for direct, client in clients.items():
                pulls.clear()
                out, trail = client.loop.run(client.sequence.forward(client.local(ids, start=0, end=0, embed=True),
                                                                     keep_hop_inputs=True))
                assert (ref.model.norm(out) - want).abs().max().item() <= 1e-5
                grad_in = client.loop.run(client.sequence.backward(trail, grad))  # the backward's answers too
                got[direct] = (out, grad_in, list(pulls))
            assert torch.equal(got[True][0], got[False][0]) and torch.equal(got[True][1], got[False][1])
            assert got[False][2] == []  # relayed: answers on the request's stream
            per_hop = 2 if rows == 4 else 1  # one per hop, forward then backward
            assert got[True][2] == [per_hop] * 6, got[True][2]
    finally:
        for client in clients.values():
            client.close()


def test_a_hop_by_hop_sessions_opening_step_is_collected_striped(smollm2_dir, smollm2_swarm, pulls):
    """Hop-by-hop generation (swarm.inference_session, the swarm placement's lm.generate): the opening step (the
    prompt's hidden states, (4, 48, 576) fp32 = 432 KiB) is collected over 2 streams per hop; the one-token steps
    after it answer on the request's stream. Outputs equal the relayed session's bit for bit."""
    from swarm.inference_session import InferenceSession

    clients = {direct: SwarmModel.from_pretrained(str(smollm2_dir), initial_peers=smollm2_swarm.initial_peers,
                                                  client_config=ClientConfig(direct_reply=direct, verify=0.0))
               for direct in (True, False)}
    try:
        ids = torch.randint(3, 1000, (4, 48))
        got = {}
        for direct, client in clients.items():
            pulls.clear()
            hidden = client.local(ids, start=0, end=0, embed=True)
            session = client.loop.run(InferenceSession.create(client.sequence, batch_size=4, max_length=64))
            try:
                first = client.loop.run(session.step(hidden))
                opening = list(pulls)
                second = client.loop.run(session.step(hidden[:, -1:]))
            finally:
                client.loop.run(session.close())
            got[direct] = (first, second, opening, list(pulls))
        assert torch.equal(got[True][0], got[False][0]) and torch.equal(got[True][1], got[False][1])
        assert got[True][2] == [2, 2, 2] and got[True][3] == [2, 2, 2], got[True][2:]  # the opening step only
        assert got[False][3] == []
    finally:
        for client in clients.values():
            client.close()
