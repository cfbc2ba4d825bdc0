"""Peak node memory during a gradient trace vs a plain trace, on a 3-node SmolLM2 swarm on loopback.

    python -m bench.backward_memory [--n 3] [--out results/]

Starts SmolLM2-135M on three nodes (layers 0:10, 10:20, 20:30) and runs the IOI attribution-patching program
(:func:`bench.ioi.attribution_patching`, batch 32, ``hybrid``: forward of clean + corrupted rows with autograd kept
on every node, then the backward chained back) and the same program without its backward (every layer's output
read, ``clean − corrupt`` summed over features and saved: the same forward work, ``no_grad``). Before each trace
every node's peak-RSS counter is reset (``/proc/<pid>/clear_refs``, ``5``); after it, ``VmHWM − VmRSS before`` is that
trace's peak growth on that node. Prints a table and writes one JSONL record per node and mode (``bench.results``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from swarm.checkpoint import resolve_checkpoint
from swarm.local_swarm import LocalSwarm

from .ioi import attribution_patching, ioi_batch
from .results import ResultLog


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/{pid}/status")


def reset_peak(pid: int) -> int:
    """Reset the process's peak RSS to its current RSS; returns the current RSS in bytes."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status_kb(pid, "VmRSS") * 1024


def peak_bytes(pid: int) -> int:
    return _status_kb(pid, "VmHWM") * 1024


def forward_only(lm, batch, *, placement: str):
    """The attribution program's forward without its backward: the same reads, ``(n, T)`` per layer saved."""
    import hybrid

    n = len(batch.io_tokens)
    pick = torch.stack([batch.io_tokens, batch.s_tokens], dim=1)
    with lm.trace(batch.prompts, placement=placement) as tracer:
        sums = []
        for layer in range(lm.config.num_hidden_layers):
            h = lm.model.layers[layer].output
            sums.append(hybrid.save((h[:n] - h[n:]).sum(-1)))
        pair = lm.lm_head.output[n:, -1, :].gather(1, pick)
        hybrid.save((pair[:, 0] - pair[:, 1]).sum())
    return sums, tracer.stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backward_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=3, help="traces per mode (the largest peak is reported)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="directory for the JSONL results")
    args = parser.parse_args(argv)
    record = ResultLog("backward-memory", args)
    import hybrid

    path = resolve_checkpoint("smollm2-135m", progress=True)
    torch.set_num_threads(1)
    modes = {"forward": forward_only, "gradient": attribution_patching}
    with tempfile.TemporaryDirectory() as workdir, LocalSwarm(Path(workdir)) as swarm:
        nodes = [swarm.start(path, "--blocks", f"{a}:{b}", initial_peers=swarm.initial_peers if i else None)
                 for i, (a, b) in enumerate([(0, 10), (10, 20), (20, 30)])]
        with hybrid.LanguageModel(str(path), initial_peers=swarm.initial_peers) as lm:
            batch = ioi_batch(lm.tokenizer, pairs=16)
            modes["forward"](lm, batch, placement="hybrid")           # warm-up: first-use allocations
            growth = {(mode, i): 0 for mode in modes for i in range(len(nodes))}
            base = {}
            for _ in range(args.n):
                for mode, run in modes.items():                      # interleaved, so drift hits both alike
                    before = {i: reset_peak(node.proc.pid) for i, node in enumerate(nodes)}
                    run(lm, batch, placement="hybrid")
                    for i, node in enumerate(nodes):
                        growth[mode, i] = max(growth[mode, i], peak_bytes(node.proc.pid) - before[i])
                        base[i] = before[i]
            for i, node in enumerate(nodes):
                span = f"{node.info['start']}:{node.info['end']}"
                fwd, grad = growth["forward", i], growth["gradient", i]
                record("node_peak_rss_growth", span=span, batch=len(batch.prompts), seq_len=lm.tokenize(
                       batch.prompts)[0].shape[1], rss_before_mb=base[i] / 1e6, forward_mb=fwd / 1e6,
                       gradient_mb=grad / 1e6, gradient_minus_forward_mb=(grad - fwd) / 1e6)
    record.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
