"""Attribution patching (nnsight tutorial, adapted to SmolLM2-135M): a gradient estimate of activation patching.

For each layer, ``(clean - corrupt) · d metric / d activation`` at each position estimates how much patching that
activation would move the metric, from one forward and one backward on the corrupted prompt plus one forward on the
clean prompt, instead of one forward per patch. The clean activations stay on the nodes (a session); the backward
runs on the nodes too; only the per-position attributions come back.

Run against a swarm:  python docs/examples/attribution_patching.py /ip4/.../p2p/...   (no address: locally)
"""

import sys

import hybrid

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
LAYERS = (4, 12, 20)


def run(lm, placement=None, layers=LAYERS):
    mary, john = lm.tokenizer(" Mary").input_ids[-1], lm.tokenizer(" John").input_ids[-1]
    with lm.session():
        with lm.trace(CLEAN, placement=placement):
            clean = [lm.model.layers[layer].output for layer in layers]
        with lm.trace(CORRUPT, placement=placement):
            acts = []
            for layer in layers:
                h = lm.model.layers[layer].output
                h.requires_grad_(True)
                acts.append(h)
            logits = lm.lm_head.output[:, -1]
            metric = (logits[:, mary] - logits[:, john]).sum()
            attributions = hybrid.save([])
            with metric.backward():
                for h, c in reversed(list(zip(acts, clean))):       # gradients arrive from the last layer down
                    attributions.insert(0, ((c - h) * h.grad).sum(-1)[0])
            value = metric.save()
    return {"metric": value.detach(), "attributions": attributions}


if __name__ == "__main__":
    with hybrid.LanguageModel("smollm2-135m", initial_peers=sys.argv[1:]) as lm:
        result = run(lm)
    print(f"corrupted logit diff Mary - John: {result['metric'].item():.2f}")
    for layer, a in zip(LAYERS, result["attributions"]):
        print(f"layer {layer:2d}: estimated effect per position {[round(x, 2) for x in a.tolist()]}")
