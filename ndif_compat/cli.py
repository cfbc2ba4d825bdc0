"""``swarm-gateway serve``: an NDIF-compatible server for the real nnsight client.

    swarm-gateway serve --local smollm2-135m --port 8289                 # one preloaded model (centralized)
    swarm-gateway serve --initial-peers /ip4/.../p2p/... --port 8289      # the same API in front of the swarm

Clients: ``NDIF_HOST=http://<host>:<port>`` and ``HF_ENDPOINT=http://<host>:<port>``, then
``LanguageModel("<name>")`` with a name the gateway prints (see ``docs/ndif_compat.md``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

from .config import BackendSpec, ExecutionLimits, GatewayConfig
from .errors import SandboxUnavailableError

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm-gateway", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve nnsight remote requests")
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", metavar="MODEL", help="local backend: load MODEL (alias or checkpoint dir) here")
    where.add_argument("--initial-peers", nargs="+", metavar="MADDR", help="swarm backend: the swarm's multiaddrs")
    serve.add_argument("--model", default="smollm2-135m", help="swarm backend: the model (alias or checkpoint dir)")
    serve.add_argument("--name", action="append", default=[], help="extra name clients may use for the model")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    serve.add_argument("--port", type=int, default=8289, help="HTTP/websocket port (default %(default)s)")
    serve.add_argument("--workers", type=int, default=1,
                       help="requests run at once, each in its own sandboxed process (default %(default)s)")
    serve.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    serve.add_argument("--no-hybrid", action="store_true", help="swarm backend: never push graphs to the nodes")
    serve.add_argument("--api-key", action="append", default=[],
                       help="accepted API key (repeat; or $SWARM_GATEWAY_API_KEYS, comma-separated); none = open")
    serve.add_argument("--rate-per-minute", type=float, default=GatewayConfig.rate_per_minute,
                       help="requests per minute per API key (or per client address without keys; default %(default)s)")
    serve.add_argument("--burst", type=int, default=GatewayConfig.burst,
                       help="most requests a key may send at once, the bucket size of its rate (default %(default)s)")
    serve.add_argument("--timeout-s", type=float, default=ExecutionLimits.timeout_s,
                       help="wall-time limit of one request; its worker is replaced past it (default %(default)s)")
    serve.add_argument("--max-memory-gb", type=float, default=ExecutionLimits.max_memory_bytes / 2**30,
                       help="memory limit of a worker process (default %(default)s)")
    serve.add_argument("--max-request-mb", type=float, default=ExecutionLimits.max_request_bytes / 2**20,
                       help="largest request payload accepted (default %(default)s)")
    serve.add_argument("--unsafe-no-sandbox", action="store_true",
                       help="run requests in persistent worker processes behind Python-level guardrails only (no "
                            "kernel sandbox, writable weights, one worker serves many requests): only for a "
                            "trusted single-user setup")
    serve.add_argument("--cache-dir", type=Path, default=None, help="where model aliases are converted")
    serve.add_argument("--ready-file", type=Path, default=None, help="write {url, names, pid} here once serving")
    return parser


def build_config(args: argparse.Namespace, env_keys: str = "") -> GatewayConfig:
    from swarm.checkpoint import resolve_checkpoint

    from swarm.errors import ModelNotFoundError

    model = args.local or args.model
    try:
        path = resolve_checkpoint(model, args.cache_dir)
    except ModelNotFoundError as e:  # its message names swarm-node's --model; say which flag of ours it was
        flag = "--local" if args.local else "--model"
        raise ModelNotFoundError(str(e).replace("--model", flag)) from e
    canonical = model if not Path(model).exists() else Path(model).resolve().name
    keys = frozenset(k.strip() for k in [*args.api_key, *env_keys.split(",")] if k.strip())
    backend = BackendSpec("local" if args.local else "swarm", path, tuple(args.initial_peers or ()),
                          hybrid=not args.no_hybrid, threads=args.threads)
    limits = ExecutionLimits(timeout_s=args.timeout_s, max_memory_bytes=int(args.max_memory_gb * 2**30),
                             max_request_bytes=int(args.max_request_mb * 2**20))
    return GatewayConfig(backend, tuple(dict.fromkeys([canonical, *args.name])), host=args.host, port=args.port,
                         workers=args.workers, api_keys=keys, rate_per_minute=args.rate_per_minute, burst=args.burst,
                         limits=limits, sandbox=not args.unsafe_no_sandbox)


def make_pool(config: GatewayConfig):
    """Where requests run: sandboxed cells (:mod:`ndif_compat.cells`), or, only when the operator opts out of the
    sandbox, persistent workers behind Python-level guardrails (:mod:`ndif_compat.workers`)."""
    from .cells import CellPool
    from .workers import WorkerPool

    if not config.sandbox:
        return WorkerPool(config.backend, config.limits, config.workers, config.worker_start_timeout_s)
    return CellPool(config.backend, config.limits, config.workers, config.worker_start_timeout_s)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, taken before the model loads, so a busy port is reported at once (and no other
    process can take it meanwhile); uvicorn serves on it.

    Raises:
        OSError: the port is in use or the address is not this machine's.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def serve(config: GatewayConfig, ready_file: Path | None = None, sock: socket.socket | None = None) -> None:
    import uvicorn

    from .app import Gateway

    pool = make_pool(config)
    print(f"swarm-gateway: loading {config.backend.kind} backend ({config.workers} worker(s))...", flush=True)
    try:
        pool.start()
        gateway = Gateway(config, pool)
        server = uvicorn.Server(uvicorn.Config(gateway.app(), host=config.host, port=config.port,
                                               log_level="warning", ws="websockets-sansio", ws_max_size=64 * 2**20))
    except BaseException:
        pool.close()
        raise
    url = f"http://{config.host}:{config.port}"

    def announce() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            print(f"swarm-gateway: serving {', '.join(config.names)} at {url}\n"
                  f"  clients: NDIF_HOST={url} HF_ENDPOINT={url}, then "
                  f"TransformersModel({config.names[0]!r}, task='text-generation')", flush=True)
            if ready_file is not None:
                tmp = ready_file.with_name(ready_file.name + ".tmp")
                tmp.write_text(json.dumps({"url": url, "names": list(config.names), "pid": os.getpid()}))
                os.replace(tmp, ready_file)

    threading.Thread(target=announce, daemon=True).start()
    try:
        server.run(sockets=[sock] if sock is not None else None)
    finally:
        pool.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        print(f"swarm-gateway: cannot listen on {args.host}:{args.port} ({e.strerror or e}); another process (a "
              f"gateway already running?) holds the port: stop it or pick another with --port.", file=sys.stderr)
        return 2
    from swarm.errors import ModelNotFoundError
    try:
        config = build_config(args, os.environ.pop("SWARM_GATEWAY_API_KEYS", ""))
    except ModelNotFoundError as e:
        sock.close()
        print(f"swarm-gateway: {e}", file=sys.stderr)
        return 2
    _not_dumpable()
    try:
        serve(config, args.ready_file, sock)
    except SandboxUnavailableError as e:
        print(f"swarm-gateway: {e}", file=sys.stderr)
        return 2
    return 0


def _not_dumpable() -> None:
    """No process of another user, and no sandboxed one, may read this process's memory or environment (the API
    keys) through /proc or ptrace."""
    import ctypes

    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)          # PR_SET_DUMPABLE


if __name__ == "__main__":
    sys.exit(main())
