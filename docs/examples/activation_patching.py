"""Activation patching (nnsight tutorial, adapted to SmolLM2-135M): which layers carry the indirect object?

Two prompts differ only in who gives the drink; the answer flips between " Mary" and " John". Each patched run takes
the corrupted prompt and replaces one layer's output (all positions) with the clean prompt's; how far the logit
difference moves back towards the clean run says how much that layer carries. One trace, one invoke per run: the
clean invoke's layer outputs are used by the patched invokes (they never leave the nodes in ``hybrid``).

Run against a swarm:  python docs/examples/activation_patching.py /ip4/.../p2p/...   (no address: the model locally)
"""

import sys

import hybrid

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
LAYERS = (0, 8, 16, 24)


def run(lm, placement=None, layers=LAYERS):
    mary, john = lm.tokenizer(" Mary").input_ids[-1], lm.tokenizer(" John").input_ids[-1]
    with lm.trace(placement=placement) as tracer:
        with tracer.invoke(CLEAN):
            clean = [lm.model.layers[layer].output for layer in layers]
            logits = lm.lm_head.output[:, -1]
            clean_diff = (logits[:, mary] - logits[:, john]).save()
        with tracer.invoke(CORRUPT):
            logits = lm.lm_head.output[:, -1]
            corrupt_diff = (logits[:, mary] - logits[:, john]).save()
        patched = hybrid.save([])
        for layer, h in zip(layers, clean):
            with tracer.invoke(CORRUPT):
                lm.model.layers[layer].output = h
                logits = lm.lm_head.output[:, -1]
                patched.append(logits[:, mary] - logits[:, john])
    recovered = [((p - corrupt_diff) / (clean_diff - corrupt_diff)).item() for p in patched]
    return {"clean": clean_diff, "corrupt": corrupt_diff, "patched": patched, "recovered": recovered}


if __name__ == "__main__":
    with hybrid.LanguageModel("smollm2-135m", initial_peers=sys.argv[1:]) as lm:
        result = run(lm)
    print(f"logit diff Mary - John: clean {result['clean'].item():.2f}, corrupt {result['corrupt'].item():.2f}")
    for layer, share in zip(LAYERS, result["recovered"]):
        print(f"patching layer {layer:2d} recovers {share:6.1%} of the clean logit difference")
