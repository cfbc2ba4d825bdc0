"""Claims are checked (issue 13, requirement 2): a node announcing layers it does not serve gets no traffic.

The liar is a real node started with the test-only fault injection ``SWARM_TEST_ANNOUNCE_BLOCKS=0:6`` (see
``swarm/cli.py``): it serves layers 3:6 but announces 0:6, the cheapest route (one hop) for every client. Honest
nodes serve 0:3 and 3:6. When it lies in its info answer too, its first request is refused, the client probes it,
excludes it and reroutes; when its info tells the truth, the claim check before first use excludes it. Results equal
local transformers (fp32, ≤ 1e-5).
"""

from __future__ import annotations

import time

import pytest
import torch

from tests.integration.conftest import local_model

LIE = {"SWARM_TEST_ANNOUNCE_BLOCKS": "0:6"}


@pytest.fixture
def lying_swarm(tiny_checkpoint_factory, swarm_factory):
    path = tiny_checkpoint_factory("llama", num_layers=6)
    swarm = swarm_factory()
    honest = [swarm.start(path, "--blocks", "0:3")]
    honest.append(swarm.start(path, "--blocks", "3:6", initial_peers=swarm.initial_peers))
    return path, swarm, honest


def test_a_node_refusing_layers_it_announced_is_excluded_and_requests_rerouted(lying_swarm, client_factory):
    path, swarm, honest = lying_swarm
    liar = swarm.start(path, "--blocks", "3:6", initial_peers=swarm.initial_peers, env=LIE)
    ids = torch.randint(3, 128, (2, 7))
    ref = local_model(path)
    with torch.no_grad():
        want = ref(ids).logits

    client = client_factory(path, swarm)
    assert [h.peer_id for h in client.route()] == [liar.peer_id]  # the lie wins routing at first
    t0 = time.perf_counter()
    got = client(ids).logits
    elapsed_s = time.perf_counter() - t0
    assert (got - want).abs().max().item() <= 1e-5
    assert client.sequence.stats.distrusted == [liar.peer_id]
    print(f"forward with a reroute around the liar: {elapsed_s:.3f} s, reroute {client.sequence.stats.reroute_s}")
    assert [h.peer_id for h in client.route()] == [n.peer_id for n in honest]
    assert (client(ids).logits - want).abs().max().item() <= 1e-5  # and it stays excluded

    # A chained forward (node → node, as hybrid runs) through the liar is rerouted too.
    chained = client_factory(path, swarm)
    hidden = chained.local(ids, start=0, end=0, embed=True)
    out, _, route, _ = chained.loop.run(chained.sequence.forward_chain(hidden))
    assert [h.peer_id for h in route] == [n.peer_id for n in honest]
    assert chained.sequence.stats.distrusted == [liar.peer_id]
    assert (chained.local(out, start=0, end=0, head=True) - want).abs().max().item() <= 1e-5
    assert liar.proc.poll() is None  # excluded by clients, not crashed


def test_a_node_whose_info_contradicts_its_record_gets_no_traffic(lying_swarm, client_factory):
    path, swarm, honest = lying_swarm
    liar = swarm.start(path, "--blocks", "3:6", initial_peers=swarm.initial_peers,
                       env={**LIE, "SWARM_TEST_INFO_TELLS_TRUTH": "1"})
    client = client_factory(path, swarm)
    assert [h.peer_id for h in client.route()] == [n.peer_id for n in honest]
    assert client.sequence.stats.distrusted == [liar.peer_id]
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        want = local_model(path)(ids).logits
    assert (client(ids).logits - want).abs().max().item() <= 1e-5
    assert client.sequence.stats.reroutes == 0  # caught before any request went to it
