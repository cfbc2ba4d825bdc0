"""Checking a node's claims: does it serve what its record announces?

Two cheap checks, both run by the client (:class:`swarm.remote_sequence.RemoteSequence`):

- :func:`claim_mismatch`: before first use, the node's ``info`` answer (over the libp2p connection, which
  authenticates the peer id) must state the span, stages and checkpoint hash of its record.
- :func:`find_refusing_hop`: after a call was refused (:class:`BadRequestError`, :class:`OverloadedError`), a
  one-token forward of well-formed inputs through each hop's layers tells which node refused (a chained forward's
  error does not say) and whether the request itself was at fault (every hop runs the probe: then it was).
"""

from __future__ import annotations

import asyncio

import torch
from hivemind.p2p import P2P

from .errors import BadRequestError, OverloadedError, PeerUnreachableError, SwarmError
from .handles import FORWARD
from .records import ServerRecord
from .routing import Hop
from .stages import DTYPES
from .transport import call

CLAIMED_FIELDS = ("start", "end", "checkpoint_hash", "embed", "head")


def claim_mismatch(record: ServerRecord, info: dict) -> str | None:
    """What the node's ``info`` answer contradicts in its record (None if nothing)."""
    wrong = [f"{name}: record {getattr(record, name)!r}, info {info.get(name)!r}" for name in CLAIMED_FIELDS
             if info.get(name) != getattr(record, name)]
    return "; ".join(wrong) or None


async def find_refusing_hop(p2p: P2P, hops: list[Hop], *, hidden_size: int, embed: bool, head: bool, num_layers: int,
                            timeout_s: float, **call_options) -> tuple[Hop, SwarmError] | None:
    """Probe every hop at once with one token of well-formed input for exactly its layers (token 0 where the hop
    embeds, else zero hidden states in the record's dtype); return the first hop in route order that refused or
    failed, with its error, or None if every hop answered."""
    async def probe(i: int, hop: Hop) -> SwarmError | None:
        first, last = i == 0 and embed and hop.start == 0, head and hop.end == num_layers
        if first:
            x = torch.zeros(1, 1, dtype=torch.int64)
        else:
            x = torch.zeros(1, 1, hidden_size, dtype=DTYPES.get(hop.record.dtype, torch.float32))
        try:
            await call(p2p, hop.peer_id, FORWARD, {"inputs": x},
                       {"start": hop.start, "end": hop.end, "embed": first, "head": last},
                       timeout_s=timeout_s, **call_options)
        except (BadRequestError, OverloadedError, PeerUnreachableError) as e:
            return e
        return None

    errors = await asyncio.gather(*(probe(i, hop) for i, hop in enumerate(hops)))
    for hop, error in zip(hops, errors):
        if error is not None:
            return hop, error
    return None
