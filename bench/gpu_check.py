"""Nodes on a GPU: exactness against plain transformers on the same device, and timings, side by side in one run.

    python -m bench.gpu_check [--device cuda] [--dtypes float32,bfloat16] [--n 5] [--out results/]

Starts a 3-node swarm of ``swarm-node serve --device DEVICE --dtype DTYPE`` on 127.0.0.1 over a random-weight
checkpoint of SmolLM2-135M's shape (30 layers, d=576, 9 query / 3 KV heads, vocab 49152; weights at unit-ish
scale so activations and logits are O(1), which makes the differences meaningful; no hub access needed), and a
reference ``LlamaForCausalLM`` of the same checkpoint on the same device and dtype. For each placement (hybrid,
swarm) it compares with the reference:

- a trace saving three layers' outputs and the last position's logits (max abs difference),
- activation patching (layer L's last position zeroed; logits after it),
- a gradient (d logit / d layer output) pushed to the nodes vs autograd,
- greedy generation (tokens equal),

and times a plain forward, a hybrid trace, a swarm trace and the reference forward (median of n after a warm-up).
Writes one JSONL record per measurement. Allowed differences: fp32 1e-5 absolute on O(1) values, bf16/fp16 a few
units in the last place of the reference's magnitude (reported, not asserted: this is a check, not a test).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from .results import ResultLog
from .synthetic import write_tokenizer

SHAPE = dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, vocab_size=49152,
             num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
             rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
             bos_token_id=1, eos_token_id=2, pad_token_id=2)
"""SmolLM2-135M's shape (its config.json), with random weights."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def random_checkpoint(path: Path, layers: int, seed: int = 0) -> Path:
    """Save a Llama of :data:`SHAPE` (``layers`` deep) with unit-ish random weights and a word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**SHAPE, "num_hidden_layers": layers})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name:
                p.normal_(0.0, 1.0 / math.sqrt(config.hidden_size))
            elif p.ndim == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
            else:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(str(path))
    write_tokenizer(path, config.vocab_size)
    return path


def prompts(batch: int, length: int, vocab: int, seed: int = 1) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"t{int(i)}" for i in torch.randint(3, vocab, (length,), generator=g)) for _ in range(batch)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, n: int, device: str) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float().cpu() - b.detach().float().cpu()).abs().max().item()


class Reference:
    """The checkpoint in plain transformers on ``device``: layer outputs through forward hooks, autograd for grads."""

    def __init__(self, path: Path, device: str, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
        self.path, self.dtype = path, dtype

    def attention_and_lens(self, ids, mask, layer: int, lens_layers) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s attention weights (eager attention, ``output_attentions``) and the logit lens
        (final norm + head on each of ``lens_layers``' outputs, last position): ``(weights, (L, B, V) logits)``."""
        from transformers import AutoModelForCausalLM

        eager = AutoModelForCausalLM.from_pretrained(str(self.path), dtype=self.dtype,
                                                     attn_implementation="eager").to(self.device).eval()
        outputs = {}  # layer outputs through hooks (output_hidden_states' last entry is after the final norm)
        handles = [eager.model.layers[i].register_forward_hook(
            lambda m, a, o, i=i: outputs.__setitem__(i, o[0] if isinstance(o, tuple) else o)) for i in lens_layers]
        with torch.no_grad():
            out = eager(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), output_attentions=True)
            lens = torch.stack([eager.lm_head(eager.model.norm(outputs[i]))[:, -1] for i in lens_layers])
        for h in handles:
            h.remove()
        weights = out.attentions[layer]
        del eager
        return weights, lens

    def run(self, ids, mask, save_layers=(), zero_layer: int | None = None, grad_layer: int | None = None,
            metric_tokens: tuple[int, int] | None = None):
        saved, handles = {}, []
        layers = self.model.model.layers

        def hook(i):
            def fn(module, args, output):
                h = output[0] if isinstance(output, tuple) else output
                if i == zero_layer:
                    h = h.clone()
                    h[:, -1] = 0
                if i == grad_layer:
                    h.retain_grad()
                saved[i] = h
                return (h, *output[1:]) if isinstance(output, tuple) else h
            return fn

        for i in {*save_layers, *(x for x in (zero_layer, grad_layer) if x is not None)}:
            handles.append(layers[i].register_forward_hook(hook(i)))
        try:
            with torch.set_grad_enabled(grad_layer is not None):
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                grad = None
                if grad_layer is not None:
                    a, b = metric_tokens
                    (logits[:, -1, a] - logits[:, -1, b]).sum().backward()
                    grad = saved[grad_layer].grad
        finally:
            for h in handles:
                h.remove()
        return {i: saved[i].detach() for i in save_layers}, logits.detach(), grad


def check_dtype(args, path: Path, dtype_name: str, record: ResultLog) -> None:
    from hybrid import LanguageModel
    from swarm.local_swarm import LocalSwarm

    dtype = DTYPES[dtype_name]
    n_layers = args.layers
    spans = [(i * n_layers // 3, (i + 1) * n_layers // 3) for i in range(3)]
    save_layers = (0, n_layers // 2, n_layers - 1)
    patch_layer, grad_layer = n_layers // 3 + 1, n_layers // 2
    texts = prompts(args.batch, args.length, SHAPE["vocab_size"])
    ref = Reference(path, args.device, dtype)
    with tempfile.TemporaryDirectory() as workdir, LocalSwarm(Path(workdir)) as swarm:
        t0 = time.perf_counter()
        for i, (start, end) in enumerate(spans):
            swarm.start(path, "--blocks", f"{start}:{end}", "--device", args.device, "--dtype", dtype_name,
                        initial_peers=swarm.initial_peers if i else None)
        record(f"{dtype_name}/startup", nodes=len(spans), seconds=time.perf_counter() - t0)
        try:
            with LanguageModel(str(path), initial_peers=swarm.initial_peers, dtype=dtype) as lm:
                ids, mask = lm.tokenize(texts)
                a, b = int(ids[0, -1]), int(ids[0, -2])
                ref_saved, ref_logits, _ = ref.run(ids, mask, save_layers)
                _, ref_patched, _ = ref.run(ids, mask, zero_layer=patch_layer)
                _, _, ref_grad = ref.run(ids, mask, grad_layer=grad_layer, metric_tokens=(a, b))
                lens_layers = list(range(0, n_layers, max(1, n_layers // 6)))
                ref_attn, ref_lens = ref.attention_and_lens(ids, mask, patch_layer, lens_layers)
                for placement in args.placements.split(","):
                    section(record, f"{dtype_name}/{placement}", lambda: exactness(
                        lm, placement, texts, save_layers, patch_layer, grad_layer, (a, b),
                        ref_saved, ref_logits, ref_patched, ref_grad, record, f"{dtype_name}/{placement}"))
                    if placement == "swarm":
                        continue  # Petals-style reaches layer boundaries only (a typed refusal, tested elsewhere)
                    section(record, f"{dtype_name}/{placement}/attention", lambda: attention_and_lens(
                        lm, placement, texts, patch_layer, lens_layers, ref_attn, ref_lens, record,
                        f"{dtype_name}/{placement}"))
                section(record, f"{dtype_name}/generation", lambda: generation(
                    lm, ref, texts[:args.gen_batch], ids[:args.gen_batch], mask[:args.gen_batch], args, record,
                    dtype_name))
                section(record, f"{dtype_name}/timing", lambda: timings(
                    lm, ref, texts, ids, mask, args, record, dtype_name))
        except Exception:
            for node in swarm.nodes:
                print(f"--- {node.log_path.name} (tail)\n{node.log()[-3000:]}", flush=True)
            raise


def section(record: ResultLog, name: str, fn) -> None:
    """Run one part; a failure is recorded with its traceback and the run goes on to the next part."""
    try:
        fn()
    except Exception as e:  # a check reports every part it could run
        traceback.print_exc()
        record(f"{name}/failed", error=f"{type(e).__name__}: {e}"[:400])


def exactness(lm, placement, texts, save_layers, patch_layer, grad_layer, tokens, ref_saved, ref_logits,
              ref_patched, ref_grad, record, name) -> None:
    with lm.trace(texts, placement=placement) as tracer:
        saves = [lm.model.layers[i].output.save() for i in save_layers]
        logits = lm.lm_head.output[:, -1].save()
    diffs = {f"layer{i}": maxdiff(s, ref_saved[i]) for i, s in zip(save_layers, saves)}
    record(f"{name}/saves", logits_diff=maxdiff(logits, ref_logits[:, -1]),
           logits_absmax=ref_logits[:, -1].abs().max().item(), **diffs,
           client_bytes=tracer.stats["client_bytes_sent"] + tracer.stats["client_bytes_received"])
    with lm.trace(texts, placement=placement):
        lm.model.layers[patch_layer].output[:, -1] = 0
        patched = lm.lm_head.output[:, -1].save()
    record(f"{name}/patching", logits_diff=maxdiff(patched, ref_patched[:, -1]))
    a, b = tokens
    with lm.trace(texts, placement=placement):
        h = lm.model.layers[grad_layer].output
        h.requires_grad_(True)
        out = lm.lm_head.output[:, -1]
        metric = (out[:, a] - out[:, b]).sum()
        with metric.backward():
            grad = h.grad.save()
    record(f"{name}/gradient", grad_diff=maxdiff(grad, ref_grad), grad_absmax=ref_grad.abs().max().item())


def attention_and_lens(lm, placement, texts, layer, lens_layers, ref_attn, ref_lens, record, name) -> None:
    import hybrid

    with lm.trace(texts, placement=placement):
        weights = lm.model.layers[layer].self_attn.output[1].save()
    with lm.trace(texts, placement=placement) as tracer:
        lens = hybrid.save([lm.lm_head(lm.model.norm(lm.model.layers[i].output))[:, -1] for i in lens_layers])
    record(f"{name}/attention", weights_diff=maxdiff(weights, ref_attn),
           lens_diff=maxdiff(torch.stack(list(lens)), ref_lens), lens_absmax=ref_lens.abs().max().item(),
           lens_client_bytes=tracer.stats["client_bytes_sent"] + tracer.stats["client_bytes_received"])


def generation(lm, ref, texts, ids, mask, args, record, dtype_name) -> None:
    expected = ref.model.generate(input_ids=ids.to(ref.device), attention_mask=mask.to(ref.device),
                                  max_new_tokens=args.gen_tokens, do_sample=False, eos_token_id=None,
                                  pad_token_id=SHAPE["pad_token_id"])[:, ids.shape[1]:].cpu()
    for placement in args.placements.split(","):
        with lm.generate(texts, max_new_tokens=args.gen_tokens, eos_token_id=None, placement=placement) as tracer:
            result = tracer.result.save()
        got = result[:, -args.gen_tokens:].cpu()
        first = (got != expected).any(0).nonzero()
        record(f"{dtype_name}/{placement}/generation", tokens_equal=bool(torch.equal(got, expected)),
               first_differing_step=int(first[0]) if len(first) else None, new_tokens=args.gen_tokens)


def timings(lm, ref, texts, ids, mask, args, record, dtype_name) -> None:
    def reference():
        with torch.no_grad():
            ref.model(input_ids=ids.to(ref.device), attention_mask=mask.to(ref.device))

    def plain():
        lm.client(ids, attention_mask=mask)

    def trace(placement):
        def fn():
            with lm.trace(texts, placement=placement):
                lm.model.layers[args.layers // 2].output[:, -1].save()
                lm.lm_head.output[:, -1].argmax(-1).save()
        return fn

    found = {"reference_forward": timed(reference, args.n, args.device), "plain_forward": timed(plain, args.n, "cpu")}
    for placement in args.placements.split(","):
        found[f"{placement}_trace"] = timed(trace(placement), args.n, "cpu")
    record(f"{dtype_name}/timing", batch=len(texts), length=args.length,
           **{f"{k}_s": v for k, v in found.items()},
           **{f"{k}_over_reference": v / found["reference_forward"] for k, v in found.items()
              if k != "reference_forward"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="where the nodes and the reference run (cuda, cuda:N, cpu)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16, float16")
    parser.add_argument("--placements", default="hybrid,swarm",
                        help="comma-separated, of hybrid and swarm (the check's swarm has 3 nodes: no centralized)")
    parser.add_argument("--layers", type=int, default=30, help="model depth (SmolLM2-135M has 30)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per trace")
    parser.add_argument("--length", type=int, default=128, help="tokens per prompt")
    parser.add_argument("--gen-batch", type=int, default=4, help="prompts in the greedy generation")
    parser.add_argument("--gen-tokens", type=int, default=16, help="new tokens in the greedy generation")
    parser.add_argument("--n", type=int, default=5, help="repetitions per timing (median reported)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="directory for the JSONL results")
    args = parser.parse_args(argv)
    unknown = set(args.placements.split(",")) - {"hybrid", "swarm"}
    if unknown:
        parser.error(f"--placements: {', '.join(sorted(unknown))} cannot run on the check's 3-node swarm; "
                     "use hybrid and/or swarm")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here")
    record = ResultLog("gpu-check", args)
    if args.device.startswith("cuda"):
        record("device", name=torch.cuda.get_device_name(), torch=torch.__version__,
               tf32=torch.backends.cuda.matmul.allow_tf32)
    with tempfile.TemporaryDirectory() as tmp:
        path = random_checkpoint(Path(tmp) / "smollm2-shape", args.layers)
        for dtype_name in args.dtypes.split(","):
            section(record, dtype_name, lambda: check_dtype(args, path, dtype_name, record))
            record.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
