"""Commitments: each answer carries a short fingerprint of what the node computed, bound to the request and the node.

In the spirit of TOPLOC, a node hashes a deterministic summary of its span's output: for every batch row, the
indices of the :data:`TOP_K` largest magnitudes at the last position and those values rounded to bfloat16, with the
request id the client chose and the node's own peer id. A chained forward returns one commitment per hop, in route
order. A client (or a later audit) that recomputes a hop's output recomputes the same digest; an answer the node
gave cannot later be disowned for another, and a digest made for one request or one node does not fit another.
The libp2p connection authenticates who sent it to the client; for third parties a node also signs each
commitment with its identity key (:func:`commit`, :func:`signature_valid`): anyone holding the node's public key
(its DHT record's ``[owner:...]`` marker, whose peer id libp2p derives from the key) can check that this node, and
no other, committed to this digest for this request.
"""

from __future__ import annotations

import hashlib

import torch
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from .errors import BadRequestError
from .identity import peer_id_of

VERSION = b"swarm-commit-v1"
SIGNED = b"swarm-commit-sig-v1"
"""Domain prefix of what a node signs: its signature over a commitment can be taken for nothing else."""
TOP_K = 16
MAX_REQUEST_ID = 64
MAX_SIGNATURE = 1024
"""Characters of a relayed signature (base64 of an RSA-2048 signature: 344; larger keys up to 6144 bits)."""


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


def commit(output: torch.Tensor, request_id: str, peer_id: str, signer: RSAPrivateKey | None = None) -> dict:
    """The commitment a node attaches to its answer: ``peer``, ``request_id``, ``digest``, and with ``signer`` (the
    node's identity key) a ``signature`` over them."""
    commitment = {"peer": peer_id, "request_id": request_id, "digest": fingerprint(output, request_id, peer_id)}
    if signer is not None:
        commitment["signature"] = signer.sign(_signed_bytes(commitment)).decode()
    return commitment


def signature_valid(commitment: dict, public_key: bytes) -> bool:
    """Whether ``commitment`` was signed by the node whose OpenSSH-format ``public_key`` is given, and that key is
    the one its ``peer`` id names (libp2p derives RSA peer ids from the key). False for any change to the digest,
    request id or peer, for a missing or malformed signature, and for another node's key."""
    signature = commitment.get("signature")
    if not isinstance(signature, str):
        return False
    try:
        if peer_id_of(public_key) != commitment["peer"]:
            return False
        return RSAPublicKey.from_bytes(public_key).verify(_signed_bytes(commitment), signature.encode())
    except (ValueError, TypeError, KeyError):
        return False


def _signed_bytes(commitment: dict) -> bytes:
    return b"|".join([SIGNED, *(str(commitment[k]).encode() for k in ("peer", "request_id", "digest"))])


def request_id_of(meta: dict) -> str:
    """The request id a client put in ``meta`` (``""`` when absent). Raises BadRequestError when malformed."""
    value = meta.get("request_id", "")
    if not isinstance(value, str) or len(value) > MAX_REQUEST_ID:
        raise BadRequestError(f"meta['request_id'] must be a string of at most {MAX_REQUEST_ID} characters.")
    return value


def parse(value, max_items: int) -> list[dict]:
    """Commitments relayed by the next hop, checked field by field (anything else is dropped, never trusted; a
    signature is kept as relayed, for whoever verifies it with :func:`signature_valid`)."""
    if not isinstance(value, list):
        return []
    kept = []
    for item in value[:max_items]:
        if isinstance(item, dict) and all(isinstance(item.get(k), str) and len(item[k]) <= 128
                                          for k in ("peer", "request_id", "digest")):
            entry = {k: item[k] for k in ("peer", "request_id", "digest")}
            signature = item.get("signature")
            if isinstance(signature, str) and len(signature) <= MAX_SIGNATURE:
                entry["signature"] = signature
            kept.append(entry)
    return kept
