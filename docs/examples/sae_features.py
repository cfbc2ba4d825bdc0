"""SAE features (nnsight's dictionary-learning tutorial, adapted to SmolLM2-135M): a sparse autoencoder written as an
``nn.Module`` encodes layer 12's output on the node that runs layer 12; the strongest features per position and the
reconstruction error come back, and the reconstruction is spliced into the forward. The SAE's weights (random here,
8×d features, 21 MB) travel once; the next trace names them by content hash.

Run against a swarm:  python docs/examples/sae_features.py /ip4/.../p2p/...   (no address: locally)
"""

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import hybrid

PROMPTS = ["The Eiffel Tower is located in the city of", "Big Ben is located in the city of"]
LAYER = 12


class SparseAutoencoder(nn.Module):
    def __init__(self, d: int, features: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = nn.Parameter(torch.randn(features, d, generator=g) / d ** 0.5)
        self.b_enc = nn.Parameter(torch.zeros(features))
        self.W_dec = nn.Parameter(torch.randn(d, features, generator=g) / features ** 0.5)
        self.b_dec = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        features = F.relu(F.linear(x - self.b_dec, self.W_enc, self.b_enc))
        return F.linear(features, self.W_dec, self.b_dec), features


def run(lm, placement=None, sae=None):
    sae = SparseAutoencoder(lm.config.hidden_size, 8 * lm.config.hidden_size) if sae is None else sae
    with lm.trace(PROMPTS, placement=placement) as tracer:
        h = lm.model.layers[LAYER].output
        recon, features = sae(h)
        top = features[:, -1].topk(5, dim=-1)
        top_ids, top_values = top.indices.save(), top.values.save()
        error = ((recon - h).norm(dim=-1) / h.norm(dim=-1)).save()
        lm.model.layers[LAYER].output = recon
        logits = lm.lm_head.output[:, -1].save()
    return {"top_ids": top_ids, "top_values": top_values, "relative_error": error, "logits": logits,
            "client_bytes_sent": tracer.stats.get("client_bytes_sent")}


if __name__ == "__main__":
    with hybrid.LanguageModel("smollm2-135m", initial_peers=sys.argv[1:]) as lm:
        sae = SparseAutoencoder(lm.config.hidden_size, 8 * lm.config.hidden_size)
        for attempt in range(2):
            result = run(lm, sae=sae)
            print(f"trace {attempt}: sent {result['client_bytes_sent']} bytes; strongest features at the last "
                  f"position {result['top_ids'].tolist()}")
