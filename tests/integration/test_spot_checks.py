"""Spot checks (issue 13, requirement 3, hop-by-hop forwards): a node computing wrong numbers is caught.

Layers 0:2 on one node; 2:4 on two honest replicas and on a node started with the test-only fault injection
``SWARM_TEST_OUTPUT_NOISE=1e-2`` (Gaussian noise on every output, see ``swarm/cli.py``). The clients are steered to
the noisy node (their per-node route jitter is set). Without verification its wrong numbers reach the client; with
``verify=1.0`` every hop is recomputed elsewhere, the disagreement is settled by a third opinion, the noisy node is
excluded, and every result equals local transformers, hop by hop and in chained forwards; the signed suspect
report they publish steers another client away from the node.
"""

from __future__ import annotations

import torch

from swarm.remote_sequence import ClientConfig
from tests.integration.conftest import local_model


def steer_to(client, peer_id: str) -> None:
    client.route()  # learns the records and draws the per-node jitter
    jitter = client.sequence._jitter
    for peer in jitter:
        jitter[peer] = 1.0 if peer == peer_id else 1.3
    assert peer_id in [h.peer_id for h in client.route()]


def test_verify_catches_a_node_adding_noise_and_returns_only_verified_results(tiny_checkpoint_factory, swarm_factory,
                                                                              client_factory):
    path = tiny_checkpoint_factory("llama", num_layers=4)
    swarm = swarm_factory()
    first = swarm.start(path, "--blocks", "0:2")
    honest = [swarm.start(path, "--blocks", "2:4", initial_peers=swarm.initial_peers) for _ in range(2)]
    noisy = swarm.start(path, "--blocks", "2:4", initial_peers=swarm.initial_peers,
                        env={"SWARM_TEST_OUTPUT_NOISE": "1e-2"})
    ref = local_model(path)
    inputs = [torch.randint(3, 128, (2, 5 + i)) for i in range(5)]
    with torch.no_grad():
        want = [ref(ids).logits for ids in inputs]

    unchecked = client_factory(path, swarm)
    steer_to(unchecked, noisy.peer_id)
    assert (unchecked(inputs[0]).logits - want[0]).abs().max().item() > 1e-3  # the fault reaches an unchecked client

    client = client_factory(path, swarm, client_config=ClientConfig(verify=1.0))
    steer_to(client, noisy.peer_id)
    for ids, w in zip(inputs, want):
        assert (client(ids).logits - w).abs().max().item() <= 1e-5
    stats = client.sequence.stats
    assert stats.distrusted == [noisy.peer_id]
    assert stats.verify_mismatches == 1 and stats.verify_checks == 2 * len(inputs)
    assert noisy.peer_id not in [h.peer_id for h in client.route()]

    # Chained forwards (node → node, as hybrid runs them): each hop's check re-runs the chain avoiding that node.
    # (suspect_weight=0: this client ignores the report the first client published, so it can be steered to the node)
    chained = client_factory(path, swarm, client_config=ClientConfig(verify=1.0, suspect_weight=0.0))
    steer_to(chained, noisy.peer_id)
    for ids, w in zip(inputs[:3], want):
        out, _, route, _ = chained.loop.run(chained.sequence.forward_chain(chained.local(ids, start=0, end=0,
                                                                                         embed=True)))
        assert (chained.local(out, start=0, end=0, head=True) - w).abs().max().item() <= 1e-5
        assert noisy.peer_id not in [h.peer_id for h in route]
    assert chained.sequence.stats.distrusted == [noisy.peer_id]

    # The catching clients published a signed suspect report: another client weighs it (one reporter, weighted 10 so
    # that measured latencies on a loaded machine cannot outweigh it, whatever this client's jitter), without
    # excluding it.
    observer = client_factory(path, swarm, client_config=ClientConfig(suspect_weight=10.0))
    observer.route()
    assert observer.sequence._suspects == {noisy.peer_id: 1}
    for peer in observer.sequence._jitter:
        observer.sequence._jitter[peer] = 1.0 if peer == noisy.peer_id else 1.3
    assert noisy.peer_id not in [h.peer_id for h in observer.route()]
    assert noisy.peer_id not in observer.sequence.excluded()
    assert (observer(inputs[0]).logits - want[0]).abs().max().item() <= 1e-5

    # verify=0.2: each request through the noisy node is checked with p = 0.2 (hop 2:4; 0:2 has no replica), so
    # it escapes n requests with probability 0.8^n; n = 42 makes that < 1e-4.
    sampled = client_factory(path, swarm, client_config=ClientConfig(verify=0.2, suspect_weight=0.0))
    steer_to(sampled, noisy.peer_id)
    probe = torch.randint(3, 128, (1, 4))
    for requests in range(1, 43):
        sampled(probe)
        if sampled.sequence.stats.distrusted:
            break
    assert sampled.sequence.stats.distrusted == [noisy.peer_id], "not caught within the 42-request bound"
    print(f"verify=0.2: noisy node excluded after {requests} request(s)")

    # Honest nodes are never outvoted: 100 clean requests, every hop checked.
    for _ in range(100):
        client(probe)
    assert client.sequence.stats.distrusted == [noisy.peer_id] and client.sequence.stats.verify_mismatches == 1
    assert all(n.proc.poll() is None for n in [first, *honest, noisy])
