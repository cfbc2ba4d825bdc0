"""The notebook-style scripts of docs/examples/ run on the swarm (``hybrid``) and give what the same script gives with
the model loaded here (``local``; fp32, max abs diff <= 1e-5), and each shows what its technique is for: patching
every position of layer 0 recovers the whole clean logit difference; the last layer's logit lens is the model's own
output; steering and a function vector change the output; the SAE's features are non-negative."""

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


def both(name, remote_lm, local_lm, **kwargs):
    module = script(name)
    got = module.run(remote_lm, "hybrid", **kwargs)
    want = module.run(local_lm, "local", **kwargs)
    for key, value in want.items():
        if key != "client_bytes_sent":
            same(got[key], value, f"{name}.{key}")
    return got


def test_activation_patching(remote_lm, local_lm):
    got = both("activation_patching", remote_lm, local_lm, layers=(0, 16))
    assert got["clean"].item() > 0 > got["corrupt"].item()
    assert abs(got["recovered"][0] - 1.0) < 1e-4   # layer 0 at every position: the rest of the run is the clean one


def test_attribution_patching(remote_lm, local_lm):
    got = both("attribution_patching", remote_lm, local_lm)
    assert all(a.shape == got["attributions"][0].shape and a.abs().max() > 0 for a in got["attributions"])


def test_logit_lens(remote_lm, local_lm):
    got = both("logit_lens", remote_lm, local_lm, layers=(0, 15, 29))
    same(got["probs"][-1], got["final"], "the last layer's lens is the model's output")


def test_steering(remote_lm, local_lm):
    got = both("steering", remote_lm, local_lm, max_new_tokens=2)
    assert (got["steered"] != got["plain"]).any()


def test_function_vectors(remote_lm, local_lm):
    got = both("function_vectors", remote_lm, local_lm)
    assert got["vector_norm"].item() > 0 and got["patched"].item() > 2 * got["plain"].item()   # 0.002 -> 0.014


def test_sae_features(remote_lm, local_lm):
    got = both("sae_features", remote_lm, local_lm)
    assert (got["top_values"] >= 0).all() and got["relative_error"].shape[0] == 2
