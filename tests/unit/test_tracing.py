"""The tracing front end: nnsight-style blocks become the expected IR, round-trip the wire form, and refuse mistakes
(shapes, whitelist, access order, data-dependent control flow) at trace time; saved values are bound after the block.

No graph is executed here: ``execute`` is a stub returning ``torch.full(fake_shape, node_id)`` per saved node.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from hybrid.errors import DisallowedOpError, TraceError
from hybrid.ir import Attachment, Graph, Ref
from hybrid.tracing import (ModelSkeleton, Proxy, Tracer, TupleProxy, current_tracer, nnsight_position_ids,
                            root_envoy, save)
from tests.tiny_checkpoints import tiny_config

D, V, L = 64, 128, 4


@pytest.fixture(scope="module")
def skeleton() -> ModelSkeleton:
    return ModelSkeleton(tiny_config("llama", num_layers=L))


class Harness:
    """A fake LanguageModel: character tokenizer (left-padded with 0), stub execute that records its calls."""

    def __init__(self, skeleton: ModelSkeleton) -> None:
        self.skeleton = skeleton
        self.root = root_envoy(skeleton)
        self.tokenized: list[list] = []
        self.executed: list[tuple[Graph, torch.Tensor, torch.Tensor]] = []
        self.tracer: Tracer | None = None

    def tokenize(self, rows: list) -> tuple[torch.Tensor, torch.Tensor]:
        self.tokenized.append(list(rows))
        rows = [[3 + ord(c) % 100 for c in r] if isinstance(r, str) else list(r) for r in rows]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return ids, mask

    def execute(self, graph: Graph, ids: torch.Tensor, mask: torch.Tensor) -> dict:
        self.executed.append((graph, ids, mask))
        out = {}
        for node_id in graph.saved():
            fake = self.tracer.fake(node_id)
            shape = fake.shape if isinstance(fake, torch.Tensor) else (1,)
            out[node_id] = torch.full(tuple(shape), float(node_id))
        return out

    def trace(self, inputs=None) -> Tracer:
        self.tracer = Tracer(self.skeleton, self.tokenize, self.execute, inputs)
        return self.tracer

    @property
    def model(self):
        return self.root.model

    @property
    def lm_head(self):
        return self.root.lm_head


@pytest.fixture
def lm(skeleton: ModelSkeleton) -> Harness:
    return Harness(skeleton)


def ops_of(graph: Graph) -> list[tuple]:
    return [(n.op, n.target or n.module) for n in graph.nodes]


# ---- skeleton and shapes ------------------------------------------------------------------------------------------

def test_module_paths_are_hf_names(skeleton):
    paths = skeleton.module_paths()
    assert "" not in paths
    for path in ("model.embed_tokens", "model.layers.3.mlp", "model.layers.0.self_attn", "model.norm", "lm_head"):
        assert path in paths


def test_shapeinfo_events_follow_the_forward(skeleton):
    info = skeleton.shapes(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long))
    at = info.index
    assert at("model.embed_tokens", "input") < at("model.embed_tokens", "output") < at("model.layers.0", "input")
    for i in range(L):
        layer = f"model.layers.{i}"
        assert (at(layer, "input") < at(f"{layer}.self_attn", "input") < at(f"{layer}.self_attn", "output")
                < at(f"{layer}.mlp", "input") < at(f"{layer}.mlp", "output") < at(layer, "output"))
        if i:
            assert at(f"model.layers.{i - 1}", "output") < at(layer, "input")
    assert at(f"model.layers.{L - 1}", "output") < at("model.norm", "input") < at("model.norm", "output")
    assert at("model.norm", "output") < at("lm_head", "input") < at("lm_head", "output")
    called = [p for p in skeleton.module_paths() if p != "model.layers"]  # a ModuleList is never called itself
    assert len(info.events) == len(set(info.events)) == 2 * len(called)
    assert {path for path, _ in info.events} == set(called)


def test_shapeinfo_fakes_and_cache(skeleton):
    ids = torch.zeros(3, 7, dtype=torch.long)
    info = skeleton.shapes(ids, torch.ones_like(ids))
    assert info is skeleton.shapes(ids, torch.ones_like(ids))
    assert info is not skeleton.shapes(ids, None)
    layer = info.fake("model.layers.1", "output")
    assert isinstance(layer, torch.Tensor) and layer.device.type == "meta" and layer.shape == (3, 7, D)
    attn = info.fake("model.layers.1.self_attn", "output")
    assert isinstance(attn, tuple) and attn[0].shape == (3, 7, D)
    assert info.fake("model.layers.1.self_attn", "input").shape == (3, 7, D)  # hidden_states= is a keyword
    assert info.fake("model.layers.1.mlp.down_proj", "input").shape == (3, 7, 128)
    assert info.fake("lm_head", "output").shape == (3, 7, V)
    assert info.fake("model.embed_tokens", "input").dtype == torch.long
    with pytest.raises(TraceError, match="no input event"):
        info.fake("model.layers.99", "input")


def test_smollm2_like_shapes():
    config = transformers.LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                                      intermediate_size=1536, vocab_size=49152, num_hidden_layers=2,
                                      tie_word_embeddings=True)
    info = ModelSkeleton(config).shapes(torch.zeros(2, 9, dtype=torch.long), None)
    assert info.fake("model.layers.1", "output").shape == (2, 9, 576)
    assert info.fake("model.layers.0.self_attn.k_proj", "output").shape == (2, 9, 192)
    assert info.fake("model.layers.0.mlp.up_proj", "output").shape == (2, 9, 1536)
    assert info.fake("lm_head", "output").shape == (2, 9, 49152)


# ---- getters, setters, ops ----------------------------------------------------------------------------------------

def test_single_invoke_records_getters_setters_and_ops(lm):
    with lm.trace(["hello", "world"]) as tracer:
        lm.model.layers[2].mlp.output = lm.model.layers[2].mlp.output * 0
        x = lm.model.layers[3].self_attn.output[0]
        h = lm.model.layers[3].output
        assert lm.model.layers[3].output is h  # same getter reused
        h[1, 3, :] = h[0, 3, :]
        n = h.shape[-1]
        probs = lm.lm_head.output[:, -1].softmax(-1)
        p = probs[1].save()
        assert x.fake.shape == (2, 5, D) and probs.fake.shape == (2, V)
    g = tracer.graph
    assert ops_of(g) == [
        ("getter", "model.layers.2.mlp"), ("operator", "mul"), ("setter", "model.layers.2.mlp"),
        ("getter", "model.layers.3.self_attn"), ("operator", "getitem"), ("getter", "model.layers.3"),
        ("operator", "getitem"), ("operator", "setitem"), ("getter", "lm_head"), ("operator", "getitem"),
        ("method", "softmax"), ("operator", "getitem")]
    assert [(n.kind, n.call) for n in g.nodes if n.op in ("getter", "setter")] == [("output", 0)] * 5
    assert g.nodes[1].args == [Ref(0), 0] and g.nodes[2].args == [Ref(1)]
    assert g.nodes[4].args == [Ref(3), 0]
    assert g.nodes[6].args == [Ref(5), (0, 3, slice(None))]
    assert g.nodes[7].args == [Ref(5), (1, 3, slice(None)), Ref(6)]
    assert g.nodes[9].args == [Ref(8), (slice(None), -1)] and g.nodes[10].args == [Ref(9), -1]
    assert g.saved() == [11] and n == D
    assert isinstance(p, torch.Tensor) and torch.equal(p, torch.full((V,), 11.0))  # bound in this frame
    assert tracer.stats == {}
    graph, ids, mask = lm.executed[0]
    assert graph is g and ids.shape == mask.shape == (2, 5)


def test_graph_round_trips_the_wire_form(lm):
    steer = torch.randn(D)
    with lm.trace("a prompt") as tracer:
        h = lm.model.layers[1].output
        lm.model.layers[1].output = h + 2.5 * steer
        vals, idx = torch.topk(lm.lm_head.output[0, -1], 5)
        both = torch.cat([vals, -vals], dim=0).save()
        lp = F.log_softmax(lm.lm_head.output, dim=-1)[:, -1].max(-1)[0].save()
        m = (lp > float("-inf")).save()
    g = tracer.graph
    back = Graph.from_bytes(g.to_bytes())
    assert back.to_json() == g.to_json()
    assert len(back.attachments) == 1 and torch.equal(back.attachments[0], 2.5 * steer)
    assert [n.args for n in back.nodes] == [n.args for n in g.nodes]
    assert isinstance(both, torch.Tensor) and isinstance(lp, torch.Tensor) and isinstance(m, torch.Tensor)


def test_torch_functions_methods_and_operators(lm):
    steer = torch.ones(D)
    with lm.trace(["one", "two"]) as tracer:
        h = lm.model.layers[0].output
        a = 2 * h
        b = 1 - h
        c = -h
        d = h < 0
        e = steer + h                     # a tensor on the left goes through __torch_function__
        f = torch.stack([h, a], dim=0)
        s = torch.softmax(h, -1)
        top = torch.topk(h[0, -1], 3)
        i = top.indices
        w = torch.where(d, h, steer)
        t = h[0].T
        y = h.to(torch.float16).sum(dim=0)
        h += 1
        assert f.fake.shape == (2, 2, 3, D) and t.fake.shape == (D, 3) and y.fake.dtype == torch.float16
        assert i.fake.dtype == torch.long and i.fake.shape == (3,)
    nodes = tracer.graph.nodes
    by_id = {n.id: n for n in nodes}
    assert (by_id[a.node_id].target, by_id[a.node_id].args) == ("mul", [2, Ref(0)])
    assert (by_id[b.node_id].target, by_id[b.node_id].args) == ("sub", [1, Ref(0)])
    assert by_id[c.node_id].target == "neg" and by_id[d.node_id].target == "lt"
    assert (by_id[e.node_id].op, by_id[e.node_id].target, by_id[e.node_id].args) == (
        "operator", "add", [Attachment(0), Ref(0)])
    assert (by_id[f.node_id].op, by_id[f.node_id].target) == ("function", "torch.stack")
    assert by_id[f.node_id].args == [[Ref(0), Ref(a.node_id)]] and by_id[f.node_id].kwargs == {"dim": 0}
    assert by_id[s.node_id].target == "torch.softmax" and by_id[top.node_id].target == "torch.topk"
    assert (by_id[i.node_id].target, by_id[i.node_id].args) == ("getitem", [Ref(top.node_id), 1])
    assert by_id[w.node_id].args == [Ref(d.node_id), Ref(0), Attachment(0)]  # the same tensor is attached once
    assert by_id[t.node_id].op == "method" and by_id[t.node_id].target == "t"
    assert nodes[-1].target == "iadd" and len(tracer.graph.attachments) == 1


def test_disallowed_ops_name_the_op(lm):
    with lm.trace("x"):
        h = lm.model.layers[0].output
        with pytest.raises(DisallowedOpError, match="'cpu'.*test_tracing.py"):
            h.cpu()
        with pytest.raises(DisallowedOpError, match="may only take a dtype"):
            h.to("cuda")
        with pytest.raises(DisallowedOpError, match="torch.unique"):
            torch.unique(h)
        with pytest.raises(DisallowedOpError, match="'device'"):
            h.device
        with pytest.raises(TraceError, match="cannot be passed into the graph"):
            h + object()


def test_shape_errors_are_raised_at_trace_time(lm):
    with lm.trace(["ab", "cd"]) as tracer:
        h = lm.model.layers[0].output
        h0 = h[0]
        before = len(tracer.graph.nodes)
        with pytest.raises(TraceError, match=r"operator add .*\(2, 2, 64\) float32.*\(3,\) float32"):
            h + torch.ones(3)
        with pytest.raises(TraceError, match="operator getitem"):
            h[5]
        with pytest.raises(TraceError, match="operator setitem"):
            h[0] = torch.ones(2, 3)
        with pytest.raises(TraceError, match=r"\.matmul\(\)"):
            h.matmul(torch.ones(3, 3))
        with pytest.raises(TraceError, match="test_tracing.py"):
            torch.cat([h, h0], dim=0)
        assert len(tracer.graph.nodes) == before and not tracer.graph.attachments  # a refused op records nothing


def test_data_dependent_control_flow_is_refused(lm):
    with lm.trace(["ab", "cd"]):
        h = lm.model.layers[0].output
        with pytest.raises(TraceError, match="control flow"):
            if h.sum() > 0:
                pass
        with pytest.raises(TraceError, match="iterating over a traced tensor"):
            for _ in h:
                pass
        with pytest.raises(TraceError, match="Python number"):
            int(h[0, 0, 0])
        with pytest.raises(TraceError, match="depend on tensor values"):
            h[h > 0]
        assert len(h) == 2 and h.size(-1) == D and h.dim() == 3 and h.ndim == 3 and h.dtype == torch.float32
        with pytest.raises(TraceError, match="len"):
            len(h.sum())
        assert h.sum().item().fake.shape == ()


def test_access_order(lm):
    with lm.trace("abc") as tracer:
        lm.model.layers[1].input
        lm.model.layers[1].output
        with pytest.raises(TraceError, match=r"model\.layers\.0\.output is computed before model\.layers\.1\.output"):
            lm.model.layers[0].output
        with pytest.raises(TraceError, match=r"model\.layers\.1\.mlp\.output .* model\.layers\.1\.output"):
            lm.model.layers[1].mlp.output = torch.zeros(1, 3, D)
        with pytest.raises(TraceError, match=r"model\.layers\.1\.input is computed before"):
            lm.model.layers[1].input
        lm.model.layers[1].output  # the same event again is fine
        lm.lm_head.output
    assert ops_of(tracer.graph) == [("getter", "model.layers.1"), ("getter", "model.layers.1"), ("getter", "lm_head")]
    assert [n.kind for n in tracer.graph.nodes] == ["input", "output", "output"]


def test_envoy_tree_and_misuse(lm):
    layers = lm.model.layers
    assert len(layers) == L and [e.path for e in layers] == [f"model.layers.{i}" for i in range(L)]
    assert layers[-1].path == "model.layers.3" and layers[1:3][0].path == "model.layers.1"
    assert layers[0].self_attn.head_dim == 16  # plain attributes of the module pass through
    with pytest.raises(TraceError, match="inside `with lm.trace"):
        layers[0].output
    with pytest.raises(TraceError, match="inside `with lm.trace"):
        layers[0].output = 1
    with pytest.raises(DisallowedOpError, match="weights"):
        lm.lm_head.weight
    with pytest.raises(AttributeError, match="no submodule 'nope'"):
        layers[0].nope
    with pytest.raises(IndexError):
        layers[L]
    with pytest.raises(TraceError, match="only .output and .input"):
        layers[0].outptu = 3


def test_reads_after_a_setter(lm):
    with lm.trace("ab") as tracer:
        out = lm.model.layers[0].mlp.output
        doubled = out * 2
        lm.model.layers[0].mlp.output = doubled
        assert lm.model.layers[0].mlp.output is doubled  # the module now holds that very tensor
        lm.model.layers[0].output = out[:, :1]  # broadcasts to (1, 2, D), as the interpreter conforms it
        again = lm.model.layers[0].output
        assert again.fake.shape == (1, 2, D)
        with pytest.raises(TraceError, match=r"setting model.layers.1.output: a \(3,\) float32 value does not "
                                             r"broadcast to the module's \(1, 2, 64\) float32"):
            lm.model.layers[1].output = torch.ones(3)
        with pytest.raises(TraceError, match="expected a tuple of 2"):
            lm.model.layers[1].self_attn.output = out
    assert ops_of(tracer.graph)[-3:] == [("operator", "getitem"), ("setter", "model.layers.0"),
                                         ("getter", "model.layers.0")]


# ---- invokes -----------------------------------------------------------------------------------------------------

def test_invokes_slice_rows_and_write_in_place(lm):
    with lm.trace() as tracer:
        with tracer.invoke("prompt one"):
            a = lm.model.layers[3].output.save()
            assert a.fake.shape == (1, 10, D)
        with tracer.invoke(["prompt two", "prompt three"]):
            b = lm.model.layers[3].output
            b[:] = 0
            assert b.fake.shape == (2, 12, D)
    g = tracer.graph
    assert ops_of(g) == [("getter", "model.layers.3"), ("operator", "getitem"), ("operator", "getitem"),
                         ("operator", "setitem")]
    assert g.nodes[1].args == [Ref(0), slice(0, 1)] and g.nodes[1].save
    assert g.nodes[2].args == [Ref(0), slice(1, 3)]
    assert g.nodes[3].args == [Ref(2), slice(None), 0]
    assert lm.tokenized == [["prompt one"], ["prompt two", "prompt three"],
                            ["prompt one", "prompt two", "prompt three"]]
    _, ids, mask = lm.executed[0]
    assert ids.shape == (3, 12) and mask[0].tolist() == [0, 0] + [1] * 10  # left-padded together
    assert isinstance(a, torch.Tensor) and a.shape == (1, 12, D)  # fakes were recomputed for the longer invoke


def test_invoke_setter_widens_like_nnsight(lm):
    with lm.trace() as tracer:
        with tracer.invoke("abc"):
            lm.model.layers[0].output
        with tracer.invoke("def"):
            h = lm.model.layers[1].output
            v = h * 2
            lm.model.layers[1].output = v
    g = tracer.graph
    full = g.nodes[h.node_id].args[0]
    assert g.nodes[full.id].op == "getter" and g.nodes[h.node_id].args == [full, slice(1, 2)]
    cat = g.nodes[-2]
    assert (cat.op, cat.target, cat.kwargs) == ("function", "torch.cat", {"dim": 0})
    pre, value, post = cat.args[0]
    assert value == Ref(v.node_id)
    assert g.nodes[pre.id].args == [full, slice(None, 1)] and g.nodes[post.id].args == [full, slice(2, None)]
    assert (g.nodes[-1].op, g.nodes[-1].module, g.nodes[-1].args) == ("setter", "model.layers.1", [Ref(cat.id)])
    with lm.trace() as tracer:
        with tracer.invoke("abc"):
            pass
        with tracer.invoke("def"):
            with pytest.raises(TraceError, match=r"must have shape \(1, 3, 64\).*\[:\] = value"):
                lm.model.layers[2].output = torch.zeros(D)


def test_invoke_tuple_outputs(lm):
    with lm.trace() as tracer:
        with tracer.invoke("abc"):
            pass
        with tracer.invoke(["xyz", "uvw"]):
            attn = lm.model.layers[0].self_attn.output
            assert isinstance(attn, TupleProxy) and len(attn) == 2  # (output, weights: the nodes run it eagerly)
            assert attn[0].fake.shape == (2, 3, D) and attn[1].fake.shape[::2] == (2, 3)
            x = attn[0].save()
            lm.model.layers[0].self_attn.output = (attn[0] * 0, None)
    setter = tracer.graph.nodes[-1]
    assert setter.op == "setter" and isinstance(setter.args[0], tuple) and setter.args[0][1] is None
    assert Graph.from_bytes(tracer.graph.to_bytes()).to_json() == tracer.graph.to_json()
    assert isinstance(x, torch.Tensor) and x.shape == (2, 3, D)


def test_invokes_track_order_separately_and_refuse_misuse(lm):
    with lm.trace() as tracer:
        with tracer.invoke("abc"):
            lm.model.layers[3].output
        with tracer.invoke("abc"):
            lm.model.layers[0].output  # a new invoke starts from the top
            with pytest.raises(TraceError, match="nested"):
                with tracer.invoke("x"):
                    pass
        with pytest.raises(TraceError, match="outside any invoke"):
            lm.model.layers[0].output
    with pytest.raises(TraceError, match="already has inputs"):
        with lm.trace("abc") as tracer:
            with tracer.invoke("x"):
                pass
    with pytest.raises(TraceError, match="no inputs"):
        with lm.trace():
            pass
    with pytest.raises(TraceError, match="same kind of input"):
        with lm.trace() as tracer:
            with tracer.invoke("abc"):
                pass
            with tracer.invoke([5, 6, 7]):
                pass


def test_reading_a_token_size_before_a_longer_invoke_is_an_error(lm):
    with pytest.raises(TraceError, match=r"invoke 1 .*read size 2 of dim 1"):
        with lm.trace() as tracer:
            with tracer.invoke("ab"):
                h = lm.model.layers[0].output
                last = h[:, h.shape[1] - 1]
            with tracer.invoke("abcdef"):
                pass
    with lm.trace() as tracer:  # the hidden size does not depend on the batch: fine
        with tracer.invoke("ab"):
            assert lm.model.layers[0].output.shape[-1] == D
        with tracer.invoke("abcdef"):
            pass
    del last


def test_token_id_and_tensor_inputs(lm):
    with lm.trace() as tracer:
        with tracer.invoke([5, 6, 7]):
            a = lm.lm_head.output.save()
        with tracer.invoke(torch.tensor([[1, 2], [3, 4]])):
            b = lm.lm_head.output.save()
    assert lm.tokenized[-1] == [[5, 6, 7], [1, 2], [3, 4]]
    assert a.shape == (1, 3, V) and b.shape == (2, 3, V)


# ---- the end of the block ----------------------------------------------------------------------------------------

def test_saved_values_are_bound_and_unsaved_stay_proxies(lm):
    with lm.trace(["ab", "cd"]) as tracer:
        h = lm.model.layers[0].output
        keep = [h.sum(-1).save(), h.mean()]
        named = {"p": save(h[0])}
        pair = (h[1].save(), 3)
    assert isinstance(keep[0], torch.Tensor) and torch.equal(keep[0], torch.full((2, 2), float(keep[0][0, 0])))
    assert isinstance(keep[1], Proxy) and isinstance(h, Proxy)
    assert isinstance(named["p"], torch.Tensor) and named["p"].shape == (2, D)
    assert isinstance(pair[0], torch.Tensor) and pair[1] == 3
    with pytest.raises(TraceError, match="was not saved"):
        h.value
    with pytest.raises(TraceError, match="trace has ended"):
        h + 1
    assert len(tracer.graph.saved()) == 3


def test_an_exception_in_the_block_runs_nothing(lm):
    with pytest.raises(ZeroDivisionError):
        with lm.trace("ab"):
            lm.model.layers[0].output.save()
            1 / 0
    assert lm.executed == [] and current_tracer(lm.skeleton) is None
    with lm.trace("ab"):
        with pytest.raises(TraceError, match="nested"):
            with lm.trace("cd"):
                pass


def test_nnsight_position_ids():
    assert nnsight_position_ids(torch.ones(2, 3, dtype=torch.long)) is None
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert nnsight_position_ids(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
