"""What spot checks cost: hop-by-hop forwards with ``verify`` = 0, 0.1 and 1.0, side by side in one run (loopback).

    python -m bench.verify_overhead [--n 10] [--out results/]

Starts SmolLM2-135M on two spans (0:15, 15:30) with two replicas each (4 nodes; a check needs another node serving
the hop's layers), and three clients that differ only in ``ClientConfig.verify``. Measures the median forward
latency, batch 1 × 16 tokens, of each, interleaved round by round so load drifts hit all three alike, and checks that
every result equals the unverified one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from swarm.checkpoint import resolve_checkpoint
from swarm.local_swarm import LocalSwarm
from swarm.model import SwarmModel
from swarm.remote_sequence import ClientConfig

from .results import ResultLog

FRACTIONS = (0.0, 0.1, 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.verify_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10, help="forwards per client (median reported)")
    parser.add_argument("--tokens", type=int, default=16, help="prompt length")
    parser.add_argument("--out", type=Path, default=Path("results"), help="directory for the JSONL results")
    args = parser.parse_args(argv)
    record = ResultLog("verify-overhead", args)
    path = resolve_checkpoint("smollm2-135m", progress=True)
    torch.set_num_threads(1)
    ids = torch.randint(100, 10000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as workdir, LocalSwarm(Path(workdir)) as swarm:
        for i, span in enumerate(["0:15", "0:15", "15:30", "15:30"]):
            swarm.start(path, "--blocks", span, initial_peers=swarm.initial_peers if i else None)
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
                median = statistics.median(times[f])
                record("forward_b1_verify", verify=f, median_ms=median * 1e3, over_unverified=median / base,
                       checks=stats.verify_checks, mismatches=stats.verify_mismatches, skipped=stats.verify_skipped)
        finally:
            for client in clients:
                client.close()
    record.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
