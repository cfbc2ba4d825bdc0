"""Bad experiments get typed errors with clear messages, as early as possible: at the user's line while tracing,
on the client before anything is sent, and at the node for graphs that bypass both. After every refusal the swarm
keeps serving the right values. A real 3-node SmolLM2 swarm (spans 0:10, 10:20, 20:30).
"""

from __future__ import annotations

import pytest
import torch

import hybrid
import hybrid.planner
from hybrid.errors import (DisallowedOpError, HybridError, LimitExceededError, OrderError, TraceError,
                           UnknownModuleError)
from hybrid.ir import Graph, Limits, Ref
from hybrid.node_plugin import NODE_LIMITS
from swarm.errors import BadRequestError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PROMPTS = ["The Eiffel Tower is located in the city of", "My favourite food is"]
HERE = r"test_hybrid_errors\.py:\d+"  # messages point at the user's line


@pytest.fixture(scope="module")
def lm(remote_lm):
    return remote_lm


def experiment(lm, placement):
    """A normal experiment: read a layer on the middle node, patch it, read the last logits."""
    with lm.trace(PROMPTS, placement=placement):
        h = lm.model.layers[12].output
        h[1, -1, :] = h[0, -1, :]
        mid = lm.model.layers[12].output.save()
        last = lm.lm_head.output[:, -1].save()
    return mid, last


@pytest.fixture(scope="module")
def expected(local_lm):
    return experiment(local_lm, "local")


@pytest.fixture
def serving(lm, expected):
    """Checks after the test that the swarm still computes the normal experiment exactly."""
    yield
    for got, want in zip(experiment(lm, "hybrid"), expected):
        assert (got - want).abs().max().item() <= 1e-5


class Sent:
    """Counts the client's calls to nodes: ``sent.calls`` since the block began."""

    def __init__(self, lm):
        self.traffic = lm.client.sequence.traffic

    def __enter__(self) -> "Sent":
        self.start = self.traffic.calls
        return self

    def __exit__(self, *exc) -> None:
        self.calls = self.traffic.calls - self.start


def simple_graph(*, limits: Limits = Limits()) -> Graph:
    """layers.3 output → sum (saved): two nodes."""
    graph = Graph(limits=limits)
    graph.add("getter", module="model.layers.3", kind="output", call=0)
    graph.add("method", target="sum", args=[Ref(0)], save=True)
    return graph


@pytest.fixture
def unchecked_client(monkeypatch):
    """The client's planner skips validation, so a bad graph reaches the node, which must refuse it itself."""
    monkeypatch.setattr(hybrid.planner, "validate", lambda graph, limits_cap=None: None)


# ---- at trace time, at the user's line ------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    pytest.param(lambda h: torch.randn_like(h), id="torch.randn_like"),
    pytest.param(lambda h: torch.fft.fft(h), id="torch.fft.fft"),
    pytest.param(lambda h: h.numpy(), id="h.numpy()"),
    pytest.param(lambda h: h.data, id="h.data"),
    pytest.param(lambda h: h.grad_fn, id="h.grad_fn"),
    pytest.param(lambda h: h.register_hook(print), id="h.register_hook"),
])
def test_ops_outside_the_whitelist_are_refused_while_tracing(lm, bad, serving):
    with Sent(lm) as sent, pytest.raises(DisallowedOpError, match=f"not in the whitelist.*{HERE}"):
        with lm.trace(PROMPTS, placement="hybrid"):
            bad(lm.model.layers[3].output).save()
    assert sent.calls == 0


def test_python_attributes_of_a_traced_value_reach_nothing_remote(lm):
    """``h.__class__`` is the client-side proxy class: asking for it records nothing and sends nothing."""
    with lm.trace(PROMPTS, placement="hybrid") as tracer:
        h = lm.model.layers[3].output
        assert h.__class__.__module__ == "hybrid.proxy"
        with pytest.raises(AttributeError):
            h.__dict__
    assert [n.op for n in tracer.graph.nodes] == ["getter"]


def test_weights_are_not_addressable(lm):
    with pytest.raises(DisallowedOpError, match="model.layers.0.mlp.gate_proj.weight: weights and buffers live on"):
        with lm.trace(PROMPTS, placement="hybrid"):
            lm.model.layers[0].mlp.gate_proj.weight.save()
    with pytest.raises(DisallowedOpError, match="model.embed_tokens.weight"):
        lm.model.embed_tokens.weight


@pytest.mark.parametrize("path, error, message", [
    (lambda lm: lm.model.layers[99], IndexError, "'model.layers' has 30 entries; index 99 is out of range"),
    (lambda lm: lm.model.nonexistent, AttributeError, "has no submodule 'nonexistent'; submodules: embed_tokens, "
                                                      "layers, norm, rotary_emb"),
    (lambda lm: lm.model.layers[0].mlp.weight, AttributeError, "no submodule 'weight'; submodules: gate_proj"),
])
def test_modules_the_model_does_not_have(lm, path, error, message):
    with pytest.raises(error, match=message):
        with lm.trace(PROMPTS, placement="hybrid"):
            path(lm).output.save()


def test_a_module_outside_the_served_stages_is_refused_before_sending(lm, serving):
    with Sent(lm) as sent, pytest.raises(UnknownModuleError, match="'model.rotary_emb' cannot be intervened on"):
        with lm.trace(PROMPTS, placement="hybrid"):
            lm.model.rotary_emb.output[0].save()
    assert sent.calls == 0


def test_data_dependent_control_flow_is_refused_while_tracing(lm):
    with pytest.raises(TraceError, match=f"bool\\(\\) of a traced value.*torch.where.*{HERE}"):
        with lm.trace(PROMPTS, placement="hybrid"):
            if lm.model.layers[3].output.sum() > 0:
                pass


# ---- order: a value is needed before the model produces it ----------------------------------------------------

def test_setter_fed_by_a_later_module_is_refused_at_the_users_line(lm):
    """nnsight raises OutOfOrderError here; the tracer refuses the out-of-order access at this line."""
    with Sent(lm) as sent, pytest.raises(TraceError, match=f"model.layers.2.output is computed before "
                                                           f"model.layers.5.output.*{HERE}"):
        with lm.trace(PROMPTS, placement="hybrid"):
            lm.model.layers[2].output = lm.model.layers[5].output
    assert sent.calls == 0


def test_setter_fed_by_a_later_module_of_another_invoke_is_refused_before_sending(lm, serving):
    with Sent(lm) as sent, pytest.raises(OrderError, match="sets model.layers.2.output with a value that depends on "
                                                           "model.layers.5.output, which the model computes later"):
        with lm.trace(placement="hybrid") as tracer:
            with tracer.invoke(PROMPTS[0]):
                later = lm.model.layers[5].output
            with tracer.invoke(PROMPTS[1]):
                lm.model.layers[2].output = later
    assert sent.calls == 0


def test_in_place_write_fed_by_a_later_module_is_refused_before_sending(lm, serving):
    with Sent(lm) as sent, pytest.raises(OrderError, match="writes into model.layers.2.output"):
        with lm.trace(PROMPTS, placement="hybrid"):
            early = lm.model.layers[2].output
            late = lm.model.layers[5].output
            early[:] = late
    assert sent.calls == 0


def test_hand_built_graph_out_of_order_is_refused_before_sending(lm):
    graph = Graph()
    graph.add("getter", module="model.layers.5", kind="output", call=0)
    graph.add("setter", module="model.layers.2", kind="output", call=0, args=[Ref(0)])
    ids, mask = lm.tokenize(PROMPTS)
    with Sent(lm) as sent, pytest.raises(OrderError, match="depends on model.layers.5.output"):
        lm.run_graph(graph, ids, mask, placement="hybrid")
    assert sent.calls == 0


def test_hand_built_graph_with_an_unknown_module(lm):
    graph = Graph()
    graph.add("getter", module="model.layers.99", kind="output", call=0, save=True)
    ids, mask = lm.tokenize(PROMPTS)
    with Sent(lm) as sent, pytest.raises(UnknownModuleError, match="never calls 'model.layers.99'"):
        lm.run_graph(graph, ids, mask, placement="hybrid")
    assert sent.calls == 0


# ---- limits and the whitelist, enforced by the node -----------------------------------------------------------

def test_op_budget_is_checked_by_the_client_and_by_the_node(lm, monkeypatch, serving):
    graph = simple_graph(limits=Limits(max_ops=3))
    for _ in range(3):
        graph.add("method", target="abs", args=[Ref(0)])
    ids, mask = lm.tokenize(PROMPTS)
    with Sent(lm) as sent, pytest.raises(LimitExceededError, match="The graph has 5 ops; the limit is 3"):
        lm.run_graph(graph, ids, mask, placement="hybrid")
    assert sent.calls == 0
    monkeypatch.setattr(hybrid.planner, "validate", lambda graph, limits_cap=None: None)
    with Sent(lm) as sent, pytest.raises(LimitExceededError, match="The graph has 5 ops; the limit is 3"):
        lm.run_graph(graph, ids, mask, placement="hybrid")
    assert sent.calls == 1  # the node answered with the typed error


def test_node_caps_the_limits_a_graph_asks_for(lm, serving):
    """A graph may lower its limits, never raise them above the node's (NODE_LIMITS)."""
    cap = NODE_LIMITS.max_ops
    graph = simple_graph(limits=Limits(max_ops=2 * cap))
    for _ in range(cap - 1):
        graph.add("method", target="abs", args=[Ref(0)])
    assert len(graph.nodes) == cap + 1
    ids, mask = lm.tokenize(PROMPTS)
    with Sent(lm) as sent, pytest.raises(LimitExceededError, match=f"has {cap + 1} ops; the limit is {cap}"):
        lm.run_graph(graph, ids, mask, placement="hybrid")  # the client's own check uses the graph's 2 * cap
    assert sent.calls == 1


def test_attachment_budget_is_checked_by_the_client_and_by_the_node(lm, monkeypatch, serving):
    graph = Graph(limits=Limits(max_attachment_bytes=1024))
    graph.add("getter", module="model.layers.3", kind="output", call=0)
    graph.add("operator", target="add", args=[Ref(0), graph.attach(torch.ones(576))])  # 2304 bytes
    graph.add("method", target="sum", args=[Ref(1)], save=True)
    ids, mask = lm.tokenize(PROMPTS)
    with Sent(lm) as sent, pytest.raises(LimitExceededError, match="attachments are 2304 bytes; the limit is 1024"):
        lm.run_graph(graph, ids, mask, placement="hybrid")
    assert sent.calls == 0
    monkeypatch.setattr(hybrid.planner, "validate", lambda graph, limits_cap=None: None)
    with Sent(lm) as sent, pytest.raises(LimitExceededError, match="attachments are 2304 bytes; the limit is 1024"):
        lm.run_graph(graph, ids, mask, placement="hybrid")
    assert sent.calls == 1
    graph.limits = Limits(max_attachment_bytes=4096)  # within budget: it runs
    saves, _ = lm.run_graph(graph, ids, mask, placement="hybrid")
    assert saves[2].shape == ()


@pytest.mark.parametrize("add, message", [
    (lambda g: g.add("exec", target="os.system", args=[Ref(0)]), "Op 'exec' of node 2 is not allowed"),
    (lambda g: g.add("function", target="torch.load", args=["/etc/passwd"]),
     "torch function 'torch.load' is not in the whitelist"),
    (lambda g: g.add("function", target="torch.randn", args=[3]), "torch function 'torch.randn' is not in the"),
    (lambda g: g.add("method", target="__class__", args=[Ref(0)]), "tensor method '__class__' is not in the"),
    (lambda g: g.add("method", target="numpy", args=[Ref(0)]), "tensor method 'numpy' is not in the whitelist"),
    (lambda g: g.add("operator", target="call", args=[Ref(0)]), "operator 'call' is not in the whitelist"),
], ids=["op exec", "torch.load", "torch.randn", "__class__", "numpy", "operator call"])
def test_ops_outside_the_whitelist_are_refused_by_the_node(lm, unchecked_client, add, message, serving):
    graph = simple_graph()
    add(graph)
    ids, mask = lm.tokenize(PROMPTS)
    with Sent(lm) as sent, pytest.raises(DisallowedOpError, match=message) as raised:
        lm.run_graph(graph, ids, mask, placement="hybrid")
    assert sent.calls == 1
    assert isinstance(raised.value, HybridError) and isinstance(raised.value, BadRequestError)
