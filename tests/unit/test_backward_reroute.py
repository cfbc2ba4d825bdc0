"""A backward pass whose node failed is rerouted (the hop's layers re-run forward, then backward, on other nodes); that
reroute can itself be refused or cut off: it is retried within ``max_retries`` like the first call, each failed node
noted so the next try goes around it, instead of raising out of the retry loop. No network: a fake ``call``."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

import swarm.remote_sequence as remote_sequence
from swarm.errors import OverloadedError, PeerUnreachableError
from swarm.handles import BACKWARD, FORWARD
from swarm.remote_sequence import ClientConfig, RemoteSequence
from swarm.routing import Hop


def hop(peer: str) -> Hop:
    return Hop(SimpleNamespace(peer_id=peer), 0, 2)


def sequence(monkeypatch, fail: dict, max_retries: int = 3) -> RemoteSequence:
    seq = RemoteSequence(None, None, None, key="k", model_name="m", num_layers=2, checkpoint_hash="h",
                         config=ClientConfig(max_retries=max_retries, overload_backoff_s=0.0,
                                             direct_reply=False))  # the fake call answers on the request's stream

    async def call(p2p, peer, handle, tensors, meta, **_):
        if fail.get((peer, handle)):
            raise fail[(peer, handle)].pop(0)
        return {"outputs": tensors["grad_outputs"] * 2 if handle == BACKWARD else tensors["inputs"] + 1}, {}

    async def route(start, end, **_):  # the first replica neither excluded nor busy
        return [next(hop(p) for p in ("B", "C", "D") if p not in seq.excluded() and p not in seq._busy)]
    monkeypatch.setattr(remote_sequence, "call", call)
    seq.route = route
    return seq


def test_a_reroute_refused_or_cut_off_is_retried(monkeypatch):
    seq = sequence(monkeypatch, {("A", BACKWARD): [PeerUnreachableError("A gone")],
                                 ("B", BACKWARD): [OverloadedError("B refuses the rerouted backward", "B")],
                                 ("C", FORWARD): [PeerUnreachableError("C cut off")]})
    grad = torch.ones(1, 2, 4)
    got = asyncio.run(seq.backward([(hop("A"), torch.zeros(1, 2, 4))], grad))
    assert torch.equal(got, grad * 2)
    assert {"A", "C"} <= seq.excluded() and "B" in seq._busy  # each failure noted against its own node


def test_reroutes_count_against_max_retries(monkeypatch):
    seq = sequence(monkeypatch, {("A", BACKWARD): [PeerUnreachableError("A gone")],
                                 ("B", BACKWARD): [PeerUnreachableError("B gone")],
                                 ("C", BACKWARD): [OverloadedError("C refuses", "C")]}, max_retries=2)
    with pytest.raises(OverloadedError, match="C refuses"):
        asyncio.run(seq.backward([(hop("A"), torch.zeros(1, 2, 4))], torch.ones(1, 2, 4)))
