"""Routing and span choice on hand-written records (no sockets)."""

import pytest

from swarm.errors import MissingBlocksError
from swarm.records import ServerRecord
from swarm.routing import RouteCosts, plan_route
from swarm.span_selection import choose_span, coverage, missing_spans


def rec(peer, start, end, n=12, **kw):
    return ServerRecord(peer_id=peer, start=start, end=end, model_name="m", checkpoint_hash="h", num_layers=n, **kw)


def test_fewest_hops_win_at_similar_latency_and_a_much_faster_route_wins_over_fewer_hops():
    records = [rec("a", 0, 6), rec("b", 6, 12), rec("c", 0, 4), rec("d", 4, 8), rec("e", 8, 12)]
    route = plan_route(records, 0, 12, latency_s={"a": 0.012, "b": 0.01, "c": 0.01, "d": 0.01, "e": 0.01})
    assert [(h.peer_id, h.start, h.end) for h in route] == [("a", 0, 6), ("b", 6, 12)]
    route = plan_route(records, 0, 12, latency_s={"a": 1.0, "b": 1.0, "c": 0.01, "d": 0.01, "e": 0.01})
    assert [h.peer_id for h in route] == ["c", "d", "e"]


def test_near_equal_routes_are_spread_over_clients_and_trusted_nodes_are_preferred():
    import random
    records = [rec("a", 0, 12), rec("b", 0, 12)]
    latency = {"a": 0.01, "b": 0.011}
    chosen = []
    for seed in range(200):  # each client draws its own jitter per node
        rng = random.Random(seed)
        costs = RouteCosts(latency_s=latency, jitter={p: rng.uniform(1.0, 1.3) for p in "ab"})
        chosen.append(plan_route(records, 0, 12, costs=costs)[0].peer_id)
    assert 60 <= chosen.count("b") <= 140, chosen.count("b")
    # A node with no history with this client costs more: its slightly faster replica with history wins.
    costs = RouteCosts(latency_s={"a": 0.01, "b": 0.008}, trusted=frozenset({"a"}), untrusted_factor=1.5)
    assert plan_route(records, 0, 12, costs=costs)[0].peer_id == "a"


def test_latency_breaks_ties_and_partial_spans_are_used():
    records = [rec("slow", 0, 12), rec("fast", 0, 12), rec("x", 3, 9)]
    route = plan_route(records, 0, 12, latency_s={"slow": 0.5, "fast": 0.01, "x": 0.0})
    assert [(h.peer_id, h.start, h.end) for h in route] == [("fast", 0, 12)]
    route = plan_route([rec("a", 0, 8), rec("b", 4, 12)], 2, 12)
    assert [(h.peer_id, h.start, h.end) for h in route] == [("a", 2, 8), ("b", 8, 12)]


def test_missing_blocks_names_the_gap_and_how_to_help():
    records = [rec("a", 0, 4), rec("b", 7, 12)]
    with pytest.raises(MissingBlocksError) as info:
        plan_route(records, 0, 12, model_name="smollm2-135m")
    assert info.value.missing == [(4, 7)]
    assert "4:7" in str(info.value) and "swarm-node serve" in str(info.value)


def test_excluded_and_offline_peers_are_not_used():
    records = [rec("a", 0, 12), rec("b", 0, 12, state="offline"), rec("c", 0, 12)]
    route = plan_route(records, 0, 12, exclude=frozenset({"a"}))
    assert [h.peer_id for h in route] == ["c"]
    with pytest.raises(MissingBlocksError):
        plan_route(records, 0, 12, exclude=frozenset({"a", "c"}))


def test_embed_and_head_requirements():
    records = [rec("a", 0, 6), rec("ae", 0, 6, embed=True), rec("b", 6, 12), rec("bh", 6, 12, head=True)]
    route = plan_route(records, 0, 12, embed=True, head=True, latency_s={"a": 0, "b": 0, "ae": 1, "bh": 1})
    assert [h.peer_id for h in route] == ["ae", "bh"]
    with pytest.raises(MissingBlocksError, match="head"):
        plan_route([rec("a", 0, 12)], 0, 12, head=True)


def test_choose_span_tiles_an_empty_swarm_then_fills_gaps():
    assert choose_span([], 12, 4) == (0, 4)
    assert choose_span([rec("a", 0, 4)], 12, 4) == (4, 8)
    assert choose_span([rec("a", 0, 4), rec("b", 4, 8)], 12, 4) == (8, 12)
    full = [rec("a", 0, 4), rec("b", 4, 8), rec("c", 8, 12), rec("d", 0, 4)]
    assert choose_span(full, 12, 4) in {(4, 8), (8, 12)}
    assert choose_span([], 12, 50) == (0, 12)


def test_coverage_and_gaps():
    records = [rec("a", 0, 4), rec("b", 2, 6), rec("c", 9, 12, state="offline")]
    assert coverage(records, 12) == [1, 1, 2, 2, 1, 1, 0, 0, 0, 0, 0, 0]
    assert missing_spans(records, 12) == [(6, 12)]


def test_records_tolerate_unknown_fields_and_reject_bad_spans():
    good = rec("a", 0, 4).to_dict() | {"from_the_future": 1}
    assert ServerRecord.from_dict(good) == rec("a", 0, 4)
    assert ServerRecord.from_dict(rec("a", 0, 4).to_dict() | {"end": 40}) is None
    assert ServerRecord.from_dict({"peer_id": "a"}) is None
    assert ServerRecord.from_dict("nonsense") is None


def test_claim_mismatch_names_what_the_info_answer_contradicts():
    from swarm.claims import claim_mismatch
    record = rec("a", 0, 6, embed=True)
    info = {**record.to_dict(), "load": 3, "weight_bytes": 10}
    assert claim_mismatch(record, info) is None
    assert claim_mismatch(record, {**info, "start": 3}) == "start: record 0, info 3"
    assert "checkpoint_hash" in claim_mismatch(record, {k: v for k, v in info.items() if k != "checkpoint_hash"})
