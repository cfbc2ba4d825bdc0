"""The real nnsight client through ``swarm-gateway``: latency of a small remote trace vs local nnsight, and the bytes
of a patching trace, a session and a generation per execution path.

    python -m bench.gateway_latency [--repeats 10] [--out results]

Starts (and always stops) a local-backend gateway twice (each request in a fresh sandboxed cell, the default; then
``--unsafe-no-sandbox``, persistent workers behind Python-level guardrails only), a 2-node SmolLM2 swarm (0:15, 15:30) with a gateway in front of
it twice (gateway execution only, then with the hybrid path), and runs the client in a fresh process per gateway
(nnsight reads NDIF_HOST / HF_ENDPOINT at import). Measurements:

- ``trace_latency``: median wall time of ``with lm.trace(prompt, remote=True): h = lm.model.layers[5].output.save()``
  after one warm-up, next to the same trace run by local nnsight in the client process; ``sandbox_cost`` is the
  sandboxed local backend's median against the unsandboxed one's, side by side in this run.
- ``bytes`` per ``experiment``: ``patch`` (IOI-style: overwrite a row of layer 8's output, scale layer 20's output,
  save one softmax row), ``session`` (two traces: the second patches in a value the first read) and ``generation``
  (3 greedy tokens, the last position's logits saved at every step with ``tracer.all()``); client link = request
  payload + result (researcher ↔ gateway) and swarm link = gateway ↔ nodes (bytes sent + received, calls), as the
  gateway reports them in the response's ``meta``, with the execution path that ran.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "The Eiffel Tower is located in the city of"
PROMPTS = ["The Colosseum is located in the city of", "The Louvre is in"]


def small_trace(lm, **remote):
    with lm.trace(PROMPT, **remote):
        h = lm.model.layers[5].output.save()
    return h


def patch(lm, **remote):
    with lm.trace(PROMPTS, **remote) as tracer:
        h = lm.model.layers[8].output
        h[1, -1, :] = h[0, -1, :]
        lm.model.layers[20].output = lm.model.layers[20].output * 0.5
        probs = lm.lm_head.output[:, -1].softmax(-1)[1].save()
    return probs, dict(tracer.backend.meta or {})


def session(lm, **remote):
    with lm.session(**remote) as tracer:
        with lm.trace(PROMPTS[0]):
            first = lm.model.layers[6].output[:, -1, :].save()
        with lm.trace(PROMPTS[1]):
            lm.model.layers[6].output[:, -1, :] = first
            second = lm.lm_head.output[:, -1].save()
    return second, dict(tracer.backend.meta or {})


def generation(lm, **remote):
    with lm.generate(PROMPT, max_new_tokens=3, **remote) as tracer:
        steps = list().save()
        for step in tracer.all():
            steps.append(lm.lm_head.output[:, -1])
    return steps, dict(tracer.backend.meta or {})


EXPERIMENTS = {"patch": patch, "session": session, "generation": generation}


def _client(repeats: int, out: str) -> None:
    """Client process: latencies (remote and local) and each experiment's meta."""
    import nnsight
    from transformers import AutoTokenizer

    from swarm.checkpoint import resolve_checkpoint

    torch.set_num_threads(1)
    lm = nnsight.LanguageModel("smollm2-135m", tokenizer=AutoTokenizer.from_pretrained("smollm2-135m"))
    local = nnsight.LanguageModel(str(resolve_checkpoint("smollm2-135m")), dispatch=True, dtype=torch.float32)

    def timed(fn) -> list[float]:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return times

    remote_s = timed(lambda: small_trace(lm, remote=True))
    local_s = timed(lambda: small_trace(local))
    metas = {name: experiment(lm, remote=True)[1] for name, experiment in EXPERIMENTS.items()}
    Path(out).write_text(json.dumps({"remote_s": remote_s, "local_s": local_s, "metas": metas}))


def _run_client(url: str, repeats: int, workdir: Path) -> dict:
    out = workdir / "client.json"
    env = {**os.environ, "NDIF_HOST": url, "HF_ENDPOINT": url, "HF_HOME": str(workdir / "hf"), "OMP_NUM_THREADS": "1",
           "NNSIGHT_REMOTE_LOGGING": "0"}
    subprocess.run([sys.executable, "-m", "bench.gateway_latency", "--client", str(repeats), str(out)], env=env,
                   check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--local-only", action="store_true",
                        help="only the two local-backend gateways (the sandbox's cost), no swarm")
    parser.add_argument("--client", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        _client(int(args.client[0]), args.client[1])
        return

    from swarm.checkpoint import resolve_checkpoint
    from swarm.local_swarm import LocalSwarm
    from ndif_compat.local_gateway import GatewayProcess as Gateway

    from .results import ResultLog

    log = ResultLog("gateway_latency", args)
    path = resolve_checkpoint("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = {}
        for name, extra in (("local", []), ("local-unsandboxed", ["--unsafe-no-sandbox"])):
            gateway = Gateway(tmp, "--local", "smollm2-135m", *extra)
            try:
                runs[name] = _run_client(gateway.url, args.repeats, tmp)
            finally:
                gateway.close()
        with contextlib.nullcontext() if args.local_only else LocalSwarm(tmp) as swarm:
            if swarm is not None:
                swarm.start(path, "--blocks", "0:15")
                swarm.start(path, "--blocks", "15:30", initial_peers=swarm.initial_peers)
            for name, extra in () if args.local_only else (("swarm-gateway", ["--no-hybrid"]), ("swarm-hybrid", [])):
                gateway = Gateway(tmp, "--initial-peers", *swarm.initial_peers, *extra)
                try:
                    runs[name] = _run_client(gateway.url, args.repeats, tmp)
                finally:
                    gateway.close()
    for name, run in runs.items():
        log("trace_latency", backend=name, remote_median_s=statistics.median(run["remote_s"]),
            local_median_s=statistics.median(run["local_s"]), repeats=args.repeats)
    sandboxed, unsandboxed = (statistics.median(runs[n]["remote_s"]) for n in ("local", "local-unsandboxed"))
    log("sandbox_cost", sandboxed_median_s=sandboxed, unsandboxed_median_s=unsandboxed,
        added_s=sandboxed - unsandboxed, ratio=sandboxed / unsandboxed)
    for experiment in EXPERIMENTS:
        for name, run in runs.items():
            meta = run["metas"][experiment]
            log("bytes", experiment=experiment, backend=name, path=meta.get("path"),
                client_link_bytes=meta.get("request_bytes", 0) + meta.get("result_bytes", 0),
                request_bytes=meta.get("request_bytes"), result_bytes=meta.get("result_bytes"),
                swarm_link_bytes=meta.get("swarm_bytes_sent", 0) + meta.get("swarm_bytes_received", 0),
                swarm_calls=meta.get("swarm_calls"))
    log.write()  # prints "wrote <path>"


if __name__ == "__main__":
    main()
