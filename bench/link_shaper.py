"""Link emulation without root: a trio TCP relay in front of each node that shapes bandwidth and adds latency.

Every node announces its relay's address instead of its own, so every peer (client or node) that dials it goes
through the relay. A connection's *class* is decided when it arrives: a dialer whose source port is one of the
nodes' listen ports is a node (libp2p dials from its listen port, ``SO_REUSEPORT``) and gets the node↔node link;
anyone else is a client and gets the client link. Each direction of a link is modelled as

    serialization at ``bandwidth_Bps`` (a pacer shared by the link's connections)  →  ``latency_s`` delay line

Links: the client site has one link (one pacer per direction shared by all its connections to all nodes); each
node has its own node link (one pacer per direction per relay). ``up`` = dialer → node, ``down`` = node → dialer.

    python -m bench.link_shaper --route 41001:41011 --route 41002:41012 --link 60MB/s,20ms \\
        --node-link none --node-ports 41011,41012 --ready-file relay.json --stats-file stats.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .errors import BenchConfigError
from .link_spec import LinkSpec as LinkSpec   # importable from here, where the relay uses it

CHUNK_BYTES = 64 * 1024


class Pacer:
    """Serializes bytes at a fixed rate for every connection sharing one direction of one link.

    A token bucket with ``burst_s`` of credit: after a late wake-up the pacer may catch up by at most that much,
    so the long-run rate stays at ``bandwidth_Bps`` under scheduler jitter.
    """

    def __init__(self, bandwidth_Bps: float | None, burst_s: float = 0.02):
        self.bandwidth_Bps = bandwidth_Bps
        self.burst_s = burst_s
        self._next_free = -math.inf

    async def transmit(self, nbytes: int) -> None:
        """Return when ``nbytes`` have been serialized onto the link (at once for an unlimited link)."""
        if not self.bandwidth_Bps:
            return
        now = trio.current_time()
        self._next_free = max(self._next_free, now - self.burst_s) + nbytes / self.bandwidth_Bps
        await trio.sleep_until(self._next_free)


@dataclass
class Counters:
    """Bytes relayed, by ``(class, direction)``: ``client``/``node`` × ``up``/``down``."""

    bytes: dict[str, int] = field(default_factory=lambda: {k: 0 for k in
                                                           ("client_up", "client_down", "node_up", "node_down")})
    connections: dict[str, int] = field(default_factory=lambda: {"client": 0, "node": 0})


async def pump(src: trio.abc.ReceiveStream, dst: trio.abc.SendStream, pacer: Pacer, latency_s: float,
               count=lambda n: None, chunk_bytes: int = CHUNK_BYTES) -> None:
    """Copy ``src`` to ``dst`` through one direction of a link until ``src`` ends, then half-close ``dst``.

    Each chunk is serialized by ``pacer`` and then delivered ``latency_s`` later (chunks in flight overlap, as
    on a real link). ``count(n)`` is called with each chunk's size as it is delivered.
    """
    send, receive = trio.open_memory_channel[tuple[float, bytes]](4096)

    async def deliver() -> None:
        async with receive:
            async for due, data in receive:
                await trio.sleep_until(due)
                await dst.send_all(data)
                count(len(data))
        try:
            if hasattr(dst, "send_eof"):
                await dst.send_eof()     # TCP: half-close, the other direction goes on
            else:
                await dst.aclose()       # a stream without half-close ends here
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(deliver)
        async with send:
            while data := await src.receive_some(chunk_bytes):
                await pacer.transmit(len(data))
                await send.send((trio.current_time() + latency_s, data))


@dataclass(frozen=True)
class Route:
    """A relay port in front of one node's real port."""

    listen_port: int
    target_port: int
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class RelayConfig:
    """What one relay process serves."""

    routes: tuple[Route, ...]
    link: LinkSpec | None
    """The client site's link (shared by all its connections)."""
    node_link: LinkSpec | None
    """Each node's link for node↔node traffic."""
    node_ports: frozenset[int] = frozenset()
    """Listen ports of the nodes: a dialer from one of these is a node."""


async def _relay_connection(client: trio.SocketStream, route: Route, config: RelayConfig, pacers: dict,
                            counters: Counters) -> None:
    peer_port = client.socket.getpeername()[1]
    kind = "node" if peer_port in config.node_ports else "client"
    link = config.node_link if kind == "node" else config.link
    latency = link.latency_s if link else 0.0
    up, down = pacers[(kind, route.listen_port, "up")], pacers[(kind, route.listen_port, "down")]
    counters.connections[kind] += 1
    try:
        server = await trio.open_tcp_stream(route.host, route.target_port)
    except OSError:
        await client.aclose()
        return

    def counter(key):
        def add(n):
            counters.bytes[key] += n
        return add

    async with client, server:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, server, up, latency, counter(f"{kind}_up"))
                nursery.start_soon(pump, server, client, down, latency, counter(f"{kind}_down"))
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # one side went away: the other is closed by leaving the block


async def serve_relays(config: RelayConfig, counters: Counters | None = None, *,
                       task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve every route until cancelled; ``task_status.started()`` once all listeners are bound."""
    counters = counters if counters is not None else Counters()
    client_up = Pacer(config.link.bandwidth_Bps if config.link else None)
    client_down = Pacer(config.link.bandwidth_Bps if config.link else None)
    pacers = {}
    for route in config.routes:
        rate = config.node_link.bandwidth_Bps if config.node_link else None
        pacers[("client", route.listen_port, "up")] = client_up
        pacers[("client", route.listen_port, "down")] = client_down
        pacers[("node", route.listen_port, "up")] = Pacer(rate)
        pacers[("node", route.listen_port, "down")] = Pacer(rate)
    async with trio.open_nursery() as nursery:
        for route in config.routes:
            listeners = await trio.open_tcp_listeners(route.listen_port, host=route.host)

            async def handle(stream, route=route):
                await _relay_connection(stream, route, config, pacers, counters)

            nursery.start_soon(trio.serve_listeners, handle, listeners)
        task_status.started()


def _route(text: str) -> Route:
    try:
        listen, target = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--route takes LISTEN_PORT:TARGET_PORT; got {text!r}") from None
    return Route(listen, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.link_shaper", description=__doc__.split("\n")[0])
    parser.add_argument("--route", type=_route, action="append", required=True, help="LISTEN_PORT:TARGET_PORT")
    parser.add_argument("--link", default="none", help="client link, e.g. 60MB/s,20ms (or none)")
    parser.add_argument("--node-link", default="none", help="node↔node link (or none)")
    parser.add_argument("--node-ports", default="", help="comma-separated listen ports of the nodes")
    parser.add_argument("--ready-file", type=Path, required=True, help="written once every listener is bound")
    parser.add_argument("--stats-file", type=Path, default=None, help="byte counters, rewritten every --stats-period")
    parser.add_argument("--stats-period", type=float, default=0.5, help="seconds between rewrites of --stats-file")
    args = parser.parse_args(argv)
    try:
        config = RelayConfig(tuple(args.route), LinkSpec.parse(args.link), LinkSpec.parse(args.node_link),
                             frozenset(int(p) for p in args.node_ports.split(",") if p))
    except (BenchConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counters = Counters()

    def write(path: Path, data: dict) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_relays, config, counters)
            write(args.ready_file, {"pid": os.getpid(), "routes": [r.__dict__ for r in config.routes]})
            while args.stats_file is not None:
                write(args.stats_file, {"bytes": counters.bytes, "connections": counters.connections})
                await trio.sleep(args.stats_period)

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
