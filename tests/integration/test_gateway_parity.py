"""The gateway's routing and parity: the real nnsight 0.8 client (``remote=True``) against ``swarm-gateway``.

Swarm backend (``--initial-peers``): every request the hybrid tracer supports goes down the hybrid path (pushed to the
nodes) — the root model's logits, skip and early stop, ``tracer.barrier``, the deprecated ``with tracer.iter[...]:``
block, operations on an earlier trace's value in a session, gradients, token-id inputs, ``tracer.cache(...)`` (a full
cache with nnsight's every key), attention weights (``self_attn.output[1]``), an ``lm.edit()``ed model, operations inside a module's forward
(``module.source``), ``lm.inputs`` (bound on the gateway, the request's own input) — and the
response metadata names the path, and for a fallback its reason. What neither path can answer exactly is refused
with a typed error, never an empty or partial cache.

Local backend (``--local``): the same experiments, and the ones the swarm backend refuses, all run by nnsight on the
gateway's model; attention weights with eager attention for the request that names the attention module.

Every saved value equals the same program run by local nnsight (fp32, one torch thread, max abs diff <= 1e-5;
attention weights: nnsight with eager attention). No gateway of its own (the test-time budget): :func:`run` is
called by the client process of ``tests/integration/test_gateway.py``'s ``--local`` run and hybrid swarm-backend
run, and :func:`check` by those tests.
"""

from __future__ import annotations

import functools

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


def token_ids(lm, **remote):
    """Inputs as token ids: nnsight's dict form and a batch of id lists of two lengths (left-padded)."""
    ids = lm.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with lm.trace({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, **remote) as tracer:
        first = lm.lm_head.output[:, -1].save()
    with lm.trace([ids[0].tolist(), ids[0, 3:].tolist()], **remote):
        rows = lm.model.layers[6].output[:, -1].save()
    return {"first": first, "rows": rows}, _meta(tracer)


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


def cache_full(lm, **remote):
    """Every module, after an intervention: nnsight's keys in its order, the root's, ``model.model``'s and
    ``rotary_emb``'s entries included (the swarm backend builds those on the gateway from the nodes' entries)."""
    with lm.trace([PROMPT, "The Louvre is in"], **remote) as tracer:  # left-padded: nnsight's positions per row
        cached = tracer.cache()
        lm.model.layers[3].output[:, -1] *= 0.5
    return {"cache": cached}, _meta(tracer)


def cache_generation(lm, **remote):
    """A full cache over a generation: nnsight's also holds ``model.generator`` and its streamer (the loop's ids),
    which no node records: the swarm backend refuses it, the local backend is nnsight."""
    with lm.generate(PROMPT, max_new_tokens=2, do_sample=False, **remote) as tracer:
        cached = tracer.cache()
    return {"cache": cached}, _meta(tracer)


def edit(lm, **remote):
    """``lm.edit()``: the edit rides with the edited model in the request; the unedited model stays clean."""
    with lm.edit() as (tracer, edited):
        edited.model.layers[2].output[:, -1] = 0
    with edited.trace(PROMPT, **remote) as tracer:
        zeroed = edited.model.layers[2].output.save()
        probs = edited.lm_head.output[:, -1].softmax(-1).save()
    with lm.trace(PROMPT, **remote):  # the unedited model: no edit heads its graph
        clean = lm.model.layers[2].output.save()
    return {"zeroed": zeroed, "probs": probs, "clean": clean}, _meta(tracer)


def scan(lm, **remote):
    """``lm.scan`` takes no ``remote``: nnsight runs it on the client's fake values, nothing reaches the gateway (a
    value read in the block is kept only when saved, as in nnsight locally)."""
    with lm.scan(PROMPT):
        shape = lm.model.layers[2].output.shape.save()
    return {"shape": tuple(shape)}, {"path": "client"}


def cache_with_inputs(lm, **remote):
    """nnsight's entries hold every argument (``.inputs``); the nodes record the first only: refused, not partial."""
    with lm.trace(PROMPT, **remote) as tracer:
        cached = tracer.cache(modules=[lm.model.layers[4].mlp], include_inputs=True)
    return {"cache": cached}, _meta(tracer)


def cache_on_gateway_path(lm, **remote):
    """``print`` of a traced value keeps the request on the gateway path, where the cache would miss every module
    inside a layer."""
    with lm.trace(PROMPT, **remote) as tracer:
        cached = tracer.cache(modules=[lm.model.layers[4].mlp])
        print(lm.model.layers[1].output)
    return {"cache": cached}, _meta(tracer)


def generator_output(lm, **remote):
    """``lm.generator.output`` (deprecated for ``tracer.result``, still nnsight 0.8.1's): the generated ids."""
    with lm.generate(PROMPT, max_new_tokens=2, do_sample=False, **remote) as tracer:
        ids = lm.generator.output.save()
    return {"ids": ids}, _meta(tracer)


class Sae(torch.nn.Module):
    """A user ``nn.Module`` in a trace: its class would have to be loaded by the gateway."""

    def __init__(self, d: int = 576) -> None:
        super().__init__()
        self.enc = torch.nn.Linear(d, 4 * d)

    def forward(self, x):
        return torch.relu(self.enc(x))


def user_module(lm, **remote):
    sae = Sae()
    with lm.trace(PROMPT, **remote) as tracer:
        codes = sae(lm.model.layers[4].output).save()
    return {"codes": codes}, _meta(tracer)


def reads_inputs(lm, **remote):
    """``lm.inputs``: the hybrid tracer binds it on the client (it is the request's own input), so the request is
    pushed to the nodes for the rest."""
    with lm.trace(PROMPT, **remote) as tracer:
        inputs = lm.inputs.save()
        h = lm.model.layers[5].output[:, -1].save()
    return {"h": h}, _meta(tracer)


PUSHED = {"logits": logits, "skip_and_stop": skip_and_stop, "barrier_patch": barrier_patch,
          "steps_block": steps_block, "session_ops": session_ops, "gradient": gradient, "token_ids": token_ids,
          "cache": cache, "attention": attention, "cache_full": cache_full, "edit": edit, "source": source,
          "reads_inputs": reads_inputs, "generator_output": generator_output}
FALLBACK: dict = {}
"""Run on the gateway path by the swarm backend, with a reason: none of these experiments since lm.inputs and
lm.generator.output are pushed too (the gateway tests keep the path itself covered)."""
CLIENT = {"scan": scan}
REFUSED = {"cache_with_inputs": cache_with_inputs, "cache_on_gateway_path": cache_on_gateway_path,
           "cache_generation": cache_generation}
"""Refused by the swarm backend (neither path answers them exactly); the local backend runs them with nnsight."""
REFUSED_EVERYWHERE = {"user_module": user_module}
"""A user ``nn.Module`` class is refused by the gateway's loader (it loads no classes from the request)."""
EAGER = {"attention"}

ROWS = {"submodule": "cache", "root_output": "logits", "root_inputs": "reads_inputs", "source": "source",
        "generator_output": "generator_output", "block_forms": "steps_block", "session_values": "session_ops",
        "barrier": "barrier_patch", "early_stop": "skip_and_stop", "skip": "skip_and_stop",
        "user_module": "user_module", "attention_weights": "attention", "cache": "cache_full", "scan": "scan",
        "edit": "edit"}
"""The experiment here that backs each ``[p]`` cell of docs/nnsight_features.md (by the row's example name); checked
against the cells by tests/integration/test_nnsight_features.py."""


def expected_cell(experiment: str, backend: str) -> tuple[str, ...]:
    """How a ``[p]`` cell of ``backend``'s column may read, given where :func:`check` requires the experiment to run."""
    if experiment in REFUSED_EVERYWHERE:
        return ("✗ UnsafeRequestError",)
    if experiment in CLIENT:
        return ("✓ client",)
    if backend == "local":
        return ("✓",)
    return {**dict.fromkeys(PUSHED, ("✓ hybrid",)), **dict.fromkeys(FALLBACK, ("✓ gateway",))}[experiment]
"""Compared with nnsight loaded with ``attn_implementation="eager"`` (SDPA returns no weights)."""


def run(lm) -> dict:
    """In the client process: every experiment remotely; a ``RemoteError`` is kept as its text."""
    from nnsight.intervention.backends.remote import RemoteError

    got: dict = {"meta": {}}
    for name, experiment in {**PUSHED, **FALLBACK, **CLIENT, **REFUSED, **REFUSED_EVERYWHERE}.items():
        try:
            got[name], got["meta"][name] = experiment(lm, remote=True)
        except RemoteError as e:
            got[name] = str(e)
    return got


# ---- the check (called by tests/integration/test_gateway.py's hybrid swarm-backend test) -------------------------

def _flat(value, where: str) -> list[tuple[str, object]]:
    """``(where, tensor or None or plain value)`` leaves of a saved value: cache entries, transformers' output objects
    and KV caches included, so two of them compare leaf by leaf."""
    from transformers.cache_utils import DynamicCache
    from transformers.utils import ModelOutput

    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (int, float, str)):
        return [(where, value)]
    if type(value).__name__ == "CacheView":
        entries = value._cache.entries
        leaves = [(f"{where}.keys", tuple(entries))]
        for key, calls in entries.items():
            for i, entry in enumerate(calls):
                leaves += _flat(entry.output, f"{where}[{key}][{i}].output")
                if entry.inputs is not None:
                    leaves += _flat(entry.inputs, f"{where}[{key}][{i}].inputs")
        return leaves
    if isinstance(value, ModelOutput):
        return [leaf for k, v in value.items() for leaf in _flat(v, f"{where}.{k}")]
    if isinstance(value, DynamicCache):
        return [leaf for i, layer in enumerate(value.layers)
                for leaf in _flat(layer.keys, f"{where}.layers[{i}].keys") + _flat(layer.values, f"{where}[{i}].values")]
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _flat(v, f"{where}[{k!r}]")]
    if isinstance(value, (tuple, list)):
        return [(f"{where}.len", len(value))] + [leaf for i, v in enumerate(value) for leaf in _flat(v, f"{where}[{i}]")]
    raise AssertionError(f"{where}: cannot compare a {type(value).__name__}")


def assert_same(have, want, where: str) -> None:
    """Leaf by leaf: the same structure, keys and plain values; tensors of one shape within :data:`TOL`."""
    have, want = _flat(have, where), _flat(want, where)
    assert [w for w, _ in have] == [w for w, _ in want], f"{where}: {[w for w, _ in have][:8]} vs {[w for w, _ in want][:8]}"
    for (at, a), (_, b) in zip(have, want):
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and a.shape == b.shape, f"{at}: {a!r:.80} vs shape {tuple(b.shape)}"
            assert (a.detach().double() - b.detach().double()).abs().max().item() <= TOL, at
        else:
            assert a == b, f"{at}: {a!r:.200} vs {b!r:.200}"


_REFERENCES: dict[str, dict] = {}
"""Local nnsight's values per experiment, computed once for both backends' checks (the test-time budget)."""


def _reference(name: str, experiment, ns, checkpoint) -> dict:
    if name not in _REFERENCES:
        _REFERENCES[name] = experiment(_eager(str(checkpoint)) if name in EAGER else ns)[0]
    return _REFERENCES[name]


@functools.cache
def _eager(checkpoint: str):
    import nnsight

    return nnsight.LanguageModel(checkpoint, dispatch=True, dtype=torch.float32, attn_implementation="eager")


def check(got: dict, ns, checkpoint, backend: str = "swarm") -> None:
    """``backend``: ``"swarm"`` (the hybrid swarm gateway: PUSHED pushed to the nodes, FALLBACK on the gateway with
    its reason, REFUSED refused) or ``"local"`` (``--local``: everything runs with nnsight on the gateway's model, and
    equals local nnsight, REFUSED included)."""
    compared = {**PUSHED, **FALLBACK, **CLIENT,
                **(REFUSED if backend == "local" else {})}
    references = {name: _reference(name, experiment, ns, checkpoint) for name, experiment in compared.items()}
    for name, values in references.items():
        assert isinstance(got[name], dict), f"{name}: {got[name]}"
        for key, want in values.items():
            assert_same(got[name][key], want, f"{name}.{key}")
    assert got["cache"]["layer"][:, -1].abs().max() == 0  # recorded after the intervention, as nnsight records it
    assert got["edit"]["zeroed"][:, -1].abs().max() == 0 and got["edit"]["clean"][:, -1].abs().max() > 0
    paths = {name: (meta.get("path"), meta.get("reason")) for name, meta in got["meta"].items()}
    assert paths["scan"] == ("client", None)
    refused = got["user_module"]
    assert isinstance(refused, str) and "UnsafeRequestError" in refused, refused
    if backend == "local":
        assert all(path == "gateway" and "--local" in reason for name, (path, reason) in paths.items()
                   if name != "scan"), paths
        return
    assert {name: path for name, (path, _) in paths.items() if name in PUSHED} == dict.fromkeys(PUSHED, "hybrid"), \
        {name: reason for name, (_, reason) in paths.items() if name in PUSHED and reason}
    assert all(reason == "" for name, (_, reason) in paths.items() if name in PUSHED), paths
    refused = got["cache_with_inputs"]
    assert isinstance(refused, str) and "BadRequestError" in refused and "include_inputs=True" in refused, refused
    refused = got["cache_generation"]
    assert isinstance(refused, str) and "BadRequestError" in refused and "model.generator" in refused, refused
    refused = got["cache_on_gateway_path"]
    assert isinstance(refused, str) and "UnreachableModuleError" in refused and "tracer.cache()" in refused \
        and "print" in refused, refused
