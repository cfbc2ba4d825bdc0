"""Result files of the basics benchmarks (``swarm_basics``, ``hybrid_basics``, ``gateway_latency``): one JSONL
record per measurement, each with the run's context inside (:func:`bench.schema.record_context`: resolved config,
package versions, machine, git commit, time), the data of record; logs are not.

These records are not ``swarm-bench/1`` records: each run goes to its own ``<out>/<name>-<time>/`` directory, apart
from the ``<out>/<run-id>/`` directories that ``swarm-bench plot`` reads.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .schema import record_context


class ResultLog:
    """Collects measurements of one run, prints each as a table row, and writes ``<out>/<name>-<time>/<name>.jsonl``."""

    def __init__(self, name: str, args):
        self.name = name
        self.run_dir = Path(args.out) / time.strftime(f"{name}-%Y%m%d-%H%M%S")
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        self.context = record_context(config)
        self.records: list[dict] = []

    def __call__(self, measurement: str, **values) -> None:
        self.records.append({"measurement": measurement, **values, **self.context, "time": time.time()})
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
