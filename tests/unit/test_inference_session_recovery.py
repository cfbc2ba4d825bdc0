"""A hop-by-hop inference session's recovery (re-route and replay a hop's history) can itself be refused or cut off:
the step retries it within ``max_retries`` like the step itself instead of raising out of the retry loop; and a step
that fails anyway leaves no node's cache silently ahead of the session (the next step rebuilds the hops that ran it).

No network: fake nodes whose "layers" are a running sum over every token their session's cache holds, so any cache
that holds a step twice, or misses one, changes every later answer."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

import swarm.inference_session as inference_session
from swarm.errors import (BadRequestError, CapacityError, OverloadedError, PeerUnreachableError,
                          UnknownSessionError)
from swarm.inference_session import InferenceSession
from swarm.remote_sequence import ClientConfig, RouteStats
from swarm.routing import Hop

REPLICAS = {(0, 2): ["A1", "A2"], (2, 4): ["B1", "B2", "B3"]}


class FakeSwarm:
    """Nodes keyed by peer id: each holds its sessions' caches and fails its next calls with ``fail[peer]``."""

    def __init__(self, replicas=REPLICAS):
        self.replicas, self.caches, self.fail = replicas, {}, {}
        self.busy, self.excluded, self.closed = set(), set(), []

    async def call(self, p2p, peer, handle, tensors, meta, **_):
        caches = self.caches.setdefault(peer, {})
        if meta.get("close"):
            self.closed.append(peer)
            caches.pop(meta["session_id"], None)
            return {}, {}
        if self.fail.get(peer):
            raise self.fail[peer].pop(0)
        if meta["session_id"] not in caches:
            if "open" not in meta:
                raise UnknownSessionError("not open")
            caches[meta["session_id"]] = tensors["inputs"][:, :0]
        cache = caches[meta["session_id"]] = torch.cat([caches[meta["session_id"]], tensors["inputs"]], dim=1)
        return {"outputs": cache.cumsum(1)[:, -tensors["inputs"].shape[1]:]}, {}

    async def route(self, start, end, *, embed=False, head=False):
        peers = [p for p in self.replicas[(start, end)] if p not in self.excluded]
        idle = [p for p in peers if p not in self.busy]
        return [Hop(SimpleNamespace(peer_id=(idle or peers)[0]), start, end)]

    def sequence(self, max_retries: int = 3):
        async def no_wait(*_):
            pass
        # the fake call answers on the request's stream: no collected answers (direct_reply)
        return SimpleNamespace(config=ClientConfig(max_retries=max_retries, verify=0.0, direct_reply=False),
                               stats=RouteStats(),
                               traffic=None, p2p=None, num_layers=4, route=self.route, mark_busy=self.busy.add,
                               note_failure=lambda peer, e: self.excluded.add(peer), overload_backoff=no_wait,
                               excluded=lambda: set(self.excluded))


@pytest.fixture
def nodes(monkeypatch):
    fake = FakeSwarm()
    monkeypatch.setattr(inference_session, "call", fake.call)
    return fake


def open_session(nodes, **kwargs) -> InferenceSession:
    sequence = nodes.sequence(**kwargs)
    hops = [asyncio.run(nodes.route(*span))[0] for span in REPLICAS]
    return InferenceSession(sequence, hops, batch_size=1, max_length=16, embed=False, head=False)


def reference(*steps: torch.Tensor) -> torch.Tensor:
    """Both hops over the whole sequence at once: the last step's positions."""
    return torch.cat(steps, dim=1).cumsum(1).cumsum(1)[:, -steps[-1].shape[1]:]


def test_a_replay_refused_or_cut_off_is_retried_within_the_step(nodes):
    s = open_session(nodes)
    first, second = torch.rand(1, 3, 2), torch.rand(1, 2, 2)
    assert torch.allclose(asyncio.run(s.step(first)), reference(first))
    nodes.fail["B1"] = [PeerUnreachableError("B1 gone")]
    nodes.fail["B2"] = [OverloadedError("B2 refuses the replay", "B2")]  # the old loop raised this
    out = asyncio.run(s.step(second))
    assert torch.allclose(out, reference(first, second))
    assert [h.peer_id for h in s.route] == ["A1", "B3"] and nodes.caches["B3"][s._hops[1].session_id].shape[1] == 5
    assert nodes.excluded == {"B1"} and "B2" in nodes.busy  # each failure noted against its own node
    assert "B1" not in nodes.closed  # no close call waits on the dead node
    assert s.length == 5 and s.sequence.stats.reroutes == 1


def test_replays_count_against_max_retries(nodes):
    s = open_session(nodes, max_retries=2)
    first = torch.rand(1, 3, 2)
    asyncio.run(s.step(first))
    nodes.fail["B1"] = [PeerUnreachableError("B1 gone")]
    nodes.fail["B2"] = [PeerUnreachableError("B2 gone")]
    nodes.fail["B3"] = [OverloadedError("B3 refuses the replay", "B3")]
    with pytest.raises(OverloadedError, match="B3 refuses"):
        asyncio.run(s.step(torch.rand(1, 1, 2)))
    assert s.length == 3


def test_a_full_node_without_replica_is_raised_at_once(monkeypatch):
    fake = FakeSwarm({(0, 2): ["A1"], (2, 4): ["B1"]})
    monkeypatch.setattr(inference_session, "call", fake.call)
    s = InferenceSession(fake.sequence(), [asyncio.run(fake.route(*span))[0] for span in REPLICAS], batch_size=1,
                         max_length=16, embed=False, head=False)
    fake.fail["B1"] = [CapacityError("B1 cache full")] * 5
    with pytest.raises(CapacityError, match="B1 cache full"):
        asyncio.run(s.step(torch.rand(1, 2, 2)))
    assert len(fake.fail["B1"]) == 4  # asked once, not retried against a node with nowhere else to go


def test_a_step_that_fails_midway_leaves_no_cache_ahead_of_the_session(nodes):
    s = open_session(nodes)
    first, second = torch.rand(1, 3, 2), torch.rand(1, 2, 2)
    asyncio.run(s.step(first))
    nodes.fail["B1"] = [BadRequestError("B1 refuses this step")]  # not retried: A1 already ran the step
    with pytest.raises(BadRequestError):
        asyncio.run(s.step(second))
    assert s.length == 3
    out = asyncio.run(s.step(second))  # the step again: A1 must not count it twice
    assert torch.allclose(out, reference(first, second))
    third = torch.rand(1, 1, 2)
    assert torch.allclose(asyncio.run(s.step(third)), reference(first, second, third))


def test_a_stale_hop_whose_rebuild_is_refused_is_never_reused(monkeypatch):
    """A stale hop (its cache holds a failed step) is rebuilt before the next step; when its only node refuses that
    rebuild's replay as overloaded, the retry must rebuild again after the backoff, not send the step to the stale
    session as if it were the overloaded node's intact one."""
    fake = FakeSwarm({(0, 2): ["A1"], (2, 4): ["B1", "B2"]})
    monkeypatch.setattr(inference_session, "call", fake.call)
    s = InferenceSession(fake.sequence(), [asyncio.run(fake.route(*span))[0] for span in REPLICAS], batch_size=1,
                         max_length=16, embed=False, head=False)
    first, second = torch.rand(1, 3, 2), torch.rand(1, 2, 2)
    asyncio.run(s.step(first))
    fake.fail["B1"] = [BadRequestError("B1 refuses this step")]  # A1 ran it: A1's session is stale now
    with pytest.raises(BadRequestError):
        asyncio.run(s.step(second))
    fake.fail["A1"] = [OverloadedError("A1 refuses the replay", "A1")]  # the rebuild on A1, its only node
    out = asyncio.run(s.step(second))
    assert torch.allclose(out, reference(first, second))
