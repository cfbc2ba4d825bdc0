"""``make demo``: a local 3-node swarm on the embedded SmolLM2-135M: the route, a generation through it, and one
interpretability experiment (IOI activation patching, batch 32) run pushed to the nodes (``hybrid``) and
Petals-style (``swarm``), with the bytes each moved over the client's link.

    python -m bench.demo [--prompt TEXT] [--max-new-tokens N] [--nodes N]

Every node is a real ``swarm-node serve`` process on 127.0.0.1; all of them are stopped when the demo ends.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from hybrid import LanguageModel
from swarm.checkpoint import load_config, resolve_checkpoint
from swarm.local_swarm import LocalSwarm
from swarm.model import SwarmModel

from .ioi import ioi_batch, patch_and_measure


def _spans(num_layers: int, nodes: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_layers / nodes) for i in range(nodes + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias or local checkpoint directory")
    parser.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--nodes", type=int, default=3, help="how many span nodes to start")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    print(f"Preparing {args.model} ...", flush=True)
    path = resolve_checkpoint(args.model, progress=True)
    num_layers = load_config(path).num_hidden_layers
    with tempfile.TemporaryDirectory(prefix="swarm-demo-") as workdir, LocalSwarm(Path(workdir)) as swarm:
        for i, (start, end) in enumerate(_spans(num_layers, args.nodes)):
            t0 = time.perf_counter()
            node = swarm.start(path, "--blocks", f"{start}:{end}", initial_peers=swarm.initial_peers if i else None)
            print(f"node {i}: layers {start}:{end} ready in {time.perf_counter() - t0:.1f} s  "
                  f"(pid {node.info['pid']}, {node.info['weight_bytes'] / 1e6:.0f} MB weights)", flush=True)
        print("initial peers: " + " ".join(swarm.initial_peers))
        with SwarmModel.from_pretrained(str(path), initial_peers=swarm.initial_peers) as model:
            tokenizer = model.tokenizer
            print("route:")
            print("  " + str(model.route()).replace("\n", "\n  "))
            ids = tokenizer(args.prompt, return_tensors="pt").input_ids
            logits = model(ids).logits
            top = torch.topk(logits[0, -1].softmax(-1), 3)
            print("next-token top 3: " + ", ".join(f"{tokenizer.decode(int(i))!r} {p:.2f}"
                                                  for p, i in zip(top.values, top.indices)))
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.max_new_tokens)   # stops at the end of the answer
            elapsed = time.perf_counter() - t0
            new = out.shape[1] - ids.shape[1]
            print(f"generated ({new} tokens, {new / elapsed:.1f} tokens/s):")
            print("  " + args.prompt + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        with LanguageModel(str(path), initial_peers=swarm.initial_peers) as lm:
            batch = ioi_batch(lm.tokenizer, pairs=16)
            layer = 6
            print(f"IOI activation patching (batch {len(batch.prompts)}, layer {layer} output at the second subject):")
            results = {}
            for placement in ("swarm", "hybrid"):
                diff, stats = patch_and_measure(lm, batch, layer, placement=placement)
                moved = stats["client_bytes_sent"] + stats["client_bytes_received"]
                results[placement] = (diff, moved)
                print(f"  {placement:<7} mean logit diff {diff.mean():+.3f}   client link {moved / 1e6:8.3f} MB   "
                      f"round trips {stats['round_trips']:>2}   {stats['wall_s']:.2f} s")
            same = torch.equal(results["swarm"][0], results["hybrid"][0])
            print(f"  identical results: {same}; hybrid moved {results['swarm'][1] / results['hybrid'][1]:.0f}x "
                  f"fewer bytes over the client's link")
    print("all nodes stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
