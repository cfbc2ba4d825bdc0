"""``swarm-node``: serve a span, inspect a swarm, prepare the embedded model.

    swarm-node serve --model smollm2-135m --blocks 0:10 --new-swarm
    swarm-node serve --model smollm2-135m --initial-peers /ip4/.../p2p/...
    swarm-node status --initial-peers /ip4/.../p2p/...
    swarm-node prepare-model smollm2-135m

Environment (read here only): ``SWARM_CACHE_DIR`` is the default for ``--cache-dir``;
``SWARM_HOOKS=0`` starts a node without plugin span hooks (entry points ``swarm.span_hooks``).
Test only (fault injection, off unless set): ``SWARM_TEST_ANNOUNCE_BLOCKS=START:END`` makes ``serve`` announce those
layers (record and info RPC) while it serves ``--blocks``, so tests can check that clients route around a liar;
with ``SWARM_TEST_INFO_TELLS_TRUTH=1`` too, it lies in its record only. ``SWARM_TEST_OUTPUT_NOISE=<std>`` adds
Gaussian noise to every output of the node's span (a node computing wrong numbers, for spot-check tests); with
``SWARM_TEST_NOISE_ROW=<i>`` only batch row ``i`` gets it, with ``SWARM_TEST_NOISE_EVERY=<k>`` only every ``k``-th
forward.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from pathlib import Path

from .node import NodeConfig, run_node
from .span_hook import HookBudgets
from .span_server import ServerLimits

def _field_help(cls, name: str) -> str:
    """The docstring written under a dataclass field (kept as the help text)."""
    import ast
    import inspect
    source = inspect.getsource(cls)
    tree = ast.parse(source)
    body = tree.body[0].body
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == name and i + 1 < len(body):
            nxt = body[i + 1]
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                return str(nxt.value.value)
    return ""


def _blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks takes START:END (half-open), e.g. 0:10; got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"--blocks needs 0 <= START < END; got {text!r}")
    return start, end


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm-node", description="Serve, inspect and prepare span-swarm models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a span of a model's layers in a swarm")
    h = lambda name: _field_help(NodeConfig, name)  # noqa: E731
    serve.add_argument("--model", default=NodeConfig.model, help=h("model"))
    serve.add_argument("--blocks", type=_blocks, default=None, help=h("blocks") + " Format START:END.")
    serve.add_argument("--num-blocks", type=int, default=None, help=h("num_blocks"))
    serve.add_argument("--no-embed", dest="serve_embed", action="store_false", help="do not serve the embedding")
    serve.add_argument("--no-head", dest="serve_head", action="store_false", help="do not serve the final norm + head")
    serve.add_argument("--initial-peers", nargs="*", default=[], help=h("initial_peers"))
    serve.add_argument("--new-swarm", action="store_true", help=h("new_swarm"))
    serve.add_argument("--host", default=NodeConfig.host, help=h("host"))
    serve.add_argument("--port", type=int, default=NodeConfig.port, help=h("port"))
    serve.add_argument("--announce-host", default=None, help=h("announce_host"))
    serve.add_argument("--announce-port", type=int, default=None, help=h("announce_port"))
    serve.add_argument("--device", default=NodeConfig.device, help=h("device"))
    serve.add_argument("--dtype", default=NodeConfig.dtype, choices=["float32", "bfloat16", "float16"], help=h("dtype"))
    serve.add_argument("--num-threads", type=int, default=None, help=h("num_threads"))
    serve.add_argument("--cache-dir", type=Path, default=None, help=h("cache_dir") + " Default: $SWARM_CACHE_DIR or ~/.cache/swarm-interp.")
    serve.add_argument("--record-ttl", type=float, default=NodeConfig.record_ttl_s, help=h("record_ttl_s"))
    serve.add_argument("--announce-period", type=float, default=NodeConfig.announce_period_s, help=h("announce_period_s"))
    for f in dataclasses.fields(ServerLimits):
        serve.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                           help=_field_help(ServerLimits, f.name) + f" Default: {f.default}.")
    for f in dataclasses.fields(HookBudgets):
        serve.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                           help=_field_help(HookBudgets, f.name) + f" Default: {f.default}.")
    serve.add_argument("--ready-file", type=Path, default=None, help=h("ready_file"))
    serve.add_argument("--identity-path", type=Path, default=None, help=h("identity_path"))

    status = sub.add_parser("status", help="show models, spans, who serves them, load and gaps")
    status.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of any peer in the swarm")

    prep = sub.add_parser("prepare-model", help="prepare an embedded model once; prints its directory last")
    prep.add_argument("model", help="alias of an embedded model, e.g. smollm2-135m")
    prep.add_argument("--cache-dir", type=Path, default=None, help="default: $SWARM_CACHE_DIR or ~/.cache/swarm-interp")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("hivemind", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cache_dir = getattr(args, "cache_dir", None) or (Path(os.environ["SWARM_CACHE_DIR"]) if os.environ.get("SWARM_CACHE_DIR") else None)
    from .errors import SwarmError
    try:
        if args.command == "serve":
            return _serve(args, cache_dir)
        if args.command == "status":
            from .status import print_status
            return print_status(list(args.initial_peers))
        if args.command == "prepare-model":
            from .checkpoint import resolve_checkpoint
            print(resolve_checkpoint(args.model, cache_dir, progress=True))
            return 0
    except SwarmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1


def _serve(args, cache_dir: Path | None) -> int:
    limits = ServerLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerLimits)})
    for flag, value in (("--max-queued-compute", limits.max_queued_compute),
                        ("--max-client-queued-compute", limits.max_client_queued_compute),
                        ("--max-client-sessions", limits.max_client_sessions)):
        if value < 1:
            print(f"error: {flag} must be at least 1 (got {value}); a node that may "
                  "queue no work refuses every request." if "queued" in flag else
                  f"error: {flag} must be at least 1 (got {value}); a node that admits no session serves no "
                  "generation.", file=sys.stderr)
            return 2
    lie = os.environ.get("SWARM_TEST_ANNOUNCE_BLOCKS")
    config = NodeConfig(model=args.model, blocks=args.blocks, num_blocks=args.num_blocks, serve_embed=args.serve_embed,
                        serve_head=args.serve_head, initial_peers=tuple(args.initial_peers), new_swarm=args.new_swarm,
                        host=args.host, port=args.port, announce_host=args.announce_host,
                        announce_port=args.announce_port, device=args.device,
                        dtype=args.dtype, num_threads=args.num_threads, cache_dir=cache_dir,
                        record_ttl_s=args.record_ttl, announce_period_s=args.announce_period, limits=limits,
                        ready_file=args.ready_file, identity_path=args.identity_path,
                        test_announce_blocks=_blocks(lie) if lie else None,
                        test_info_tells_truth=os.environ.get("SWARM_TEST_INFO_TELLS_TRUTH") == "1",
                        test_output_noise=float(os.environ.get("SWARM_TEST_OUTPUT_NOISE", "0")),
                        test_noise_row=int(os.environ["SWARM_TEST_NOISE_ROW"])
                        if os.environ.get("SWARM_TEST_NOISE_ROW") else None,
                        test_noise_every=int(os.environ.get("SWARM_TEST_NOISE_EVERY") or 1))
    hooks = None
    if os.environ.get("SWARM_HOOKS", "1") != "0":
        hooks = _default_hooks(HookBudgets(**{f.name: getattr(args, f.name) for f in dataclasses.fields(HookBudgets)}))
    asyncio.run(run_node(config, hooks=hooks))
    return 0


def _default_hooks(budgets: HookBudgets = HookBudgets()):
    """Span hooks from installed plugins: every entry point in the group ``swarm.span_hooks`` is called with the
    registry (``hybrid`` registers its interpreter this way), so volunteers get them by default. The registry
    carries the node's per-request ``budgets`` for them to enforce."""
    from importlib.metadata import entry_points

    from .span_hook import HookRegistry
    registry = HookRegistry(budgets)
    for entry in entry_points(group="swarm.span_hooks"):
        entry.load()(registry)
    return registry


if __name__ == "__main__":
    sys.exit(main())
