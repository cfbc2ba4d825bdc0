"""Hybrid vs swarm placement on one 3-node SmolLM2 swarm, side by side in one run on loopback (no link shaping).

    python -m bench.hybrid_basics [--n 5] [--out results/]

Measures (median of n after a warm-up): IOI activation patching, batch 32 (client-link bytes, round trips, wall
time, swarm / hybrid ratios, identical results), and the overhead of a hybrid trace over a plain forward with no
intervention (same batch; the trace saves only the last position's argmax), and steered generation (a vector added at
the patched layer's last position on every step) swarm vs hybrid. Writes one JSONL record each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from hybrid import LanguageModel
from swarm.checkpoint import resolve_checkpoint
from swarm.local_swarm import LocalSwarm

from .ioi import ioi_batch, patch_and_measure
from .results import ResultLog
from .timing import median_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hybrid_basics", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5, help="repetitions per timing (median reported)")
    parser.add_argument("--layer", type=int, default=6, help="layer patched in the IOI experiment")
    parser.add_argument("--gen-batch", type=int, default=8, help="prompts in the steered generation")
    parser.add_argument("--gen-tokens", type=int, default=16, help="new tokens in the steered generation")
    parser.add_argument("--out", type=Path, default=Path("results"), help="directory for the JSONL results")
    args = parser.parse_args(argv)
    record = ResultLog("hybrid-basics", args)

    path = resolve_checkpoint("smollm2-135m", progress=True)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as workdir, LocalSwarm(Path(workdir)) as swarm:
        for i, (start, end) in enumerate([(0, 10), (10, 20), (20, 30)]):
            swarm.start(path, "--blocks", f"{start}:{end}", initial_peers=swarm.initial_peers if i else None)
        with LanguageModel(str(path), initial_peers=swarm.initial_peers) as lm:
            batch = ioi_batch(lm.tokenizer, pairs=16)
            runs: dict[str, list] = {"swarm": [], "hybrid": []}
            for placement in runs:
                patch_and_measure(lm, batch, args.layer, placement=placement)  # warm-up
                for _ in range(args.n):
                    runs[placement].append(patch_and_measure(lm, batch, args.layer, placement=placement))
            summary = {}
            for placement, results in runs.items():
                stats = results[-1][1]
                summary[placement] = {"bytes": stats["client_bytes_sent"] + stats["client_bytes_received"],
                                      "wall_s": statistics.median(r[1]["wall_s"] for r in results),
                                      "round_trips": stats["round_trips"], "node_bytes": stats["node_bytes"]}
                record(f"ioi_patching_{placement}", batch=len(batch.prompts), **summary[placement])
            same = all(torch.equal(a[0], b[0]) for a, b in zip(runs["swarm"], runs["hybrid"]))
            record("ioi_swarm_over_hybrid", bytes_ratio=summary["swarm"]["bytes"] / summary["hybrid"]["bytes"],
                   time_ratio=summary["swarm"]["wall_s"] / summary["hybrid"]["wall_s"], identical=same)

            ids, mask = lm.tokenize(batch.prompts)

            def plain():
                lm.client(ids, attention_mask=mask)

            def traced():
                with lm.trace(batch.prompts, placement="hybrid"):
                    lm.lm_head.output[:, -1].argmax(-1).save()

            timings = {"plain_forward": median_s(plain, args.n), "hybrid_trace": median_s(traced, args.n)}
            record("hybrid_overhead", plain_forward_s=timings["plain_forward"], hybrid_trace_s=timings["hybrid_trace"],
                   ratio=timings["hybrid_trace"] / timings["plain_forward"])

            # Steered generation: a vector added at one layer's last position on every step, per-step top token.
            steer = torch.randn(lm.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 4
            prompts = batch.prompts[:args.gen_batch]

            def steered(placement: str):
                with lm.generate(prompts, max_new_tokens=args.gen_tokens, eos_token_id=None,
                                 placement=placement) as tracer:
                    for _ in tracer.iter[:args.gen_tokens]:
                        lm.model.layers[args.layer].output[:, -1] += steer
                    ids = tracer.result.save()
                return ids, tracer.stats

            gen: dict[str, list] = {"swarm": [], "hybrid": []}
            gen_summary = {}
            for placement in gen:
                steered(placement)  # warm-up
                gen[placement] = [steered(placement) for _ in range(args.n)]
                stats = gen[placement][-1][1]
                gen_summary[placement] = {"bytes": stats["client_bytes_sent"] + stats["client_bytes_received"],
                                          "round_trips": stats["round_trips"],
                                          "wall_s": statistics.median(r[1]["wall_s"] for r in gen[placement])}
                record(f"steered_generation_{placement}", batch=len(prompts), new_tokens=args.gen_tokens,
                       **gen_summary[placement])
            same = all(torch.equal(a[0], b[0]) for a, b in zip(gen["swarm"], gen["hybrid"]))
            record("steered_generation_swarm_over_hybrid",
                   bytes_ratio=gen_summary["swarm"]["bytes"] / gen_summary["hybrid"]["bytes"],
                   time_ratio=gen_summary["swarm"]["wall_s"] / gen_summary["hybrid"]["wall_s"], identical=same)
    record.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
