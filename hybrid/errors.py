"""Errors of the intervention graph, named by who must act. All are :class:`swarm.errors.BadRequestError`
subclasses with their own ``code``, so a node's refusal comes back to the client as the same type."""

from __future__ import annotations

from swarm.errors import BadRequestError


class HybridError(BadRequestError):
    """Root of every graph error: the experiment (or its graph) must change."""

    code = "hybrid_error"


class TraceError(HybridError):
    """A mistake found while tracing (shape, dtype, access order); reported at the user's line."""

    code = "trace_error"


class InvalidGraphError(HybridError):
    """The graph payload is malformed (bad JSON, bad references, unknown fields)."""

    code = "invalid_graph"


class DisallowedOpError(HybridError):
    """An op, function, method or attribute outside the whitelist."""

    code = "disallowed_op"


class UnknownModuleError(HybridError):
    """A module path the model does not have."""

    code = "unknown_module"


class OrderError(HybridError):
    """A value is needed before the model produces it (e.g. a setter fed by a later module)."""

    code = "order_error"


class LimitExceededError(HybridError):
    """A budget of the request was exceeded: ops, attachment bytes, elements, wall time."""

    code = "limit_exceeded"


class SessionValueError(HybridError):
    """A value an earlier trace of the session left on a node is gone (expired, evicted, or the node restarted)."""

    code = "session_value_missing"


class BlobMissingError(SessionValueError):
    """A graph names a large attachment by content hash that this node does not hold (never uploaded here, evicted,
    or the node restarted); the client sends it again inline, once."""

    code = "blob_missing"


class UnknownSourceOpError(UnknownModuleError, AttributeError):
    """``module.source.<name>`` names no operation of the module's forward (an AttributeError too, as in nnsight)."""

    code = "unknown_source_op"
