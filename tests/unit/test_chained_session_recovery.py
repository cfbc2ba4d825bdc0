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
