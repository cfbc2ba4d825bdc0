"""The wall-time watchdog interrupts long Python work in its own thread (issue 10, req. 3); no sockets."""

from __future__ import annotations

import json
import struct
import time

import pytest

from hybrid.errors import LimitExceededError
from hybrid.ir import IR_VERSION, Limits
from hybrid.ir import MAGIC as GRAPH_MAGIC
from hybrid.node_plugin import build_graph_hook
from hybrid.request import MAGIC
from hybrid.watchdog import Watchdog


def test_a_python_loop_past_its_deadline_is_interrupted():
    watchdog = Watchdog(tick_s=0.005)
    spins = 0
    with pytest.raises(LimitExceededError, match="0.05 s"):
        with watchdog.guard(time.monotonic() + 0.05, 0.05):
            while spins < 10**9:  # minutes of work if nothing interrupts it
                spins += 1
    assert watchdog.fired == 1
    assert spins < 10**9


def test_work_that_ends_in_time_is_untouched_and_nothing_fires_later():
    watchdog = Watchdog(tick_s=0.005)
    with watchdog.guard(time.monotonic() + 60, 60):
        total = sum(range(1000))
    assert total == 499500
    deadline = time.monotonic() + 0.02
    with pytest.raises(LimitExceededError):
        with watchdog.guard(deadline, 0.02):
            while True:
                pass
    for _ in range(200_000):  # a pending interrupt would surface here
        pass
    assert watchdog.fired == 1


def _graph_payload(num_ops: int, max_wall_s: float) -> bytes:
    limits = {**Limits().to_json(), "max_wall_s": max_wall_s, "max_ops": 10**9}
    nodes = ",".join('{"id":%d,"op":"operator","target":"add","args":[1,2]}' % i for i in range(num_ops))
    text = ('{"version":%d,"limits":%s,"nodes":[%s]}' % (IR_VERSION, json.dumps(limits), nodes)).encode()
    plan = json.dumps({"executors": [["n", 0, 1]], "assignment": [0] * num_ops, "carry": [[]],
                       "hop_offset": 0}).encode()
    return MAGIC + struct.pack("<Q", len(plan)) + plan + GRAPH_MAGIC + struct.pack("<IQ", IR_VERSION, len(text)) + text


def test_decoding_counts_against_the_wall_time_limit():
    """A node's wall-time limit counts from the request's arrival: a graph that took longer than its limit to
    decode is refused before a single op runs (its limits allow its op count)."""
    node = Limits(max_ops=10**9, max_wall_s=0.001)
    payload = _graph_payload(20_000, max_wall_s=0.001)
    with pytest.raises(LimitExceededError, match="wall-time"):
        build_graph_hook(payload, context=None, node=node)


def test_graph_json_past_the_nodes_bound_is_refused_before_parsing():
    """Parsing JSON holds the GIL (the event loop would stall): a node refuses graph JSON over
    ``max_ops × JSON_BYTES_PER_OP`` bytes without parsing it (this one is not even valid JSON)."""
    from hybrid.ir import JSON_BYTES_PER_OP
    node = Limits(max_ops=100)
    text = b"[" * (100 * JSON_BYTES_PER_OP + 1)
    plan = json.dumps({"executors": [["n", 0, 1]], "assignment": [], "carry": [[]], "hop_offset": 0}).encode()
    payload = MAGIC + struct.pack("<Q", len(plan)) + plan + GRAPH_MAGIC + struct.pack("<IQ", IR_VERSION, len(text)) + text
    with pytest.raises(LimitExceededError, match="graph JSON is 102401 bytes; this node parses at most 102400"):
        build_graph_hook(payload, context=None, node=node)
