"""A busy node keeps answering pings (issue 10, req. 3): ping latency while one request's huge graph is decoded.

    python -m bench.node_event_loop [--ops 800000] [--out results]

Starts (and always stops) one node (a tiny random Llama, layers 0:4) and sends it two hybrid requests in turn, while
a second task pings the node's ``info`` RPC every 50 ms: ``huge_json``, a graph of ``--ops`` constant ops (800,000
≈ 60 MB of JSON; refused before parsing, over the node's ``max_ops × JSON_BYTES_PER_OP``), and ``chain``, a graph of
``--chain-ops`` tensor ops the node runs (in its compute executor). Writes one JSONL record per request: the request's wall time and error, and the pings
answered during it (count, median and worst round trip), with the resolved config inside.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import struct
import tempfile
import time
from pathlib import Path

import torch

from hybrid.request import HOOK_KIND, HOOK_VERSION
from swarm import SwarmModel
from swarm.handles import FORWARD
from swarm.local_swarm import LocalSwarm
from swarm.transport import call, ping
from hybrid.ir import IR_VERSION, Graph, Limits, Ref
from hybrid.planner import Executor, Plan
from hybrid.ir import MAGIC as GRAPH_MAGIC
from hybrid.request import MAGIC, encode_request
from tests.tiny_checkpoints import make_tiny_checkpoint


def huge_graph_payload(num_ops: int) -> bytes:
    """A hybrid request (span hook payload) whose graph has ``num_ops`` constant ops, built as text (building the
    Nodes would take long); a node decodes all of it before refusing it for its op count."""
    nodes = ",".join('{"id":%d,"op":"operator","target":"add","args":[1,[2,3,{"a":[4]}]]}' % i
                     for i in range(num_ops))
    text = ('{"version":%d,"limits":%s,"nodes":[%s]}' % (IR_VERSION, json.dumps(Limits().to_json()), nodes)).encode()
    graph = GRAPH_MAGIC + struct.pack("<IQ", IR_VERSION, len(text)) + text
    plan = json.dumps({"executors": [["node", 0, 4]], "assignment": [0] * num_ops, "carry": [[]],
                       "hop_offset": 0}).encode()
    return MAGIC + struct.pack("<Q", len(plan)) + plan + graph


def chain_graph_payload(num_ops: int) -> bytes:
    """A hybrid request whose graph is ``num_ops`` constant tensor ops in a chain (``ones_like`` then ``+ 1.0``), all
    run by the node while it builds the request's hook (within the default op limit of 10,000: accepted)."""
    graph = Graph()
    prev = graph.add("function", target="torch.ones_like", args=[graph.attach(torch.zeros(64, 64))])
    for _ in range(num_ops - 1):
        prev = graph.add("operator", target="add", args=[Ref(prev.id), 1.0])
    return encode_request(graph, Plan([Executor("node", 0, 4)], [0] * len(graph.nodes), [[]], []), 0)


async def _measure(p2p, peer_id: str, payload: bytes) -> dict:
    tensors = {"inputs": torch.randn(1, 3, 64), "hook_payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    meta = {"start": 0, "end": 4, "hook": {"kind": HOOK_KIND, "version": HOOK_VERSION}, "hop": 0}
    await ping(p2p, peer_id)
    t0 = time.perf_counter()
    heavy = asyncio.ensure_future(call(p2p, peer_id, FORWARD, tensors, meta, timeout_s=600))
    rtts, misses = [], 0
    while not heavy.done():
        try:
            rtt, _ = await ping(p2p, peer_id, timeout_s=30)
            rtts.append(rtt)
        except Exception:
            misses += 1
        await asyncio.sleep(0.05)
    try:
        await heavy
        error = None
    except Exception as e:
        error = f"{type(e).__name__}: {str(e)[:120]}"
    return {"request_s": time.perf_counter() - t0, "error": error, "pings_answered": len(rtts), "pings_missed": misses,
            "ping_median_s": statistics.median(rtts) if rtts else None, "ping_max_s": max(rtts) if rtts else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=800_000, help="ops of the huge graph (800,000 ≈ 60 MB of JSON)")
    parser.add_argument("--chain-ops", type=int, default=9_000, help="ops of the accepted chain graph")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    payloads = {"huge_json": huge_graph_payload(args.ops), "chain": chain_graph_payload(args.chain_ops)}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint("llama", Path(tmp) / "ckpt", num_layers=4)
        (Path(tmp) / "swarm").mkdir()
        with LocalSwarm(Path(tmp) / "swarm") as swarm:
            node = swarm.start(path, "--blocks", "0:4")
            client = SwarmModel.from_pretrained(str(path), initial_peers=swarm.initial_peers)
            try:
                results = {name: client.loop.run(_measure(client.sequence.p2p, node.peer_id, payload), timeout_s=900)
                           for name, payload in payloads.items()}
            finally:
                client.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, result in results.items():
        record = {"bench": "node_event_loop", "graph": name,
                  "config": {"ops": args.ops, "chain_ops": args.chain_ops, "payload_bytes": len(payloads[name])},
                  **result}
        with open(out / "node_event_loop.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record))


if __name__ == "__main__":
    main()
