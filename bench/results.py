"""Benchmark result files: one JSONL record per measurement, each with the resolved config, package versions,
machine and git commit inside (the data of record; logs are not)."""

from __future__ import annotations

import os
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from swarm.local_swarm import REPO


def run_context(args) -> dict:
    """Context embedded in each JSONL record of a run made with ``args`` (an argparse namespace)."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    import hivemind
    import transformers
    return {"config": vars(args) | {"out": str(args.out)}, "commit": commit, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "hivemind": hivemind.__version__,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}


class ResultLog:
    """Collects measurements of one run, prints each as a table row, and writes ``<out>/<name>-<time>/<name>.jsonl``."""

    def __init__(self, name: str, args):
        self.name = name
        self.run_dir = Path(args.out) / time.strftime(f"{name}-%Y%m%d-%H%M%S")
        self.context = run_context(args)
        self.records: list[dict] = []

    def __call__(self, measurement: str, **values) -> None:
        self.records.append({"measurement": measurement, **values, **self.context})
        shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        print(f"{measurement:<28} {shown}", flush=True)

    def write(self) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / f"{self.name}.jsonl"
        with open(path, "w") as f:
            for record in self.records:
                f.write(json.dumps(record) + "\n")
        print(f"wrote {path}")
        return path
