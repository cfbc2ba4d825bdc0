"""A chained forward refused by a full node mid-chain is routed around to its replica (issue 13, requirement 2).

Layers 0:2 on one node, 2:4 on two replicas started with ``--max-queued-compute 1``. The replica the client would
route to is held busy by a slow hybrid request (a 9,000-op constant graph). A chained forward (node → node, as hybrid
runs) is refused with :class:`OverloadedError` relayed by the first node; the client probes the route, finds the full
node, routes around it to the idle replica (without excluding it) and the result equals local transformers.
"""

from __future__ import annotations

import asyncio

import torch

from hybrid.ir import Graph, Ref
from hybrid.planner import Executor, Plan
from hybrid.request import HOOK_KIND, HOOK_VERSION, encode_request
from swarm.handles import FORWARD
from swarm.remote_sequence import ClientConfig
from swarm.transport import call
from tests.integration.conftest import local_model
from tests.integration.test_node_overload import HIDDEN, until_computing


def slow_request(start: int, end: int) -> tuple[dict, dict]:
    graph = Graph()
    prev = graph.add("function", target="torch.ones_like", args=[graph.attach(torch.zeros(64, 64))])
    for _ in range(9_000 - 1):
        prev = graph.add("operator", target="add", args=[Ref(prev.id), 1.0])
    payload = encode_request(graph, Plan([Executor("node", start, end)], [0] * len(graph.nodes), [[]], []), 0)
    tensors = {"inputs": torch.randn(1, 3, HIDDEN), "hook_payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    return tensors, {"start": start, "end": end, "hook": {"kind": HOOK_KIND, "version": HOOK_VERSION}, "hop": 0}


def test_chained_forward_routes_around_a_full_node_mid_chain(tiny_checkpoint_factory, swarm_factory, client_factory):
    path = tiny_checkpoint_factory("llama", num_layers=4)
    swarm = swarm_factory()
    first = swarm.start(path, "--blocks", "0:2")
    replicas = [swarm.start(path, "--blocks", "2:4", "--max-queued-compute", "1", initial_peers=swarm.initial_peers)
                for _ in range(2)]
    # verify=0: a spot check's re-run would avoid the idle replica and meet the full one; this test counts reroutes
    client = client_factory(path, swarm, client_config=ClientConfig(verify=0.0))
    seq = client.sequence
    [_, hop] = client.route()
    held = next(n for n in replicas if n.peer_id == hop.peer_id)
    idle = next(n for n in replicas if n is not held)
    ids = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        want = local_model(path)(ids).logits
    hidden = client.local(ids, start=0, end=0, embed=True)
    tensors, meta = slow_request(2, 4)

    async def scenario():
        heavy = asyncio.ensure_future(call(seq.p2p, held.peer_id, FORWARD, tensors, meta, timeout_s=120))
        await until_computing(seq.p2p, held.peer_id, heavy)
        out, _, route, _ = await seq.forward_chain(hidden)
        refused_while_busy = not heavy.done()
        await heavy
        return out, route, refused_while_busy

    out, route, refused_while_busy = client.loop.run(scenario(), timeout_s=90)
    assert refused_while_busy, "the slow request finished first: the test did not exercise overload"
    assert [h.peer_id for h in route] == [first.peer_id, idle.peer_id]
    assert seq.stats.reroutes >= 1 and len(seq.stats.reroute_s) == 1
    assert not seq.excluded(), "a node that refused for overload was excluded as if dead or lying"
    assert (client.local(out, start=0, end=0, head=True) - want).abs().max().item() <= 1e-5
    print(f"chained forward rerouted around the full node in {seq.stats.reroute_s[0]:.3f} s")
