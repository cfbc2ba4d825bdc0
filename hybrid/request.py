"""What a node receives for a hybrid request: the graph and its plan, as one opaque span-hook payload.

Wire form: ``b"HYRQ" + u64 len(plan json) + plan json + graph bytes (hybrid.ir)``. The plan JSON is
``{"executors": [[name, first_stage, last_stage], ...], "assignment": [...], "carry": [[...], ...],
"hop_offset": k, "call": c}``: the node at chain position ``hop`` is executor ``hop_offset + hop``, and its module
events are call ``c`` of the model (the generation step; 0 for a single forward). An assignment of ``-1``/``-2``
marks a node of an earlier/later generation step, which does not run in this request. ``"keep": {"<node id>": key}``
names values the executor computing them stores for a later trace of the session (``hybrid.session_store``).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidGraphError, LimitExceededError
from .ir import Graph
from .planner import FUTURE, Executor, Plan

MAGIC = b"HYRQ"
HOOK_KIND = "hybrid.graph"
HOOK_VERSION = 1


def encode_request(graph: Graph, plan: Plan, hop_offset: int, call: int = 0, keep: dict[int, str] | None = None,
                   blobs: list[dict] | None = None) -> bytes:
    doc = {**plan.to_json(), "hop_offset": hop_offset, "call": call, "keep": {str(k): v for k, v in (keep or {}).items()}}
    text = json.dumps(doc, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<Q", len(text)) + text + graph.to_bytes(blobs)


def decode_request(data: bytes, *, max_attachment_bytes: int | None = None, max_json_bytes: int | None = None
                   ) -> tuple[Graph, Plan, int, int, dict[int, str]]:
    """``(graph, plan, hop_offset, call, keep)`` of a request. Raises InvalidGraphError (or LimitExceededError) on
    anything malformed."""
    if len(data) < 12 or data[:4] != MAGIC:
        raise InvalidGraphError("span hook payload is not a hybrid request (bad magic)")
    (length,) = struct.unpack("<Q", data[4:12])
    if max_json_bytes is not None and length > max_json_bytes:
        raise LimitExceededError(f"plan JSON is {length} bytes; this node parses at most {max_json_bytes}")
    try:
        doc = json.loads(data[12:12 + length])
        executors = [Executor(str(n), int(a), int(b)) for n, a, b in doc["executors"]]
        assignment = [int(x) for x in doc["assignment"]]
        carry = [[int(x) for x in c] for c in doc["carry"]]
        hop_offset = int(doc["hop_offset"])
        call = int(doc.get("call", 0))
        keep = {int(k): str(v) for k, v in dict(doc.get("keep", {})).items()}
        bcarry = [[int(x) for x in c] for c in doc.get("bcarry", [[] for _ in executors])]
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise InvalidGraphError(f"malformed plan in hybrid request: {e}") from None
    graph = Graph.from_bytes(data[12 + length:], max_attachment_bytes=max_attachment_bytes,
                             max_json_bytes=max_json_bytes)
    if len(assignment) != len(graph.nodes) or len(carry) != len(executors) or not all(
            FUTURE <= a < len(executors) for a in assignment) or not 0 <= call < 2 ** 31 or not all(
            0 <= k < len(graph.nodes) and 0 < len(v) <= 200 for k, v in keep.items()) or len(bcarry) != len(
            executors) or not all(0 <= x < len(graph.nodes) for c in carry + bcarry for x in c):
        raise InvalidGraphError("plan does not match the graph (assignment/carry sizes or executor indices)")
    head_last = doc.get("head_last", False) is True
    return graph, Plan(executors, assignment, carry, [], head_last=head_last, bcarry=bcarry), hop_offset, call, keep


@dataclass(frozen=True)
class SessionLinks:
    """How one trace of an ``lm.session()`` connects to the others (see :mod:`hybrid.session`)."""

    keep: dict[int, str] = field(default_factory=dict)
    """Node id -> key: values a later trace loads from the node that computes them here."""
    held: dict[int, int] = field(default_factory=dict)
    """``load`` node id -> stage whose node holds that value."""
    supplied: dict[int, Any] = field(default_factory=dict)
    """``load`` node id -> value the client sends (an earlier trace saved it)."""


NO_LINKS = SessionLinks()

