"""Nothing heavy on a node's event loop (issue 10, req. 3): while a request's graph is decoded and checked, the node
keeps answering pings.

One real node (a tiny random Llama, layers 0:4) gets a hybrid request whose graph is 9,000 constant tensor ops (a
second or more of interpretation while the node builds the request's hook). A second connection pings the node's
``info`` RPC the whole time. The node must answer pings *while* that request is in its compute executor (the
``info`` answer says how many jobs are there); before this change the hook was built, and its constant ops run, on
the event loop, and no ping was answered until it was done. Graph JSON too big to parse quickly is refused unparsed.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from bench.node_event_loop import chain_graph_payload, huge_graph_payload
from hybrid.errors import LimitExceededError
from hybrid.request import HOOK_KIND, HOOK_VERSION
from swarm.handles import FORWARD
from swarm.transport import call, ping

HIDDEN = 64


def test_pings_are_answered_while_a_graph_runs(tiny_node):
    _, node, client = tiny_node
    p2p = client.sequence.p2p
    payload = chain_graph_payload(9_000)
    tensors = {"inputs": torch.randn(1, 3, HIDDEN),
               "hook_payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    meta = {"start": 0, "end": 4, "hook": {"kind": HOOK_KIND, "version": HOOK_VERSION}, "hop": 0}

    async def scenario():
        await ping(p2p, node.peer_id)  # connected before the clock matters
        heavy = asyncio.ensure_future(call(p2p, node.peer_id, FORWARD, tensors, meta, timeout_s=120))
        busy_answers, answers = 0, 0
        while not heavy.done():
            try:
                _, info = await ping(p2p, node.peer_id, timeout_s=60)
            except Exception:
                break
            answers += 1
            if not heavy.done() and info.get("computing", 0) >= 1:
                busy_answers += 1  # answered while the heavy request was in the compute executor
            await asyncio.sleep(0.02)
        out, _ = await heavy
        return busy_answers, answers, out

    busy_answers, answers, out = client.loop.run(scenario(), timeout_s=180)
    assert "hook_result" in out
    assert busy_answers >= 3, f"only {busy_answers} of {answers} pings were answered while the graph ran"
    assert node.proc.poll() is None


def test_huge_graph_json_is_refused_before_parsing(tiny_node):
    """60 MB of graph JSON (the issue's attack) is refused at once: parsing JSON holds the GIL, so it never starts."""
    _, node, client = tiny_node
    payload = huge_graph_payload(800_000)
    tensors = {"inputs": torch.randn(1, 3, HIDDEN),
               "hook_payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    meta = {"start": 0, "end": 4, "hook": {"kind": HOOK_KIND, "version": HOOK_VERSION}, "hop": 0}
    with pytest.raises(LimitExceededError, match="graph JSON is .* bytes; this node parses at most"):
        client.loop.run(call(client.sequence.p2p, node.peer_id, FORWARD, tensors, meta, timeout_s=120))
    assert node.proc.poll() is None
