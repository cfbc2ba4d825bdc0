"""A Petals client worker (run inside the Petals venv): the same JSON-lines protocol as :mod:`bench.worker`.

    .petals-venv/bin/python -m bench.petals_worker SPEC_JSON

The embedding, final norm and LM head run here; the layers run on the Petals servers through
``model.model.layers`` (a ``RemoteSequential``). Interventions are done the way the NDIF paper did with Petals:
pull the hidden state at the layer (``layers[:l + 1]``), modify it locally, send it back (``layers[l + 1:]``).
Inputs come precomputed in the spec (``inputs.ids``; the venv's tokenizers cannot read our tokenizer files).
Bytes and round trips are not instrumented in Petals: those record fields stay null.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

from bench.petals_shim import install

SUPPORTED = ("remote_inference", "patching", "ioi_patching")


def main() -> int:
    spec = json.loads(sys.argv[1])
    install()
    import torch
    torch.set_num_threads(int(spec.get("threads", 1)))
    from petals import AutoDistributedModelForCausalLM

    experiment = spec["experiment"]["experiment"]
    if experiment not in SUPPORTED:
        raise SystemExit(f"petals worker: experiment {experiment!r} is not implemented for Petals "
                         f"(supported: {', '.join(SUPPORTED)})")
    inputs = spec["inputs"]
    ids = torch.tensor(inputs["ids"])
    layer = int(inputs["layer"])
    t0 = time.perf_counter()
    model = AutoDistributedModelForCausalLM.from_pretrained(spec["model"], initial_peers=spec["initial_peers"],
                                                            dht_prefix=spec["dht_prefix"], torch_dtype=torch.float32)
    model.eval()
    layers = model.model.layers

    def head(hidden):
        return model.lm_head(model.model.norm(hidden))

    def remote_inference():
        logits = head(layers(model.model.embed_tokens(ids)))[:, -1]
        return {"argmax": logits.argmax(-1).tolist()}

    def patching():
        n = ids.shape[0] // 2
        h = layers[: layer + 1](model.model.embed_tokens(ids))       # pull the hidden state after `layer`
        h[n:, -1, :] = h[:n, -1, :]                                   # patch locally
        logits = head(layers[layer + 1:](h))[n:, -1]                  # send it back through the rest
        return {"layer": layer, "argmax": logits.argmax(-1).tolist()}

    def ioi_patching():
        n, pos = ids.shape[0] // 2, int(inputs["s2_position"])
        h = layers[: layer + 1](model.model.embed_tokens(ids))
        h[n:, pos, :] = h[:n, pos, :]
        last = head(layers[layer + 1:](h))[n:, -1]
        pick = torch.stack([torch.tensor(inputs["io_tokens"]), torch.tensor(inputs["s_tokens"])], dim=1)
        pair = last.gather(1, pick)
        return {"layer": layer, "logit_diff_mean": float((pair[:, 0] - pair[:, 1]).mean())}

    run = {"remote_inference": remote_inference, "patching": patching, "ioi_patching": ioi_patching}[experiment]
    setup_s = time.perf_counter() - t0
    print(json.dumps({"event": "ready", "load_s": None, "setup_s": setup_s, "batch": int(ids.shape[0]),
                      "seq_len": int(ids.shape[1])}), flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            continue
        t_start, start = time.time(), time.perf_counter()
        try:
            with torch.no_grad():
                extra = run()
            result = {"ok": True, "error": None, "stats": {}, "extra": extra}
        except Exception as e:  # a failed repetition is a result
            traceback.print_exc(file=sys.stderr)
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000], "stats": {}, "extra": {}}
        print(json.dumps({"event": "rep", "wall_s": time.perf_counter() - start, "t_start": t_start,
                          "t_end": time.time(), **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
