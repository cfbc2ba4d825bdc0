"""The interpreter checks a request's memory before allocating it and frees values after their last use (issue 10:
a volunteer's node survives hostile requests). Hand-built graphs, run in-process."""

import json
import struct
import time
import weakref

import pytest
import torch

from hybrid import ops
from hybrid.errors import InvalidGraphError, LimitExceededError
from hybrid.interpreter import Interpreter
from hybrid.ir import Graph, Limits, Ref
from hybrid.node_plugin import cap_limits, node_limits
from hybrid.planner import Executor, plan_graph
from hybrid.validation import validate
from swarm.span_hook import HookBudgets
from tests.unit.test_planner_interpreter import EVENTS, L

ALL = [Executor("x", 0, L + 1)]
MiB = 1 << 20


def interpreter(g: Graph, carried=None, **kwargs) -> Interpreter:
    return Interpreter(g, plan_graph(g, EVENTS, L, ALL), 0, carried or {}, **kwargs)


def getter(g: Graph, module="model.layers.0"):
    return g.add("getter", module=module, kind="output", call=0)


@pytest.fixture
def spy(monkeypatch):
    """``spy(name)`` wraps operator ``name`` of the whitelist; the returned list gets every real result it makes (as
    weak references when they are tensors; meta results of the checks are left out), so a test sees whether the op
    ran and which of its results are still alive."""
    def wrap(name: str) -> list:
        made: list = []
        real = ops.OPERATORS[name]

        def counted(*args, **kwargs):
            result = real(*args, **kwargs)
            if not (isinstance(result, torch.Tensor) and result.is_meta):
                made.append(weakref.ref(result) if isinstance(result, torch.Tensor) else result)
            return result
        monkeypatch.setitem(ops.OPERATORS, name, counted)
        return made
    return wrap


def matmul_chain(n: int) -> Graph:
    """``h @ h @ h ...`` (``n`` matmuls) of one module value, the last one saved."""
    g = Graph()
    h = getter(g)
    prev = h.id
    for _ in range(n):
        prev = g.add("operator", target="matmul", args=[Ref(prev), Ref(h.id)]).id
    g.nodes[prev].save = True
    return g


# ---- free as you go ---------------------------------------------------------------------------------------------

def test_a_long_chain_holds_its_widest_point_not_its_sum(spy):
    made = spy("matmul")
    n, d = 300, 32
    x = torch.eye(d)[torch.randperm(d, generator=torch.Generator().manual_seed(0))]  # a permutation: stays exact
    interp = interpreter(matmul_chain(n))
    interp.on_event("model.layers.0", "output", 0, x)
    value = d * d * 4
    assert sum(r() is not None for r in made) <= 2  # the saved result (and nothing else of the chain) is alive
    assert interp.peak_live_bytes <= 3 * value      # module value + one input + one output of a matmul at a time
    assert set(interp.values) == {n}                # only the saved value is still held
    want = x
    for _ in range(n):
        want = want @ x
    assert torch.equal(interp.finish()[n], want)


def test_values_carried_onward_or_kept_for_the_session_outlive_their_last_use():
    g = Graph()
    h = getter(g, "model.layers.0")
    doubled = g.add("operator", target="mul", args=[Ref(h.id), 2.0])       # read by the next executor
    kept = g.add("method", target="sum", args=[Ref(h.id)])                 # kept for a later trace
    g.add("operator", target="add", args=[Ref(doubled.id), 1.0])
    g.add("operator", target="add", args=[Ref(doubled.id), Ref(getter(g, "model.layers.3").id)], save=True)
    plan = plan_graph(g, EVENTS, L, [Executor("a", 0, 2), Executor("b", 3, L + 1)])
    interp = Interpreter(g, plan, 0, {}, retain=[kept.id])
    interp.on_event("model.layers.0", "output", 0, torch.ones(2, 3))
    assert set(interp.values) == {doubled.id, kept.id}
    assert set(interp.finish()) == {doubled.id}
    assert interp.values[kept.id].item() == 6.0


def test_an_unused_module_value_is_not_held():
    g = Graph()
    getter(g, "model.layers.0")
    interp = interpreter(g)
    interp.on_event("model.layers.0", "output", 0, torch.ones(2, 3))
    assert interp.values == {} and interp.peak_live_bytes == 24


# ---- check before allocating ------------------------------------------------------------------------------------

def test_an_outer_product_over_the_budget_is_refused_before_it_is_computed(spy):
    made = spy("matmul")
    g = Graph(limits=Limits(max_live_bytes=8 * MiB))
    col = getter(g, "model.layers.0")                                             # (N, 1)
    row = g.add("method", target="t", args=[Ref(col.id)])                         # (1, N)
    g.add("operator", target="matmul", args=[Ref(col.id), Ref(row.id)], save=True, site="experiment.py:12")
    interp = interpreter(g)
    with pytest.raises(LimitExceededError, match=r"node 2 \(operator matmul, traced at experiment\.py:12\).*"
                                                 r"\(64\.0 MiB\).*memory budget of 8\.0 MiB"):
        interp.on_event("model.layers.0", "output", 0, torch.ones(4096, 1))
    assert made == [] and interp.ops_run == 0  # refused before any op of the event ran


def test_in_place_writes_cost_nothing_more():
    """``h[:] = 0`` then ``h.add_(1)`` on a module value that alone fills most of the budget."""
    g = Graph(limits=Limits(max_live_bytes=MiB + 1024))
    h = getter(g)                                                                 # 1 MiB
    zeroed = g.add("operator", target="setitem", args=[Ref(h.id), slice(None), 0.0])
    g.add("method", target="add_", args=[Ref(zeroed.id), 1.0], save=True)
    interp = interpreter(g)
    interp.on_event("model.layers.0", "output", 0, torch.ones(256, 1024))
    assert torch.equal(interp.finish()[2], torch.ones(256, 1024)) and interp.peak_live_bytes == MiB


def test_the_element_limit_is_checked_before_allocating(spy):
    made = spy("mul")
    g = Graph(limits=Limits(max_elements=1000))
    h = getter(g)
    wide = g.add("method", target="expand", args=[Ref(h.id), 100, 100])          # a view: 10,000 elements
    g.add("operator", target="mul", args=[Ref(wide.id), 2.0])
    with pytest.raises(LimitExceededError, match=r"\(100, 100\) float32 tensor of 10000 elements; the limit is 1000"):
        interpreter(g).on_event("model.layers.0", "output", 0, torch.ones(1, 100))
    assert made == []


def test_the_sum_of_live_values_is_bounded_not_only_each_value(spy):
    made = spy("mul")
    g = Graph(limits=Limits(max_live_bytes=3 * MiB))
    h = getter(g)                                                                 # 1 MiB
    for k in range(4):                                                            # each 1 MiB, all saved
        g.add("operator", target="mul", args=[Ref(h.id), float(k)], save=True)
    with pytest.raises(LimitExceededError, match=r"node 3 .*on top of the 3\.0 MiB this request holds"):
        interpreter(g).on_event("model.layers.0", "output", 0, torch.ones(256, 1024))
    assert made == []  # the first two fit, but the request is refused before any of them runs


def test_saves_have_a_total_limit_even_for_views_of_one_scalar():
    g = Graph(limits=Limits(max_save_bytes=10 * MiB))
    h = getter(g)                                                                 # one number
    for _ in range(4):                                                            # 4 MiB each once sent
        g.add("method", target="expand", args=[Ref(h.id), 1024, 1024], save=True)
    interp = interpreter(g)
    with pytest.raises(LimitExceededError, match=r"node 3 .*saves to 12\.0 MiB; the limit is 10\.0 MiB"):
        interp.on_event("model.layers.0", "output", 0, torch.ones(1, 1))
    assert interp.ops_run == 0


def test_a_size_known_only_at_run_time_is_checked_just_before_the_op(monkeypatch):
    """``k = x.max().item()`` is data: the ops it sizes are checked once it exists, still before they allocate."""
    cats = []
    real = ops.FUNCTIONS["torch.cat"]
    monkeypatch.setitem(ops.FUNCTIONS, "torch.cat", lambda *a, **kw: real(*a, **kw) if a[0][0].is_meta
                        else cats.append(1) or real(*a, **kw))
    g = Graph(limits=Limits(max_live_bytes=16 * MiB))
    h = getter(g)                                                                 # 1 MiB
    k = g.add("method", target="item", args=[Ref(g.add("method", target="max", args=[Ref(h.id)]).id)])
    copies = g.add("operator", target="mul", args=[[Ref(h.id)], Ref(k.id)])       # [h] * k
    g.add("function", target="torch.cat", args=[Ref(copies.id)], save=True)
    interp = interpreter(g)
    with pytest.raises(LimitExceededError, match=r"node 4 \(function torch\.cat\).*\(1000\.0 MiB\)"):
        interp.on_event("model.layers.0", "output", 0, torch.full((256, 1024), 1000, dtype=torch.int32))
    assert cats == [] and interp.ops_run == 3  # max, item, [h] * k ran; the concatenation did not
    small = interpreter(g)
    small.on_event("model.layers.0", "output", 0, torch.full((256, 1024), 3, dtype=torch.int32))
    assert torch.equal(small.finish()[4], torch.full((768, 1024), 3, dtype=torch.int32))


# ---- Python values ----------------------------------------------------------------------------------------------

# Sizes a regression survives (the attack was ``list * 10**9``: 17 GB), still far past the limits.
@pytest.mark.parametrize("target, args, message", [
    ("mul", [[1, 2, 3], 10 ** 6], "repeating a list of 3 items 1000000 times makes 3000000 items; the limit is 4096"),
    ("mul", [10 ** 6, "abc"], "repeating a str of 3 items 1000000 times"),
    ("add", [list(range(3000)), list(range(3000))], "joining sequences of 3000 and 3000 items"),
    ("pow", [10, 10 ** 6], r"10 \*\* 1000000 has about 3321928 bits"),
    ("pow", [2, 63], r"2 \*\* 63 has about 63 bits; integers are limited to 64 bits"),
])
def test_huge_python_values_are_refused_before_they_are_computed(spy, target, args, message):
    made = spy(target)
    g = Graph()
    g.add("operator", target=target, args=args, save=True)
    t0 = time.perf_counter()
    with pytest.raises(LimitExceededError, match=f"node 0 \\(operator {target}\\): {message}"):
        interpreter(g)
    assert made == [] and time.perf_counter() - t0 < 0.5


def test_python_results_beyond_64_bits_and_huge_integer_literals_are_refused():
    g = Graph()
    g.add("operator", target="mul", args=[2 ** 40, 2 ** 40], save=True)          # cheap, but 81 bits
    with pytest.raises(LimitExceededError, match="result has 81 bits"):
        interpreter(g)
    g = Graph()
    g.add("operator", target="add", args=[2 ** 70, 1])
    with pytest.raises(LimitExceededError, match="integer argument beyond 64 bits"):
        validate(g)
    text = json.dumps(g.to_json()).replace(str(2 ** 70), "9" * 5000).encode()   # json refuses > 4300 digits
    with pytest.raises(InvalidGraphError, match="does not parse"):
        Graph.from_bytes(b"HYIR" + struct.pack("<IQ", 1, len(text)) + text)


def test_small_python_values_still_compute():
    g = Graph()
    a = g.add("operator", target="mul", args=[[1, 2], 3])
    g.add("operator", target="add", args=[Ref(a.id), [7]], save=True)
    g.add("operator", target="pow", args=[3, 20], save=True)
    g.add("operator", target="truediv", args=[1, 0])
    with pytest.raises(InvalidGraphError, match="ZeroDivisionError"):             # typed, not a crash
        interpreter(g)
    g.nodes.pop()
    out = interpreter(g).finish()
    assert out == {1: [1, 2, 1, 2, 1, 2, 7], 2: 3 ** 20}


# ---- the wire and the node's caps -------------------------------------------------------------------------------

def test_limits_from_older_clients_get_the_new_budgets_by_default_and_the_node_caps_them():
    old = {"max_ops": 5, "max_attachment_bytes": 10, "max_elements": 100, "max_wall_s": 1.0}
    limits = Limits.from_json(old)
    assert (limits.max_live_bytes, limits.max_save_bytes) == (Limits.max_live_bytes, Limits.max_save_bytes)
    assert Limits.from_json({**old, "max_live_bytes": 7, "unknown_later_field": 1}).max_live_bytes == 7
    node = node_limits(HookBudgets(max_request_memory_mb=64, max_save_mb=8))
    capped = cap_limits(Limits(max_live_bytes=1 << 40, max_save_bytes=1 << 20), node)
    assert (capped.max_live_bytes, capped.max_save_bytes) == (64 * MiB, 1 * MiB)


def test_a_node_site_travels_with_the_graph():
    g = Graph()
    g.add("method", target="sum", args=[Ref(getter(g).id)], site="exp.py:3")
    back = Graph.from_json(json.loads(g.to_bytes()[16:]), [])
    assert back.nodes[1].site == "exp.py:3" and back.nodes[0].site is None
