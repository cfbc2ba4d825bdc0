"""An inference session whose node refuses a step as overloaded is rerouted or backs off, never fails (issue 10,
req. 4-5): the output is identical to local transformers.

Nodes run with ``--max-queued-compute 1``; mid-generation another client holds the node serving the session busy
(an inference step replaying 250 one-token chunks), so the session's next step is refused with OverloadedError.
With a replica, the session moves there (its history replayed); without one, it keeps its session and retries after a
backoff; a chained session routes around the refusing hop, which the relayed error names. A session that meets a
full KV cache midway (bytes are charged as used) moves to a replica the same way.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch

from swarm.chained_session import ChainedSession
from swarm.errors import CapacityError
from swarm.handles import INFERENCE
from swarm.transport import call, ping
from tests.integration.conftest import local_generate, local_model

pytestmark = pytest.mark.usefixtures("one_thread")

HIDDEN, LAYERS = 64, 4


def hold_busy(holder, peer_id: str) -> asyncio.Future:
    """Start a long request on ``peer_id`` from ``holder``'s client and return once the node is computing it."""
    async def start():
        tensors = {"inputs": torch.randn(1, 250, HIDDEN)}
        meta = {"session_id": uuid.uuid4().hex, "start": 2, "end": LAYERS, "open": {"max_length": 256, "batch_size": 1},
                "chunks": [1] * 250}
        heavy = asyncio.ensure_future(call(holder.sequence.p2p, peer_id, INFERENCE, tensors, meta, timeout_s=120))
        while not heavy.done():
            _, info = await ping(holder.sequence.p2p, peer_id)
            if info.get("computing", 0) >= 1:
                return heavy
            await asyncio.sleep(0.005)
        raise AssertionError(f"the holding request ended before the node reported it computing: {heavy.result()}")
    return holder.loop.run(start(), timeout_s=60)


async def finish(request: asyncio.Future):
    return await request


def start_nodes(swarm, path, spans: list[str]) -> dict:
    nodes = {}
    for i, span in enumerate(spans):
        node = swarm.start(path, "--blocks", span, "--max-queued-compute", "1",
                           initial_peers=swarm.initial_peers if i else None)
        nodes[node.peer_id] = node
    return nodes


@pytest.mark.parametrize("replicas", [2, 1])
def test_a_generation_refused_as_overloaded_moves_or_backs_off_and_stays_exact(
        replicas, tiny_checkpoint_factory, swarm_factory, client_factory):
    path = tiny_checkpoint_factory("llama", num_layers=LAYERS)
    swarm = swarm_factory()
    nodes = start_nodes(swarm, path, ["0:4"] * replicas)
    client, holder = client_factory(path, swarm), client_factory(path, swarm)
    prompt = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    want = local_generate(local_model(path), prompt, 12)
    held, routes = [], []

    def hold_at_step_3(step, tokens):
        if step == 3:
            [hop] = client.active_session.route
            routes.append(hop.peer_id)
            held.append(hold_busy(holder, hop.peer_id))
        if step == 11:
            routes.append(client.active_session.route[0].peer_id)

    got = client.generate(prompt, max_new_tokens=12, eos_token_id=None, on_token=hold_at_step_3)
    assert held, "the test did not hold the node busy"
    assert torch.equal(got, want)
    assert client.sequence.stats.reroutes >= 1, "no step was refused: the test did not exercise overload"
    assert not client.sequence.excluded(), "a node that refused as overloaded was excluded as if dead"
    if replicas == 2:
        assert routes[1] != routes[0], "the session stayed on the busy node although a replica was idle"
    else:
        assert routes[1] == routes[0]
    holder.loop.run(finish(held[0]), timeout_s=60)  # the holding request completes too
    assert all(n.proc.poll() is None for n in nodes.values())


def test_a_chained_session_routes_around_the_refusing_hop(tiny_checkpoint_factory, swarm_factory, client_factory):
    path = tiny_checkpoint_factory("llama", num_layers=LAYERS)
    swarm = swarm_factory()
    start_nodes(swarm, path, ["0:2", "2:4", "2:4"])
    client, holder = client_factory(path, swarm), client_factory(path, swarm)
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = local_model(path)(ids).logits  # (1, 10, V)
        hidden = client.local(ids, start=0, end=0, embed=True)
    seq = client.sequence
    session = client.loop.run(ChainedSession.create(seq, batch_size=1, max_length=16))
    steps, got, routes = [(0, 6), (6, 7), (7, 8), (8, 9), (9, 10)], [], []
    held = None
    for k, (a, b) in enumerate(steps):
        if k == 2:
            second = session.route[1].peer_id
            routes.append(second)
            held = hold_busy(holder, second)
        out, _ = client.loop.run(session.step(hidden[:, a:b]), timeout_s=60)
        with torch.no_grad():
            got.append(client.local(out, start=0, end=0, head=True))
    routes.append(session.route[1].peer_id)
    client.loop.run(session.close())
    assert (torch.cat(got, dim=1) - want).abs().max().item() <= 1e-5
    assert seq.stats.reroutes >= 1, "no step was refused: the test did not exercise overload"
    assert routes[1] != routes[0], "the chained session stayed on the busy hop although a replica was idle"
    assert not seq.excluded()
    holder.loop.run(finish(held), timeout_s=60)


async def fill_cache(p2p, peer_id: str) -> int:
    """Charge one session on ``peer_id`` with as many tokens as its KV cache takes (to the last 1,024-byte token);
    returns the tokens held."""
    session_id, opened, held = uuid.uuid4().hex, False, 0
    for size in (64, 16, 4, 1):
        while True:
            meta = {"session_id": session_id, "start": 0, "end": LAYERS, "chunks": [size]}
            if not opened:
                meta["open"] = {"max_length": 256, "batch_size": 1}
            try:
                await call(p2p, peer_id, INFERENCE, {"inputs": torch.randn(1, size, HIDDEN)}, meta, timeout_s=30)
            except CapacityError:
                break
            opened, held = True, held + size
    return held


def test_a_generation_meeting_a_full_kv_cache_moves_to_a_replica(tiny_checkpoint_factory, swarm_factory,
                                                                 client_factory):
    path = tiny_checkpoint_factory("llama", num_layers=LAYERS)
    swarm = swarm_factory()
    for i in range(2):
        swarm.start(path, "--blocks", f"0:{LAYERS}", "--max-cache-bytes", "200000", "--max-client-cache-bytes",
                    "200000", initial_peers=swarm.initial_peers if i else None)
    client, other = client_factory(path, swarm), client_factory(path, swarm)
    prompt = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(5))
    want = local_generate(local_model(path), prompt, 12)
    filled, routes = [], []

    def fill_at_step_3(step, tokens):
        if step == 3:  # another client's session takes the rest of the cache the generation's session grows in
            [hop] = client.active_session.route
            routes.append(hop.peer_id)
            filled.append(other.loop.run(fill_cache(other.sequence.p2p, hop.peer_id), timeout_s=60))
        if step == 11:
            routes.append(client.active_session.route[0].peer_id)

    got = client.generate(prompt, max_new_tokens=12, eos_token_id=None, on_token=fill_at_step_3)
    assert filled and filled[0] > 100, filled
    assert torch.equal(got, want)
    assert routes[1] != routes[0], "the session was not moved off the node whose cache was full"
    assert not client.sequence.excluded()
