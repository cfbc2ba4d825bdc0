"""Gradients through ``swarm-gateway``: the real nnsight 0.8 client (``remote=True``) against ``--local`` and against
``--initial-peers`` (two nodes), compared with local nnsight on the same checkpoint (fp32, one thread, ≤ 1e-5).

The program is issue 12's attribution patching, scaled down: layer outputs made to require grad (both spellings),
a logit-difference metric, ``.grad`` read in reverse order inside ``with metric.backward(retain_graph=True):``, one
gradient edited in place and one replaced (which changes every earlier layer's gradient), then a second backward.
Bad input: a weight's gradient (two ways), ``.grad`` outside a backward block, a backward with no graph, a graph
that outgrows the cell's memory limit; after them
the gateway serves a plain request equal to local nnsight, and the weights it holds are byte-identical.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ndif_compat.local_gateway import GatewayProcess as Gateway

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["When Mary and John went to the store, John gave a drink to",
           "When Tom and Anna went to the park, Tom gave a ball to"]
LAYERS = (2, 9, 16, 24)           # both nodes of the two-node swarm (0:15, 15:30)
TOL = 1e-5


def _meta(tracer) -> dict:
    return dict(getattr(tracer.backend, "meta", None) or {})


def _ids(lm) -> tuple[int, int]:
    return lm.tokenizer(" Mary").input_ids[-1], lm.tokenizer(" John").input_ids[-1]


# ---- experiments (run remotely by the client process and locally by the tests) ------------------------------------

def attribution(lm, **remote):
    right, wrong = _ids(lm)
    with lm.trace(PROMPTS, **remote) as tracer:
        acts = []
        for i, layer in enumerate(LAYERS):
            h = lm.model.layers[layer].output
            if i == 0:
                h.requires_grad = True                   # a leaf (the forward above it takes no gradient)
            else:
                h.requires_grad_(True)                   # later layers' outputs already carry the graph
            acts.append(h)
        logits = lm.lm_head.output[:, -1]
        metric = (logits[:, right] - logits[:, wrong]).sum()
        with metric.backward(retain_graph=True):
            last = acts[3].grad.clone().save()
            acts[3].grad[:, -2:] = 0                     # edit in place: earlier layers see the edited gradient
            third = acts[2].grad.clone().save()
            acts[2].grad = acts[2].grad * 2              # replace it
            second = acts[1].grad.save()
            first = acts[0].grad.save()
        with metric.backward():                          # the same graph again, no edits
            again = acts[0].grad.save()
        attributions = (acts[1] * second).sum(-1).save()
        value = metric.save()
    return {"last": last, "third": third, "second": second, "first": first, "again": again,
            "attributions": attributions, "metric": value.detach()}, _meta(tracer)


def forward_only(lm, **remote):
    """The same forward and saves without gradients (the latency baseline)."""
    right, wrong = _ids(lm)
    with lm.trace(PROMPTS, **remote) as tracer:
        acts = list().save()
        for layer in LAYERS:
            acts.append(lm.model.layers[layer].output)
        logits = lm.lm_head.output[:, -1]
        value = (logits[:, right] - logits[:, wrong]).sum().save()
    return {"metric": value, "h": acts[1]}, _meta(tracer)


def fixed_layers(lm, **remote):
    """Constant layer indices: the swarm backend cuts only after layers 9 and 20, so the segment ``[10, 21)`` spans
    both nodes (its backward runs node by node); the embedding's output takes the gradient too."""
    right, wrong = _ids(lm)
    with lm.trace(PROMPTS, **remote) as tracer:
        emb = lm.model.embed_tokens.output
        emb.requires_grad_(True)
        h9 = lm.model.layers[9].output
        h20 = lm.model.layers[20].output
        logits = lm.lm_head.output[:, -1]
        metric = (logits[:, right] - logits[:, wrong]).sum()
        with metric.backward():
            g20 = h20.grad.save()
            g9 = h9.grad.save()
            g_emb = emb.grad.save()
    return {"g20": g20, "g9": g9, "g_emb": g_emb}, _meta(tracer)


def inside_layer(lm, **remote):
    """The gradient of an MLP's output: inside a decoder layer, which the swarm backend's gateway path cannot reach."""
    with lm.trace(PROMPTS, **remote) as tracer:
        m = lm.model.layers[3].mlp.output
        m.requires_grad_(True)
        loss = lm.lm_head.output[:, -1].sum()
        with loss.backward():
            g = m.grad.save()
    return {"g": g}, _meta(tracer)


EXTRA = {"fixed_layers": fixed_layers, "inside_layer": inside_layer}


def weight_requires_grad(lm):
    with lm.trace(PROMPTS, remote=True):
        w = lm.model.norm.weight
        w.requires_grad_(True)
        loss = lm.lm_head.output.sum()
        with loss.backward():
            g = w.grad.save()


def weight_grad_in_backward(lm):
    with lm.trace(PROMPTS, remote=True):
        h = lm.model.layers[LAYERS[0]].output
        h.requires_grad_(True)
        loss = lm.lm_head.output.sum()
        with loss.backward():
            g = lm.model.norm.weight.grad.save()


def grad_outside_backward(lm):
    with lm.trace(PROMPTS, remote=True):
        h = lm.model.layers[LAYERS[0]].output
        h.requires_grad_(True)
        g = h.grad.save()


def backward_without_graph(lm):
    with lm.trace(PROMPTS, remote=True):
        loss = lm.lm_head.output.sum()
        with loss.backward():
            g = lm.model.layers[LAYERS[0]].output.save()


def runaway_graph(lm):
    """An autograd graph that grows without bound (each step keeps a 2 MB tensor alive for the backward): the
    cell's memory limit (the tests' gateways run with --max-memory-gb 1.5) stops it, at most ~2.6 GB if it did not."""
    with lm.trace(PROMPTS, remote=True):
        h = lm.model.layers[LAYERS[0]].output
        h.requires_grad_(True)
        big = h.repeat(32, 1, 1)
        for _ in range(1200):
            big = big.tanh()                             # tanh keeps its output for the backward
        loss = big.sum()
        with loss.backward():
            g = h.grad.save()


def disguised_weight_grad(lm):
    """Names built from pieces slip past the gradient gate (the request runs under no_grad, unguarded): flipping a
    weight's requires_grad still fails the seal after the run, and no result comes back."""
    with lm.trace(PROMPTS, remote=True):
        import operator
        operator.methodcaller("requires" + "_gr" + "ad" + "_", True)(lm.model.norm.weight)
        h = lm.model.layers[LAYERS[0]].output.save()


BAD = {"disguised_weight_grad": disguised_weight_grad, "weight_requires_grad": weight_requires_grad,
       "weight_grad_in_backward": weight_grad_in_backward,
       "grad_outside_backward": grad_outside_backward, "backward_without_graph": backward_without_graph,
       "runaway_graph": runaway_graph}
MEMORY_LIMIT = ("--max-memory-gb", "1.5")


def weights(lm, **remote):
    """Weights the gateway itself holds (the decoder layers of the swarm backend live on the nodes)."""
    with lm.trace(PROMPTS[0], **remote):
        norm = lm.model.norm.weight.save()
    return {"norm": norm}


# ---- the client process ---------------------------------------------------------------------------------------------

def _client(out: str) -> None:
    from nnsight import LanguageModel
    from nnsight.intervention.backends.remote import RemoteError
    from transformers import AutoTokenizer

    from tests.integration import test_gateway
    lm = LanguageModel("smollm2-135m", tokenizer=AutoTokenizer.from_pretrained("smollm2-135m"))
    got: dict = {"meta": {}, "wall_s": {"attribution": [], "forward_only": []}}
    for _ in range(3):                                   # interleaved, so load drifts hit both alike
        for name, experiment in (("forward_only", forward_only), ("attribution", attribution)):
            t0 = time.perf_counter()
            got[name], got["meta"][name] = experiment(lm, remote=True)
            got["wall_s"][name].append(time.perf_counter() - t0)
    for name, experiment in EXTRA.items():
        try:
            got[name], got["meta"][name] = experiment(lm, remote=True)
        except RemoteError as e:
            got[name] = str(e)
    got.update(test_gateway.remote_errors(lm, BAD))
    got["after"], got["meta"]["after"] = forward_only(lm, remote=True)
    got["weights"] = weights(lm, remote=True)
    torch.save(got, out)


def run_client(gateway: Gateway, tmp_path: Path) -> dict:
    out = tmp_path / "gradients.pt"
    env = {**os.environ, "NDIF_HOST": gateway.url, "HF_ENDPOINT": gateway.url, "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, str(out)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=500)
    assert done.returncode == 0, f"client failed:\n{done.stderr[-4000:]}\ngateway log:\n{gateway.log()[-3000:]}"
    return torch.load(out, weights_only=False)


# ---- fixtures and checks ------------------------------------------------------------------------------------------

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ns(smollm2_dir):
    """Local nnsight, its weights frozen as the gateway's are (so ``h.requires_grad = True`` on the first layer's
    output, a leaf there, is legal here too; gradients of activations do not depend on it)."""
    import nnsight

    lm = nnsight.LanguageModel(str(smollm2_dir), dispatch=True, dtype=torch.float32)
    lm._module.requires_grad_(False)
    return lm


@pytest.fixture(scope="module")
def references(ns, one_thread):
    return {"attribution": attribution(ns)[0], "forward_only": forward_only(ns)[0], "weights": weights(ns),
            **{name: experiment(ns)[0] for name, experiment in EXTRA.items()}}


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


def check(got: dict, references: dict, names=("attribution", "forward_only", "fixed_layers", "inside_layer"),
          path: str = "gateway") -> None:
    for name in names:
        for key, want in references[name].items():
            have = got[name][key]
            assert have.shape == want.shape, f"{name}.{key}: {tuple(have.shape)} vs {tuple(want.shape)}"
            diff = (have - want).abs().max().item()
            assert diff <= TOL, f"{name}.{key} differs from local nnsight by {diff:.3g}"
    grads = got["attribution"]
    assert grads["last"].abs().max() > 0 and grads["first"].abs().max() > 0
    assert (grads["again"] - grads["first"]).abs().max() > 1e-4, "the edits changed nothing (no test of editing)"
    assert got["meta"]["attribution"]["gradients"] is True and got["meta"]["attribution"]["path"] == path
    assert got["meta"]["forward_only"]["gradients"] is False
    for name in ("weight_requires_grad", "weight_grad_in_backward"):
        assert got[name].startswith("ParameterGradientError") and "model.norm.weight" in got[name] \
            and "gradients of weights are not served" in got[name], got[name]
    assert got["disguised_weight_grad"].startswith("ParametersModifiedError") and "model.norm.weight" in \
        got["disguised_weight_grad"], got["disguised_weight_grad"]
    assert got["grad_outside_backward"].startswith("GradientUnavailableError") and "backward" in \
        got["grad_outside_backward"], got["grad_outside_backward"]
    assert "does not require grad" in got["backward_without_graph"], got["backward_without_graph"]
    assert got["runaway_graph"].startswith("ExecutionLimitError") and "memory" in got["runaway_graph"], \
        got["runaway_graph"]
    for key, want in references["forward_only"].items():          # served after all of that
        assert (got["after"][key] - want).abs().max().item() <= TOL
    assert _digest(got["weights"]["norm"]) == _digest(references["weights"]["norm"])
    walls = {k: sorted(v)[len(v) // 2] for k, v in got["wall_s"].items()}
    print(f"\nmedian wall through the gateway: forward-only {walls['forward_only']:.3f} s, "
          f"attribution (forward + 2 backwards) {walls['attribution']:.3f} s; "
          f"swarm bytes {got['meta']['attribution'].get('swarm_bytes_sent', 0)} sent / "
          f"{got['meta']['attribution'].get('swarm_bytes_received', 0)} received, "
          f"{got['meta']['attribution'].get('swarm_calls', 0)} calls "
          f"(forward-only: {got['meta']['forward_only'].get('swarm_calls', 0)} calls)")


def test_local_backend_gradients_equal_local_nnsight(references, tmp_path):
    with Gateway(tmp_path, "--local", "smollm2-135m", *MEMORY_LIMIT) as gateway:
        got = run_client(gateway, tmp_path)
    check(got, references)
    assert got["meta"]["after"]["path"] == "gateway"


def test_swarm_backend_gradients_equal_local_nnsight(smollm2_dir, references, tmp_path):
    from swarm.local_swarm import LocalSwarm

    from tests.integration.conftest import start_split

    (tmp_path / "swarm").mkdir()
    with LocalSwarm(tmp_path / "swarm") as swarm:
        start_split(swarm, smollm2_dir, [(0, 15), (15, 30)])
        with Gateway(tmp_path, *MEMORY_LIMIT, "--initial-peers", *swarm.initial_peers) as gateway:
            got = run_client(gateway, tmp_path)
    # gradients are pushed to the nodes as intervention graphs (each node runs the backward of its span, hybrid.backward),
    # a submodule inside a decoder layer included
    check(got, references, path="hybrid")
    assert {got["meta"][name]["path"] for name in ("fixed_layers", "inside_layer")} == {"hybrid"}, got["meta"]
    assert got["meta"]["after"]["path"] == "hybrid" and got["meta"]["after"]["gradients"] is False


if __name__ == "__main__":
    _client(sys.argv[1])
