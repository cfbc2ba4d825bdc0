"""The real-Petals baseline, from the project's side: where its venv is, a checkpoint it can load, its servers.

Petals 2.2.0.post1 runs in its own venv (``make petals-env``: transformers 4.34.1, hivemind 1.1.12, the shim in
:mod:`bench.petals_shim`). Its servers (:mod:`bench.petals_server`) serve the same spans as our nodes, behind the
same relays; its client (:mod:`bench.petals_worker`) patches the way the NDIF paper did: pull the hidden state
at the layer, modify it locally, send it back.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from swarm.local_swarm import REPO

from .errors import PetalsUnavailableError
from .harness import Harness

DEFAULT_VENV = REPO / ".petals-venv"
HOW_TO = "create it with `make petals-env` (a few minutes; builds .petals-venv with petals==2.2.0.post1)"


def petals_python(venv: Path | None = None) -> Path:
    """The Petals venv's python.

    Raises:
        PetalsUnavailableError: the venv or its petals install is missing; the message says how to create it.
    """
    venv = Path(venv or DEFAULT_VENV)
    python = venv / "bin" / "python"
    if not python.exists() or not list((venv / "lib").glob("python3*/site-packages/petals")):
        raise PetalsUnavailableError(f"the real-Petals baseline needs its venv at {venv}, which is missing or has "
                                     f"no petals; {HOW_TO}.")
    return python


def petals_checkpoint(model_dir: Path, cache_dir: Path) -> Path:
    """A copy of ``model_dir`` that transformers 4.34 loads: weights linked, ``config.json`` rewritten (top-level
    ``rope_theta``, ``torch_dtype``; newer keys such as ``rope_parameters`` dropped). Built once per checkpoint."""
    model_dir = Path(model_dir).resolve()
    out = Path(cache_dir) / "bench-petals" / model_dir.name
    config = json.loads((model_dir / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    config["rope_scaling"] = None
    config["torch_dtype"] = "float32"
    for key in ("dtype", "layer_types"):
        config.pop(key, None)
    out.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json"):
            link = out / path.name
            if not link.exists():
                link.symlink_to(path)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def dht_prefix(model_dir: Path) -> str:
    """A DHT prefix for a local model dir (petals needs one: it cannot derive it from a path)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", Path(model_dir).name) + "-petals"


async def start_petals_servers(harness: Harness, deployment, spans, ports, announce) -> None:
    """Start one Petals server per span (the first one starts a new swarm), each ready once its blocks serve."""
    config = deployment.config
    python = petals_python(config.petals_venv)
    model = petals_checkpoint(config.model, config.cache_dir)
    for i, span in enumerate(spans):
        tag = f"petals-server{i}-{len(harness.children)}"
        ready = harness.workdir / f"{tag}.ready.json"
        cmd = [str(python), "-m", "bench.petals_server", "--ready-file", str(ready),
               "--converted_model_name_or_path", str(model), "--dht_prefix", dht_prefix(model),
               "--block_indices", f"{span[0]}:{span[1]}", "--throughput", "1000", "--num_handlers", "2",
               "--torch_dtype", "float32", "--device", "cpu", "--skip_reachability_check",
               "--host_maddrs", f"/ip4/127.0.0.1/tcp/{ports[i]}"]
        if announce[i] is not None:
            cmd += ["--announce_maddrs", f"/ip4/127.0.0.1/tcp/{announce[i]}"]
        cmd += ["--initial_peers", *deployment.initial_peers] if i else ["--new_swarm"]
        env = {"OMP_NUM_THREADS": str(config.threads), "HIVEMIND_LOGLEVEL": "WARNING",
               "PETALS_IGNORE_DEPENDENCY_VERSION": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        t0 = os.times().elapsed
        child = await harness.spawn(tag, cmd, ready_file=ready, env=env, timeout_s=config.timeout_s)
        deployment.nodes.append(child)
        deployment.startup_s.append(os.times().elapsed - t0)
        if i == 0:
            deployment.initial_peers = list(child.info["maddrs"])
