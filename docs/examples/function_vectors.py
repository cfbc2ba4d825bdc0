"""Function vectors (nnsight tutorial, adapted to SmolLM2-135M): the mean last-position state of one layer over
in-context examples of a task (antonyms) is a "function vector"; added to a zero-shot prompt at that layer, it moves
the prediction towards the task's answer. The mean stays on the node that computed it (a session).

Run against a swarm:  python docs/examples/function_vectors.py /ip4/.../p2p/...   (no address: locally)
"""

import sys

import hybrid

LAYER = 12
ICL = ["hot: cold\nbig: small\nup:", "fast: slow\nold: new\ndark:", "wet: dry\nhigh: low\nfull:"]
ZERO_SHOT = "yes:"
ANSWER = " no"


def run(lm, placement=None):
    answer = lm.tokenizer(ANSWER).input_ids[-1]
    with lm.session():
        with lm.trace(ICL, placement=placement):
            vector = lm.model.layers[LAYER].output[:, -1].mean(0)
            size = vector.norm().save()
        with lm.trace(ZERO_SHOT, placement=placement):
            lm.model.layers[LAYER].output[:, -1] += vector
            patched = lm.lm_head.output[:, -1].softmax(-1)[:, answer].save()
        with lm.trace(ZERO_SHOT, placement=placement):
            plain = lm.lm_head.output[:, -1].softmax(-1)[:, answer].save()
    return {"plain": plain, "patched": patched, "vector_norm": size}


if __name__ == "__main__":
    with hybrid.LanguageModel("smollm2-135m", initial_peers=sys.argv[1:]) as lm:
        result = run(lm)
    print(f"p({ANSWER!r}) zero-shot {result['plain'].item():.3f}, with the function vector "
          f"{result['patched'].item():.3f}")
