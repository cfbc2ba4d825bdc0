"""The real nnsight 0.8 client, unchanged, against ``swarm-gateway`` on 127.0.0.1, with each backend.

The client runs in a subprocess (this file's ``__main__``: nnsight reads ``NDIF_HOST`` and the Hub endpoint when it
is imported, and compiles each ``with`` block from this file). Every saved value is compared with the same
experiment run here by local nnsight on the same checkpoint (fp32, one torch thread, max abs diff ≤ 1e-5).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ndif_compat.local_gateway import GatewayProcess as Gateway

REPO = Path(__file__).resolve().parents[2]
PROMPT = "The Eiffel Tower is located in the city of"
PROMPTS = ["The Colosseum is located in the city of", "The Louvre is in"]
TOL = 1e-5


# ---- experiments (run remotely by the client process and locally by the tests) ------------------------------------

def _meta(tracer) -> dict:
    """What the gateway reported about the run (execution path, bytes); empty for a local run."""
    return dict(getattr(tracer.backend, "meta", None) or {})


def read(lm, **remote):
    with lm.trace(PROMPT, **remote) as tracer:
        h5 = lm.model.layers[5].output.save()
        h20_in = lm.model.layers[20].input.save()
        logits = lm.lm_head.output[:, -1].save()
    return {"h5": h5, "h20_in": h20_in, "logits": logits}, _meta(tracer)


def patch(lm, **remote):
    with lm.trace(PROMPTS, **remote) as tracer:
        h = lm.model.layers[8].output
        h[1, -1, :] = h[0, -1, :]
        lm.model.layers[20].output = lm.model.layers[20].output * 0.5
        probs = lm.lm_head.output[:, -1].softmax(-1)[1].save()
    return {"probs": probs}, _meta(tracer)


def session(lm, **remote):
    with lm.session(**remote) as tracer:
        with lm.trace(PROMPTS[0]):
            first = lm.model.layers[6].output[:, -1, :].save()
        with lm.trace(PROMPTS[1]):
            lm.model.layers[6].output[:, -1, :] = first
            second = lm.lm_head.output[:, -1].save()
    return {"first": first, "second": second}, _meta(tracer)


def generation(lm, **remote):
    with lm.generate(PROMPT, max_new_tokens=3, **remote) as tracer:
        steps = list().save()
        with tracer.all():
            steps.append(lm.lm_head.output[:, -1])
    return {"steps": torch.stack(steps)}, _meta(tracer)


EXPERIMENTS = {"read": read, "patch": patch, "session": session, "generation": generation}


def lens_bound_outside(lm, **remote):
    """A tutorial-style logit lens: the layer list bound before the block and looped with ``enumerate``, ``lm.inputs``
    read, and a traced value printed (so the swarm backend runs it on the gateway path). The source analysis cannot
    see which layers it reads; the answer must still be every layer's own lens."""
    layers = lm.model.layers
    with lm.trace(PROMPT, **remote) as tracer:
        inputs = lm.inputs.save()
        print(lm.model.embed_tokens.output)
        probs = list().save()
        for i, layer in enumerate(layers):
            logits = lm.lm_head(lm.model.norm(layer.output))[:, -1]
            probs.append(logits.softmax(-1).max(-1).values)
    return {"probs": torch.stack(probs), "ids": inputs[1]["input_ids"]}, _meta(tracer)


def large_matrix(lm, **remote):
    """A 20 MB dictionary matrix shipped with the trace (uploads over 1 MiB are spooled by the server)."""
    dictionary = torch.randn(576, 8704, generator=torch.Generator().manual_seed(0))
    with lm.trace(PROMPT, **remote) as tracer:
        codes = (lm.model.layers[5].output[:, -1] @ dictionary).save()
    return {"codes": codes}, _meta(tracer)


def submodule_with_inputs(lm, **remote):
    """A submodule inside a decoder layer, in a request that also prints a traced value (not translated, so the swarm
    backend runs it on the gateway path, where submodules inside layers are out of reach)."""
    with lm.trace(PROMPT, **remote) as tracer:
        print(lm.model.embed_tokens.output)
        mlp = lm.model.layers[3].mlp.output[:, -1].save()
    return {"mlp": mlp}, _meta(tracer)


STYLES = {"lens_bound_outside": lens_bound_outside, "large_matrix": large_matrix,
          "submodule_with_inputs": submodule_with_inputs}
"""Programs in styles the source analysis of the swarm backend's gateway path cannot follow, and a large upload."""


def typo_index(lm):
    with lm.trace(PROMPT, remote=True):
        h = lm.model.layers[50].output.save()


def typo_name(lm):
    with lm.trace(PROMPT, remote=True):
        h = lm.model.layers[3].mlpp.output.save()


TYPOS = {"typo_index": typo_index, "typo_name": typo_name}


def assert_typos_are_clear(got: dict) -> None:
    """nnsight alone says ``'Envoy' object has no attribute '50'``; the gateway names the path, line and valid range."""
    index, name = got.pop("typo_index"), got.pop("typo_name")
    assert index.startswith("UnknownModuleError") and "lm.model.layers[50] does not exist" in index \
        and "indices 0 to 29" in index and "Envoy" not in index, index
    assert name.startswith("UnknownModuleError") and "lm.model.layers[3].mlpp does not exist" in name \
        and "self_attn, mlp" in name, name


# ---- the client process ---------------------------------------------------------------------------------------------

def remote_errors(lm, experiments: dict) -> dict[str, str]:
    """Each experiment's remote error text (``"no error"`` when it ran): what the client was told."""
    from nnsight.intervention.backends.remote import RemoteError
    told = {}
    for name, experiment in experiments.items():
        try:
            experiment(lm)
            told[name] = "no error"
        except RemoteError as e:
            told[name] = str(e)
    return told


def _client(url: str, scenario: str, out: str) -> None:
    """Run ``scenario`` with the real nnsight client against ``url``; torch.save what came back to ``out``."""
    global PWNED
    PWNED = str(Path(out).with_name("gateway-pwned.pt"))  # per run: what save_to_file tries to write
    from concurrent.futures import ThreadPoolExecutor

    from nnsight import LanguageModel
    from nnsight.intervention.backends.remote import AsyncRemoteBackend, RemoteError
    from transformers import AutoTokenizer

    lm = LanguageModel("smollm2-135m", tokenizer=AutoTokenizer.from_pretrained("smollm2-135m"))
    got: dict = {}
    if "correctness" in scenario:
        for name, experiment in {**EXPERIMENTS, **STYLES}.items():
            try:
                got[name], got.setdefault("meta", {})[name] = experiment(lm, remote=True)
            except RemoteError as e:  # an error instead of a value: the tests say where that is the answer
                got[name] = str(e)
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
    if "correctness" in scenario:  # typos in a module path: our typed error, before anything runs
        got.update(remote_errors(lm, TYPOS))
    if "parity" in scenario:  # issue 14's features, checked by tests/integration/test_gateway_parity.py
        from tests.integration import test_gateway_parity
        got["parity"] = test_gateway_parity.run(lm)
    if "unsafe" in scenario:
        got.update(remote_errors(lm, UNSAFE))
        got["after"] = read(lm, remote=True)[0]
    if "concurrent" in scenario:
        def one(i: int):
            with lm.trace(PROMPTS[i % 2], remote=True):
                out = lm.model.layers[3 + i % 5].output[:, -1, :].save()
            return out
        with ThreadPoolExecutor(20) as pool:
            got["rows"] = list(pool.map(one, range(20)))
    if "keys" in scenario:  # the gateway accepts key "k1" at one request per minute, burst 1
        from nnsight import CONFIG

        def attempt() -> str:
            try:
                read(lm, remote=True)
                return "ok"
            except Exception as e:  # the client's error text is what a researcher sees
                return f"{type(e).__name__}: {e}"
        got["no_key"] = attempt()
        CONFIG.API.APIKEY = "k1"
        got["with_key"] = attempt()
        got["over_rate"] = attempt()
    torch.save(got, out)


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


PWNED = ""
"""Where ``save_to_file`` tries to write (set per run by :func:`_client`, next to its output file)."""


def save_to_file(lm):
    with lm.trace(PROMPT, remote=True):
        h = lm.model.layers[0].output.save()
        torch.save(h, PWNED)


def write_weights(lm):
    with lm.trace(PROMPT, remote=True):
        lm.model.layers[0].mlp.down_proj.weight.mul_(0)
        h = lm.model.layers[0].output.save()


def too_large(lm):
    """A 72 MB upload: over the gateway's default 64 MiB limit."""
    noise = torch.randn(18 * 2**20, generator=torch.Generator().manual_seed(1))
    with lm.trace(PROMPT, remote=True):
        h = (lm.model.layers[0].output[:, -1, :1] * noise[:1]).save()


UNSAFE = {"too_large": too_large, "open_file": open_file, "import_os": import_os, "import_subprocess": import_subprocess,
          "import_socket": import_socket, "loop_forever": loop_forever, "save_to_file": save_to_file,
          "write_weights": write_weights}


# ---- fixtures: a gateway process, the client process, local references ---------------------------------------------

def run_client(gateway: Gateway, scenario: str, tmp_path: Path) -> dict:
    """Run a client scenario in a fresh process (the real nnsight client, configured by environment only)."""
    out = tmp_path / f"{scenario}.pt"
    env = {**os.environ, "NDIF_HOST": gateway.url, "HF_ENDPOINT": gateway.url, "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, gateway.url, scenario, str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, f"client failed:\n{done.stderr[-4000:]}\ngateway log:\n" \
                                 f"{gateway.log()[-3000:]}"
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def ns(smollm2_dir):
    """Local nnsight on the same checkpoint: the reference."""
    import nnsight

    return nnsight.LanguageModel(str(smollm2_dir), dispatch=True, dtype=torch.float32)


@pytest.fixture(scope="module")
def references(ns, one_thread):
    """Every experiment run by local nnsight (one torch thread, as the gateway's workers and nodes)."""
    return {name: experiment(ns)[0] for name, experiment in {**EXPERIMENTS, **STYLES}.items()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("gateway")


@pytest.fixture(scope="module")
def local_gateway(workdir):
    gateway = Gateway(workdir, "--local", "smollm2-135m", "--timeout-s", "8")
    try:
        yield gateway
    finally:
        gateway.close()


@pytest.fixture(scope="module")
def two_node_swarm(smollm2_dir, tmp_path_factory):
    from swarm.local_swarm import LocalSwarm

    from tests.integration.conftest import start_split

    swarm = LocalSwarm(tmp_path_factory.mktemp("gateway-swarm"))
    try:
        yield start_split(swarm, smollm2_dir, [(0, 15), (15, 30)])
    finally:
        swarm.close()


def assert_equal_to_local(got: dict, references: dict) -> None:
    for name, values in references.items():
        for key, want in values.items():
            have = got[name][key]
            assert have.shape == want.shape, f"{name}.{key}: {tuple(have.shape)} vs {tuple(want.shape)}"
            diff = (have - want).abs().max().item()
            assert diff <= TOL, f"{name}.{key} differs from local nnsight by {diff:.3g}"
    for mode in ("nonblocking", "async"):
        diff = (got[mode]["h5"] - references["read"]["h5"]).abs().max().item()
        assert diff <= TOL, f"{mode} read differs from local nnsight by {diff:.3g}"


# ---- tests --------------------------------------------------------------------------------------------------------

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_run(local_gateway, workdir):
    """One client process: the correctness experiments, issue 14's features, then 20 concurrent clients."""
    return run_client(local_gateway, "correctness+parity+concurrent", workdir)


def test_local_backend_equals_local_nnsight(local_run, references):
    got = dict(local_run)
    assert_typos_are_clear(got)
    assert_equal_to_local(got, references)
    assert {m["path"] for m in got["meta"].values()} == {"gateway"}
    assert got["meta"]["patch"]["swarm_bytes_sent"] == 0


def test_local_backend_serves_nnsight_features_as_local_nnsight(local_run, ns, smollm2_dir):
    """Issue 14's features through ``--local``: attention weights (eager for the request that names the attention
    module), a full cache with every key, ``lm.edit()``, the cache forms the swarm backend refuses; equal to local
    nnsight."""
    from tests.integration import test_gateway_parity
    test_gateway_parity.check(dict(local_run["parity"]), ns, smollm2_dir, backend="local")


def test_operators_get_one_log_line_per_request(local_run, local_gateway):
    """Who, what, where it ran, bytes in and out, time and outcome; one line per request, the key never logged."""
    lines = [line for line in local_gateway.log().splitlines() if "ndif_compat.requests: request " in line]
    ok = [line for line in lines if "outcome=ok" in line]
    assert len(ok) >= 20 + len(EXPERIMENTS)  # the concurrent clients and the experiments, at least
    assert all(re.search(r"client=addr:127\.0\.0\.1 what=(trace|generate|session) path=gateway/local "
                         r"in=[1-9]\d*B out=[1-9]\d*B swarm=0/0B time=\d+\.\d{3}s outcome=ok$", line) for line in ok), ok
    assert sum("what=session" in line for line in ok) >= 1 and sum("what=generate" in line for line in ok) >= 1
    assert sum("outcome=UnknownModuleError" in line for line in lines) == len(TYPOS)
    assert "is deprecated" not in local_gateway.log()  # nnsight's LanguageModel warning: the gateway uses its new name


def test_a_busy_port_is_refused_before_the_model_loads(local_gateway):
    port = local_gateway.url.rsplit(":", 1)[1]
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "ndif_compat.cli", "serve", "--local", "smollm2-135m", "--host",
                           "127.0.0.1", "--port", port], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.count("\n") == 1 and f"127.0.0.1:{port}" in done.stderr and "--port" in done.stderr, done.stderr
    assert time.monotonic() - t0 < 10  # no model load (that takes longer); the check comes first


def test_unsafe_requests_fail_with_clear_errors_and_the_gateway_keeps_serving(local_gateway, references, tmp_path):
    got = run_client(local_gateway, "unsafe", tmp_path)
    assert "BadRequestError" in got["too_large"] and "--max-request-mb" in got["too_large"], got["too_large"]
    assert "UnsafeRequestError" in got["open_file"] and "'open' is not allowed" in got["open_file"]
    for module in ("os", "subprocess", "socket"):
        assert f"import of '{module}' is not allowed" in got[f"import_{module}"], got[f"import_{module}"]
    assert "ExecutionLimitError" in got["loop_forever"] and "time limit" in got["loop_forever"]
    # the request's torch has no save (nnsight's mounted .save answers instead); nothing reaches the disk
    assert "Error" in got["save_to_file"] and not (tmp_path / "gateway-pwned.pt").exists(), got["save_to_file"]
    # the weights are mapped read-only: the write faults, and the process that made it is gone
    assert "SandboxViolationError" in got["write_weights"] and "read-only" in got["write_weights"], got["write_weights"]
    for key, want in references["read"].items():  # served after all of that, with the weights intact
        assert (got["after"][key] - want).abs().max().item() <= TOL


def test_malformed_uploads_get_typed_errors_never_a_bare_500(local_gateway):
    import httpx

    url = f"{local_gateway.url}/request"
    answers = [
        httpx.post(url, content=b"{}", headers={"content-type": "application/json"}),
        httpx.post(url, content=b"--x\r\nnot a part", headers={"content-type": "multipart/form-data; boundary=x"}),
        httpx.post(url, files={"data": (None, "{}")}),
        httpx.post(url, files={"data": (None, "not json"), "blob": ("blob", b"x")}),
        httpx.post(url, files={"data": (None, '{"model_key": "x"}'), "blob": (None, "a plain field")}),
    ]
    for answer in answers:
        assert answer.status_code == 400 and answer.json()["detail"].startswith("BadRequestError"), answer.text
    assert httpx.get(f"{local_gateway.url}/ping").json() == {"status": "ok"}


def test_twenty_concurrent_clients(local_run, ns, one_thread):
    rows = local_run["rows"]
    assert len(rows) == 20
    for i, row in enumerate(rows):
        with ns.trace(PROMPTS[i % 2]):
            want = ns.model.layers[3 + i % 5].output[:, -1, :].save()
        assert (row - want).abs().max().item() <= TOL, f"client {i}"


@pytest.mark.parametrize("hybrid", [False, True], ids=["gateway-execution", "hybrid"])
def test_swarm_backend_equals_local_nnsight(hybrid, two_node_swarm, references, workdir, tmp_path, ns, smollm2_dir):
    gateway = Gateway(tmp_path, "--initial-peers", *two_node_swarm.initial_peers,
                      *([] if hybrid else ["--no-hybrid"]))
    try:
        got = run_client(gateway, "correctness+parity" if hybrid else "correctness", tmp_path)
    finally:
        gateway.close()
    if hybrid:  # the same gateway serves issue 14's features (no gateway of their own: the test-time budget)
        from tests.integration import test_gateway_parity
        test_gateway_parity.check(got.pop("parity"), ns, smollm2_dir)
    # gateway path: a submodule inside a layer is out of reach; the error says what, why, and what would help
    assert_typos_are_clear(got)
    error = got.pop("submodule_with_inputs")
    assert isinstance(error, str) and "UnreachableModuleError" in error and "layers.3.mlp.output" in error \
        and ("--no-hybrid" in error if not hybrid else "not expressible" in error), error
    assert_equal_to_local(got, {k: v for k, v in references.items() if k != "submodule_with_inputs"})
    paths = {name: meta["path"] for name, meta in got["meta"].items() if name in EXPERIMENTS}
    # every experiment translates into hybrid graphs: sessions and .all() generation too
    assert paths == dict.fromkeys(EXPERIMENTS, "hybrid" if hybrid else "gateway")
    patch_meta = got["meta"]["patch"]
    if hybrid:  # inputs + graph out, only the saved row back; one chained call per trace / per generated token
        assert patch_meta["swarm_calls"] == 1
        assert patch_meta["swarm_bytes_received"] < 1.2 * 49152 * 4
        assert got["meta"]["session"]["swarm_calls"] == 2 and got["meta"]["generation"]["swarm_calls"] == 3
        # the saved logits come back once per step; the next token is picked on the node that ran the head
        assert got["meta"]["generation"]["swarm_bytes_received"] < 1.1 * 3 * 49152 * 4
    else:  # hidden states cross only after layers 8 and 20: segments 0:9, 9:21 (two nodes: 0:15, 15:30), 21:30
        assert patch_meta["swarm_calls"] == 4


def test_api_keys_and_rate_limits_over_http(workdir, tmp_path):
    """A gateway with keys refuses a request without one, serves the key, and refuses it past its rate, with
    messages that say what to do; the real client sends the key from nnsight's CONFIG.API.APIKEY."""
    gateway = Gateway(workdir, "--local", "smollm2-135m", "--api-key", "k1", "--rate-per-minute", "1",
                      "--burst", "1")
    try:
        got = run_client(gateway, "keys", tmp_path)
    finally:
        gateway.close()
    assert "API key" in got["no_key"] and got["no_key"] != "ok", got["no_key"]
    assert got["with_key"] == "ok", got["with_key"]
    assert "rate limit" in got["over_rate"], got["over_rate"]


if __name__ == "__main__":
    _client(*sys.argv[1:4])
