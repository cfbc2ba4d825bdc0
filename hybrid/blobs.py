"""Large attachments uploaded once: a graph may name a tensor by content hash that the node already holds.

A dictionary or a steering basis of tens of MB would otherwise travel with every trace, and through every hop of the
route. The client sends attachments of at least :data:`BLOB_MIN_BYTES` *by hash* (the graph's ``"blobs"`` entries,
an empty placeholder in place of the tensor); a node that holds them (in :data:`hybrid.session_store.STORE`, under
``blob:<sha256>``, bounded per client like session values) uses them, and one that does not answers
:class:`~hybrid.errors.BlobMissingError`. The client then sends that graph once more with the tensors inline and
``keep``: every node of the route checks each tensor's hash itself (a client can never store a tensor under another
tensor's hash) and keeps it for the next trace.

Wire form of an entry: ``{"index": i, "sha256": hex, "shape": [...], "dtype": "float32", "keep": bool}``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from .errors import BlobMissingError, InvalidGraphError, SessionValueError

BLOB_MIN_BYTES = 1 << 20
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                                       torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                                       torch.bool)}


def blob_hash(tensor: torch.Tensor) -> str:
    """sha256 over dtype, shape and bytes: equal tensors, equal names."""
    tensor = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def entries_for(attachments: list[torch.Tensor], *, inline: bool) -> list[dict]:
    """The blob entries of a graph's large attachments: by hash, or (``inline``) sent along to be kept."""
    return [{"index": i, "sha256": blob_hash(t), "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
             "keep": inline} for i, t in enumerate(attachments) if t.numel() * t.element_size() >= BLOB_MIN_BYTES]


def parse_entries(raw: Any, count: int) -> list[dict]:
    """Validate the graph's ``"blobs"`` field. Raises InvalidGraphError."""
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > count:
        raise InvalidGraphError("graph 'blobs' must be a list of at most one entry per attachment")
    entries, seen = [], set()
    for e in raw:
        try:
            entry = {"index": int(e["index"]), "sha256": str(e["sha256"]), "shape": [int(s) for s in e["shape"]],
                     "dtype": str(e["dtype"]), "keep": bool(e.get("keep", False))}
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidGraphError(f"malformed blob entry {e!r:.200}: {err}") from None
        if not 0 <= entry["index"] < count or entry["index"] in seen or len(entry["sha256"]) != 64 or any(
                c not in "0123456789abcdef" for c in entry["sha256"]) or entry["dtype"] not in _DTYPES or any(
                s < 0 for s in entry["shape"]) or len(entry["shape"]) > 8:
            raise InvalidGraphError(f"malformed blob entry {e!r:.200}")
        seen.add(entry["index"])
        entries.append(entry)
    return entries


def resolve(attachments: list[torch.Tensor], entries: list[dict], store, owner: str) -> None:
    """Fill by-hash attachments from ``store`` and keep inline ones there (their hash checked here).

    Raises:
        BlobMissingError: a by-hash attachment is not held here.
        InvalidGraphError: an inline tensor does not match its hash, shape or dtype.
    """
    missing = []
    for entry in entries:
        key, i = "blob:" + entry["sha256"], entry["index"]
        if entry["keep"]:
            tensor = attachments[i]
            if list(tensor.shape) != entry["shape"] or str(tensor.dtype).removeprefix("torch.") != entry["dtype"] \
                    or blob_hash(tensor) != entry["sha256"]:
                raise InvalidGraphError(f"attachment {i} does not match the hash, shape or dtype it is sent under")
            store.put(key, tensor, owner=owner)
            continue
        try:
            tensor = store.get(key)
        except SessionValueError:  # gone or never here: the client sends it again
            missing.append(entry["sha256"][:12])
            continue
        if list(tensor.shape) != entry["shape"] or str(tensor.dtype).removeprefix("torch.") != entry["dtype"]:
            raise InvalidGraphError(f"attachment {i}: the tensor held under its hash has another shape or dtype")
        attachments[i] = tensor
    if missing:
        raise BlobMissingError(f"this node does not hold attachment(s) {', '.join(missing)}... (uploaded elsewhere, "
                               "evicted or expired); the client sends them inline once more")
