"""What each of issue 10's attacks costs a node and its other users, side by side in one run.

    python -m bench.node_attacks [--quick] [--model tiny|<checkpoint>] [--out results]

Starts (and always stops) one node serving a whole model (by default a tiny random 4-layer Llama, with the node's
default budgets, as a volunteer runs it), a hostile client that sends raw requests (no client-side checks), and a
well-behaved client that loops over a hybrid forward, a two-trace ``lm.session()`` and a 4-token generation. First
it measures the well-behaved client alone (baseline), then, for each attack, runs the attack over and over for a
window (at least once) while the well-behaved client keeps working, sampling the node's RSS every few ms.

Per attack it records: the attacker's outcomes (typed error codes, results, untyped errors), the node's RSS before
and at its peak, and the well-behaved client's operations in the window (done, failed with which error) and their
worst latency against the baseline's. Prints a table; writes JSONL (one record per attack, config inside) to
``<out>/node_attacks-<time>/node_attacks.jsonl``.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import torch

import hybrid
from bench.attack_requests import ATTACKS, QUICK, Attacker, Sizes, outcome
from bench.results import ResultLog
from swarm.local_swarm import LocalSwarm
from swarm.model import SwarmModel

MiB = 1 << 20


# ---- the well-behaved client ------------------------------------------------------------------------------------

class Polite:
    """A well-behaved user of the node: loops over a hybrid forward, a two-trace session and a generation, and
    records ``(start, kind, seconds, outcome)`` for each."""

    def __init__(self, lm: hybrid.LanguageModel, vocab: int) -> None:
        self.lm = lm
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, vocab, (1, 6), generator=gen)
        self.other = torch.randint(3, vocab, (1, 6), generator=gen)
        self.log: list[tuple[float, str, float, str]] = []
        self._stop = threading.Event()

    def forward(self) -> None:
        with self.lm.trace(self.ids):
            self.lm.model.layers[1].output[:, -1] = self.lm.model.layers[1].output[:, -1] * 2
            self.lm.lm_head.output[:, -1].save()

    def session(self) -> None:
        with self.lm.session():
            with self.lm.trace(self.ids):
                h = self.lm.model.layers[1].output[:, -1]
            with self.lm.trace(self.other):
                self.lm.model.layers[1].output[:, -1] = h
                self.lm.lm_head.output[:, -1].save()

    def generate(self) -> None:
        self.lm.client.generate(self.ids, max_new_tokens=4)

    def round(self) -> None:
        for kind in ("forward", "session", "generate"):
            t0 = time.perf_counter()
            try:
                getattr(self, kind)()
                error = None
            except Exception as e:  # noqa: BLE001 -- recorded as the outcome
                error = e
            self.log.append((time.monotonic(), kind, time.perf_counter() - t0, outcome(error)))

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.round()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=600)


class PeakRss:
    """Samples a process's RSS every ``period_s`` in a thread while in the ``with`` block (once more at its end);
    :attr:`growth` is the peak over the start."""

    def __init__(self, pid: int, period_s: float = 0.002) -> None:
        self.process, self.period_s, self._stop = psutil.Process(pid), period_s, threading.Event()

    def __enter__(self) -> "PeakRss":
        self.start = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.period_s):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.start


def attack_window(name: str, attacker: Attacker, polite: Polite, pid: int, sizes: Sizes) -> dict:
    """Run attack ``name`` again and again for ``sizes.window_s`` (at least once) while ``polite`` works."""
    outcomes: Counter = Counter()
    attack_s = []
    polite.log.clear()
    polite.start()
    with PeakRss(pid) as rss:
        t0 = time.monotonic()
        while not attack_s or time.monotonic() - t0 < sizes.window_s:
            a0 = time.perf_counter()
            try:
                ATTACKS[name](attacker, sizes)
                error = None
            except Exception as e:  # noqa: BLE001 -- recorded as the outcome
                error = e
            attack_s.append(time.perf_counter() - a0)
            outcomes[outcome(error)] += 1
        t1 = time.monotonic()
        polite.stop()  # lets its operation in flight finish: one the attack holds up counts in full
    # the well-behaved operations that overlapped the window (ended after its start, started before its end)
    during = [entry for entry in polite.log if entry[0] >= t0 and entry[0] - entry[2] <= t1]
    attacker.close_sessions()
    return {"attacker": dict(outcomes), "attack_s_max": max(attack_s), "node_rss_before_mb": rss.start / MiB,
            "node_rss_peak_mb": rss.peak / MiB, "polite_done": sum(e[3] == "ok" for e in during),
            "polite_failed": dict(Counter(e[3] for e in during if e[3] != "ok")),
            "polite_worst_s": max((e[2] for e in during), default=None)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller attacks and windows (a smoke run)")
    parser.add_argument("--model", default="tiny", help="'tiny' (a random 4-layer Llama) or a checkpoint name/path")
    parser.add_argument("--attacks", nargs="*", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    log = ResultLog("node_attacks", args)
    with tempfile.TemporaryDirectory() as tmp:
        path = _checkpoint(args.model, Path(tmp))
        (Path(tmp) / "swarm").mkdir()
        with LocalSwarm(Path(tmp) / "swarm") as swarm:
            node = swarm.start(path, "--blocks", f"0:{_layers(path)}")
            lm = hybrid.LanguageModel(str(path), initial_peers=swarm.initial_peers)
            hostile = SwarmModel.from_pretrained(str(path), initial_peers=swarm.initial_peers)
            try:
                polite = Polite(lm, _vocab(path))
                max_length = min(4096, _config(path).max_position_embeddings)  # the node's (ServerLimits)
                attacker = Attacker(hostile, node.peer_id, max_length, _open_batch(path, max_length=max_length))
                polite.round()  # warm-up
                polite.log.clear()
                for _ in range(sizes.baseline_rounds):
                    polite.round()
                baseline = {kind: max(e[2] for e in polite.log if e[1] == kind) for kind in ("forward", "session",
                                                                                             "generate")}
                base_worst = max(baseline.values())
                base_failed = [e[3] for e in polite.log if e[3] != "ok"]
                log("baseline", polite_worst_s=base_worst, polite_failed=len(base_failed), **{
                    f"{k}_s": v for k, v in baseline.items()})
                for name in args.attacks:
                    result = attack_window(name, attacker, polite, node.proc.pid, sizes)
                    log(name, **result, polite_baseline_worst_s=base_worst, node_alive=node.proc.poll() is None)
            finally:
                lm.close()
                hostile.close()
    log.write()
    _table(log.records)
    return log.records


def _checkpoint(model: str, tmp: Path) -> Path:
    if model == "tiny":
        from tests.tiny_checkpoints import make_tiny_checkpoint
        return make_tiny_checkpoint("llama", tmp / "ckpt", num_layers=4)
    from swarm.checkpoint import resolve_checkpoint
    return Path(resolve_checkpoint(model))


def _config(path: Path):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(path)


def _layers(path: Path) -> int:
    return _config(path).num_hidden_layers


def _vocab(path: Path) -> int:
    return _config(path).vocab_size


def _open_batch(path: Path, cache_bytes: int = 1 << 30, opens: int = 9, max_length: int = 4096) -> int:
    """The batch with which one session of ``max_length`` reserves about ``1/opens`` of the node's default KV cache."""
    c = _config(path)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_token = 2 * c.num_key_value_heads * head_dim * 4 * c.num_hidden_layers  # K and V, float32, every layer
    return max(1, cache_bytes // opens // (max_length * per_token))


def _table(records: list[dict]) -> None:
    base = next(r for r in records if r["measurement"] == "baseline")
    print(f"\nbaseline: the well-behaved client's worst operation {base['polite_worst_s']:.2f} s "
          f"(forward {base['forward_s']:.2f}, session {base['session_s']:.2f}, generate {base['generate_s']:.2f})")
    print(f"{'attack':<20} {'attacker got':<34} {'node RSS MB before→peak':>24} {'polite ok/failed':>17} "
          f"{'polite worst s (base)':>22}")
    for r in records:
        if r["measurement"] == "baseline":
            continue
        got = ", ".join(f"{k}×{v}" for k, v in r["attacker"].items())
        failed = sum(r["polite_failed"].values())
        worst = "-" if r["polite_worst_s"] is None else f"{r['polite_worst_s']:.2f}"
        print(f"{r['measurement']:<20} {got[:34]:<34} {r['node_rss_before_mb']:>11.0f} → {r['node_rss_peak_mb']:<10.0f} "
              f"{r['polite_done']:>8}/{failed:<8} {worst:>12} ({r['polite_baseline_worst_s']:.2f})")


if __name__ == "__main__":
    main()
