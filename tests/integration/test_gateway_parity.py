"""The gateway's routing: the real nnsight 0.8 client (``remote=True``) against ``swarm-gateway --initial-peers`` sends
every request the hybrid tracer supports down the hybrid path (pushed to the nodes) — the root model's logits, skip
and early stop, ``tracer.barrier``, the deprecated ``with tracer.iter[...]:`` block, operations on an earlier trace's
value in a session, gradients, ``tracer.cache(...)``, attention weights (``self_attn.output[1]``), operations inside
a module's forward (``module.source``) — and the response metadata names the path, and for a fallback its reason. Every saved value equals the same program run by local
nnsight (fp32, one torch thread, max abs diff <= 1e-5; attention weights: nnsight with eager attention, as the nodes
run that call). What neither path can answer exactly is refused with a typed error, never an empty cache.

No gateway of its own (the test-time budget): :func:`run` is called by the client process of
``tests/integration/test_gateway.py``'s hybrid swarm-backend run, and :func:`check` by that test.
"""

from __future__ import annotations

import torch

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


def cache(lm, **remote):
    """nnsight's ``tracer.cache``: a layer and a submodule inside one, after an intervention on the layer."""
    with lm.trace(PROMPT, **remote) as tracer:
        cached = tracer.cache(modules=[lm.model.layers[3], "model.model.layers.4.mlp"])
        lm.model.layers[3].output[:, -1] = 0
    return {"keys": sorted(cached.keys()), "layer": cached["model.model.layers.3"].output,
            "mlp": cached["model.model.layers.4.mlp"].output}, _meta(tracer)


def attention(lm, **remote):
    with lm.trace(PROMPT, **remote) as tracer:
        weights = lm.model.layers[2].self_attn.output[1].save()
        late = lm.model.layers[20].self_attn.output[1][:, :, -1].save()
    return {"weights": weights, "late": late}, _meta(tracer)


def source(lm, **remote):
    """``module.source``: the attention call inside layer 4's attention read, its output projection halved."""
    with lm.trace(PROMPT, **remote) as tracer:
        attn = lm.model.layers[4].self_attn.source
        call = attn.attention_interface_1.output[0].save()
        attn.self_o_proj_0.output = attn.self_o_proj_0.output * 0.5
        h = lm.model.layers[10].output[:, -1].save()
    return {"call": call, "h": h}, _meta(tracer)


def cache_with_inputs(lm, **remote):
    """nnsight's entries hold every argument (``.inputs``); the nodes record the first only: refused, not partial."""
    with lm.trace(PROMPT, **remote) as tracer:
        cached = tracer.cache(modules=[lm.model.layers[4].mlp], include_inputs=True)
    return {"cache": cached}, _meta(tracer)


def cache_on_gateway_path(lm, **remote):
    """``lm.inputs`` keeps the request on the gateway path, where the cache would miss every module inside a layer."""
    with lm.trace(PROMPT, **remote) as tracer:
        cached = tracer.cache(modules=[lm.model.layers[4].mlp])
        inputs = lm.inputs.save()
    return {"cache": cached}, _meta(tracer)


def reads_inputs(lm, **remote):
    """``lm.inputs`` has no node to run on (the hybrid tracer refuses it): the gateway runs it and says why."""
    with lm.trace(PROMPT, **remote) as tracer:
        inputs = lm.inputs.save()
        h = lm.model.layers[5].output[:, -1].save()
    return {"h": h}, _meta(tracer)


PUSHED = {"logits": logits, "skip_and_stop": skip_and_stop, "barrier_patch": barrier_patch,
          "steps_block": steps_block, "session_ops": session_ops, "gradient": gradient, "cache": cache,
          "attention": attention, "source": source}
FALLBACK = {"reads_inputs": reads_inputs}
REFUSED = {"cache_with_inputs": cache_with_inputs, "cache_on_gateway_path": cache_on_gateway_path}
EAGER = {"attention"}
"""Compared with nnsight loaded with ``attn_implementation="eager"`` (SDPA returns no weights)."""


def run(lm) -> dict:
    """In the client process: every experiment remotely; a ``RemoteError`` is kept as its text."""
    from nnsight.intervention.backends.remote import RemoteError

    got: dict = {"meta": {}}
    for name, experiment in {**PUSHED, **FALLBACK, **REFUSED}.items():
        try:
            got[name], got["meta"][name] = experiment(lm, remote=True)
        except RemoteError as e:
            got[name] = str(e)
    return got


# ---- the check (called by tests/integration/test_gateway.py's hybrid swarm-backend test) -------------------------

def check(got: dict, ns, checkpoint) -> None:
    import nnsight

    eager = nnsight.LanguageModel(str(checkpoint), dispatch=True, dtype=torch.float32, attn_implementation="eager")
    references = {name: experiment(eager if name in EAGER else ns)[0]
                  for name, experiment in {**PUSHED, **FALLBACK}.items()}
    for name, values in references.items():
        assert isinstance(got[name], dict), f"{name}: {got[name]}"
        for key, want in values.items():
            if key == "keys":
                assert got[name][key] == want, f"{name}.{key}: {got[name][key]} vs {want}"
                continue
            have, want = got[name][key].detach(), want.detach()
            assert have.shape == want.shape, f"{name}.{key}: {tuple(have.shape)} vs {tuple(want.shape)}"
            assert (have.double() - want.double()).abs().max().item() <= TOL, f"{name}.{key}"
    assert got["cache"]["layer"][:, -1].abs().max() == 0  # recorded after the intervention, as nnsight records it
    paths = {name: (meta.get("path"), meta.get("reason")) for name, meta in got["meta"].items()}
    assert {name: path for name, (path, _) in paths.items() if name in PUSHED} == dict.fromkeys(PUSHED, "hybrid"), paths
    assert all(reason == "" for name, (_, reason) in paths.items() if name in PUSHED), paths
    path, reason = paths["reads_inputs"]
    assert path == "gateway" and "not expressible as an intervention graph" in reason and "inputs" in reason, paths
    refused = got["cache_with_inputs"]
    assert isinstance(refused, str) and "BadRequestError" in refused and "include_inputs=True" in refused, refused
    refused = got["cache_on_gateway_path"]
    assert isinstance(refused, str) and "UnreachableModuleError" in refused and "tracer.cache()" in refused \
        and "inputs" in refused, refused
