"""Line rate: how close one stream between two peers comes to a shaped link's bandwidth (issue 16, requirement 2).

Two hivemind peers on 127.0.0.1, the link shaper (:mod:`bench.link_shaper`) in front of the receiving one, so
every byte between them crosses one shaped client link. For each frame size, one call sends a frame of that many
bytes (a :mod:`swarm.wire` frame, as the nodes send) and waits for a small answer (``up``), and one call asks for a
frame of that size back (``down``). Each gets a fresh stream, as every RPC of the swarm does. The line time is what
the link alone needs: ``bytes / bandwidth`` plus one round trip (the request out, the answer back).

    python -m bench.line_rate --link 20MB/s,20ms --sizes 100KB,1MB,20MB,100MB --out results/line_rate.jsonl

One JSON object per call: ``{"direction", "bytes", "streams", "seconds", "line_s", "ratio", "MBps", "link",
"shaper_bytes"}``; ``shaper_bytes`` is what the shaper counted on the link for that call (its counters, not a clock).
Then one ``"summary"`` object per frame size and stream count (medians over ``--repeats``) with the CPU's own ceiling
measured in the same run (``cpu_MBps``: frame bytes / the process CPU seconds one frame's encode + serialize + parse +
decode took here, no network; the link cannot be driven faster than the two ends' CPU moves bytes), and a table of
the ratios side by side on stderr. ``ratio ≤ 1.25`` is 80% of the link: the frame took at most 1.25 × what the link
alone needs. Exits 1 when a frame of ``--check-bytes`` (default 20 MB), striped as the swarm sends it, took more than
``--max-ratio`` (default 1.25) × its line time (``"check"``; the one-stream rows are the comparison, unchecked).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from swarm.direct_reply import Mailbox, stripe_of
from swarm.local_swarm import REPO
from swarm.stripes import StripeBoard, serve_stripes
from swarm.transport import call
from swarm.wire import MAX_STRIPES, encode_frame, read_frame, stripe

from .errors import BenchConfigError
from .harness import free_port
from .link_spec import LinkSpec

SINK, SOURCE = "bench.line_rate.sink", "bench.line_rate.source"
_UNITS = {"B": 1, "KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3}


def parse_size(text: str) -> int:
    """``"100KB"`` → 100000 (decimal units, as the link spec's MB/s)."""
    for unit in ("GB", "MB", "KB", "B"):
        if text.upper().endswith(unit):
            try:
                return int(float(text[:-len(unit)]) * _UNITS[unit])
            except ValueError:
                break
    raise BenchConfigError(f"Frame size {text!r} is not a size; write e.g. 100KB, 1.5MB, 20MB.")


async def _serve(p2p: P2P) -> None:
    """The receiving peer, as a node serves: a sink that reads a (possibly striped) frame and answers its size, and
    a source that answers a frame of the size asked for, striped over the streams the caller opened (as the
    collect stream of swarm.direct_reply)."""
    board, mailbox = StripeBoard(), Mailbox()
    await serve_stripes(p2p, board)

    async def sink(requests, context: P2PContext):
        caller = context.remote_id.to_base58()
        tensors, _ = await read_frame(requests, stripes=lambda sid, k: board.take(caller, sid, k))
        for message in encode_frame([], {"names": [], "bytes": sum(t.numel() for t in tensors)},
                                    runtime_pb2.ExpertResponse):
            yield message
        await asyncio.sleep(5)  # the caller closes the stream (see swarm.span_server)

    async def source(requests, context: P2PContext):
        caller = context.remote_id.to_base58()
        _, meta = await read_frame(requests)
        index, count = stripe_of(meta)
        if index == 0:
            payload = torch.zeros(int(meta["bytes"]), dtype=torch.uint8)
            messages = list(encode_frame([payload], {"names": ["payload"]}, runtime_pb2.ExpertResponse))
            mailbox.deliver(caller, meta["request_id"], messages, int(meta["bytes"]))
        messages = await mailbox.collect(caller, meta["request_id"], index, count, 60)
        for message in stripe(messages, count, meta["request_id"])[index]:
            yield message
        await asyncio.sleep(5)

    for name, handler in ((SINK, sink), (SOURCE, source)):
        await p2p.add_protobuf_handler(name, handler, runtime_pb2.ExpertRequest, stream_input=True,
                                       stream_output=True)


async def _one_frame(messages):
    for message in messages:
        yield message


def cpu_ceiling_MBps(nbytes: int, repeats: int = 3) -> float:
    """Frame bytes per CPU second of one frame's whole codec path in this process, no network: encode and serialize
    each message (the sender), parse and decode them (the receiver); the median of ``repeats``. Both ends run on
    this machine's cores, so the link cannot be driven faster than this."""
    payload = torch.zeros(nbytes, dtype=torch.uint8)
    seconds = []
    for _ in range(repeats):
        t0 = time.process_time()
        wire = [m.SerializeToString() for m in encode_frame([payload], {"names": ["payload"]})]
        parsed = []
        for data in wire:
            message = runtime_pb2.ExpertRequest()
            message.ParseFromString(data)
            parsed.append(message)
        del wire
        asyncio.run(read_frame(_one_frame(parsed)))
        seconds.append(time.process_time() - t0)
    return nbytes / max(statistics.median(seconds), 1e-6) / 1e6


def summarize(rows: list[dict], link: LinkSpec, cpu: dict[int, float]) -> list[dict]:
    """Median ratio per (bytes, streams, direction), one ``summary`` row per (bytes, streams)."""
    out = []
    for (size, k) in sorted({(r["bytes"], r["streams"]) for r in rows}):
        row = {"summary": True, "bytes": size, "streams": k, "link": str(link),
               "link_MBps": round(link.bandwidth_Bps / 1e6, 2), "cpu_MBps": round(cpu.get(size, 0.0), 1)}
        for direction in ("up", "down"):
            mine = [r for r in rows if (r["bytes"], r["streams"], r["direction"]) == (size, k, direction)]
            if mine:
                row[f"{direction}_ratio"] = round(statistics.median(r["ratio"] for r in mine), 3)
                row[f"{direction}_MBps"] = round(statistics.median(r["MBps"] for r in mine), 2)
        out.append(row)
    return out


def table(summary: list[dict]) -> str:
    """The summary as text: per frame size, up/down ratio per stream count, and the CPU's ceiling."""
    counts = sorted({r["streams"] for r in summary})
    head = f"{'frame':>10} " + " ".join(f"{f'up x{k}':>8} {f'down x{k}':>8}" for k in counts) + \
        f" {'link MB/s':>10} {'CPU MB/s':>9}"
    lines = [head, "(seconds / line time; <= 1.25 is >= 80% of the link)"]
    for size in sorted({r["bytes"] for r in summary}):
        cells = []
        for k in counts:
            row = next((r for r in summary if (r["bytes"], r["streams"]) == (size, k)), {})
            cells.append(f"{row.get('up_ratio', float('nan')):8.3f} {row.get('down_ratio', float('nan')):8.3f}")
        any_row = next(r for r in summary if r["bytes"] == size)
        lines.append(f"{_human(size):>10} " + " ".join(cells) + f" {any_row['link_MBps']:10.1f} "
                     f"{any_row['cpu_MBps']:9.0f}")
    return "\n".join(lines)


def _human(nbytes: int) -> str:
    for unit in ("GB", "MB", "KB"):
        if nbytes >= _UNITS[unit]:
            return f"{nbytes / _UNITS[unit]:g}{unit}"
    return f"{nbytes}B"


def _shaper_bytes(stats_file: Path) -> dict:
    try:
        return json.loads(stats_file.read_text())["bytes"]
    except (OSError, ValueError, KeyError):
        return {}


async def measure(link: LinkSpec, sizes: list[int], workdir: Path, repeats: int = 1,
                  streams: tuple[int, ...] = (1, MAX_STRIPES), stats_period_s: float = 0.2) -> list[dict]:
    """Measure each size in both directions, on one stream and striped over up to each of ``streams``, through a
    shaper subprocess (started and killed here)."""
    node_port, relay_port = free_port(), free_port()
    ready, stats_file = workdir / "relay.json", workdir / "stats.json"
    relay = subprocess.Popen([sys.executable, "-m", "bench.link_shaper", "--route", f"{relay_port}:{node_port}",
                              "--link", str(link), "--ready-file", str(ready), "--stats-file", str(stats_file),
                              "--stats-period", str(stats_period_s)],
                             cwd=REPO)
    server = client = None
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            if relay.poll() is not None or time.monotonic() > deadline:
                raise BenchConfigError("The link shaper did not start.")
            await asyncio.sleep(0.05)
        server = await P2P.create(host_maddrs=[f"/ip4/127.0.0.1/tcp/{node_port}"])
        await _serve(server)
        client = await P2P.create(initial_peers=[f"/ip4/127.0.0.1/tcp/{relay_port}/p2p/{server.peer_id}"])
        peer = server.peer_id.to_base58()
        await call(client, peer, SINK, {"x": torch.zeros(1000, dtype=torch.uint8)}, {}, timeout_s=30)  # connect
        rows = []
        # repeats outermost, so a burst of load from other jobs falls on every size and stream count alike
        for _, size, direction, k in itertools.product(range(repeats), sizes, ("up", "down"), streams):
            await asyncio.sleep(2.5 * stats_period_s)  # the shaper rewrites its counters every period
            before = _shaper_bytes(stats_file)
            t0 = time.perf_counter()
            if direction == "up":
                await call(client, peer, SINK, {"x": torch.zeros(size, dtype=torch.uint8)}, {},
                           timeout_s=600, max_stripes=k)
            else:
                await call(client, peer, SOURCE, {}, {"bytes": size, "request_id": secrets.token_hex(8)},
                           timeout_s=600, pull=k)
            seconds = time.perf_counter() - t0
            await asyncio.sleep(2.5 * stats_period_s)
            after = _shaper_bytes(stats_file)
            key = f"client_{direction}"
            line_s = size / link.bandwidth_Bps + 2 * link.latency_s
            rows.append({"direction": direction, "bytes": size, "streams": k, "seconds": round(seconds, 4),
                         "line_s": round(line_s, 4), "ratio": round(seconds / line_s, 3),
                         "MBps": round(size / seconds / 1e6, 2), "link": str(link),
                         "shaper_bytes": after.get(key, 0) - before.get(key, 0)})
        return rows
    finally:
        for p2p in (client, server):
            if p2p is not None:
                await p2p.shutdown()
        relay.kill()
        relay.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.line_rate", description=__doc__.split("\n")[0])
    parser.add_argument("--link", default="20MB/s,20ms", help="the shaped link, e.g. 20MB/s,20ms")
    parser.add_argument("--sizes", default="100KB,1MB,20MB,100MB", help="comma-separated frame sizes")
    parser.add_argument("--repeats", type=int, default=1, help="calls per size, direction and stream count "
                        "(the summary takes medians)")
    parser.add_argument("--streams", default=f"1,{MAX_STRIPES}",
                        help=f"stream counts to compare, comma-separated (at most {MAX_STRIPES}; default 1,{MAX_STRIPES})")
    parser.add_argument("--out", type=Path, default=None, help="append JSONL here (default: stdout only)")
    parser.add_argument("--check-bytes", default="20MB", help="the frame size the check applies to")
    parser.add_argument("--max-ratio", type=float, default=1.25, help="most seconds / line time at --check-bytes")
    args = parser.parse_args(argv)
    try:
        link = LinkSpec.parse(args.link)
        sizes = [parse_size(s) for s in args.sizes.split(",") if s]
        check = parse_size(args.check_bytes)
        try:
            streams = tuple(int(k) for k in args.streams.split(",") if k)
        except ValueError:
            streams = ()
        if not streams or not all(1 <= k <= MAX_STRIPES for k in streams):
            raise BenchConfigError(f"--streams takes stream counts from 1 to {MAX_STRIPES}, e.g. 1,{MAX_STRIPES}.")
        if link is None or not link.bandwidth_Bps:
            raise BenchConfigError("--link needs a bandwidth, e.g. 20MB/s,20ms.")
    except BenchConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="line-rate-") as workdir:
        rows = asyncio.run(measure(link, sizes, Path(workdir), args.repeats, streams))
    cpu = {size: cpu_ceiling_MBps(size) for size in sizes}
    summary = summarize(rows, link, cpu)
    failed = False
    for row in rows + summary:
        # the check is on the transport as the swarm runs it (striped); one stream is the comparison
        if "summary" in row:
            row["check"] = None
        else:
            row["check"] = None if row["bytes"] != check or row["streams"] == 1 else row["ratio"] <= args.max_ratio
        failed |= row["check"] is False
        print(json.dumps(row), flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    print(table(summary), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
