"""Gradients through the swarm, computed on the nodes that own the modules: ``.grad`` of layer, attention and MLP
outputs w.r.t. a logit metric, gradient edits, and two backward passes with ``retain_graph=True`` give the same
numbers in every placement as plain PyTorch autograd with hooks AND as real nnsight 0.8 run locally (fp32, max abs
diff <= 1e-5), on a real 3-node SmolLM2 swarm (0:10, 10:20, 20:30) and a one-node deployment.

Each experiment is one function whose ``with`` block runs unchanged on ``hybrid.LanguageModel`` and on
``nnsight.LanguageModel``; gradients are read in reverse module order, as nnsight requires.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hybrid
from hybrid.tracing import nnsight_position_ids

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PLACEMENTS = ["local", "hybrid", "centralized", "swarm"]
TOL = 1e-5
CITIES = ["The Eiffel Tower is located in the city of", "The Brandenburg Gate is located in the city of",
          "The Colosseum is located in the city of", "Big Ben is located in the city of"]
PARIS, BERLIN, ROME, LONDON = 7042, 11452, 7268, 4528
PICK = torch.tensor([[PARIS, BERLIN], [BERLIN, PARIS], [ROME, LONDON], [LONDON, ROME]])  # (B, 2): right, wrong
LAYERS = (3, 14, 27)  # one on each node


@pytest.fixture(scope="module")
def autograd(smollm2_dir):
    return Autograd(smollm2_dir)


@pytest.fixture(scope="module")
def refs():
    return {}


class Autograd:
    """The independent reference: plain transformers, forward hooks that register tensor hooks, and autograd."""

    def __init__(self, path) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def grads(self, modules: list[str], metrics: list[Callable[[torch.Tensor], torch.Tensor]],
              edits: dict[str, Callable] | None = None) -> list[dict[str, torch.Tensor]]:
        """Per metric (one backward each, the graph retained between them): the gradient reaching each module's
        output (its first element for a tuple), after ``edits[module](grad) -> new grad`` where given."""
        encoded = self.tokenizer(CITIES, padding=True, return_tensors="pt")
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        outputs: dict[str, torch.Tensor] = {}

        def keep(name):
            def hook(module, args, output):
                outputs[name] = output[0] if isinstance(output, tuple) else output
            return hook
        handles = [self.model.get_submodule(m).register_forward_hook(keep(m)) for m in modules]
        try:
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=nnsight_position_ids(mask)).logits
        finally:
            for handle in handles:
                handle.remove()
        results = []
        for i, metric in enumerate(metrics):
            seen: dict[str, torch.Tensor] = {}
            tensor_hooks = []
            for name, tensor in outputs.items():
                def on_grad(grad, name=name):
                    new = (edits or {}).get(name, lambda g: g)(grad)
                    seen[name] = new.detach().clone()
                    return new
                tensor_hooks.append(tensor.register_hook(on_grad))
            metric(logits).backward(retain_graph=i < len(metrics) - 1)
            for handle in tensor_hooks:
                handle.remove()
            results.append(seen)
        return results


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    pair = logits[:, -1, :].gather(1, PICK)
    return (pair[:, 0] - pair[:, 1]).sum()


def paris_logit(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, PARIS].sum()


# ---- the experiments: one with-block for nnsight and for every placement ---------------------------------------

def read_grads(lm, *, inside: bool = True, **placement):
    """Gradients of three layers' outputs (one per node) and (``inside``) an attention and an MLP output w.r.t. the
    logit difference."""
    out: dict = {}
    with lm.trace(CITIES, **placement) as tracer:
        h3 = lm.model.layers[3].output
        h3.requires_grad_(True)
        if inside:
            mlp5 = lm.model.layers[5].mlp.output
            attn14 = lm.model.layers[14].self_attn.output[0]
        h14 = lm.model.layers[14].output
        h27 = lm.model.layers[27].output
        pair = lm.lm_head.output[:, -1, :].gather(1, PICK)
        metric = (pair[:, 0] - pair[:, 1]).sum()
        with metric.backward():
            out["model.layers.27"] = h27.grad.save()
            out["model.layers.14"] = h14.grad.save()
            if inside:
                out["model.layers.14.self_attn"] = attn14.grad.save()
                out["model.layers.5.mlp"] = mlp5.grad.save()
            out["model.layers.3"] = h3.grad.save()
    return out, tracer


def edit_grads(lm, **placement):
    """Zero one layer's gradient at the first positions and double another's: every earlier gradient changes."""
    out: dict = {}
    with lm.trace(CITIES, **placement) as tracer:
        h3 = lm.model.layers[3].output
        h14 = lm.model.layers[14].output
        h20 = lm.model.layers[20].output
        pair = lm.lm_head.output[:, -1, :].gather(1, PICK)
        metric = (pair[:, 0] - pair[:, 1]).sum()
        with metric.backward():
            h20.grad = h20.grad * 2
            h14.grad[:, :5] = 0
            out["model.layers.3"] = h3.grad.save()
    return out, tracer


def two_passes(lm, **placement):
    """Two backward passes over one forward, the first retaining the graph."""
    out: dict = {}
    with lm.trace(CITIES, **placement) as tracer:
        h3 = lm.model.layers[3].output
        h27 = lm.model.layers[27].output
        logits = lm.lm_head.output
        diff = logits[:, -1, :].gather(1, PICK)
        first = (diff[:, 0] - diff[:, 1]).sum()
        with first.backward(retain_graph=True):
            out["first.27"] = h27.grad.save()
            out["first.3"] = h3.grad.save()
        second = logits[:, -1, PARIS].sum()
        with second.backward():
            out["second.3"] = h3.grad.save()
    return out, tracer


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got, want = got.detach(), want.detach()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got - want).abs().max().item()
    assert diff <= TOL, f"{what}: max abs diff {diff:.3g} > {TOL}"
    assert want.abs().max().item() > 0 or "zeroed" in what, f"{what}: the reference gradient is all zeros"


def check(placement: str, got: dict, autograd_ref: dict, nnsight_ref: dict, tracer) -> None:
    for name, want in autograd_ref.items():
        assert_close(got[name], want, f"{placement} vs autograd: {name}")
        assert_close(got[name], nnsight_ref[name], f"{placement} vs nnsight: {name}")
    stats = tracer.stats
    if placement == "hybrid":  # one call; the gradients of three nodes came back on the chained forward's answer
        assert stats["round_trips"] == 1 and len(stats["compute_s"]) == 3, stats
    if placement == "centralized":
        assert stats["round_trips"] == 1 and len(stats["route"]) == 1, stats


def cached(refs: dict, key: str, compute: Callable[[], Any]) -> Any:
    if key not in refs:
        refs[key] = compute()
    return refs[key]


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_gradients_of_layer_attention_and_mlp_outputs(placement, lm_for, autograd, ns, refs):
    modules = ["model.layers.27", "model.layers.14", "model.layers.14.self_attn", "model.layers.5.mlp",
               "model.layers.3"]
    if placement == "swarm":  # Petals-style reaches only layer boundaries
        modules = ["model.layers.27", "model.layers.14", "model.layers.3"]
    (want,) = cached(refs, "read", lambda: autograd.grads(["model.layers.27", "model.layers.14",
                                                           "model.layers.14.self_attn", "model.layers.5.mlp",
                                                           "model.layers.3"], [logit_diff]))
    from_nnsight = cached(refs, "read-ns", lambda: read_grads(ns)[0])
    lm = lm_for(placement)
    if placement == "swarm":
        with pytest.raises(hybrid.errors.DisallowedOpError, match="inside a layer"):
            read_grads(lm, placement=placement)
        got, tracer = read_grads(lm, inside=False, placement=placement)
    else:
        got, tracer = read_grads(lm, placement=placement)
    check(placement, got, {m: want[m] for m in modules}, from_nnsight, tracer)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_gradient_edits_change_earlier_gradients_as_autograd_does(placement, lm_for, autograd, ns, refs):
    def zero_first(grad):
        grad = grad.clone()
        grad[:, :5] = 0
        return grad
    edits = {"model.layers.20": lambda g: g * 2, "model.layers.14": zero_first}
    (want,) = cached(refs, "edit", lambda: autograd.grads(["model.layers.20", "model.layers.14", "model.layers.3"],
                                                          [logit_diff], edits))
    (plain,) = cached(refs, "read-plain", lambda: autograd.grads(["model.layers.3"], [logit_diff]))
    from_nnsight = cached(refs, "edit-ns", lambda: edit_grads(ns)[0])
    got, tracer = edit_grads(lm_for(placement), placement=placement)
    check(placement, got, {"model.layers.3": want["model.layers.3"]}, from_nnsight, tracer)
    assert (got["model.layers.3"] - plain["model.layers.3"]).abs().max() > 1e-3  # the edits did change it


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_two_backward_passes_with_retain_graph(placement, lm_for, autograd, ns, refs):
    first, second = cached(refs, "two", lambda: autograd.grads(["model.layers.27", "model.layers.3"],
                                                               [logit_diff, paris_logit]))
    want = {"first.27": first["model.layers.27"], "first.3": first["model.layers.3"],
            "second.3": second["model.layers.3"]}
    from_nnsight = cached(refs, "two-ns", lambda: two_passes(ns)[0])
    got, tracer = two_passes(lm_for(placement), placement=placement)
    check(placement, got, want, from_nnsight, tracer)
