"""Hybrid features in the local placement (tiny Llama, no sockets): backward passes (refused at the user's line with a
typed error when misused, equal to plain autograd when run), batched lens calls, the head on the positions read."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import hybrid
from hybrid.errors import DisallowedOpError, InvalidGraphError, OrderError, TraceError
from hybrid.node_plugin import TRIM_MIN_ROWS

IDS = torch.tensor([[5, 9, 11, 3, 7], [2, 4, 6, 8, 10]])


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory("llama", num_layers=4)
    return path, hybrid.LanguageModel(str(path))


def reference_grads(path, layers: list[int], edit: dict | None = None) -> dict[int, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outputs, grads = {}, {}
    for k in layers:
        model.model.layers[k].register_forward_hook(lambda m, a, o, k=k: outputs.__setitem__(k, o))
    logits = model(IDS).logits
    for k, t in outputs.items():
        def hook(g, k=k):
            g = (edit or {}).get(k, lambda x: x)(g)
            grads[k] = g.clone()
            return g
        t.register_hook(hook)
    logits[:, -1, 3].sum().backward()
    return grads


def test_local_gradients_and_an_edit_equal_autograd(tiny):
    path, lm = tiny
    with lm.trace(IDS):
        h1, h2 = lm.model.layers[1].output, lm.model.layers[2].output
        with lm.lm_head.output[:, -1, 3].sum().backward():
            h2.grad[:, 0] = 0
            g1 = h1.grad.save()
    def zero_row(g):
        g = g.clone()
        g[:, 0] = 0
        return g
    want = reference_grads(path, [1, 2], {2: zero_row})
    assert (g1 - want[1]).abs().max() <= 1e-5 and want[1].abs().max() > 0


def test_grad_outside_backward_is_refused_at_the_users_line(tiny):
    _, lm = tiny
    with pytest.raises(TraceError, match=r"inside `with loss.backward\(\):`.*test_hybrid_runtime_features.py"):
        with lm.trace(IDS):
            lm.model.layers[1].output.grad.save()


def test_backward_of_a_non_scalar_needs_a_gradient(tiny):
    _, lm = tiny
    with pytest.raises(TraceError, match="only for scalar outputs"):
        with lm.trace(IDS):
            lm.lm_head.output.backward()


def test_backward_is_refused_in_generation(tiny):
    _, lm = tiny
    with pytest.raises(TraceError, match="not in lm.generate"):
        with lm.generate(IDS, max_new_tokens=2):
            lm.lm_head.output.sum().backward()


def test_an_edit_that_needs_a_later_gradient_is_an_order_error_while_tracing(tiny):
    _, lm = tiny
    with pytest.raises(TraceError, match="reverse module order") as info:
        with lm.trace(IDS):
            h1, h2 = lm.model.layers[1].output, lm.model.layers[2].output
            with lm.lm_head.output.sum().backward():
                h2.grad[:] = h1.grad  # h1's gradient exists only after h2's has flowed on
    assert "test_hybrid_runtime_features.py" in str(info.value)


def test_weights_are_not_addressable(tiny):
    _, lm = tiny
    with pytest.raises(DisallowedOpError, match="weights"):
        with lm.trace(IDS):
            lm.lm_head.weight.grad


def test_gradient_of_a_value_without_grad_is_a_typed_error(tiny):
    _, lm = tiny
    with pytest.raises(InvalidGraphError, match="does not require grad"):
        with lm.trace(IDS):
            const = torch.ones(3) * lm.model.layers[0].output[0, 0, :3].detach()
            loss = lm.lm_head.output.sum()
            with loss.backward():
                const.grad.save()


def test_a_gradient_the_loss_does_not_reach_is_a_typed_error(tiny):
    _, lm = tiny
    with pytest.raises(OrderError, match="does not depend on it"):
        with lm.trace(IDS):
            h = lm.model.layers[1].output
            side = h * 2  # not on the path to the loss
            loss = lm.model.layers[2].output.sum()
            with loss.backward():
                side.grad.save()


def test_grad_assignment_must_fit_the_gradient(tiny):
    _, lm = tiny
    with pytest.raises(TraceError):
        with lm.trace(IDS):
            h = lm.model.layers[1].output
            with lm.lm_head.output.sum().backward():
                h.grad = torch.zeros(7, 7)


def test_backward_blocks_do_not_nest(tiny):
    _, lm = tiny
    with pytest.raises(TraceError, match="nested"):
        with lm.trace(IDS):
            loss = lm.lm_head.output.sum()
            with loss.backward(retain_graph=True):
                with loss.backward():
                    pass


def test_the_tracer_runs_a_module_on_fakes_once_per_input_shape(tiny):
    """While tracing, the lens's ``lm_head(norm(h_k[:, -1]))`` of every layer runs the skeleton's ``norm`` and
    ``lm_head`` on fakes once (a module's output shape follows from its inputs'); a call on another input shape runs
    them again, and every traced value keeps its own shape. The values are the interpreter's, unchanged."""
    _, lm = tiny
    calls = {"model.norm": 0, "lm_head": 0}
    handles = [lm.skeleton.module(p).register_forward_hook(lambda m, a, o, p=p: calls.__setitem__(p, calls[p] + 1))
               for p in calls]
    try:
        baseline = {}
        for _ in range(2):  # a trace calling no module: what the skeleton's own shape pass calls (the first may fill
            before = dict(calls)  # its cache), so that only the lens trace's own module calls are counted below
            with lm.trace(IDS):
                lm.model.layers[3].output.save()
            baseline = {p: calls[p] - before[p] for p in calls}
        before = dict(calls)
        with lm.trace(IDS):
            lens = [lm.lm_head(lm.model.norm(lm.model.layers[k].output[:, -1])) for k in range(4)]
            full = lm.lm_head(lm.model.norm(lm.model.layers[3].output))  # (B, T, D): another shape
            shapes = [tuple(x.shape) for x in (*lens, full)]
            saved = [x.save() for x in (*lens, full)]
    finally:
        for handle in handles:
            handle.remove()
    assert {p: calls[p] - before[p] - baseline[p] for p in calls} == {"model.norm": 2, "lm_head": 2}
    (b, t), v = IDS.shape, lm.config.vocab_size
    assert shapes == [(b, v)] * 4 + [(b, t, v)]
    assert [tuple(x.shape) for x in saved] == shapes
    assert (saved[3] - saved[4][:, -1]).abs().max().item() <= 1e-5  # layer 3's lens, both ways (other GEMM shapes)


def test_logit_lens_on_a_later_executor_calls_norm_and_head_once_with_per_layer_values(tiny):
    """The lens pattern: ``lm_head(norm(h_k))`` of every layer runs as one batched norm call and one batched head call
    on the executor holding the head, both for the layers carried there and for the layers it runs itself (their calls
    wait for the last one), equal to per-layer calls of plain transformers within 1e-5; the top-k after the head too."""
    from hybrid.interpreter import Interpreter
    from hybrid.placements import run_local_stage
    from hybrid.planner import Executor, plan_graph
    path, lm = tiny
    with lm.trace(IDS) as tracer:  # layers 0 and 1 on the first executor; layers 2, 3 and the head on the second
        lens = [lm.lm_head(lm.model.norm(lm.model.layers[k].output[:, -1])) for k in range(4)]
        saved = [x.save() for x in lens]
        tops = [x.topk(3, dim=-1)[1].save() for x in lens]
        node_ids, top_ids = [x.node_id for x in saved], [x.node_id for x in tops]
    graph, model = tracer.graph, lm.local_model
    plan = plan_graph(graph, lm.skeleton.shapes(IDS, None).events, 4, [Executor("a", 0, 2), Executor("b", 3, 5)])
    first = Interpreter(graph, plan, 0, {}, modules=dict(model.named_modules()))
    hidden = run_local_stage(model, first, IDS, start=0, end=2, embed=True)
    second = Interpreter(graph, plan, 1, first.finish(), modules=dict(model.named_modules()))
    run_local_stage(model, second, hidden, start=2, end=4, head=True)
    values = second.finish()
    assert second.module_calls == 2  # one norm, one head for the four layers, carried or run here
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hidden = {}  # each layer's output (hidden_states[-1] would be after the final norm)
    for k in range(4):
        reference.model.layers[k].register_forward_hook(lambda m, a, o, k=k: hidden.__setitem__(k, o))
    with torch.no_grad():
        reference(IDS)
        for k in range(4):
            want = reference.lm_head(reference.model.norm(hidden[k][:, -1]))  # one layer at a time
            assert (values[node_ids[k]] - want).abs().max() <= 1e-5
            assert (saved[k] - want).abs().max() <= 1e-5  # the local run agrees too
            assert torch.equal(values[top_ids[k]], values[node_ids[k]].topk(3, dim=-1)[1])


def test_a_waiting_module_call_runs_when_a_setter_needs_it(tiny):
    """A position-wise call waiting for a sibling (the lens batching) still runs in time for a setter that reads it:
    layer 3's post-attention norm input replaced by layer 3's MLP applied to layer 1's output, while the MLP's call on
    its own later input is pending; equal to plain transformers with the same edit made by hooks."""
    path, lm = tiny
    with lm.trace(IDS):
        mlp = lm.model.layers[3].mlp
        lm.model.layers[3].post_attention_layernorm.input = mlp(lm.model.layers[1].output)
        late = mlp(lm.model.layers[3].mlp.input).save()
        logits = lm.lm_head.output.save()
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layer, kept = reference.model.layers[3], {}
    reference.model.layers[1].register_forward_hook(lambda m, a, o: kept.__setitem__(1, o))
    layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: (layer.mlp(kept[1]),))
    layer.mlp.register_forward_pre_hook(lambda m, a: kept.__setitem__(3, a[0]))
    with torch.no_grad():
        want = reference(IDS).logits
        assert (late - layer.mlp(kept[3])).abs().max() <= 1e-5
    assert (logits - want).abs().max() <= 1e-5


@pytest.mark.parametrize("index, positions", [((slice(None), -1), "last"), ((0, -1, slice(None, 5)), "last"),
                                               ((slice(None), 2), "all"), ((Ellipsis, 3), "all")])
def test_the_head_runs_only_on_the_positions_the_graph_reads(tiny, index, positions):
    """By default (``trim_head``) the head sees the last position alone (padded to TRIM_MIN_ROWS rows) when nothing
    else of it is read and the batch has TRIM_MIN_ROWS rows × positions; its logits equal the full head's (checked at
    1e-5 on this tiny model; bit for bit on SmolLM2 in tests/integration/test_trimmed_head.py). Fewer rows, or
    ``trim_head=False``: the head runs on every position."""
    path, lm = tiny
    ids = torch.randint(3, 128, (2, 8))  # 16 rows: trimmed
    whole = hybrid.LanguageModel(str(path), trim_head=False)
    head = lm.local_model.get_submodule("lm_head")
    seen: list = []
    handle = head.register_forward_hook(lambda module, args, output: seen.append(tuple(args[0].shape)))
    try:
        with lm.trace(ids) as tracer:
            got = lm.lm_head.output[index].save()
    finally:
        handle.remove()
    assert tracer.stats["head_positions"] == positions
    assert seen == [(TRIM_MIN_ROWS, 1, 64) if positions == "last" else (2, 8, 64)]  # 2 rows padded (last_rows_padded)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(ids).logits[index]
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-5
    with whole.trace(ids) as tracer:
        whole.lm_head.output[index].save()
    assert tracer.stats["head_positions"] == "all"
    with lm.trace(IDS) as tracer:  # 10 rows: below TRIM_MIN_ROWS, the head runs whole
        lm.lm_head.output[index].save()
    assert tracer.stats["head_positions"] == "all"


def test_a_saved_whole_head_output_keeps_every_position(tiny):
    path, lm = tiny
    with lm.trace(IDS) as tracer:
        logits = lm.lm_head.output.save()
        last = lm.output.logits[:, -1].save()  # nnsight's root output: the same tensor
    assert tracer.stats["head_positions"] == "all" and logits.shape == (2, 5, 128)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(IDS).logits
    assert (logits - want).abs().max() <= 1e-5 and torch.equal(last, logits[:, -1])
