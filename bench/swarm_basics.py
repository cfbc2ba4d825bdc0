"""The span swarm's basic numbers, measured side by side in one run on loopback (no link shaping).

    python -m bench.swarm_basics [--n 10] [--out results/]

Starts a 3-node SmolLM2-135M swarm (layers 0:10, 10:20, 20:30) plus a replica of 10:20, and measures:
forward latency batch 1 × 16 tokens (swarm vs local, median of n), greedy generation tokens/s (swarm vs local),
the reroute time after SIGKILL of the node serving 10:20 mid-generation, and each node's peak RSS (at readiness
and after serving) against its span's weight bytes. Prints a table and writes one JSONL record per measurement (config, versions, commit inside).
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from swarm.checkpoint import resolve_checkpoint
from swarm.local_swarm import LocalSwarm
from swarm.model import SwarmModel
from swarm.node import peak_rss_bytes

from .results import ResultLog
from .timing import median_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.swarm_basics", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10, help="repetitions per timing (median reported)")
    parser.add_argument("--tokens", type=int, default=16, help="prompt length of the forward timing")
    parser.add_argument("--new-tokens", type=int, default=20, help="tokens generated per generation timing")
    parser.add_argument("--out", type=Path, default=Path("results"), help="directory for the JSONL results")
    args = parser.parse_args(argv)
    record = ResultLog("swarm-basics", args)

    path = resolve_checkpoint("smollm2-135m", progress=True)
    torch.set_num_threads(1)  # each node uses one thread; so does the local reference
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(100, 10000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as workdir, LocalSwarm(Path(workdir)) as swarm:
        nodes = []
        for i, (start, end) in enumerate([(0, 10), (10, 20), (20, 30)]):
            nodes.append(swarm.start(path, "--blocks", f"{start}:{end}", initial_peers=swarm.initial_peers if i else None))
        replica = swarm.start(path, "--blocks", "10:20", initial_peers=swarm.initial_peers)
        with SwarmModel.from_pretrained(str(path), initial_peers=swarm.initial_peers) as model:
            with torch.no_grad():
                local_s = median_s(lambda: local(ids), args.n)
                swarm_s = median_s(lambda: model(ids), args.n)
            record("forward_b1_t%d" % args.tokens, local_ms=local_s * 1e3, swarm_ms=swarm_s * 1e3,
                   swarm_over_local=swarm_s / local_s)

            local.generation_config.eos_token_id = None
            with torch.no_grad():
                local_g = median_s(lambda: local.generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                                                           pad_token_id=0), max(3, args.n // 3))
            swarm_g = median_s(lambda: model.generate(ids, max_new_tokens=args.new_tokens, eos_token_id=None), max(3, args.n // 3))
            record("generate_tokens_per_s", local=args.new_tokens / local_g, swarm=args.new_tokens / swarm_g,
                   local_over_swarm=swarm_g / local_g)

            for node in nodes:  # after serving forwards and generations, before any kill
                peak = peak_rss_bytes(node.proc.pid)
                record("node_memory", span=f"{node.info['start']}:{node.info['end']}",
                       rss_before_load_mb=node.info["rss_before_load_bytes"] / 1e6, peak_rss_mb=peak / 1e6,
                       peak_minus_base_mb=(peak - node.info["rss_before_load_bytes"]) / 1e6,
                       weight_mb=node.info["weight_bytes"] / 1e6)
            want = model.generate(ids, max_new_tokens=args.new_tokens, eos_token_id=None)
            middle = {n.peer_id: n for n in (nodes[1], replica)}

            def kill_middle(step, tokens):
                if step == args.new_tokens // 2:
                    [peer] = [h.peer_id for h in model.active_session.route if h.peer_id in middle]
                    middle[peer].kill(signal.SIGKILL)

            before = len(model.sequence.stats.reroute_s)
            got = model.generate(ids, max_new_tokens=args.new_tokens, eos_token_id=None, on_token=kill_middle)
            reroute = model.sequence.stats.reroute_s[before:]
            record("reroute_after_kill", reroute_s=reroute[0] if reroute else float("nan"),
                   identical_tokens=bool(torch.equal(got, want)))
    record.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
