"""A chained session's recovery (re-routing and replaying the earlier steps) can itself be refused or cut off: the
step then retries it like the step itself, within ``max_retries``, instead of raising out of the retry loop (seen
once under load: ``OverloadedError`` from the replay of a session moving around a refusing hop)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from swarm.chained_session import ChainedSession
from swarm.errors import OverloadedError, PeerUnreachableError
from swarm.remote_sequence import ClientConfig, RouteStats


def session(failures: list[Exception], recover_failures: list[Exception], max_retries: int = 3):
    """A session whose step sends fail with ``failures`` (then answer) and whose recoveries fail with
    ``recover_failures`` (then succeed); no network."""
    sequence = SimpleNamespace(config=ClientConfig(max_retries=max_retries, verify=0.0), stats=RouteStats(),
                               traffic=None)
    s = ChainedSession(sequence, [], batch_size=1, max_length=8, embed=False, head=False, start=0, end=2)
    s.sent, s.recovered = 0, 0

    async def send(step, last_only, argmax=False):
        s.sent += 1
        if failures:
            raise failures.pop(0)
        return step.inputs + 1, b""

    async def recover(*_):
        s.recovered += 1
        if recover_failures:
            raise recover_failures.pop(0)

    s._send, s._after_overload, s._rebuild = send, recover, recover
    return s


@pytest.mark.parametrize("first", [OverloadedError("full", "peerA"), PeerUnreachableError("gone")])
def test_a_recovery_refused_or_cut_off_is_retried(first):
    s = session([first], [OverloadedError("replay refused", "peerB"), PeerUnreachableError("replay cut off")])
    x = torch.zeros(1, 1, 4)
    out, _ = asyncio.run(s.step(x))
    assert torch.equal(out, x + 1)
    assert s.recovered == 3 and s.sent == 2  # three recoveries (two failed), then the step's second send
    assert s.length == 1 and s.sequence.stats.reroutes == 1


def test_recoveries_count_against_max_retries():
    s = session([OverloadedError("full", "peerA")], [OverloadedError("replay refused", "peerB")] * 5, max_retries=2)
    with pytest.raises(OverloadedError, match="replay refused"):
        asyncio.run(s.step(torch.zeros(1, 1, 4)))
    assert s.recovered == 2 and s.length == 0


def test_a_replay_refused_midway_is_never_continued_by_the_step():
    """The rebuild around a refusing hop replays the history on fresh sessions; if the first hop refuses a replay
    midway (its queue is full for a moment), the sessions hold only part of the history. The retry must rebuild
    again, not send the step to those sessions as if nothing had run (seen under load: logits off by 0.63)."""
    a, b = SimpleNamespace(peer_id="A", start=0, end=2), SimpleNamespace(peer_id="B", start=2, end=4)
    c = SimpleNamespace(peer_id="C", start=2, end=4)

    async def route(*_, **__):
        return [a, c]

    async def nothing(*_, **__):
        return None
    sequence = SimpleNamespace(config=ClientConfig(max_retries=3, verify=0.0), stats=RouteStats(), traffic=None,
                               route=route, mark_busy=lambda peer: None, overload_backoff=nothing, excluded=set)
    s = ChainedSession(sequence, [a, b], batch_size=1, max_length=8, embed=False, head=False, start=0, end=4)
    held: dict[tuple, int] = {}  # steps each set of sessions holds in its caches
    refusals = [None, None, OverloadedError("B is busy", "B"), None, OverloadedError("A is busy", "A")]

    async def send(step, last_only, argmax=False):
        error = refusals.pop(0) if refusals else None
        if error is not None:
            raise error  # refused at admission: nothing ran
        key = tuple(s._session_ids)
        held[key] = held.get(key, 0) + 1
        return torch.full((1, 1, 1), float(held[key] - 1)), b""  # how many earlier steps these sessions hold

    s._send, s._close_sessions = send, nothing
    x = torch.zeros(1, 1, 1)
    asyncio.run(s.step(x))
    asyncio.run(s.step(x))
    out, _ = asyncio.run(s.step(x))  # refused by B; the rebuild's second replay refused by A
    assert out.item() == 2, "the step ran on sessions missing part of the history"
    assert s.route[1].peer_id == "C" and s.length == 3
