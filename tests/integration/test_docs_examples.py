"""The notebook-style scripts of docs/examples/ run on the swarm (``hybrid``), each once, and each shows what its
technique is for (patching every position of layer 0 recovers the whole clean logit difference; the last layer's
logit lens is the model's own output; steering and a function vector change the output; the SAE's features are
non-negative). Their key values are compared with a cheap independent reference: the same quantity computed by real
nnsight 0.8.1 run locally, in one forward (or a two-token generation), not a second run of the whole script (the
test-time budget; the placements' parity is the subject of tests/integration/test_nnsight_*.py). fp32, <= 1e-5."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
TOL = 1e-5


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def same(got, want, what):
    if isinstance(want, (list, tuple)):
        assert len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want)):
            same(g, w, f"{what}[{i}]")
    elif isinstance(want, torch.Tensor):
        assert got.shape == want.shape, f"{what}: {tuple(got.shape)} != {tuple(want.shape)}"
        assert (got.double() - want.double()).abs().max().item() <= TOL, what
    elif isinstance(want, float):
        assert abs(got - want) <= 1e-4, what


def on_swarm(name, remote_lm, **kwargs):
    module = script(name)
    return module, module.run(remote_lm, "hybrid", **kwargs)


def last_logits(ns, prompt):
    """Real nnsight's last-position logits of one prompt (the reference)."""
    with ns.trace(prompt):
        logits = ns.lm_head.output[:, -1].save()
    return logits


def logit_diff(ns, prompt, mary, john):
    logits = last_logits(ns, prompt)
    return logits[:, mary] - logits[:, john]


def test_activation_patching(remote_lm, ns):
    module, got = on_swarm("activation_patching", remote_lm, layers=(0, 16))
    mary, john = remote_lm.tokenizer(" Mary").input_ids[-1], remote_lm.tokenizer(" John").input_ids[-1]
    same(got["clean"], logit_diff(ns, module.CLEAN, mary, john), "clean")
    same(got["corrupt"], logit_diff(ns, module.CORRUPT, mary, john), "corrupt")
    assert got["clean"].item() > 0 > got["corrupt"].item()
    assert abs(got["recovered"][0] - 1.0) < 1e-4   # layer 0 at every position: the rest of the run is the clean one


def test_attribution_patching(remote_lm, ns):
    module, got = on_swarm("attribution_patching", remote_lm)
    mary, john = remote_lm.tokenizer(" Mary").input_ids[-1], remote_lm.tokenizer(" John").input_ids[-1]
    same(got["metric"], logit_diff(ns, module.CORRUPT, mary, john).sum(), "metric")
    assert all(a.shape == got["attributions"][0].shape and a.abs().max() > 0 for a in got["attributions"])


def test_logit_lens(remote_lm, ns):
    module, got = on_swarm("logit_lens", remote_lm, layers=(0, 15, 29))
    same(got["final"], last_logits(ns, module.PROMPT).softmax(-1).max(-1).values, "final")
    same(got["probs"][-1], got["final"], "the last layer's lens is the model's output")


def test_steering(remote_lm, ns):
    module, got = on_swarm("steering", remote_lm, max_new_tokens=2)
    with ns.generate(module.PROMPT, max_new_tokens=2, do_sample=False) as tracer:
        plain = tracer.result.save()
    assert torch.equal(got["plain"], plain), (got["plain"], plain)
    assert (got["steered"] != got["plain"]).any()


def test_function_vectors(remote_lm, ns):
    module, got = on_swarm("function_vectors", remote_lm)
    answer = remote_lm.tokenizer(module.ANSWER).input_ids[-1]
    same(got["plain"], last_logits(ns, module.ZERO_SHOT).softmax(-1)[:, answer], "plain")
    assert got["vector_norm"].item() > 0 and got["patched"].item() > 2 * got["plain"].item()   # 0.002 -> 0.014


def test_sae_features(remote_lm, ns):
    module, got = on_swarm("sae_features", remote_lm)
    with ns.trace(module.PROMPTS):
        h = ns.model.layers[module.LAYER].output.save()
    sae = module.SparseAutoencoder(ns.config.hidden_size, 8 * ns.config.hidden_size)   # the script's weights (seed 0)
    with torch.no_grad():
        recon, features = sae(h)
        top = features[:, -1].topk(5, dim=-1)
        error = (recon - h).norm(dim=-1) / h.norm(dim=-1)
    same(got["top_values"], top.values, "top_values")
    assert torch.equal(got["top_ids"], top.indices)
    same(got["relative_error"], error, "relative_error")
    assert (got["top_values"] >= 0).all() and got["relative_error"].shape[0] == 2
