"""Spot-check decisions on fake nodes (no sockets): who is outvoted, when a result is refused."""

from __future__ import annotations

import asyncio

import pytest
import torch

import swarm.verification as verification
from swarm.errors import PeerUnreachableError, ResultMismatchError
from swarm.records import ServerRecord
from swarm.remote_sequence import ClientConfig, RouteStats
from swarm.routing import Hop, RouteCosts


def rec(peer: str) -> ServerRecord:
    return ServerRecord(peer_id=peer, start=0, end=4, model_name="m", checkpoint_hash="h", num_layers=4)


class FakeSequence:
    model_name, config, p2p, _call_options, _verify_options = "m", ClientConfig(verify=1.0), None, {}, {}

    def __init__(self, peers):
        self._records = [rec(p) for p in peers]
        self.stats = RouteStats()
        self.distrusted, self.reported, self.failed = [], [], []

    async def records(self):
        return self._records

    def excluded(self):
        return frozenset(self.distrusted)

    def costs(self):
        return RouteCosts()

    def note_failure(self, peer_id, error):
        self.failed.append(peer_id)

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


def test_a_failing_checker_gives_up_the_check_not_the_answer(monkeypatch):
    async def dead(p2p, peer_id, handle, tensors, meta, **kwargs):
        raise PeerUnreachableError(f"{peer_id} is gone")
    monkeypatch.setattr(verification, "call", dead)
    seq = FakeSequence(["a", "b"])
    y = torch.ones(1, 2, 3)
    out = asyncio.run(verification.spot_check(seq, Hop(rec("a"), 0, 4), torch.zeros(1, 2, 3), y, {}, embed=False,
                                              head=False))
    assert out is y and seq.stats.verify_skipped == 1 and seq.distrusted == [] and seq.failed == ["b", "b"]


def chained_answer(peer: str, result: bytes) -> tuple:
    return torch.ones(1, 2, 3), result, [Hop(rec(peer), 0, 4)], {}


def test_a_chain_check_compares_hook_results_with_the_hooks_own_comparison():
    """Byte-different hook results that the hook says agree pass; a liar's are outvoted with the same comparison."""
    answers = {"b": chained_answer("b", b"1.0000001"), "c": chained_answer("c", b"1.0")}

    async def run_avoiding(avoid):
        return next(a for p, a in answers.items() if p not in avoid)

    def close(a: bytes, b: bytes) -> bool:
        return abs(float(a) - float(b)) < 1e-5

    seq = FakeSequence(["a", "b", "c"])
    out = asyncio.run(verification.spot_check_chain(seq, chained_answer("a", b"1.0"), run_avoiding, close))
    assert out[2][0].peer_id == "a" and seq.stats.verify_mismatches == 0
    with pytest.raises(ResultMismatchError):  # byte for byte (no comparison given), b and c disagree with a
        asyncio.run(verification.spot_check_chain(FakeSequence(["a", "b", "c"]), chained_answer("a", b"1.00000001"),
                                                  run_avoiding))
    seq = FakeSequence(["a", "b", "c"])
    out = asyncio.run(verification.spot_check_chain(seq, chained_answer("a", b"1.1"), run_avoiding, close))
    assert out[2][0].peer_id == "b" and seq.distrusted == ["a"] and seq.stats.suspects == ["a"]


def test_hybrid_results_agree_within_the_dtype_tolerance_and_exactly_elsewhere():
    from hybrid.values import pack_values, results_agree

    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    base = {1: x, 2: (torch.tensor([1, 2]), 3), 4: torch.tensor([True, False])}
    assert results_agree(pack_values(base), pack_values({**base, 1: x + 5e-6}))
    assert not results_agree(pack_values(base), pack_values({**base, 1: x + 1e-3}))
    assert results_agree(pack_values({1: x.bfloat16()}), pack_values({1: (x + 2e-3).bfloat16()}))
    assert not results_agree(pack_values(base), pack_values({**base, 2: (torch.tensor([1, 3]), 3)}))  # ints exact
    assert not results_agree(pack_values(base), pack_values({**base, 2: (torch.tensor([1, 2]), 4)}))
    assert not results_agree(pack_values(base), pack_values({**base, 4: torch.tensor([True, True])}))
    assert not results_agree(pack_values(base), pack_values({1: x, 2: base[2]}))  # a missing value
    assert not results_agree(pack_values(base), pack_values({**base, 1: x.double()}))  # another dtype
    assert not results_agree(pack_values(base), b"HYVL garbage")
