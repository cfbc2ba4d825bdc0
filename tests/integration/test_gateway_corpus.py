"""A differential corpus: programs written in many styles, run by local nnsight and through the swarm gateway.

Every answer must equal local nnsight (fp32, max abs diff ≤ 1e-5) or be a typed error naming its cause — never a
different value. The corpus is hand-written styles plus a seeded generator of small programs over the module tree
(layer lists bound outside the block, aliases, loops with ``enumerate``/``zip``/``reversed``, slices of
``layers[a:b]``, helper functions defined outside the block, computed and negative indices, ``lm.inputs``, writes
before later reads, logit lenses), so styles nobody listed are covered too.

The programs are written to a module in the run's directory (nnsight ships a block's source, so each program is a
real function in a real file); the real nnsight client runs them remotely in a subprocess (this file's
``__main__``), the test process runs them locally.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ndif_compat.local_gateway import GatewayProcess as Gateway

REPO = Path(__file__).resolve().parents[2]
N_LAYERS = 30
GENERATED = 200
SEED = 20261126
TOL = 1e-5
TYPED = re.compile(r"\b[A-Z][A-Za-z]*Error: \S")

HEADER = '''import torch

PROMPT = "The Eiffel Tower is located in the city of"


def pick(lm, k):
    """A helper defined outside the block."""
    return lm.model.layers[k]


def last(x):
    return x[:, -1, :16]


def meta(tracer):
    """What the gateway reported (the execution path); empty for a local run."""
    return dict(getattr(tracer.backend, "meta", None) or {})

'''

HANDWRITTEN = {
    "lens_enumerate_outside": '''
    layers = lm.model.layers
    with lm.trace(PROMPT, **remote) as tracer:
        inputs = lm.inputs.save()
        probs = list().save()
        for i, layer in enumerate(layers):
            probs.append(lm.lm_head(lm.model.norm(layer.output))[:, -1].softmax(-1).max(-1).values)
    return {"probs": torch.stack(probs), "ids": inputs[1]["input_ids"]}, meta(tracer)''',
    "comprehension_over_slice": '''
    with lm.trace(PROMPT, **remote) as tracer:
        outs = [layer.output[:, -1, :8] for layer in lm.model.layers[3:7]]
        stacked = torch.stack(outs).save()
    return {"stacked": stacked}, meta(tracer)''',
    "zip_reversed": '''
    layers = lm.model.layers
    with lm.trace(PROMPT, **remote) as tracer:
        got = list().save()
        for i, layer in zip(range(N), layers):
            if i in (2, 11, 23):
                got.append(layer.output[:, -1, :8])
    return {"got": torch.stack(got)}, meta(tracer)'''.replace("N", str(N_LAYERS)),
    "reversed_list": '''
    backwards = list(reversed(lm.model.layers))
    with lm.trace(PROMPT, **remote) as tracer:
        a = backwards[25].output[:, -1, :8].save()
        b = backwards[4].input[:, -1, :8].save()
    return {"a": a, "b": b}, meta(tracer)''',
    "helper_outside_with_write": '''
    with lm.trace(PROMPT, **remote) as tracer:
        layer = pick(lm, 9)
        layer.output[:, -1] = layer.output[:, -1] * 0.5
        after = last(pick(lm, 17).output).save()
    return {"after": after}, meta(tracer)''',
    "module_reuse_across_invokes": '''
    layers = lm.model.layers
    with lm.trace(**remote) as tracer:
        with tracer.invoke(PROMPT):
            a = layers[12].output[:, -1, :8].save()
        with tracer.invoke("The Louvre is in"):
            b = layers[12].output[:, -1, :8].save()
    return {"a": a, "b": b}, meta(tracer)''',
    "alias_chain": '''
    model = lm.model
    stack = model.layers
    with lm.trace(PROMPT, **remote) as tracer:
        x = stack[-3].output[:, -1, :8].save()
        y = model.norm.output[:, -1, :8].save()
    return {"x": x, "y": y}, meta(tracer)''',
    "inputs_then_layers": '''
    with lm.trace(PROMPT, **remote) as tracer:
        inputs = lm.inputs.save()
        h = lm.model.layers[4 + 3].output[:, -1, :8].save()
        logits = lm.lm_head.output[:, -1, :32].save()
    return {"h": h, "logits": logits, "ids": inputs[1]["input_ids"]}, meta(tracer)''',
}


def _reference(k: int, style: str) -> tuple[str, str]:
    """(code before the block, expression naming layer k) in ``style``."""
    if style == "direct":
        return "", f"lm.model.layers[{k}]"
    if style == "outside":
        return "    layers = lm.model.layers\n", f"layers[{k}]"
    if style == "negative":
        return "", f"lm.model.layers[{k - N_LAYERS}]"
    if style == "computed":
        a = k // 2
        return "", f"lm.model.layers[{a} + {k - a}]"
    if style == "slice":
        a = max(0, k - 3)
        return f"    part = lm.model.layers[{a}:{min(N_LAYERS, k + 4)}]\n", f"part[{k - a}]"
    if style == "helper":
        return "", f"pick(lm, {k})"
    if style == "reversed":
        return "    backwards = list(reversed(lm.model.layers))\n", f"backwards[{N_LAYERS - 1 - k}]"
    raise ValueError(style)


STYLES = ("direct", "outside", "negative", "computed", "slice", "helper", "reversed", "loop")
TRANSFORMS = ("{x}[:, -1, :16]", "{x}[:, -1].norm(dim=-1)", "{x}.mean(dim=1)[:, :16]",
              "lm.lm_head(lm.model.norm({x}))[:, -1].softmax(-1).max(-1).values")


def generate(seed: int, count: int) -> dict[str, str]:
    """``count`` small programs: 1-3 reads of distinct layers in forward order, each named in a random style,
    sometimes a write before a later read, sometimes ``lm.inputs``, sometimes the head's logits."""
    rng = random.Random(seed)
    programs = {}
    for index in range(count):
        layers = sorted(rng.sample(range(N_LAYERS), rng.randint(1, 3)))
        before, body, names = [], [], []
        if rng.random() < 0.35:
            body.append("        inputs = lm.inputs.save()")
            names.append(("ids", 'inputs[1]["input_ids"]'))
        for j, k in enumerate(layers):
            style = rng.choice(STYLES)
            kind = rng.choice(("output", "output", "input"))
            value = rng.choice(TRANSFORMS)
            write = rng.random() < 0.2 and kind == "output"
            if style == "loop":
                if "    layers = lm.model.layers\n" not in before:
                    before.append("    layers = lm.model.layers\n")
                loop = rng.choice(("enumerate(layers)", f"zip(range({N_LAYERS}), layers)"))
                body.append(f"        for i, layer in {loop}:")
                body.append(f"            if i == {k}:")
                indent, ref = "                ", "layer"
            else:
                setup, ref = _reference(k, style)
                if setup and setup not in before:
                    before.append(setup)
                indent = "        "
            body.append(f"{indent}v{j} = ({value.format(x=f'{ref}.{kind}')}).save()")
            names.append((f"v{j}", f"v{j}"))
            if write:
                body.append(f"{indent}{ref}.output[:, -1] = {ref}.output[:, -1] * 0.5")
        if rng.random() < 0.3:
            body.append("        logits = lm.lm_head.output[:, -1, :32].save()")
            names.append(("logits", "logits"))
        result = ", ".join(f'"{name}": {expr}' for name, expr in names)
        programs[f"generated_{index:03d}"] = ("".join(before) + "    with lm.trace(PROMPT, **remote) as tracer:\n" +
                                              "\n".join(body) + f"\n    return {{{result}}}, meta(tracer)")
    return programs


def write_corpus(path: Path) -> list[str]:
    corpus = {**HANDWRITTEN, **generate(SEED, GENERATED)}
    source = HEADER + "".join(f"\ndef {name}(lm, **remote):{body if body.startswith(chr(10)) else chr(10) + body}\n\n"
                              for name, body in corpus.items())
    path.write_text(source)
    return list(corpus)


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- the client process ---------------------------------------------------------------------------------------------

def _client(corpus: str, out: str) -> None:
    from nnsight import LanguageModel
    from nnsight.intervention.backends.remote import RemoteError
    from transformers import AutoTokenizer

    programs = load(Path(corpus))
    lm = LanguageModel("smollm2-135m", tokenizer=AutoTokenizer.from_pretrained("smollm2-135m"))
    got = {}
    for name in programs.NAMES:
        try:
            got[name] = ("value", *getattr(programs, name)(lm, remote=True))
        except RemoteError as e:
            got[name] = ("error", str(e), {})
    torch.save(got, out)


# ---- the test -------------------------------------------------------------------------------------------------------

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus_programs.py"
    names = write_corpus(path)
    with path.open("a") as f:
        f.write(f"\nNAMES = {names!r}\n")
    return path


def test_every_answer_equals_local_nnsight_or_is_a_typed_error(corpus, smollm2_dir, tmp_path):
    import nnsight

    from swarm.local_swarm import LocalSwarm

    from tests.integration.conftest import start_split

    programs = load(corpus)
    local = nnsight.LanguageModel(str(smollm2_dir), dispatch=True, dtype=torch.float32)
    references = {}
    for name in programs.NAMES:
        try:
            references[name] = getattr(programs, name)(local)[0]
        except Exception as e:  # noqa: BLE001 (a program local nnsight refuses must be refused remotely too)
            references[name] = e
    assert sum(not isinstance(r, Exception) for r in references.values()) >= 0.9 * len(references), \
        "the generator should write programs local nnsight runs"
    (tmp_path / "swarm").mkdir()
    with LocalSwarm(tmp_path / "swarm") as swarm:
        start_split(swarm, smollm2_dir, [(0, 15), (15, 30)])
        gateway = Gateway(tmp_path, "--initial-peers", *swarm.initial_peers, "--timeout-s", "60")
        try:
            out = tmp_path / "remote.pt"
            env = {**os.environ, "NDIF_HOST": gateway.url, "HF_ENDPOINT": gateway.url, "HF_HOME": str(tmp_path / "hf"),
                   "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "NNSIGHT_REMOTE_LOGGING": "0"}
            done = subprocess.run([sys.executable, __file__, str(corpus), str(out)], env=env, cwd=tmp_path,
                                  capture_output=True, text=True, timeout=1200)
            assert done.returncode == 0, f"client failed:\n{done.stderr[-4000:]}\n{gateway.log()[-2000:]}"
        finally:
            gateway.close()
    got = torch.load(out, weights_only=False)
    wrong, untyped, counts = [], [], {"equal": 0, "typed error": 0}
    paths, errors = {}, {}
    for name, want in references.items():
        kind, value, info = got[name]
        if kind == "error":
            counts["typed error"] += 1
            cause = TYPED.search(value)
            errors[cause.group(0)[:-3] if cause else "untyped"] = errors.get(cause.group(0)[:-3] if cause else
                                                                            "untyped", 0) + 1
            if not TYPED.search(value):
                untyped.append((name, value[:300]))
            continue
        if isinstance(want, Exception):
            wrong.append((name, f"local nnsight raised {type(want).__name__}, the gateway returned a value"))
            continue
        for key, expected in want.items():
            have = value[key]
            if not isinstance(have, torch.Tensor) or have.shape != expected.shape or \
                    (have.float() - expected.float()).abs().max().item() > TOL:
                wrong.append((name, key))
        counts["equal"] += not any(w[0] == name for w in wrong)
        paths[info.get("path")] = paths.get(info.get("path"), 0) + 1
    print(f"\ncorpus of {len(references)}: {counts}; answered by path: {paths}; errors: {errors}")
    assert not wrong, f"values that differ from local nnsight: {wrong[:10]}"
    assert not untyped, f"errors without a type and cause: {untyped[:5]}"


if __name__ == "__main__":
    _client(*sys.argv[1:3])
