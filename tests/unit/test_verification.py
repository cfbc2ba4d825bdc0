"""Spot-check decisions on fake nodes (no sockets): who is outvoted, when a result is refused."""

from __future__ import annotations

import asyncio

import pytest
import torch

import swarm.verification as verification
from swarm.errors import ResultMismatchError
from swarm.records import ServerRecord
from swarm.remote_sequence import ClientConfig, RouteStats
from swarm.routing import Hop, RouteCosts


def rec(peer: str) -> ServerRecord:
    return ServerRecord(peer_id=peer, start=0, end=4, model_name="m", checkpoint_hash="h", num_layers=4)


class FakeSequence:
    model_name, config, p2p, _call_options = "m", ClientConfig(verify=1.0), None, {}

    def __init__(self, peers):
        self._records = [rec(p) for p in peers]
        self.stats = RouteStats()
        self.distrusted, self.reported = [], []

    async def records(self):
        return self._records

    def excluded(self):
        return frozenset(self.distrusted)

    def costs(self):
        return RouteCosts()

    def distrust(self, peer_id, why):
        self.distrusted.append(peer_id)

    async def report_suspect(self, peer_id, why):
        self.reported.append(peer_id)


def run(monkeypatch, peers, liars, checked):
    async def fake_call(p2p, peer_id, handle, tensors, meta, **kwargs):
        out = tensors["inputs"] + 1
        return {"outputs": out + 0.1 if peer_id in liars else out}, {}
    monkeypatch.setattr(verification, "call", fake_call)
    seq = FakeSequence(peers)
    x = torch.zeros(1, 2, 3)
    y = x + 1 + (0.1 if checked in liars else 0.0)
    hop = Hop(rec(checked), 0, 4)
    return seq, asyncio.run(verification.spot_check(seq, hop, x, y, {}, embed=False, head=False))


def test_agreeing_answers_pass_and_a_liar_is_outvoted(monkeypatch):
    seq, out = run(monkeypatch, ["a", "b", "c"], liars=set(), checked="a")
    assert torch.equal(out, torch.ones(1, 2, 3)) and seq.distrusted == [] and seq.stats.verify_mismatches == 0
    seq, out = run(monkeypatch, ["a", "b", "c"], liars={"a"}, checked="a")
    assert torch.equal(out, torch.ones(1, 2, 3)) and seq.distrusted == ["a"] and seq.stats.verify_mismatches == 1
    assert seq.reported == ["a"]


def test_a_disagreement_without_a_third_opinion_returns_nothing(monkeypatch):
    with pytest.raises(ResultMismatchError, match="no third node"):
        run(monkeypatch, ["a", "b"], liars={"a"}, checked="a")
    seq, out = run(monkeypatch, ["a"], liars={"a"}, checked="a")  # nobody to ask: skipped, counted
    assert seq.stats.verify_skipped == 1


def test_tolerance_follows_the_dtype():
    a = torch.ones(4)
    assert verification.agree(a, a + 5e-6) and not verification.agree(a, a + 1e-3)
    assert verification.agree(a.bfloat16(), (a + 5e-3).bfloat16())
    assert not verification.agree(a, a.bfloat16()) and not verification.agree(a, torch.ones(5))
