"""The logit lens (nnsight tutorial, adapted to SmolLM2-135M): decode every layer's residual stream with the final norm
and the unembedding, and watch the answer form. Each layer's lens runs where the norm and head weights are; only the
top token and its probability per layer come back.

Run against a swarm:  python docs/examples/logit_lens.py /ip4/.../p2p/...   (no address: locally)
"""

import sys

import hybrid

PROMPT = "The Eiffel Tower is located in the city of"


def run(lm, placement=None, layers=None):
    layers = range(lm.config.num_hidden_layers) if layers is None else layers
    with lm.trace(PROMPT, placement=placement):
        probs, tokens = hybrid.save([]), hybrid.save([])
        for layer in layers:
            p = lm.lm_head(lm.model.norm(lm.model.layers[layer].output))[:, -1].softmax(-1)
            top = p.max(-1)
            probs.append(top.values)
            tokens.append(top.indices)
        final = lm.lm_head.output[:, -1].softmax(-1).max(-1).values.save()
    return {"probs": probs, "tokens": tokens, "final": final}


if __name__ == "__main__":
    with hybrid.LanguageModel("smollm2-135m", initial_peers=sys.argv[1:]) as lm:
        result = run(lm)
        for layer, (p, t) in enumerate(zip(result["probs"], result["tokens"])):
            print(f"layer {layer:2d}: {lm.tokenizer.decode(t)!r:>12} {p.item():.2f}")
