"""The bench experiments on a tiny local model: steering generation equals a hook-based reference."""

from __future__ import annotations

import torch
import transformers

from bench.workloads import Experiment, ExperimentConfig


def _reference_steering(model_dir, ids, layer, vector, new_tokens):
    """Greedy decoding with a KV cache, ``vector`` added to ``layer``'s output at the last position of every step."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[:, -1] += vector
        return output

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        cache, step_ids, out = transformers.DynamicCache(), ids, []
        with torch.no_grad():
            for _ in range(new_tokens):
                logits = model(step_ids, past_key_values=cache, use_cache=True).logits
                step_ids = logits[:, -1].argmax(-1, keepdim=True)
                out.append(step_ids)
    finally:
        handle.remove()
    return torch.cat(out, dim=1)


def test_steering_generation_matches_hooks(tiny_checkpoint_factory):
    from hybrid import LanguageModel

    model_dir = tiny_checkpoint_factory("llama")
    config = ExperimentConfig("steering_generation", batch=2, seq_len=6, new_tokens=4, steering_scale=8.0)
    with LanguageModel(model_dir) as lm:
        experiment = Experiment(lm, config)
        stats, extra = experiment.run("local")
        expected = _reference_steering(model_dir, experiment.ids, experiment.layer, experiment.steering, 4)
    assert extra["new_tokens"] == 4 and extra["layer"] == experiment.layer
    assert extra["tokens"] == expected.tolist()
    assert stats["client_bytes_sent"] == 0
