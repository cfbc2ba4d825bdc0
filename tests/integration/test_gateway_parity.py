"""The gateway's routing: the real nnsight 0.8 client (``remote=True``) against ``swarm-gateway --initial-peers`` sends
every request the hybrid tracer supports down the hybrid path (pushed to the nodes) — the root model's logits, skip
and early stop, ``tracer.barrier``, the deprecated ``with tracer.iter[...]:`` block, operations on an earlier trace's
value in a session, gradients — and the response metadata names the path, and for a fallback its reason. Every saved
value equals the same program run by local nnsight (fp32, one torch thread, max abs diff <= 1e-5).

The client runs in a subprocess (this file's ``__main__``), as in tests/integration/test_gateway.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ndif_compat.local_gateway import GatewayProcess as Gateway

REPO = Path(__file__).resolve().parents[2]
PROMPT = "The Eiffel Tower is located in the city of"
OTHER = "Big Ben is located in the city of the"
TOL = 1e-5
PARIS, LONDON = 7042, 3807


def _meta(tracer) -> dict:
    return dict(getattr(tracer.backend, "meta", None) or {})


# ---- experiments (nnsight's spelling; run remotely by the client process and locally by the test) ----------------

def logits(lm, **remote):
    with lm.trace([PROMPT, OTHER], **remote) as tracer:
        last = lm.output.logits[:, -1].save()
    return {"last": last}, _meta(tracer)


def skip_and_stop(lm, **remote):
    with lm.trace(PROMPT, **remote) as tracer:
        lm.model.layers[3].skip(lm.model.layers[3].input)
        h = lm.model.layers[10].output[:, -1].save()
        tracer.stop()
    return {"h": h}, _meta(tracer)


def barrier_patch(lm, **remote):
    with lm.trace(**remote) as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(PROMPT):
            h = lm.model.layers[8].output[:, -1]
            barrier()
        with tracer.invoke(OTHER):
            barrier()
            lm.model.layers[8].output[:, -1] = h
            probs = lm.lm_head.output[:, -1].softmax(-1).save()
    return {"probs": probs}, _meta(tracer)


def steps_block(lm, **remote):
    with lm.generate(PROMPT, max_new_tokens=3, do_sample=False, **remote) as tracer:
        steps = list().save()
        with tracer.iter[0:2]:
            lm.model.layers[5].output[:, -1] += 0.5
            steps.append(lm.lm_head.output[:, -1])
        ids = tracer.result.save()
    return {"steps": torch.stack(steps), "ids": ids}, _meta(tracer)


def session_ops(lm, **remote):
    with lm.session(**remote) as tracer:
        with lm.trace(PROMPT):
            h = lm.model.layers[6].output
        with lm.trace(OTHER):
            doubled = (h * 2)[:, -1, :8].save()
            lm.model.layers[6].output[:, -1] = h[:, -1]
            probs = lm.lm_head.output[:, -1].softmax(-1).save()
    return {"doubled": doubled, "probs": probs}, _meta(tracer)


def gradient(lm, **remote):
    with lm.trace(PROMPT, **remote) as tracer:
        h = lm.model.layers[5].output
        h.requires_grad_(True)
        out = lm.lm_head.output[:, -1]
        metric = (out[:, PARIS] - out[:, LONDON]).sum()
        with metric.backward():
            g = h.grad.save()
        value = metric.save()
    return {"g": g, "metric": value.detach()}, _meta(tracer)


def reads_inputs(lm, **remote):
    """``lm.inputs`` has no node to run on (the hybrid tracer refuses it): the gateway runs it and says why."""
    with lm.trace(PROMPT, **remote) as tracer:
        inputs = lm.inputs.save()
        h = lm.model.layers[5].output[:, -1].save()
    return {"h": h}, _meta(tracer)


PUSHED = {"logits": logits, "skip_and_stop": skip_and_stop, "barrier_patch": barrier_patch,
          "steps_block": steps_block, "session_ops": session_ops, "gradient": gradient}
FALLBACK = {"reads_inputs": reads_inputs}


def _client(url: str, out: str) -> None:
    from nnsight import LanguageModel
    from nnsight.intervention.backends.remote import RemoteError
    from transformers import AutoTokenizer

    lm = LanguageModel("smollm2-135m", tokenizer=AutoTokenizer.from_pretrained("smollm2-135m"))
    got: dict = {"meta": {}}
    for name, experiment in {**PUSHED, **FALLBACK}.items():
        try:
            got[name], got["meta"][name] = experiment(lm, remote=True)
        except RemoteError as e:
            got[name] = str(e)
    torch.save(got, out)


# ---- the test -------------------------------------------------------------------------------------------------------

pytestmark = pytest.mark.slow


def test_supported_requests_run_pushed_and_fallbacks_say_why(smollm2_swarm, ns, one_thread, tmp_path):
    references = {name: experiment(ns)[0] for name, experiment in {**PUSHED, **FALLBACK}.items()}
    out = tmp_path / "got.pt"
    with Gateway(tmp_path, "--initial-peers", *smollm2_swarm.initial_peers) as gateway:
        env = {**os.environ, "NDIF_HOST": gateway.url, "HF_ENDPOINT": gateway.url, "HF_HOME": str(tmp_path / "hf"),
               "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, __file__, gateway.url, str(out)], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, f"client failed:\n{done.stderr[-4000:]}\ngateway log:\n{gateway.log()[-3000:]}"
    got = torch.load(out, weights_only=False)
    for name, values in references.items():
        assert isinstance(got[name], dict), f"{name}: {got[name]}"
        for key, want in values.items():
            have, want = got[name][key].detach(), want.detach()
            assert have.shape == want.shape, f"{name}.{key}: {tuple(have.shape)} vs {tuple(want.shape)}"
            assert (have.double() - want.double()).abs().max().item() <= TOL, f"{name}.{key}"
    paths = {name: (meta.get("path"), meta.get("reason")) for name, meta in got["meta"].items()}
    assert {name: path for name, (path, _) in paths.items() if name in PUSHED} == dict.fromkeys(PUSHED, "hybrid"), paths
    assert all(reason == "" for name, (_, reason) in paths.items() if name in PUSHED), paths
    path, reason = paths["reads_inputs"]
    assert path == "gateway" and "not expressible as an intervention graph" in reason and "inputs" in reason, paths


if __name__ == "__main__":
    _client(*sys.argv[1:3])
