"""The real nnsight 0.8 client, unchanged, against ``swarm-gateway`` on 127.0.0.1, with each backend.

The client runs in a subprocess (this file's ``__main__``: nnsight reads ``NDIF_HOST`` and the Hub endpoint when it
is imported, and compiles each ``with`` block from this file). Every saved value is compared with the same
experiment run here by local nnsight on the same checkpoint (fp32, one torch thread, max abs diff ≤ 1e-5).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PROMPT = "The Eiffel Tower is located in the city of"
PROMPTS = ["The Colosseum is located in the city of", "The Louvre is in"]
TOL = 1e-5


# ---- experiments (run remotely by the client process and locally by the tests) ------------------------------------

def read(lm, **remote):
    with lm.trace(PROMPT, **remote):
        h5 = lm.model.layers[5].output.save()
        h20_in = lm.model.layers[20].input.save()
        logits = lm.lm_head.output[:, -1].save()
    return {"h5": h5, "h20_in": h20_in, "logits": logits}


def patch(lm, **remote):
    with lm.trace(PROMPTS, **remote):
        h = lm.model.layers[8].output
        h[1, -1, :] = h[0, -1, :]
        lm.model.layers[20].output = lm.model.layers[20].output * 0.5
        probs = lm.lm_head.output[:, -1].softmax(-1)[1].save()
    return {"probs": probs}


def session(lm, **remote):
    with lm.session(**remote):
        with lm.trace(PROMPTS[0]):
            first = lm.model.layers[6].output[:, -1, :].save()
        with lm.trace(PROMPTS[1]):
            lm.model.layers[6].output[:, -1, :] = first
            second = lm.lm_head.output[:, -1].save()
    return {"first": first, "second": second}


def generation(lm, **remote):
    with lm.generate(PROMPT, max_new_tokens=3, **remote) as tracer:
        steps = list().save()
        with tracer.all():
            steps.append(lm.lm_head.output[:, -1])
    return {"steps": torch.stack(steps)}


EXPERIMENTS = {"read": read, "patch": patch, "session": session, "generation": generation}


# ---- the client process ---------------------------------------------------------------------------------------------

def _client(url: str, scenario: str, out: str) -> None:
    """Run ``scenario`` with the real nnsight client against ``url``; torch.save what came back to ``out``."""
    from concurrent.futures import ThreadPoolExecutor

    from nnsight import LanguageModel
    from nnsight.intervention.backends.remote import AsyncRemoteBackend, RemoteBackend, RemoteError
    from transformers import AutoTokenizer

    lm = LanguageModel("smollm2-135m", tokenizer=AutoTokenizer.from_pretrained("smollm2-135m"))
    got: dict = {}
    if scenario == "correctness":
        for name, experiment in EXPERIMENTS.items():
            with _timer(got, name):
                got[name] = experiment(lm, remote=True)
        with lm.trace(PROMPT, remote=True, blocking=False) as tracer:  # submit, then poll
            h = lm.model.layers[5].output.save()
        backend = tracer.backend
        for _ in range(600):
            result = backend()
            if result is not None:
                break
            time.sleep(0.1)
        got["nonblocking"] = {"h5": result["h"]}
        import asyncio

        async def run_async():
            backend = AsyncRemoteBackend(lm.to_model_key())
            with lm.trace(PROMPT, backend=backend):
                h = lm.model.layers[5].output.save()
            return await backend
        got["async"] = {"h5": asyncio.run(run_async())["h"]}
        got["patch_meta"] = _meta_of(lm)
    elif scenario == "unsafe":
        for name, experiment in UNSAFE.items():
            try:
                experiment(lm)
                got[name] = "no error"
            except RemoteError as e:
                got[name] = str(e)
        got["after"] = read(lm, remote=True)
    elif scenario == "concurrent":
        def one(i: int):
            with lm.trace(PROMPTS[i % 2], remote=True):
                out = lm.model.layers[3 + i % 5].output[:, -1, :].save()
            return out
        with ThreadPoolExecutor(20) as pool:
            got["rows"] = list(pool.map(one, range(20)))
    torch.save(got, out)


def _meta_of(lm) -> dict:
    """Client-link bytes of the patching example: what the client posted and what came back (server's count)."""
    with lm.trace(PROMPTS, remote=True) as tracer:
        h = lm.model.layers[8].output
        h[1, -1, :] = h[0, -1, :]
        lm.model.layers[20].output = lm.model.layers[20].output * 0.5
        probs = lm.lm_head.output[:, -1].softmax(-1)[1].save()
    return dict(tracer.backend.meta or {})


class _timer:
    def __init__(self, got, name):
        self.got, self.name = got, name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.got.setdefault("wall_s", {})[self.name] = time.perf_counter() - self.t0


def open_file(lm):
    with lm.trace(PROMPT, remote=True):
        secret = open("/etc/passwd").read()
        lm.model.layers[0].output.save()


def import_os(lm):
    with lm.trace(PROMPT, remote=True):
        import os
        h = lm.model.layers[0].output.save()


def import_subprocess(lm):
    with lm.trace(PROMPT, remote=True):
        import subprocess
        h = lm.model.layers[0].output.save()


def import_socket(lm):
    with lm.trace(PROMPT, remote=True):
        import socket
        h = lm.model.layers[0].output.save()


def loop_forever(lm):
    with lm.trace(PROMPT, remote=True):
        n = 0
        while n >= 0:
            n += 1
        h = lm.model.layers[0].output.save()


def save_to_file(lm):
    with lm.trace(PROMPT, remote=True):
        h = lm.model.layers[0].output.save()
        torch.save(h, "/tmp/gateway-pwned.pt")


def write_weights(lm):
    with lm.trace(PROMPT, remote=True):
        lm.model.layers[0].mlp.down_proj.weight.mul_(0)
        h = lm.model.layers[0].output.save()


UNSAFE = {"open_file": open_file, "import_os": import_os, "import_subprocess": import_subprocess,
          "import_socket": import_socket, "loop_forever": loop_forever, "save_to_file": save_to_file,
          "write_weights": write_weights}


if __name__ == "__main__":
    _client(*sys.argv[1:4])
