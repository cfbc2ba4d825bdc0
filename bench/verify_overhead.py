"""What spot checks cost and how fast they catch a faulty node (issue 13), on SmolLM2-135M over loopback.

    python -m bench.verify_overhead [--n 10] [--pairs 4] [--trials 5] [--out results/]

1. Overhead: SmolLM2-135M on two spans (0:15, 15:30) with two replicas each (4 nodes; a check needs another node
   serving the hop's layers). Three clients differing only in ``ClientConfig.verify`` (0, 0.1, 1.0) run, interleaved
   round by round so load drifts hit all three alike, (a) a hop-by-hop forward, batch 1 x 16 tokens, and (b) a
   hybrid IOI activation-patching trace (``bench.ioi.patch_and_measure``, layer 8, ``--pairs`` clean/corrupted
   pairs; a chained forward whose checks re-run the whole chain). Median and mean latency per client (with a few
   checks in many rounds the median hides them; the mean is the expected cost), and every result must equal the
   unverified one.
2. Detection: three faulty nodes join on 15:30 (the test-only fault injection of ``swarm/cli.py``: noise of std
   1e-2 on every output, on batch row 1 only, on every 5th forward only). For each fault, ``--trials`` fresh clients
   with ``verify=0.2`` (the OS CSPRNG draw) are steered to the faulty node, batch 2 x 16 tokens, and count the
   requests until they exclude it. The derived bounds (escape probability < 1e-4): 42 requests for a node wrong on
   every answer (0.8^n), 210 for one wrong on every 5th (0.8^floor(n/5)).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import hybrid
from swarm.checkpoint import resolve_checkpoint
from swarm.local_swarm import LocalSwarm
from swarm.model import SwarmModel
from swarm.remote_sequence import ClientConfig

from .ioi import ioi_batch, patch_and_measure
from .results import ResultLog

FRACTIONS = (0.0, 0.1, 1.0)
NOISE = {"SWARM_TEST_OUTPUT_NOISE": "1e-2"}
FAULTS = {"all_outputs": NOISE, "one_row": {**NOISE, "SWARM_TEST_NOISE_ROW": "1"},
          "every_5th": {**NOISE, "SWARM_TEST_NOISE_EVERY": "5"}}
DETECT_P = 0.2
_ROUNDS = math.ceil(math.log(1e-4) / math.log(1 - DETECT_P))
BOUND = {"all_outputs": _ROUNDS, "one_row": _ROUNDS, "every_5th": 5 * _ROUNDS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.verify_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10, help="rounds per client (median reported)")
    parser.add_argument("--tokens", type=int, default=16, help="prompt length of the forwards")
    parser.add_argument("--pairs", type=int, default=4, help="IOI clean/corrupted pairs per trace")
    parser.add_argument("--trials", type=int, default=5, help="fresh clients per fault kind (detection)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="directory for the JSONL results")
    args = parser.parse_args(argv)
    record = ResultLog("verify-overhead", args)
    path = resolve_checkpoint("smollm2-135m", progress=True)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as workdir, LocalSwarm(Path(workdir)) as swarm:
        for i, span in enumerate(["0:15", "0:15", "15:30", "15:30"]):
            swarm.start(path, "--blocks", span, initial_peers=swarm.initial_peers if i else None)
        overhead_forward(record, path, swarm, args)
        overhead_ioi(record, path, swarm, args)
        faulty = {kind: swarm.start(path, "--blocks", "15:30", initial_peers=swarm.initial_peers, env=env).peer_id
                  for kind, env in FAULTS.items()}
        detection(record, path, swarm, faulty, args)
    record.write()
    return 0


def overhead_forward(record: ResultLog, path: Path, swarm: LocalSwarm, args) -> None:
    ids = torch.randint(100, 10000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    clients = [SwarmModel.from_pretrained(str(path), initial_peers=swarm.initial_peers,
                                          client_config=ClientConfig(verify=f)) for f in FRACTIONS]
    try:
        times: dict[float, list[float]] = {f: [] for f in FRACTIONS}
        with torch.no_grad():
            want = clients[0](ids).logits
            for client in clients:
                client(ids)  # warm-up: connections, pings
            for _ in range(args.n):
                for f, client in zip(FRACTIONS, clients):
                    t0 = time.perf_counter()
                    got = client(ids).logits
                    times[f].append(time.perf_counter() - t0)
                    if not torch.allclose(got, want, atol=1e-5, rtol=0):
                        raise AssertionError(f"verify={f} changed the result")
        base = statistics.median(times[0.0])
        for f, client in zip(FRACTIONS, clients):
            stats = client.sequence.stats
            median, mean = statistics.median(times[f]), statistics.fmean(times[f])
            record("forward_b1_verify", verify=f, median_ms=median * 1e3, over_unverified=median / base,
                   mean_ms=mean * 1e3, mean_over_unverified=mean / statistics.fmean(times[0.0]),
                   checks=stats.verify_checks, mismatches=stats.verify_mismatches, skipped=stats.verify_skipped,
                   hops=2 * (args.n + 1 + (f == 0.0)), verify_calls=client.sequence.verify_traffic.calls)
    finally:
        for client in clients:
            client.close()


def overhead_ioi(record: ResultLog, path: Path, swarm: LocalSwarm, args) -> None:
    lms = [hybrid.LanguageModel(str(path), initial_peers=swarm.initial_peers, client_config=ClientConfig(verify=f))
           for f in FRACTIONS]
    try:
        batch = ioi_batch(lms[0].tokenizer, pairs=args.pairs)
        times: dict[float, list[float]] = {f: [] for f in FRACTIONS}
        totals = {f: {"verify_checks": 0, "verify_mismatches": 0, "verify_skipped": 0, "verify_bytes": 0,
                      "client_bytes": 0, "round_trips": 0} for f in FRACTIONS}
        want, _ = patch_and_measure(lms[0], batch, 8, placement="hybrid")
        for lm in lms:
            patch_and_measure(lm, batch, 8, placement="hybrid")  # warm-up
        for _ in range(args.n):
            for f, lm in zip(FRACTIONS, lms):
                t0 = time.perf_counter()
                got, stats = patch_and_measure(lm, batch, 8, placement="hybrid")
                times[f].append(time.perf_counter() - t0)
                if not torch.allclose(got, want, atol=1e-4, rtol=0):
                    raise AssertionError(f"verify={f} changed the IOI result")
                for key in ("verify_checks", "verify_mismatches", "verify_skipped", "verify_bytes", "round_trips"):
                    totals[f][key] += stats[key]
                totals[f]["client_bytes"] += stats["client_bytes_sent"] + stats["client_bytes_received"]
        base = statistics.median(times[0.0])
        for f in FRACTIONS:
            median, mean = statistics.median(times[f]), statistics.fmean(times[f])
            record("ioi_patching_verify", verify=f, pairs=args.pairs, median_ms=median * 1e3,
                   over_unverified=median / base, mean_ms=mean * 1e3,
                   mean_over_unverified=mean / statistics.fmean(times[0.0]), hops=2 * args.n, **totals[f])
    finally:
        for lm in lms:
            lm.close()


def detection(record: ResultLog, path: Path, swarm: LocalSwarm, faulty: dict[str, str], args) -> None:
    ids = torch.randint(100, 10000, (2, args.tokens), generator=torch.Generator().manual_seed(1))
    for kind, target in faulty.items():
        counts = []
        for _ in range(args.trials):
            # suspect_weight=0: each trial ignores the earlier trials' suspect reports, so it can be steered to the node
            client = SwarmModel.from_pretrained(str(path), initial_peers=swarm.initial_peers,
                                                client_config=ClientConfig(verify=DETECT_P, suspect_weight=0.0))
            try:
                steer(client, target, set(faulty.values()) - {target})
                requests = 0
                with torch.no_grad():
                    while not client.sequence.stats.suspects and requests < 3 * BOUND[kind]:
                        client(ids)
                        requests += 1
                if client.sequence.stats.suspects != [target]:
                    raise AssertionError(f"{kind}: not excluded after {requests} requests")
                counts.append(requests)
            finally:
                client.close()
        record("requests_until_excluded", fault=kind, verify=DETECT_P, trials=len(counts),
               median=statistics.median(counts), max=max(counts), bound=BOUND[kind], counts=counts)


def steer(client: SwarmModel, peer_id: str, shun: set[str]) -> None:
    """Make ``peer_id`` the cheapest node for ``client`` and ``shun`` the dearest (so no other faulty node checks),
    through the client's per-node route jitter (as the tests do)."""
    client.route()
    jitter = client.sequence._jitter
    for peer in jitter:
        jitter[peer] = 1.0 if peer == peer_id else 50.0 if peer in shun else 5.0
    if peer_id not in [h.peer_id for h in client.route()]:
        raise AssertionError("could not steer the client to the faulty node")


if __name__ == "__main__":
    sys.exit(main())
