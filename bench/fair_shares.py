"""Fair shares on a node (issue 10, req. 4): a second client's success and latency under the issue's attacks.

    python -m bench.fair_shares [--rounds 5] [--out results]

Starts (and always stops) one node per attack (a tiny random Llama, layers 0:4, low budgets) and, for each attack,
a well-behaved *victim* client measuring its own requests, while the node's RSS is sampled:

- ``kv_reserve``: the attacker opens 9 one-token sessions with ``max_length=256``; the victim then generates 20 tokens
  (batch 2) ``--rounds`` times;
- ``store_evict``: between the two traces of each of the victim's ``lm.session()`` runs, the attacker keeps 60 values
  (15 sessions × 4, 123 KB each) in the node's 2 MiB session store;
- ``queue_flood``: the attacker sends 6 long inference steps at once (250 one-token chunks each); the victim then sends
  one small forward. Records how many flood requests were admitted, and whether the victim finished first;
- ``long_requests``: the same with a queue wide enough to admit all 6 (``--max-queued-compute 8``, and 8 per client):
  isolates preemption at layer boundaries (without it the victim waits behind every admitted flood request).

The flags a node does not know (an older checkout, to measure *before*) are left out, so the same script measures
both. Writes one JSONL record per attack with the resolved config inside.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import torch

import hybrid
from swarm import SwarmModel
from swarm.handles import FORWARD, INFERENCE
from swarm.local_swarm import LocalSwarm
from swarm.span_hook import HookBudgets
from swarm.span_server import ServerLimits
from swarm.transport import call
from tests.tiny_checkpoints import make_tiny_checkpoint

HIDDEN, LAYERS, TOKEN_BYTES = 64, 4, 1024
KNOWN = {f.name for f in dataclasses.fields(ServerLimits)} | {f.name for f in dataclasses.fields(HookBudgets)}


def flags(**limits) -> list[str]:
    """CLI flags for the limits this checkout's node knows."""
    return [a for k, v in limits.items() if k in KNOWN for a in ("--" + k.replace("_", "-"), str(v))]


class PeakRss:
    def __init__(self, pid: int):
        self.processes = [psutil.Process(pid)]
        self.peak, self._stop = 0, threading.Event()

    def _rss(self) -> int:
        try:
            return self.processes[0].memory_info().rss
        except psutil.Error:
            return 0

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def timed(fn):
    t0 = time.perf_counter()
    try:
        fn()
        return True, time.perf_counter() - t0, None
    except Exception as e:  # the measurement: which typed error the victim got
        return False, time.perf_counter() - t0, f"{type(e).__name__}: {str(e)[:160]}"


def kv_reserve(swarm: LocalSwarm, path: Path, rounds: int) -> dict:
    node = swarm.start(path, "--blocks", f"0:{LAYERS}", *flags(max_cache_bytes=9 * TOKEN_BYTES * 256 + 40_000,
                                                               max_client_cache_bytes=65536))
    attacker = SwarmModel.from_pretrained(str(path), initial_peers=swarm.initial_peers)
    victim = SwarmModel.from_pretrained(str(path), initial_peers=swarm.initial_peers)
    try:
        async def attack():
            for _ in range(9):
                meta = {"session_id": uuid.uuid4().hex, "start": 0, "end": LAYERS,
                        "open": {"max_length": 256, "batch_size": 1}}
                await call(attacker.sequence.p2p, node.peer_id, INFERENCE, {"inputs": torch.randn(1, 1, HIDDEN)}, meta,
                           timeout_s=30)
        with PeakRss(node.proc.pid) as rss:
            attack_error = timed(lambda: attacker.loop.run(attack(), timeout_s=60))[2]
            prompt = torch.randint(3, 128, (2, 7))
            runs = [timed(lambda: victim.generate(prompt, max_new_tokens=20, eos_token_id=None)) for _ in range(rounds)]
        return summary(runs, rss, attack_error=attack_error)
    finally:
        attacker.close()
        victim.close()


def store_evict(swarm: LocalSwarm, path: Path, rounds: int) -> dict:
    node = swarm.start(path, "--blocks", f"0:{LAYERS}", *flags(max_store_mb=2, max_client_store_mb=1))
    victim = hybrid.LanguageModel(str(path), initial_peers=swarm.initial_peers)
    attacker = hybrid.LanguageModel(str(path), initial_peers=swarm.initial_peers)
    try:
        def attack():
            for seed in range(15):
                ids = torch.randint(3, 128, (8, 60), generator=torch.Generator().manual_seed(seed))
                with attacker.session():
                    with attacker.trace(ids):
                        hs = [attacker.model.layers[i].output for i in range(LAYERS)]
                    with attacker.trace(ids):
                        for i in range(LAYERS):
                            attacker.model.layers[i].output = hs[i]
                        attacker.lm_head.output[:, -1].argmax(-1).save()

        def victim_session():
            with victim.session() as session:
                with victim.trace(torch.tensor([[5, 17, 33, 9, 60, 2, 41]])):
                    h = victim.model.layers[1].output[:, -1]
                with victim.trace(torch.tensor([[7, 8, 99, 14, 3, 77, 21]])):
                    victim.model.layers[1].output[:, -1] = h
                    victim.lm_head.output[:, -1].softmax(-1).save()
                tracer, placement, run = session._pending[1]
                session._pending[1] = (tracer, placement, lambda links: (attack(), run(links))[1])
        with PeakRss(node.proc.pid) as rss:
            runs = [timed(victim_session) for _ in range(rounds)]
        return summary(runs, rss)
    finally:
        victim.close()
        attacker.close()


def queue_flood(swarm: LocalSwarm, path: Path, rounds: int, *, queue: int = 4, per_client: int = 2) -> dict:
    node = swarm.start(path, "--blocks", f"0:{LAYERS}", *flags(max_queued_compute=queue,
                                                               max_client_queued_compute=per_client))
    attacker = SwarmModel.from_pretrained(str(path), initial_peers=swarm.initial_peers)
    victim = SwarmModel.from_pretrained(str(path), initial_peers=swarm.initial_peers)
    ids = torch.randint(3, 128, (1, 9))
    try:
        async def one_round():
            finished, session_ids = [], [uuid.uuid4().hex for _ in range(6)]

            async def flood_one(i):
                meta = {"session_id": session_ids[i], "start": 0, "end": LAYERS, "chunks": [1] * 250,
                        "open": {"max_length": 256, "batch_size": 1}}
                try:
                    return await call(attacker.sequence.p2p, node.peer_id, INFERENCE,
                                      {"inputs": torch.randn(1, 250, HIDDEN)}, meta, timeout_s=120)
                finally:
                    finished.append(i)
            t_flood = time.perf_counter()
            flood = [asyncio.ensure_future(flood_one(i)) for i in range(6)]
            await asyncio.sleep(0.2)
            t0 = time.perf_counter()
            try:
                await call(victim.sequence.p2p, node.peer_id, FORWARD, {"inputs": ids},
                           {"start": 0, "end": LAYERS, "embed": True, "head": True}, timeout_s=120)
                error = None
            except Exception as e:
                error = f"{type(e).__name__}: {str(e)[:160]}"
            latency_s = time.perf_counter() - t0
            finished.append("victim")
            results = await asyncio.gather(*flood, return_exceptions=True)
            flood_s = time.perf_counter() - t_flood
            for sid in session_ids:  # each round starts clean (else the per-client session bound soon refuses)
                await call(attacker.sequence.p2p, node.peer_id, INFERENCE, {}, {"session_id": sid, "close": True},
                           timeout_s=30)
            admitted = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
            first = next((x for x in finished if x == "victim" or x in admitted), None)
            return {"ok": error is None, "latency_s": latency_s, "error": error, "flood_admitted": len(admitted),
                    "flood_s": flood_s, "victim_served_before_flood": error is None and first == "victim",
                    "flood_errors": sorted({f"{type(r).__name__}: {str(r)[:100]}" for r in results
                                            if isinstance(r, BaseException)})}
        with PeakRss(node.proc.pid) as rss:
            runs = [victim.loop.run(one_round(), timeout_s=300) for _ in range(rounds)]
        return {"per_round": runs, "rounds": len(runs), "victim_ok": sum(r["ok"] for r in runs),
                "flood_admitted": [r["flood_admitted"] for r in runs],
                "victim_served_before_flood": sum(r["victim_served_before_flood"] for r in runs),
                "victim_worst_latency_s": max(r["latency_s"] for r in runs), "node_peak_rss_mb": rss.peak / 2**20}
    finally:
        attacker.close()
        victim.close()


def summary(runs, rss: PeakRss, **extra) -> dict:
    errors = sorted({e for ok, _, e in runs if not ok})
    return {"victim_ok": sum(ok for ok, _, _ in runs), "rounds": len(runs),
            "victim_worst_latency_s": max(t for _, t, _ in runs), "victim_errors": errors,
            "node_peak_rss_mb": rss.peak / 2**20, **extra}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--attacks", nargs="*", default=None, help="run only these (default: all)")
    parser.add_argument("--label", default="", help="a name for this checkout in the records (e.g. before/after)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint("llama", Path(tmp) / "ckpt", num_layers=LAYERS)
        attacks = (("kv_reserve", kv_reserve), ("store_evict", store_evict), ("queue_flood", queue_flood),
                   ("long_requests", lambda *a: queue_flood(*a, queue=8, per_client=8)))
        for name, attack in attacks:
            if args.attacks and name not in args.attacks:
                continue
            workdir = Path(tmp) / name
            workdir.mkdir()
            with LocalSwarm(workdir) as swarm:
                result = attack(swarm, path, args.rounds)
            record = {"bench": "fair_shares", "attack": name, "label": args.label, **result,
                      "config": {"rounds": args.rounds, "node_flags_known": sorted(KNOWN)}}
            print(json.dumps({k: v for k, v in record.items() if k not in ("config", "per_round")}))
            with open(args.out / "fair_shares.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
