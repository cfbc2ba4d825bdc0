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
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .errors import BenchConfigError

CHUNK_BYTES = 64 * 1024

# Bandwidth units, matched *exactly* (case-sensitive): a capital B is bytes, "bit" or "bps" is bits. Spellings whose
# meaning hangs on the case of one letter ("Mb/s", "mb/s", "MBps", "mbps") are refused rather than guessed.
BYTE_UNITS = {"B/s": 1.0, "kB/s": 1e3, "KB/s": 1e3, "MB/s": 1e6, "GB/s": 1e9,
              "KiB/s": 1024.0, "MiB/s": 1024.0**2, "GiB/s": 1024.0**3}
"""Bytes per second: decimal (kB/s = KB/s = 1000 B/s, MB/s, GB/s) and binary (KiB/s, MiB/s, GiB/s)."""
BIT_UNITS = {"bit/s": 1 / 8, "kbit/s": 125.0, "Kbit/s": 125.0, "Mbit/s": 125e3, "Gbit/s": 125e6,
             "kbps": 125.0, "Kbps": 125.0, "Mbps": 125e3, "Gbps": 125e6}
"""Bits per second, as bytes per second (÷ 8). ``Mbps``/``Gbps`` follow the networking convention: megabits."""
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}
"""One-way latency units."""
_BANDWIDTH_UNITS = {**BYTE_UNITS, **BIT_UNITS}
_ACCEPTED = ("bandwidth in bytes: " + ", ".join(BYTE_UNITS) + "; in bits: " + ", ".join(BIT_UNITS)
             + "; latency: " + ", ".join(TIME_UNITS))


def _refusal(unit: str, part: str, text: str) -> str:
    """The error text for a unit that is not one of the accepted spellings."""
    folded = unit.lower()
    where = f"{part!r}" if part == text else f"{part!r} of {text!r}"
    if "b" in folded and any(folded.startswith(p) for p in ("b", "k", "m", "g")) and (
            folded.endswith("/s") or folded.endswith("ps")):
        why = (f"unit {unit!r} in {where} is refused: whether it means bits or bytes hangs on the case "
               "of one letter. Write MB/s for megabytes per second, Mbit/s (or Mbps) for megabits per second")
    elif folded in TIME_UNITS:
        why = f"unit {unit!r} in {where}: units are case-sensitive (did you mean {folded!r}?)"
    else:
        why = f"unknown unit {unit!r} in {where}"
    return f"{why}. Accepted spellings (case-sensitive): {_ACCEPTED}"


def _exact(value: float, scales: tuple[tuple[str, float], ...]) -> str:
    """``value`` written in the first unit of ``scales`` whose text parses back to exactly ``value``."""
    for unit, scale in scales:
        text = f"{value / scale!r}"
        if float(text) * scale == value:
            return (text[:-2] if text.endswith(".0") else text) + unit
    raise AssertionError("the last scale must be 1")  # unreachable: scale 1 always round-trips


@dataclass(frozen=True)
class LinkSpec:
    """One emulated link, applied to each direction separately."""

    bandwidth_Bps: float | None
    """Bytes per second per direction; None = unlimited."""
    latency_s: float = 0.0
    """One-way delay added to each direction (so a round trip gains ``2 * latency_s``)."""

    @classmethod
    def parse(cls, text: str | None) -> "LinkSpec | None":
        """``"60MB/s,20ms"`` / ``"100Mbit/s"`` / ``"20ms"`` / ``"none"`` → a spec (None for ``none``/empty).

        Units are case-sensitive and only unambiguous spellings are accepted (see :data:`BYTE_UNITS`,
        :data:`BIT_UNITS`, :data:`TIME_UNITS`): ``MB/s``/``KB/s``/``kB/s``/``GB/s`` and ``MiB/s``… are bytes;
        ``Mbit/s``/``Gbit/s``/``Kbit/s`` and ``Mbps``/``Gbps``/``Kbps`` are bits. ``Mb/s``, ``mb/s``, ``MBps``,
        ``mbps`` are refused: their meaning hangs on the case of one letter (issue 15: ``100Mb/s`` used to be read
        as 100 MB/s, 8× too fast).

        Raises:
            BenchConfigError: an unparseable part, a unit not listed (the message lists the accepted spellings),
                a bandwidth that is not positive, or two bandwidths/latencies in one spec.
        """
        if text is None or text.strip().lower() in ("", "none", "off"):
            return None
        bandwidth, latency = None, None
        for part in (p.strip() for p in text.split(",")):
            match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Zµ/]+)", part)
            if not match:
                raise BenchConfigError(f"cannot parse link part {part!r} of {text!r}; write e.g. '60MB/s,20ms' "
                                       f"or '100Mbit/s,5ms'. Accepted spellings (case-sensitive): {_ACCEPTED}")
            value, unit = float(match.group(1)), match.group(2)
            if unit in TIME_UNITS:
                if latency is not None:
                    raise BenchConfigError(f"two latencies in link spec {text!r}; give one")
                latency = value * TIME_UNITS[unit]
            elif unit in _BANDWIDTH_UNITS:
                if bandwidth is not None:
                    raise BenchConfigError(f"two bandwidths in link spec {text!r}; give one")
                if value <= 0:
                    raise BenchConfigError(f"bandwidth must be > 0; got {part!r} (use 'none' for an unshaped link)")
                bandwidth = value * _BANDWIDTH_UNITS[unit]
            else:
                raise BenchConfigError(_refusal(unit, part, text))
        return cls(bandwidth, latency or 0.0)

    def as_record(self) -> dict:
        """The record form ``{"bandwidth_Bps", "latency_s"}`` (an unlimited bandwidth is recorded as ``inf``→1e18)."""
        return {"bandwidth_Bps": float(self.bandwidth_Bps or 1e18), "latency_s": float(self.latency_s)}

    def __str__(self) -> str:
        """A spec that :meth:`parse` reads back to exactly this one (it is what the relay process is given)."""
        rate = _exact(self.bandwidth_Bps, (("MB/s", 1e6), ("B/s", 1.0))) if self.bandwidth_Bps else None
        delay = _exact(self.latency_s, (("ms", 1e-3), ("s", 1.0)))
        return f"{rate},{delay}" if rate else delay


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
    parser.add_argument("--stats-file", type=Path, default=None, help="byte counters, rewritten every 0.5 s")
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
                await trio.sleep(0.5)

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
