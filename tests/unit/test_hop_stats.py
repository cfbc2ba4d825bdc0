"""The per-hop statistics a chained request carries forward to its last node (swarm.direct_reply.upstream_of): they
come from other nodes, so each field is checked and anything malformed is dropped, never trusted or raised."""

from __future__ import annotations

import math

from swarm.direct_reply import merged, seconds_by_peer, upstream_of


def test_well_formed_hop_stats_pass_and_merge_in_route_order():
    upstream = upstream_of({"upstream": {"compute_s": {"A": 0.5}, "read_s": {"A": 0.01}, "node_bytes": 10,
                                         "commitments": []}}, max_chain=4)
    mine = {"compute_s": {"B": 0.25}, "read_s": {"B": 0.02}, "commitments": []}
    out = merged(upstream, mine, received=7)
    assert out["compute_s"] == {"A": 0.5, "B": 0.25} and list(out["compute_s"]) == ["A", "B"]
    assert out["read_s"] == {"A": 0.01, "B": 0.02}
    assert out["node_bytes"] == 17


def test_malformed_hop_stats_are_dropped_not_trusted():
    bad = {"x" * 500: 1.0, "nan": math.nan, "inf": math.inf, "bool": True, "str": "1", 3: 1.0, "ok": 2}
    assert seconds_by_peer(bad, limit=10) == {"ok": 2.0}
    assert seconds_by_peer({f"p{i}": 1.0 for i in range(100)}, limit=5) == {f"p{i}": 1.0 for i in range(5)}
    for value in (None, [], "x", 5):
        assert seconds_by_peer(value, limit=5) == {}
        assert upstream_of({"upstream": {"read_s": value, "compute_s": value}}, max_chain=4)["read_s"] == {}
    assert upstream_of({}, max_chain=4) == {"compute_s": {}, "read_s": {}, "commitments": [], "node_bytes": 0}
