"""Planner placement and refusals, and the interpreter's whitelist and limits, on hand-built graphs."""

import pytest
import torch

from hybrid.errors import DisallowedOpError, InvalidGraphError, LimitExceededError, OrderError, UnknownModuleError
from hybrid.interpreter import Interpreter
from hybrid.validation import validate
from hybrid.ir import Graph, Limits, Ref
from hybrid.planner import Executor, module_stage, plan_graph
from hybrid.values import pack_values, unpack_values

L = 4
EVENTS = [("model.embed_tokens", "input"), ("model.embed_tokens", "output")]
for i in range(L):
    EVENTS += [(f"model.layers.{i}", "input"), (f"model.layers.{i}.self_attn", "input"),
               (f"model.layers.{i}.self_attn", "output"), (f"model.layers.{i}.mlp", "input"),
               (f"model.layers.{i}.mlp", "output"), (f"model.layers.{i}", "output")]
EVENTS += [("model.norm", "input"), ("model.norm", "output"), ("lm_head", "input"), ("lm_head", "output")]
ROUTE = [Executor("client", 0, 0), Executor("a", 1, 2), Executor("b", 3, 4), Executor("client", 5, 5)]


def getter(g, module, kind="output"):
    return g.add("getter", module=module, kind=kind, call=0)


def test_nodes_go_to_the_earliest_executor_holding_their_inputs_and_values_are_carried():
    g = Graph()
    h1 = getter(g, "model.layers.0")               # executor a
    h3 = getter(g, "model.layers.3.mlp")           # executor b
    diff = g.add("operator", target="sub", args=[Ref(h3.id), Ref(h1.id)])      # needs both: b
    scaled = g.add("operator", target="mul", args=[Ref(h1.id), 2.0])           # only h1: a
    logits = getter(g, "lm_head")
    metric = g.add("method", target="sum", args=[Ref(logits.id)], save=True)  # client head
    g.nodes[diff.id].save = True
    plan = plan_graph(g, EVENTS, L, ROUTE)
    assert plan.assignment == [1, 2, 2, 1, 3, 3]
    assert plan.carry[1] == [h1.id]                   # a → b: only what b needs (scaled is not needed later)
    assert plan.carry[2] == [diff.id]                 # b → client: the saved difference
    assert metric.id in plan.carry[3]
    assert module_stage("model.layers.3.self_attn.q_proj", L) == 4


def test_a_setter_fed_by_a_later_module_is_refused():
    g = Graph()
    later = getter(g, "model.layers.3")
    g.add("setter", module="model.layers.1", kind="output", call=0, args=[Ref(later.id)])
    with pytest.raises(OrderError, match="model.layers.1.output.*model.layers.3.output"):
        plan_graph(g, EVENTS, L, ROUTE)
    g = Graph()  # the same through an in-place write into an earlier module's value
    early, later = getter(g, "model.layers.0"), getter(g, "model.layers.2.mlp")
    g.add("operator", target="setitem", args=[Ref(early.id), 0, Ref(later.id)])
    with pytest.raises(OrderError, match="writes into model.layers.0.output"):
        plan_graph(g, EVENTS, L, ROUTE)
    g = Graph()  # an input setter fed by the same module's output
    out = getter(g, "model.layers.2.mlp")
    g.add("setter", module="model.layers.2.mlp", kind="input", call=0, args=[Ref(out.id)])
    with pytest.raises(OrderError):
        plan_graph(g, EVENTS, L, ROUTE)


def test_unknown_modules_are_refused():
    g = Graph()
    getter(g, "model.layers.9")
    with pytest.raises(UnknownModuleError):
        plan_graph(g, EVENTS, L, ROUTE)
    g = Graph()
    getter(g, "model.rotary_emb")
    with pytest.raises(UnknownModuleError, match="rotary_emb"):
        plan_graph(g, EVENTS, L, ROUTE)


def test_validate_refuses_what_the_whitelist_does_not_name():
    for op, target in (("function", "torch.load"), ("method", "numpy"), ("operator", "call"), ("exec", None),
                       ("method", "__class__")):
        g = Graph()
        h = getter(g, "model.layers.0")
        g.add(op, target=target, args=[Ref(h.id)])
        with pytest.raises(DisallowedOpError):
            validate(g)
    g = Graph()
    g.add("method", target="sum", args=[Ref(3)])
    with pytest.raises(InvalidGraphError, match="refers to node 3"):
        validate(g)
    g = Graph(limits=Limits(max_ops=2))
    for _ in range(3):
        getter(g, "model.layers.0")
    with pytest.raises(LimitExceededError, match="3 ops; the limit is 2"):
        validate(g)


def test_interpreter_enforces_element_limits_and_reports_failed_ops():
    g = Graph(limits=Limits(max_elements=100))
    h = getter(g, "model.layers.0")
    g.add("method", target="expand", args=[Ref(h.id), 50, 10])
    g.add("operator", target="add", args=[Ref(1), 1])
    plan = plan_graph(g, EVENTS, L, [Executor("x", 0, 5)])
    interp = Interpreter(g, plan, 0, {})
    with pytest.raises(LimitExceededError, match="500 elements; the limit is 100"):
        interp.on_event("model.layers.0", "output", 0, torch.ones(1, 10))
    g = Graph()
    h = getter(g, "model.layers.0")
    g.add("method", target="view", args=[Ref(h.id), 7])
    interp = Interpreter(g, plan_graph(g, EVENTS, L, [Executor("x", 0, 5)]), 0, {})
    with pytest.raises(InvalidGraphError, match="view.*failed"):
        interp.on_event("model.layers.0", "output", 0, torch.ones(2, 3))


def test_values_roundtrip_tensors_tuples_and_scalars():
    values = {0: torch.randn(2, 3), 4: (torch.arange(3), torch.ones(1, dtype=torch.bool)), 7: 3.5, 9: [1, None, "x"]}
    back = unpack_values(pack_values(values))
    assert set(back) == set(values)
    assert torch.equal(back[0], values[0]) and back[7] == 3.5 and back[9] == [1, None, "x"]
    assert isinstance(back[4], tuple) and torch.equal(back[4][0], values[4][0])
    with pytest.raises(InvalidGraphError):
        unpack_values(b"garbage-bytes-here")


def test_values_and_attachments_that_share_memory_roundtrip():
    """A value and a view of it (``model.norm.output`` and ``lm_head.input`` in generation) in one message."""
    whole = torch.randn(2, 5, 4)
    values = {1: whole, 2: whole[:, -1:], 3: whole[0]}
    back = unpack_values(pack_values(values))
    assert all(torch.equal(back[k], v) for k, v in values.items())
    g = Graph()
    a, b = g.attach(whole), g.attach(whole[1])
    back_graph = Graph.from_bytes(g.to_bytes())
    assert torch.equal(back_graph.attachments[a.index], whole) and torch.equal(back_graph.attachments[b.index], whole[1])


def test_graph_bytes_roundtrip_exactly():
    g = Graph()
    h = getter(g, "model.layers.1")
    vec = g.attach(torch.randn(64))
    g.add("operator", target="add", args=[Ref(h.id), vec])
    g.add("operator", target="getitem", args=[Ref(h.id), (slice(None), -1, Ellipsis)], save=True)
    g.add("method", target="to", args=[Ref(h.id), torch.float16], kwargs={"non_blocking": False})
    g.add("operator", target="mul", args=[Ref(h.id), float("inf")])
    back = Graph.from_bytes(g.to_bytes())
    assert back.to_json() == g.to_json()
    assert torch.equal(back.attachments[0], g.attachments[0])
    with pytest.raises(InvalidGraphError):
        Graph.from_bytes(b"HYIR" + b"\x01\x00\x00\x00" + b"\xff" * 8)


def test_a_getter_after_a_setter_reads_the_new_value():
    g = Graph()
    first = getter(g, "model.layers.1.mlp")
    doubled = g.add("operator", target="mul", args=[Ref(first.id), 2.0])
    g.add("setter", module="model.layers.1.mlp", kind="output", call=0, args=[Ref(doubled.id)])
    second = getter(g, "model.layers.1.mlp")
    g.add("method", target="clone", args=[Ref(second.id)], save=True)
    interp = Interpreter(g, plan_graph(g, EVENTS, L, [Executor("x", 0, 5)]), 0, {})
    out = interp.on_event("model.layers.1.mlp", "output", 0, torch.ones(2, 3))
    assert torch.equal(out, torch.full((2, 3), 2.0))
    assert torch.equal(interp.finish()[4], torch.full((2, 3), 2.0))


def test_module_calls_run_where_the_module_is():
    g = Graph()
    h = getter(g, "model.layers.0")
    normed = g.add("module", module="model.norm", args=[Ref(h.id)])
    g.add("module", module="lm_head", args=[Ref(normed.id)], save=True)
    plan = plan_graph(g, EVENTS, L, ROUTE)
    assert plan.assignment == [1, 3, 3]          # read on node a, lens applied on the client's head
    assert plan.carry[1] == [h.id] and plan.carry[2] == [h.id]   # the layer output travels to the head
    g = Graph()
    late = getter(g, "model.layers.3")
    g.add("module", module="model.layers.1.mlp", args=[Ref(late.id)])
    with pytest.raises(OrderError, match="model.layers.1.mlp"):
        plan_graph(g, EVENTS, L, ROUTE)
