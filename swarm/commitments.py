"""Commitments: each answer carries a short fingerprint of what the node computed, bound to the request and the node.

In the spirit of TOPLOC, a node hashes a deterministic summary of its span's output: for every batch row, the
indices of the :data:`TOP_K` largest magnitudes at the last position and those values rounded to bfloat16, with the
request id the client chose and the node's own peer id. A chained forward returns one commitment per hop, in route
order. A client (or a later audit) that recomputes a hop's output recomputes the same digest; an answer the node
gave cannot later be disowned for another, and a digest made for one request or one node does not fit another.
The libp2p connection authenticates who sent it; commitments are not (yet) signed for third parties.
"""

from __future__ import annotations

import hashlib

import torch

from .errors import BadRequestError

VERSION = b"swarm-commit-v1"
TOP_K = 16
MAX_REQUEST_ID = 64


def fingerprint(output: torch.Tensor, request_id: str, peer_id: str) -> str:
    """The digest (32 hex chars) of ``output`` (``(B, T, D)``, or any tensor whose last dim is features)."""
    digest = hashlib.sha256(VERSION + b"|" + request_id.encode() + b"|" + peer_id.encode() + b"|")
    if output.numel():
        last = output.detach().reshape(-1, output.shape[-2] if output.ndim >= 2 else 1, output.shape[-1])[:, -1]
        last = last.float().cpu()
        k = min(TOP_K, last.shape[-1])
        index = last.abs().topk(k, dim=-1, sorted=True).indices.sort(dim=-1).values  # (B, k), order-free
        values = last.gather(-1, index).to(torch.bfloat16).view(torch.int16)
        digest.update(index.to(torch.int64).numpy().tobytes() + values.numpy().tobytes())
    digest.update(repr(tuple(output.shape)).encode())
    return digest.hexdigest()[:32]


def request_id_of(meta: dict) -> str:
    """The request id a client put in ``meta`` (``""`` when absent). Raises BadRequestError when malformed."""
    value = meta.get("request_id", "")
    if not isinstance(value, str) or len(value) > MAX_REQUEST_ID:
        raise BadRequestError(f"meta['request_id'] must be a string of at most {MAX_REQUEST_ID} characters.")
    return value


def parse(value, max_items: int) -> list[dict]:
    """Commitments relayed by the next hop, checked field by field (anything else is dropped, never trusted)."""
    if not isinstance(value, list):
        return []
    kept = []
    for item in value[:max_items]:
        if isinstance(item, dict) and all(isinstance(item.get(k), str) and len(item[k]) <= 128
                                          for k in ("peer", "request_id", "digest")):
            kept.append({k: item[k] for k in ("peer", "request_id", "digest")})
    return kept
