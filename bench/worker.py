"""A benchmark client in its own process: connects to a deployment (or loads the model: ``hpc``), prepares one
experiment, then runs one repetition per ``go`` line on stdin, answering each with one JSON line on stdout.

    python -m bench.worker SPEC_JSON

Protocol (stdout, one JSON object per line): ``{"event": "ready", "load_s", "batch", "seq_len"}`` once connected
and prepared; then per ``go``: ``{"event": "rep", "wall_s", "stats", "extra", "ok", "error", "t_start", "t_end"}``;
the worker exits at EOF on stdin. Logs go to stderr. The harness (:mod:`bench.deployments`) drives it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import torch
    torch.set_num_threads(int(spec.get("threads", 1)))
    from hybrid import LanguageModel

    from .workloads import Experiment, ExperimentConfig

    out = sys.stdout
    placement = spec["placement"]
    t0 = time.perf_counter()
    lm = LanguageModel(spec["model"], initial_peers=spec.get("initial_peers") or None)
    load_s = None
    if placement == "local":
        lm.local_model  # noqa: B018 (loads the whole model: the hpc job's setup)
        load_s = time.perf_counter() - t0
    experiment = Experiment(lm, ExperimentConfig(**spec["experiment"]))
    setup_s = time.perf_counter() - t0
    out.write(json.dumps({"event": "ready", "load_s": load_s, "setup_s": setup_s, "batch": experiment.batch,
                          "seq_len": experiment.seq_len}) + "\n")
    out.flush()
    try:
        for line in sys.stdin:
            if line.strip() != "go":
                continue
            t_start = time.time()
            start = time.perf_counter()
            try:
                stats, extra = experiment.run(placement)
                result = {"ok": True, "error": None, "stats": _jsonable(stats), "extra": _jsonable(extra)}
            except Exception as e:  # a failed repetition is a result (ok=false), not a crashed run
                traceback.print_exc(file=sys.stderr)
                result = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000], "stats": {}, "extra": {}}
            wall_s = time.perf_counter() - start
            if result["ok"]:  # after the clock stopped: a workload's reference timings (the logit lens's floor)
                try:
                    result["extra"].update(_jsonable(experiment.reference(placement)))
                except Exception as e:
                    result["extra"]["reference_error"] = f"{type(e).__name__}: {e}"[:500]
            out.write(json.dumps({"event": "rep", "wall_s": wall_s, "t_start": t_start, "t_end": time.time(),
                                  **result}) + "\n")
            out.flush()
    finally:
        lm.close()
    return 0


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
