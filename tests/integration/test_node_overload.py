"""Overload answers a typed OverloadedError quickly (issue 10, req. 4).

A real node started with ``--max-queued-compute 1`` gets one slow hybrid request (a 9,000-op constant graph, a
second or more in its compute executor) and then several more requests: each is refused with
:class:`OverloadedError` (the type crossed the wire as ``{code, message}``) *before* the slow request finishes, and
pings keep answering. A client with two such replicas, one of them held busy, completes concurrent forwards exactly
(equal to the local model), routing around refusals instead of failing or excluding the refusing node.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from bench.node_event_loop import chain_graph_payload
from hybrid.request import HOOK_KIND, HOOK_VERSION
from swarm.errors import OverloadedError
from swarm.handles import FORWARD
from swarm.remote_sequence import ClientConfig
from swarm.transport import call, ping
from tests.integration.conftest import local_model

HIDDEN = 64


def slow_request() -> tuple[dict, dict]:
    payload = chain_graph_payload(9_000)
    tensors = {"inputs": torch.randn(1, 3, HIDDEN),
               "hook_payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    return tensors, {"start": 0, "end": 4, "hook": {"kind": HOOK_KIND, "version": HOOK_VERSION}, "hop": 0}


async def until_computing(p2p, peer_id: str, heavy: asyncio.Future) -> None:
    """Wait until the node's info says a job is in its compute executor (the slow request is being worked on)."""
    while not heavy.done():
        _, info = await ping(p2p, peer_id, timeout_s=30)
        if info.get("computing", 0) >= 1:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the slow request finished before the node reported it computing")


def test_a_full_node_refuses_quickly_and_keeps_answering_pings(tiny_checkpoint_factory, swarm_factory,
                                                                client_factory):
    path = tiny_checkpoint_factory("llama", num_layers=4)
    swarm = swarm_factory()
    node = swarm.start(path, "--blocks", "0:4", "--max-queued-compute", "1")
    client = client_factory(path, swarm)
    p2p = client.sequence.p2p
    tensors, meta = slow_request()

    async def scenario():
        await ping(p2p, node.peer_id)
        heavy = asyncio.ensure_future(call(p2p, node.peer_id, FORWARD, tensors, meta, timeout_s=120))
        await until_computing(p2p, node.peer_id, heavy)
        small = {"inputs": torch.randn(1, 3, HIDDEN)}
        refusals = await asyncio.gather(*(call(p2p, node.peer_id, FORWARD, small, {"start": 0, "end": 4},
                                               timeout_s=60) for _ in range(4)), return_exceptions=True)
        refused_before_heavy = not heavy.done()
        pings = 0
        while not heavy.done():
            await ping(p2p, node.peer_id, timeout_s=30)
            pings += 1
            await asyncio.sleep(0.02)
        out, _ = await heavy
        return refusals, refused_before_heavy, pings, out

    refusals, refused_before_heavy, pings, out = client.loop.run(scenario(), timeout_s=90)
    assert all(type(r) is OverloadedError for r in refusals), refusals
    assert "--max-queued-compute) is 1" in refusals[0].message
    assert refused_before_heavy, "the refusals came only after the running request had finished"
    assert pings >= 1 and "hook_result" in out
    assert node.proc.poll() is None


def test_a_client_with_two_replicas_routes_around_refusals(tiny_checkpoint_factory, swarm_factory, client_factory):
    path = tiny_checkpoint_factory("llama", num_layers=4)
    swarm = swarm_factory()
    nodes = [swarm.start(path, "--blocks", "0:4", "--max-queued-compute", "1",
                         initial_peers=swarm.initial_peers if i else None) for i in range(2)]
    # verify=0: spot checks would send extra requests to the full replica; this test is about refusals alone
    client = client_factory(path, swarm, client_config=ClientConfig(verify=0.0))
    seq = client.sequence
    ids = [torch.randint(3, 128, (1, 7 + i)) for i in range(4)]
    with torch.no_grad():
        ref = local_model(path)
        want = [ref(x).logits for x in ids]
    [hop] = client.route()
    held = next(n for n in nodes if n.peer_id == hop.peer_id)  # the node the client would route to first
    tensors, meta = slow_request()

    async def scenario():
        heavy = asyncio.ensure_future(call(seq.p2p, held.peer_id, FORWARD, tensors, meta, timeout_s=120))
        await until_computing(seq.p2p, held.peer_id, heavy)
        got = await asyncio.gather(*(seq.forward(x, embed=True, head=True) for x in ids))
        await heavy
        return [logits for logits, _ in got]

    got = client.loop.run(scenario(), timeout_s=90)
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() <= 1e-5
    assert seq.stats.reroutes >= 1, "no request was refused: the test did not exercise overload"
    assert not seq.excluded(), "a node that refused for overload was excluded as if dead"
    assert all(n.proc.poll() is None for n in nodes)
