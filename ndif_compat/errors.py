"""Errors of the NDIF-compatible gateway, named by who must act.

Every error a request can cause reaches the nnsight client as a ``RemoteError`` whose text is ``str(error)``
(prefixed with the class name, so the researcher sees what kind of failure it was); the gateway keeps serving.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Root of every error raised by :mod:`ndif_compat`."""

    code = "gateway_error"
    http_status = 500


class BadRequestError(GatewayError):
    """The request is malformed (not an nnsight 0.8 payload, unknown model key, too large). Fix the request."""

    code = "bad_request"
    http_status = 400


class ModelNotServedError(BadRequestError):
    """The request names a model this gateway does not serve; the message lists the names it accepts."""

    code = "model_not_served"
    http_status = 404


class UnauthorizedError(GatewayError):
    """Missing or unknown API key (header ``ndif-api-key``). Ask the gateway operator for a key."""

    code = "unauthorized"
    http_status = 401


class RateLimitedError(GatewayError):
    """This API key sent more requests than its rate allows; retry after the time in the message."""

    code = "rate_limited"
    http_status = 429


class UnsafeRequestError(BadRequestError):
    """The request's code tried something the guardrails forbid (an import, a builtin, file/network/process
    access, a private attribute, writing a parameter). Nothing of it ran past the point of refusal."""

    code = "unsafe_request"


class ParametersModifiedError(UnsafeRequestError):
    """The request wrote a model parameter or buffer; its worker is replaced (the weights reloaded)."""


class ParameterGradientError(UnsafeRequestError):
    """The request asked for the gradient of a model parameter or buffer (``requires_grad_``, ``.grad``, a hook, or
    ``autograd.grad`` inputs): weights never require grad on this gateway. Take gradients of activations instead."""

    code = "parameter_gradient"


class GradientUnavailableError(BadRequestError):
    """The request's code read ``.grad`` where no gradient exists: outside a ``with loss.backward():`` block (nnsight
    serves gradients inside it)."""

    code = "gradient_unavailable"
    http_status = 200


class GradientUnsupportedError(BadRequestError):
    """The request asks for a gradient this execution path cannot compute exactly (the message says which and why);
    nothing approximate is returned."""

    code = "gradient_unsupported"
    http_status = 200


class ExecutionLimitError(GatewayError):
    """The request ran past a limit (wall time, memory). Its worker process was killed and replaced."""

    code = "limit_exceeded"
    http_status = 200


class ExecutionError(GatewayError):
    """The request's code raised while running on the gateway (the message carries the remote traceback)."""

    code = "execution_error"
    http_status = 200


class WorkerCrashedError(GatewayError):
    """The process executing the request died unexpectedly (its exit code is in the message); it was replaced."""

    code = "worker_crashed"


class UnknownJobError(BadRequestError):
    """No job with this id (never submitted, or its result was already collected and expired)."""

    code = "unknown_job"
    http_status = 404


class SandboxUnavailableError(GatewayError):
    """This machine lacks a kernel feature the request sandbox needs (Landlock, seccomp, user namespaces); the
    gateway refuses to start. The operator fixes the host, or passes ``--unsafe-no-sandbox`` for a trusted setup."""

    code = "sandbox_unavailable"


class SandboxViolationError(UnsafeRequestError):
    """The kernel stopped the request's process: a forbidden system call (processes, programs, sockets), or a
    write to read-only memory (the model's parameters). Nothing it did outlives it."""


class FusedSegmentError(GatewayError):
    """The program read a decoder layer's value that the swarm computed inside a fused segment (several layers in
    one call), so no such value exists at the gateway. The gateway runs the request again with every layer cut; this
    error never reaches a client with a value."""

    code = "fused_segment"


class UnreachableModuleError(ExecutionError):
    """The program reads a submodule inside a decoder layer on the swarm backend's gateway path, where the layers run
    on the swarm; the message says why the request is on that path and what would push it to the nodes."""


class UnknownModuleError(BadRequestError):
    """The request names a module path the model does not have (``model.layers[50]`` on a 30-layer model, a misspelt
    submodule); the message names the path as written, its line, and the valid indices or submodules. Checked before
    anything runs (:mod:`ndif_compat.module_paths`)."""

    code = "unknown_module"
    http_status = 200
