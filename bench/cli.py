"""``swarm-bench run``: start deployments, run workloads on them, write one ``swarm-bench/1`` record per repetition.

    swarm-bench run --suite paper --link 60MB/s,20ms
    swarm-bench run --workload ioi_patching --placements hpc,centralized,petals,swarm,hybrid -n 20
    swarm-bench run --workload attribution_patching --link 60MB/s,20ms -n 3
    swarm-bench run --suite smoke                      # a few minutes (make bench-smoke)

Records go to ``<out>/<run-id>/<workload>.jsonl`` (``--out`` defaults to ``results``). Environment (read here
only): ``SWARM_CACHE_DIR`` (default ``~/.cache/swarm-interp``) holds SmolLM2 and the synthetic checkpoints.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

# Light imports only up here, so `swarm-bench run --help` answers at once; trio, torch and the deployments are
# imported by the functions that run benchmarks.
from .errors import BenchConfigError, BenchError, PetalsUnavailableError
from .link_spec import LinkSpec
from .schema import PLACEMENTS, SCHEMA, WORKLOADS, dump_record, record_context
from .synthetic import SIZES, synthetic_checkpoint

if TYPE_CHECKING:
    from .deployments import DeploymentConfig
    from .runner import Measurement

SIZE_WORKLOADS = ("setup_time", "patching_vs_size")
SUITES = {
    "paper": dict(workloads=WORKLOADS, sizes=("llama-10m", "llama-40m", "llama-150m", "llama-500m"), users=(1, 2, 4),
                  n=20, warmup=2),
    "smoke": dict(workloads=WORKLOADS, sizes=("llama-10m",), users=(1, 2), n=2, warmup=1),
}
"""Suites: which workloads, synthetic sizes and user counts; -n / --warmup / --sizes / --users override."""
PLACEMENTS_OF = {
    "setup_time": ("hpc", "centralized"), "patching_vs_size": ("hpc", "centralized"),
    "remote_inference": ("centralized", "petals", "swarm", "hybrid"), "patching": ("centralized", "petals", "swarm", "hybrid"),
    "ioi_patching": ("hpc", "centralized", "petals", "swarm", "hybrid"), "logit_lens": ("centralized", "swarm", "hybrid"),
    "steering_generation": ("centralized", "swarm", "hybrid"), "concurrency": ("hybrid", "swarm"),
    "attribution_patching": ("hpc", "centralized", "swarm", "hybrid"),
}
"""Placements each workload runs in by default (``--placements`` narrows or widens them)."""
PETALS_WORKLOADS = ("remote_inference", "patching", "ioi_patching", "concurrency")
"""What the Petals worker implements (:mod:`bench.petals_worker`); not ``attribution_patching``: it needs a backward
through every layer boundary, which the worker does not implement."""
BATCH = {"ioi_patching": 32, "setup_time": 2, "patching_vs_size": 2, "remote_inference": 8, "patching": 8,
         "logit_lens": 8, "steering_generation": 2, "concurrency": 8, "attribution_patching": 32}

RUN_EPILOG = "workloads and the placements each runs in by default:\n" + "\n".join(
    f"  {w:<22} {', '.join(PLACEMENTS_OF[w])}" for w in WORKLOADS) + "\nsuites: " + "; ".join(
    f"{name}: n={s['n']}, sizes {','.join(s['sizes'])}, users {','.join(map(str, s['users']))}"
    for name, s in SUITES.items())


def _csv(choices):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x for x in text.split(",") if x)
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad[0]!r}; choose from {', '.join(choices)}")
        return items
    return parse


def _link(text: str) -> LinkSpec | None:
    """``--link``: a link spec parsed at once, so a wrong unit stops the command before anything starts."""
    try:
        return LinkSpec.parse(text)
    except BenchConfigError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def _node_link(text: str) -> LinkSpec | None | str:
    return "same" if text == "same" else _link(text)


def run_config(args: argparse.Namespace, run_id: str) -> dict:
    """The resolved config recorded in every record: paths as text, links as parsed (``LinkSpec.as_record``)."""
    def plain(value):
        if isinstance(value, Path):
            return str(value)
        return value.as_record() if isinstance(value, LinkSpec) else value
    return {k: plain(v) for k, v in vars(args).items()} | {"run_id": run_id}


def build_run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swarm-bench run", description=__doc__.split("\n")[0], epilog=RUN_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), default="paper",
                   help="workloads, sizes and defaults (default: %(default)s; smoke: a few minutes)")
    p.add_argument("--workload", type=_csv(WORKLOADS), default=None, metavar="NAME[,NAME...]",
                   help=f"only these workloads (default: all of the suite); one of: {', '.join(WORKLOADS)}")
    p.add_argument("--placements", type=_csv(PLACEMENTS), default=None, metavar="NAME[,NAME...]",
                   help=f"only these of {', '.join(PLACEMENTS)} (default: each workload's own, listed below)")
    p.add_argument("-n", type=int, default=None, help="measured repetitions (suite default: paper 20, smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up repetitions, recorded and flagged")
    p.add_argument("--link", type=_link, default=None,
                   help="client link, e.g. 60MB/s,20ms or 100Mbit/s,5ms; units are case-sensitive: MB/s KB/s GB/s "
                        "MiB/s = bytes, Mbit/s Gbit/s Kbit/s Mbps Gbps = bits; Mb/s, MBps are refused "
                        "(default: none = loopback)")
    p.add_argument("--node-link", type=_node_link, default="same",
                   help="node↔node links: 'same' as --link (default), none, or a spec")
    p.add_argument("--nodes", type=int, default=3, help="span nodes of the swarm / petals deployments (default: 3)")
    p.add_argument("--sizes", type=_csv(tuple(SIZES)), default=None, metavar="NAME[,NAME...]",
                   help=f"synthetic models for the size workloads, of {', '.join(SIZES)} (default: the suite's)")
    p.add_argument("--users", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                   help="concurrent users, e.g. 1,2,4 (default: the suite's)")
    p.add_argument("--out", type=Path, default=Path("results"),
                   help="results root; the run goes to OUT/<run-id>/ (default: results)")
    p.add_argument("--run-id", default=None, help="default: <suite>-<date>-<time>")
    p.add_argument("--petals-venv", type=Path, default=None, help="default: .petals-venv in the repository")
    return p


@dataclass(frozen=True)
class Job:
    """Measurements sharing one deployment."""

    deployment: DeploymentConfig
    model_name: str
    measurements: tuple[Measurement, ...]


def plan_jobs(args, cache_dir: Path) -> list[Job]:
    """Resolve the command line into jobs, grouped by deployment (each deployment starts once)."""
    from swarm.checkpoint import resolve_checkpoint

    from .deployments import PLACEMENT_DEPLOYMENT, DeploymentConfig
    from .runner import Measurement, count_params
    from .workloads import WORKLOAD_EXPERIMENT, ExperimentConfig

    suite = SUITES[args.suite]
    n = args.n if args.n is not None else suite["n"]
    warmup = args.warmup if args.warmup is not None else suite["warmup"]
    workloads = args.workload or suite["workloads"]
    link = args.link
    node_link = link if args.node_link == "same" else args.node_link
    groups: dict[tuple, list[Measurement]] = {}
    params: dict[Path, int] = {}   # per model path: count_params reads every safetensors header

    def add(model: Path, name: str, workload: str, placement: str, users: int = 1) -> None:
        if args.placements and placement not in args.placements:
            return
        experiment = ExperimentConfig(WORKLOAD_EXPERIMENT[workload], batch=BATCH[workload])
        kind = PLACEMENT_DEPLOYMENT[placement]
        if model not in params:
            params[model] = count_params(model)
        m = Measurement(workload, placement, experiment, n=n, warmup=warmup, users=users, params=params[model])
        groups.setdefault((str(model), name, kind), []).append(m)

    smollm2 = resolve_checkpoint("smollm2-135m", cache_dir)
    for workload in workloads:
        placements = [p for p in (args.placements or PLACEMENTS_OF[workload])
                      if p != "petals" or workload in PETALS_WORKLOADS]   # no size workload is a Petals one
        if workload in SIZE_WORKLOADS:
            for size in args.sizes or suite["sizes"]:
                path = synthetic_checkpoint(size, cache_dir)
                for placement in placements:
                    add(path, size, workload, placement)
        elif workload == "concurrency":
            for placement in placements:
                for users in args.users or suite["users"]:
                    add(smollm2, "smollm2-135m", workload, placement, users)
        else:
            for placement in placements:
                add(smollm2, "smollm2-135m", workload, placement)
    jobs = []
    for (model, name, kind), measurements in groups.items():
        deployment = DeploymentConfig(kind, Path(model), num_nodes=args.nodes, link=None if kind == "hpc" else link,
                                      node_link=None if kind == "hpc" else node_link, cache_dir=cache_dir,
                                      petals_venv=args.petals_venv)
        jobs.append(Job(deployment, name, tuple(measurements)))
    return jobs


async def run_jobs(jobs: list[Job], run_dir: Path, config: dict, progress) -> int:
    """Run every job; returns the number of records written."""
    from .deployments import deploy
    from .harness import open_harness
    from .runner import interleavable, measure, measure_interleaved
    context = record_context(config)
    written = 0
    # One log directory per invocation: several invocations may append to one run (bench/paper_run.sh).
    async with open_harness(run_dir / "logs" / time.strftime("%Y%m%d-%H%M%S")) as harness:
        for job in jobs:
            d = job.deployment
            progress.set_description(f"{d.kind} {job.model_name}: starting")
            async with deploy(harness, d) as deployment:
                def emitter(m):
                    def emit(partial: dict) -> None:
                        nonlocal written
                        record = {"schema": SCHEMA, "run_id": run_dir.name, "workload": m.workload,
                                  "placement": m.placement, "model": job.model_name, "params": m.params,
                                  "link": d.link.as_record() if d.link else None,
                                  "node_link": d.node_link.as_record() if d.node_link else None,
                                  **partial, **context, "time": time.time()}
                        record["extra"]["deployment_startup_s"] = deployment.startup_s
                        with open(run_dir / f"{m.workload}.jsonl", "a") as f:
                            f.write(dump_record(record))
                        written += 1
                        progress.update(1)
                    return emit

                # placements of one workload on this deployment run interleaved (bench.runner.measure_interleaved)
                groups: dict[str, list] = {}
                for m in job.measurements:
                    groups.setdefault(m.workload if interleavable(m) else f"{m.workload}/{m.placement}/{m.users}",
                                      []).append(m)
                for group in groups.values():
                    progress.set_description(f"{group[0].workload} {'+'.join(m.placement for m in group)} "
                                             f"{job.model_name}" + (f" x{group[0].users}" if group[0].users > 1 else ""))
                    if len(group) > 1:
                        await measure_interleaved(harness, deployment, group, [emitter(m) for m in group])
                    else:
                        await measure(harness, deployment, group[0], emitter(group[0]))
    return written


def run_main(argv: list[str]) -> int:
    """Entry point of ``swarm-bench run``; returns the exit code."""
    args = build_run_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import trio
    from tqdm import tqdm

    from swarm.embedded import default_cache_dir

    from .petals import petals_python
    cache_dir = Path(os.environ.get("SWARM_CACHE_DIR") or default_cache_dir())
    try:
        jobs = plan_jobs(args, cache_dir)
        if any(j.deployment.kind == "petals" for j in jobs):
            try:
                petals_python(args.petals_venv)
            except PetalsUnavailableError as e:
                print(f"skipping the petals rows: {e}", file=sys.stderr)
                jobs = [j for j in jobs if j.deployment.kind != "petals"]
        run_id = args.run_id or time.strftime(f"{args.suite}-%Y%m%d-%H%M%S")
        run_dir = args.out / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        config = run_config(args, run_id)
        total = sum((m.warmup + m.n) * m.users for j in jobs for m in j.measurements)
        with tqdm(total=total, unit="rep", dynamic_ncols=True) as progress:
            written = trio.run(run_jobs, jobs, run_dir, config, progress)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {written} records to {run_dir}/  (plot: swarm-bench plot {run_dir} --out figures/)")
    return 0


def main() -> int:
    return run_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
