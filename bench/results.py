"""What every benchmark record carries: the resolved config, package versions, machine and git commit."""

from __future__ import annotations

import os
import platform
import subprocess

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
