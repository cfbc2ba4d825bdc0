"""``module.source`` pieces: operation names equal nnsight 0.8.1's (its own ``.source`` on the same modules), the
instrumented forward computes what the forward computes, and a node checks the operation a request names against its
own module class before anything runs."""

from __future__ import annotations

import pytest
import torch
import transformers

from hybrid.errors import UnknownSourceOpError
from hybrid.ir import Graph, Ref
from hybrid.node_plugin import build_graph_hook
from hybrid.planner import Executor, Plan
from hybrid.request import encode_request
from hybrid.source import op_names, run_instrumented
from tests.fuzz_node import InProcessNode
from tests.tiny_checkpoints import tiny_config

PATHS = ["model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.0", "model.norm", "lm_head", "model",
         "model.embed_tokens"]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_operation_names_equal_nnsight(family):
    import nnsight

    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, num_layers=1))
    wrapped = nnsight.NNsight(model)
    for path in PATHS:
        envoy = wrapped
        for part in path.split("."):
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        assert op_names(model.get_submodule(path)) == tuple(envoy.source.names), path


def test_the_instrumented_forward_computes_the_forward():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama", num_layers=1)).eval()
    layer = model.model.layers[0]
    x = torch.randn(2, 5, 64)
    position_embeddings = model.model.rotary_emb(x, torch.arange(5)[None])
    seen = []

    def report(label, callee, args, kwargs):
        seen.append(label)
        return callee(*args, **kwargs)

    with torch.no_grad():
        want = layer(x, position_embeddings=position_embeddings)
        got = run_instrumented(layer, (x,), {"position_embeddings": position_embeddings}, report)
    assert torch.equal(got, want)
    assert seen[:3] == ["residual_0", "self_input_layernorm_0", "hidden_states_0"] and "self_mlp_0" in seen


@pytest.fixture(scope="module")
def node(tiny_checkpoint_factory):
    return InProcessNode(tiny_checkpoint_factory("llama", num_layers=4))


def test_a_node_refuses_an_operation_its_module_does_not_have(node):
    g = Graph()
    g.add("getter", module="model.layers.1.self_attn.source.o_proj_0", kind="output", call=0, save=True)
    plan = Plan([Executor("n", 0, 5)], [0], [[0]], [])
    with pytest.raises(UnknownSourceOpError, match="self_o_proj_0"):  # the valid names are listed
        build_graph_hook(encode_request(g, plan, 0), node.context, node=node.limits)


def test_a_node_reads_and_sets_an_operation_inside_a_forward(node):
    """Halving ``self_o_proj_0``'s output halves the attention module's output; its input is the attention call's."""
    g = Graph()
    call = g.add("getter", module="model.layers.1.self_attn.source.attention_interface_1", kind="output", call=0)
    first = g.add("operator", target="getitem", args=[Ref(call.id), 0], save=True)
    o_in = g.add("getter", module="model.layers.1.self_attn.source.self_o_proj_0", kind="input", call=0, save=True)
    out = g.add("getter", module="model.layers.1.self_attn.source.self_o_proj_0", kind="output", call=0)
    half = g.add("operator", target="mul", args=[Ref(out.id), 0.5])
    g.add("setter", module="model.layers.1.self_attn.source.self_o_proj_0", kind="output", call=0, args=[Ref(half.id)])
    attn = g.add("getter", module="model.layers.1.self_attn", kind="output", call=0)
    attn_out = g.add("operator", target="getitem", args=[Ref(attn.id), 0], save=True)
    g.nodes[out.id].save = True
    plan = Plan([Executor("n", 0, 5)], [0] * len(g.nodes), [g.saved()], [])
    assert node.run(encode_request(g, plan, 0), real=True)[0] == "ok"
    hook = build_graph_hook(encode_request(g, plan, 0), node.context, node=node.limits)
    from swarm.span_hook import active_hook
    from tests.fuzz_node import INPUT_IDS
    with torch.no_grad(), active_hook(hook):
        node.model(INPUT_IDS, embed=True, head=True)
    values = hook.interpreter.finish()
    b, t = INPUT_IDS.shape
    assert values[first.id].shape == (b, t, 4, 16)
    assert torch.equal(values[o_in.id], values[first.id].reshape(b, t, -1))
    assert torch.allclose(values[attn_out.id], values[out.id] * 0.5)
