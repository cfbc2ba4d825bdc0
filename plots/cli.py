"""``swarm-bench``: run the benchmarks (``run``, implemented in :mod:`bench.cli`) and plot their results (``plot``).

    swarm-bench run --suite paper --link 60MB/s,20ms
    swarm-bench plot results/<run-id>/ --out figures/
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from bench.errors import BenchError


logger = logging.getLogger(__name__)

DESCRIPTION = """\
Benchmarks of the swarm against Petals, a centralized (NDIF-like) server and local HPC, and their figures.

  run   start deployments, run workloads, write results/<run-id>/*.jsonl (one record per repetition)
  plot  read a run's result files and write every figure (PNG + PDF) and summary.md

Try `swarm-bench run --help` and `swarm-bench plot --help`. The record schema, statistics and figures are
described in docs/bench.md."""

PLOT_EPILOG = """\
Figures (skipped, with a note in summary.md, when the run has no rows for them):
  fig6a_setup_time        setup time vs model size (log-log), per placement
  fig6b_patching_vs_size  activation patching runtime vs model size, HPC vs remote placements
  fig6c_petals_vs_ours    Petals vs swarm vs hybrid: plain remote inference and activation patching
  fig_ioi_patching        IOI patching batch 32: time and client-link bytes (log scale)
  fig_attribution_patching  IOI attribution patching (forward + backward) batch 32: time and client-link bytes
  fig_logit_lens          all-layer logit lens vs a plain forward
  fig_steering            steering-vector generation: per generation and per token
  fig_concurrency         1..N concurrent users: response time (quartile band) and throughput

summary.md holds the headline ratios (IOI time swarm÷hybrid and petals÷hybrid, client-link bytes
swarm÷hybrid, hybrid÷centralized; attribution patching time and bytes swarm÷hybrid and hybrid÷centralized;
plain forward ours÷petals, logit lens ÷ plain forward), the concurrency table and every measurement's median with its 95% CI.

Example:
  swarm-bench plot results/paper-20261122-0600/ --out docs/figures/"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm-bench", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) to stderr")
    commands = parser.add_subparsers(dest="command", metavar="{run,plot}", required=True)
    commands.add_parser("run", add_help=False, help="run benchmarks and write results/<run-id>/*.jsonl "
                        "(options: swarm-bench run --help)")
    plot = commands.add_parser("plot", help="draw the figures and summary.md of a run",
                               description="Read every *.jsonl under RUN_DIR (validated against the "
                               "swarm-bench/1 schema) and write each figure as PNG and PDF plus summary.md.",
                               epilog=PLOT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a results/<run-id>/ directory")
    plot.add_argument("--out", default="figures", metavar="DIR",
                      help="directory for the figures and summary.md (created; default: %(default)s)")
    plot.add_argument("--only", metavar="NAME[,NAME...]", type=lambda s: [n for n in s.split(",") if n],
                      help="draw only these figures (names listed below)")
    return parser


def _run(argv: list[str]) -> int:
    from bench.cli import run_main  # lazy: the runner's imports are not needed to plot
    return run_main(argv)


def _plot(args) -> int:
    command = "swarm-bench plot " + shlex.join([args.run_dir, "--out", args.out]
                                               + (["--only", ",".join(args.only)] if args.only else []))
    from .figures import plot_run  # matplotlib: not needed for --help
    try:
        results, summary = plot_run(args.run_dir, args.out, args.only, command=command)
    except BenchError as e:
        print(f"swarm-bench plot: {e}", file=sys.stderr)
        return 2
    for result in results:
        for path in result.paths:
            print(path)
        if result.skipped:
            print(f"{result.name}: skipped ({'; '.join(result.notes)})")
    print(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``swarm-bench`` console script.

    Args:
        argv: arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        The exit status: 0 on success, 2 on bad input (unreadable results, unknown figure), else what
        ``bench.cli.run_main`` returns.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = argv[:1] in (["-v"], ["--verbose"])
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        argv = argv[1:]
    if argv[:1] == ["run"]:  # everything after `run` belongs to bench.cli, including --help
        return _run(argv[1:])
    args = build_parser().parse_args(argv)
    return _plot(args)


if __name__ == "__main__":
    sys.exit(main())
