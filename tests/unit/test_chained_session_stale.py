"""A chained step that fails past its retries may already have run on the hops before the failing one (a later hop's
CapacityError or MailboxFullError): the next step rebuilds the session from its history first, so no cache counts
the failed step. No network: a fake chain whose first hop keeps every step it ran."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from swarm.chained_session import ChainedSession
from swarm.errors import MailboxFullError
from swarm.remote_sequence import ClientConfig, RouteStats


def test_a_step_that_failed_midway_is_not_counted_again_by_the_next():
    async def route(*_, **__):
        return []
    sequence = SimpleNamespace(config=ClientConfig(max_retries=3, verify=0.0), stats=RouteStats(), traffic=None,
                               route=route, excluded=set)
    s = ChainedSession(sequence, [], batch_size=1, max_length=8, embed=False, head=False, start=0, end=2)
    first_hop, fail = [], []

    async def send(step, last_only, argmax=False):
        first_hop.append(step.inputs)  # the first hop runs the step into its cache ...
        if fail:
            raise fail.pop(0)  # ... before a later hop refuses it
        return torch.cat(first_hop, dim=1).sum(1, keepdim=True), b""

    async def close_sessions():
        first_hop.clear()

    s._send, s._close_sessions = send, close_sessions
    a, b, c = torch.rand(1, 3, 2), torch.rand(1, 2, 2), torch.rand(1, 1, 2)
    asyncio.run(s.step(a))
    fail.append(MailboxFullError("the last hop cannot hold the answer"))
    with pytest.raises(MailboxFullError):
        asyncio.run(s.step(b))
    assert s.length == 3
    out, _ = asyncio.run(s.step(b))  # the same step again: the first hop must not hold b twice
    assert torch.allclose(out, torch.cat([a, b], dim=1).sum(1, keepdim=True))
    out, _ = asyncio.run(s.step(c))
    assert torch.allclose(out, torch.cat([a, b, c], dim=1).sum(1, keepdim=True)) and s.length == 6
