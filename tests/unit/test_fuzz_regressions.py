"""Graphs the fuzz (tests/integration/test_graph_fuzz_scale.py) found crashing a node's hybrid path with an untyped
error (an InternalNodeError on a live node); each now gets a typed error, or its right result."""

import struct

import pytest
import torch

from hybrid.errors import DisallowedOpError, InvalidGraphError, OrderError
from hybrid.interpreter import Interpreter
from hybrid.ir import Graph, Ref
from hybrid.node_plugin import build_graph_hook
from hybrid.planner import Executor, Plan
from hybrid.request import encode_request
from hybrid.validation import validate
from tests.fuzz_node import InProcessNode

H = torch.randn(1, 3, 64)


def single(g: Graph, carry=None) -> Plan:
    return Plan([Executor("n", 0, 5)], [0] * len(g.nodes), [carry if carry is not None else g.saved()], [])


def test_a_value_read_by_a_later_event_outlives_a_reader_that_ran_before_it():
    """Nodes run when their inputs exist, not in graph order: ``y = h + c`` (waits for h) comes before ``z = c * 2``
    (runs at once), and ``c`` was freed after z, its last reader in graph order."""
    g = Graph()
    h = g.add("getter", module="model.layers.1", kind="output", call=0)
    c = g.add("function", target="torch.ones_like", args=[g.attach(torch.zeros(64))])
    y = g.add("operator", target="add", args=[Ref(h.id), Ref(c.id)], save=True)
    z = g.add("operator", target="mul", args=[Ref(c.id), 2.0], save=True)
    interp = Interpreter(g, single(g), 0, {})
    interp.on_event("model.layers.1", "output", 0, H)
    out = interp.finish()
    assert torch.equal(out[y.id], H + 1) and torch.equal(out[z.id], torch.full((64,), 2.0))
    assert interp.values.keys() == {y.id, z.id}  # c is freed once both readers ran


def test_a_setter_fed_by_a_later_module_is_an_order_error():
    g = Graph()
    later = g.add("getter", module="model.layers.3", kind="output", call=0)
    g.add("setter", module="model.layers.1", kind="output", call=0, args=[Ref(later.id)])
    interp = Interpreter(g, single(g), 0, {})
    with pytest.raises(OrderError, match="not computed yet"):
        interp.on_event("model.layers.1", "output", 0, H)


def test_a_scalar_that_does_not_fit_the_module_value_is_refused():
    g = Graph()
    g.add("setter", module="model.embed_tokens", kind="input", call=0, args=[1e30])
    interp = Interpreter(g, single(g), 0, {})
    with pytest.raises(InvalidGraphError, match="does not fit its torch.int64"):
        interp.on_event("model.embed_tokens", "input", 0, torch.tensor([[5, 6, 7]]))


@pytest.mark.parametrize("field, value", [("kwargs", None), ("kwargs", "x"), ("kwargs", 3), ("args", {"a": 1})])
def test_args_and_kwargs_of_the_wrong_type_are_invalid(field, value):
    doc = {"version": 1, "limits": Graph().limits.to_json(),
           "nodes": [{"id": 0, "op": "function", "target": "torch.abs", "args": [1.0], field: value}]}
    with pytest.raises(InvalidGraphError, match="args must be a list and kwargs an object"):
        validate(Graph.from_json(doc, []))


def test_out_arguments_are_refused():
    """``torch.log(x, out=<a module's value>)`` resized the model's own hidden state in place."""
    g = Graph()
    h = g.add("getter", module="model.layers.0.self_attn.o_proj", kind="output", call=0)
    g.add("function", target="torch.log", args=[g.attach(torch.ones(2))], kwargs={"out": Ref(h.id)})
    with pytest.raises(DisallowedOpError, match="out= is not allowed"):
        validate(g)


@pytest.fixture(scope="module")
def node(tiny_checkpoint_factory):
    return InProcessNode(tiny_checkpoint_factory("llama", num_layers=4))


def hook(node: InProcessNode, g: Graph, **kwargs):
    return build_graph_hook(encode_request(g, single(g), 0, **kwargs), node.context, node=node.limits)


@pytest.mark.parametrize("value", [-1.5, 128, 10 ** 6])
def test_token_ids_written_outside_the_vocabulary_are_refused(node, value):
    """The model's embedding raised IndexError (an InternalNodeError on a node)."""
    g = Graph()
    g.add("setter", module="model.embed_tokens", kind="input", call=0, args=[value])
    with pytest.raises(InvalidGraphError, match=r"token ids outside 0\.\.127"):
        hook(node, g).before("model.embed_tokens", (torch.tensor([[5, 6, 7]]),), {})
    assert node.run(encode_request(g, single(g), 0), real=True)[0] == "typed"


def test_keeping_a_setter_for_the_session_is_invalid(node):
    g = Graph()
    h = g.add("getter", module="model.layers.0", kind="output", call=0)
    g.add("setter", module="model.layers.1", kind="output", call=0, args=[Ref(h.id)])
    with pytest.raises(InvalidGraphError, match="a setter has no value to keep"):
        hook(node, g, keep={1: "s:k"})


@pytest.mark.parametrize("inner", [{"a": 1}, [1], None])
def test_a_dtype_that_is_not_a_name_is_invalid(inner):
    from hybrid.ir import decode_value
    with pytest.raises(InvalidGraphError, match="dtype .* is not allowed"):
        decode_value({"dtype": inner})


@pytest.mark.parametrize("carry", [{5: torch.ones(2)}, {-1: 3}])
def test_carried_values_of_nodes_outside_the_graph_are_invalid(node, carry):
    """A hostile client's ``hook_carry`` named node 5 of a 1-node graph: IndexError in the interpreter."""
    from dataclasses import replace
    from hybrid.values import pack_values
    g = Graph()
    g.add("function", target="torch.abs", args=[1.0])
    with pytest.raises(InvalidGraphError, match="carried values name node ids"):
        build_graph_hook(encode_request(g, single(g), 0), replace(node.context, carry=pack_values(carry)),
                         node=node.limits)


@pytest.mark.parametrize("doc", [b"[1, 2]", b'{"x": 1}', b"3"])
def test_carried_values_that_are_not_an_object_of_node_ids_are_invalid(doc):
    from hybrid.values import MAGIC, unpack_values
    with pytest.raises(InvalidGraphError, match="carried values do not parse"):
        unpack_values(MAGIC + struct.pack("<Q", len(doc)) + doc)
