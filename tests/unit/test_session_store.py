"""Session values kept on a node: the store's bounds, and how the planner places ``load`` nodes."""

import time

import pytest
import torch

from hybrid.errors import InvalidGraphError, LimitExceededError, OrderError, SessionValueError
from hybrid.interpreter import Interpreter
from hybrid.ir import Graph, Ref
from hybrid.planner import PAST, plan_graph
from hybrid.session_store import SessionStore
from hybrid.validation import validate
from tests.unit.test_planner_interpreter import EVENTS, L, ROUTE


def test_store_returns_what_was_kept_and_evicts_oldest_past_its_byte_cap():
    store = SessionStore(max_bytes=3 * 4 * 10, ttl_s=60)
    for i in range(3):
        store.put(f"s:0:{i}", torch.full((10,), float(i)))
    assert torch.equal(store.get("s:0:1"), torch.full((10,), 1.0))
    store.put("s:0:3", torch.zeros(10))          # over the cap: the oldest goes
    with pytest.raises(SessionValueError, match="s:0:0.*not held on this node.*run the session again"):
        store.get("s:0:0")
    assert store.bytes == 3 * 4 * 10
    with pytest.raises(LimitExceededError, match="exceeds this node's store"):
        store.put("big", torch.zeros(31))


def test_store_forgets_values_after_their_time():
    store = SessionStore(ttl_s=0.05)
    store.put("k", torch.ones(2))
    time.sleep(0.1)
    with pytest.raises(SessionValueError, match="expired"):
        store.get("k")


def test_a_kept_value_is_a_copy():
    store, value = SessionStore(), torch.ones(3)
    store.put("k", value)
    value.zero_()
    assert torch.equal(store.get("k"), torch.ones(3))


def load_graph(setter_layer: int) -> tuple[Graph, int]:
    g = Graph()
    loaded = g.add("load", target="sess:0:7")
    g.add("setter", module=f"model.layers.{setter_layer}", kind="output", call=0, args=[Ref(loaded.id)])
    return g, loaded.id


def test_a_held_load_runs_on_the_holder_and_is_carried_to_its_use():
    g, loaded = load_graph(setter_layer=3)        # layer 3 runs on executor b
    plan = plan_graph(g, EVENTS, L, ROUTE, held={loaded: 1})   # held by the node of stage 1 (executor a)
    assert plan.assignment == [1, 2]
    assert plan.carry[1] == [loaded]


def test_a_load_used_before_its_holder_runs_is_refused():
    g, loaded = load_graph(setter_layer=0)        # layer 0 runs on executor a
    with pytest.raises(OrderError, match="session value held by a node that runs after it"):
        plan_graph(g, EVENTS, L, ROUTE, held={loaded: 4})


def test_a_load_not_held_is_sent_by_the_client_and_must_be_provided():
    g, loaded = load_graph(setter_layer=0)
    plan = plan_graph(g, EVENTS, L, ROUTE)
    assert plan.assignment[loaded] == PAST and plan.inputs == [loaded]
    held = plan_graph(g, EVENTS, L, ROUTE, held={loaded: 1})
    with pytest.raises(SessionValueError, match="not provided"):
        Interpreter(g, held, 1, {})


def test_a_load_needs_a_key_and_no_arguments():
    g = Graph()
    g.add("load", target="")
    with pytest.raises(InvalidGraphError, match="a load needs a key"):
        validate(g)
