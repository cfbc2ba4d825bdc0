"""Errors of the span swarm, named by who must act.

Every error has a stable ``code`` so it can cross the wire as ``{code, message}`` and be raised again on the
caller's side as the same type (see :func:`error_from_wire`).

- :class:`BadRequestError` and subclasses: the caller sent something wrong; fix the request.
- :class:`PeerUnreachableError`: the outside broke (a node died or timed out); the client may reroute.
  :class:`PeerBusyError`: it timed out but answers pings (slow, not dead): reroute, but do not exclude it.
- :class:`CapacityError`: the node is healthy but full; retry later or elsewhere (:class:`OverloadedError`: its
  compute queue is full).
- :class:`MissingBlocksError`: no node serves some blocks; someone must serve them.
- :class:`ModelNotFoundError`: the ``--model`` argument does not name a usable checkpoint.
"""

from __future__ import annotations


class SwarmError(Exception):
    """Root of every error raised by :mod:`swarm`."""

    code = "swarm_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_wire(self) -> dict:
        return {"code": self.code, "message": self.message}


class BadRequestError(SwarmError):
    """The request is malformed: wrong dtype/shape, unknown fields, bad span. The caller must fix it."""

    code = "bad_request"


class PayloadTooLargeError(BadRequestError):
    """A tensor or message is larger than the node accepts."""

    code = "payload_too_large"


class SequenceTooLongError(BadRequestError):
    """The sequence (including the session's history) is longer than the node's limit."""

    code = "sequence_too_long"


class UnknownSessionError(BadRequestError):
    """An inference step names a session the node does not hold (expired, closed or never opened)."""

    code = "unknown_session"


class HookError(BadRequestError):
    """The span hook payload was rejected (unknown kind or version, or the hook raised)."""

    code = "hook_error"


class CapacityError(SwarmError):
    """The node is healthy but cannot take this request now (KV-cache memory cap, too many sessions)."""

    code = "capacity"


class PeerUnreachableError(SwarmError):
    """A peer did not answer in time or its connection broke. The client may retry elsewhere."""

    code = "peer_unreachable"


class PeerBusyError(PeerUnreachableError):
    """A peer kept answering pings but did not finish a call in time: it is busy, not dead. The client may retry
    elsewhere, but must not exclude the peer as it would a dead one."""

    code = "peer_busy"


class OverloadedError(CapacityError):
    """The node's queue of compute work is full (in all, or for this client). Retry later or on another node.

    ``peer_id`` names the refusing node where known (it crosses the wire), so the client of a chained call knows which
    hop to route around."""

    code = "overloaded"

    def __init__(self, message: str, peer_id: str = ""):
        super().__init__(message)
        self.peer_id = peer_id

    def to_wire(self) -> dict:
        return {**super().to_wire(), **({"peer_id": self.peer_id} if self.peer_id else {})}


class MailboxFullError(CapacityError):
    """The last node of a chain cannot hold a direct answer for the client's collect stream (:mod:`swarm.direct_reply`):
    its mailbox is full (answers not yet collected), or the answer alone is larger than the mailbox. Retry later, ask
    for fewer outputs, or relay the answer through the chain (``ClientConfig(direct_reply=False)``)."""

    code = "mailbox_full"


class MissingBlocksError(SwarmError):
    """No online node serves some blocks of the model."""

    code = "missing_blocks"

    def __init__(self, model_name: str, missing: list[tuple[int, int]], hint: str = ""):
        spans = ", ".join(f"{s}:{e}" for s, e in missing)
        message = (
            f"No online node serves blocks {spans} of model {model_name!r}. "
            f"Check coverage with `swarm-node status --initial-peers ...`; to help, run "
            f"`swarm-node serve --model {model_name} --blocks {missing[0][0]}:{missing[0][1]} --initial-peers ...`."
        )
        if hint:
            message += " " + hint
        super().__init__(message)
        self.missing = missing


class ModelNotFoundError(SwarmError):
    """``--model`` is neither a known alias nor a directory holding a safetensors checkpoint."""

    code = "model_not_found"


class InternalNodeError(SwarmError):
    """The node failed while serving a valid request (a bug on the node). The node keeps serving."""

    code = "internal"


def _by_code(cls: type[SwarmError], code: str) -> type[SwarmError] | None:
    if cls.__dict__.get("code") == code:
        return cls
    for sub in cls.__subclasses__():
        found = _by_code(sub, code)
        if found is not None:
            return found
    return None


def error_from_wire(payload: dict) -> SwarmError:
    """Rebuild the error a node sent as ``{code, message}``.

    Subclasses defined by other packages (e.g. ``hybrid``'s graph errors) resolve too once imported; unknown
    codes become :class:`SwarmError`.
    """
    code = str(payload.get("code", SwarmError.code))
    message = str(payload.get("message", "remote error without a message"))
    cls = _by_code(SwarmError, code) or SwarmError
    err = SwarmError.__new__(cls)
    SwarmError.__init__(err, message)
    if cls is MissingBlocksError:
        err.missing = []
    if isinstance(err, OverloadedError):
        peer_id = payload.get("peer_id", "")
        err.peer_id = peer_id if isinstance(peer_id, str) and len(peer_id) <= 128 else ""
    return err


class ResultMismatchError(SwarmError):
    """A spot check found two nodes disagreeing on the same hop and no third opinion could settle it. No result is
    returned; the nodes involved are named in the message."""

    code = "result_mismatch"
