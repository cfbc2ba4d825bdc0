"""Steering (nnsight tutorial, adapted to SmolLM2-135M): add a direction to the residual stream on every generated
step. The direction is the difference of one layer's last-position state between two contrasting prompts, computed in
the first trace of a session and used by the generation without leaving the nodes.

Run against a swarm:  python docs/examples/steering.py /ip4/.../p2p/...   (no address: locally)
"""

import sys

import hybrid

LAYER, SCALE = 6, 2.0
PROMPT = "My favourite city is"


def run(lm, placement=None, max_new_tokens=4):
    with lm.session():
        with lm.trace(["I love it, it is wonderful", "I hate it, it is terrible"], placement=placement):
            h = lm.model.layers[LAYER].output[:, -1]
            direction = h[0] - h[1]
        with lm.generate(PROMPT, max_new_tokens=max_new_tokens, placement=placement) as tracer:
            for step in tracer.iter[:max_new_tokens]:
                lm.model.layers[LAYER].output[:, -1] += SCALE * direction
            steered = tracer.result.save()
    with lm.generate(PROMPT, max_new_tokens=max_new_tokens, placement=placement) as tracer:
        plain = tracer.result.save()
    return {"steered": steered, "plain": plain}


if __name__ == "__main__":
    with hybrid.LanguageModel("smollm2-135m", initial_peers=sys.argv[1:]) as lm:
        result = run(lm)
        print("plain:  ", lm.tokenizer.decode(result["plain"][0]))
        print("steered:", lm.tokenizer.decode(result["steered"][0]))
