"""The pieces of ``python -m bench.node_attacks`` (a full run starts a node and takes minutes): the attacks' graphs
meet a volunteer node's default budgets as the issue says they must, outcomes are named honestly, and the table
shows every attack."""

import pytest
import torch

from bench.attack_requests import QUICK, Sizes, constant_pow, expanded_saves, list_mul, matmul_chain, outcome, \
    outer_product, store_flood_graph, _graph_request
from bench.node_attacks import _open_batch, _table
from hybrid.errors import LimitExceededError
from hybrid.request import decode_request
from swarm.errors import CapacityError, InternalNodeError
from swarm.span_hook import HookBudgets
from tests.fuzz_node import InProcessNode


@pytest.fixture(scope="module")
def volunteer(tiny_checkpoint_factory):
    """A node's hybrid path with ``swarm-node serve``'s default budgets."""
    return InProcessNode(tiny_checkpoint_factory("llama", num_layers=4), budgets=HookBudgets())


def payload(graph) -> bytes:
    return _graph_request(graph)[0]["hook_payload"].numpy().tobytes()


@pytest.mark.parametrize("build", [list_mul, outer_product, constant_pow, expanded_saves])
def test_the_allocating_attacks_are_refused_with_a_typed_error(volunteer, build):
    kind, detail, executed = volunteer.run(payload(build(Sizes())), real=True)
    assert (kind, detail) == ("typed", None)
    assert not [op for op in executed if op != "getter"] or build is expanded_saves  # nothing big ran


def test_the_matmul_chain_runs_and_the_flood_graph_keeps_one_value(volunteer):
    small = Sizes(chain_ops=500, chain_side=64)
    kind, detail, executed = volunteer.run(payload(matmul_chain(small)))
    assert kind == "ok" and executed.count("operator:matmul") == small.chain_ops, detail
    graph, _, _, _, keep = decode_request(_graph_request(store_flood_graph(QUICK), {2: "k"})[0]["hook_payload"]
                                          .numpy().tobytes())
    assert keep == {2: "k"} and graph.nodes[2].target == "expand"


def test_outcomes_name_typed_errors_and_count_internal_ones_as_untyped():
    assert outcome(None) == "ok"
    assert outcome(LimitExceededError("x")) == "limit_exceeded"
    assert outcome(CapacityError("x")) == "capacity"
    assert outcome(InternalNodeError("x")) == "untyped:InternalNodeError"
    assert outcome(TimeoutError()) == "untyped:TimeoutError"


def test_session_opens_reserve_a_ninth_of_the_cache(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory("llama", num_layers=4)
    per_session = _open_batch(path, max_length=256) * 256 * (2 * 2 * 16 * 4 * 4)  # K+V, 2 KV heads × 16, fp32, 4 layers
    assert (1 << 30) / 10 < per_session <= (1 << 30) / 9


def test_the_table_has_a_row_per_attack(capsys):
    base = {"measurement": "baseline", "polite_worst_s": 0.4, "forward_s": 0.1, "session_s": 0.1, "generate_s": 0.4}
    row = {"attacker": {"limit_exceeded": 3}, "node_rss_before_mb": 400.0, "node_rss_peak_mb": 410.0,
           "polite_done": 9, "polite_failed": {"capacity": 2}, "polite_worst_s": 1.5, "polite_baseline_worst_s": 0.4}
    _table([base, {"measurement": "list mul", **row}, {"measurement": "chunks", **row, "polite_worst_s": None}])
    out = capsys.readouterr().out
    assert "list mul" in out and "chunks" in out and "limit_exceeded×3" in out and "9/2" in out
    assert torch.__version__  # the bench's imports load without a node
