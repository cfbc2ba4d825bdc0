"""Run one nnsight request on a model held by this process (the worker), under the guardrails.

    tracer, source = load_request(data, "abc", model._remoteable_persistent_objects())
    try:
        saves = run_tracer(tracer, log=print)       # {variable name: saved value}
    finally:
        forget(tracer.info.frame.f_code.co_filename)
    encode_result(saves, compress=True)             # zstd/torch.save bytes, what nnsight's client loads

The payload is nnsight 0.8's: a pickle of ``(tracer, (block source, globals, locals))``. It is unpickled with
:class:`~ndif_compat.guardrails.RestrictedUnpickler` against the model's persistent objects, the block source is
checked, then run with nnsight's own tracer (so remote semantics equal local nnsight) inside the audit guard, with
restricted builtins.
"""

from __future__ import annotations

import io
import linecache
import logging
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
import zstandard

from .errors import BadRequestError, ExecutionError, GatewayError
from .gradients import GradientGuard
from .guardrails import SAFE_BUILTINS, AuditGuard, RestrictedUnpickler, check_source

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    result: bytes
    """Serialized saves, compressed when the request was."""


def decompress(blob: bytes, compress: bool, max_bytes: int) -> bytes:
    """Undo the client's zstd compression, refusing payloads that expand beyond ``max_bytes``."""
    if not compress:
        if len(blob) > max_bytes:
            raise BadRequestError(f"request payload is {len(blob)} bytes; this gateway accepts at most {max_bytes} "
                                  "(swarm-gateway serve --max-request-mb).")
        return blob
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob))
        data = reader.read(max_bytes + 1)
    except zstandard.ZstdError as e:
        raise BadRequestError(f"request payload is not valid zstd ({e}); is this an nnsight 0.8 client?") from None
    if len(data) > max_bytes:
        raise BadRequestError(f"request payload expands beyond {max_bytes} bytes; this gateway refuses it "
                              "(swarm-gateway serve --max-request-mb).")
    return data


def encode_result(saves: dict[str, Any], compress: bool) -> bytes:
    """What nnsight's ``RemoteBackend.finalize`` loads: ``torch.save`` bytes, zstd-compressed if asked."""
    saves = {k: _compact(v) for k, v in saves.items()}
    buffer = io.BytesIO()
    torch.save(saves, buffer, pickle_protocol=4)
    data = buffer.getvalue()
    return zstandard.ZstdCompressor(level=3).compress(data) if compress else data


def _compact(value: Any) -> Any:
    """A tensor that views a larger storage is sent as a copy of itself (torch.save would ship the whole storage)."""
    if isinstance(value, torch.Tensor) and value.untyped_storage().nbytes() > value.numel() * value.element_size():
        return value.clone()
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_compact(v) for v in value)
    return value


def load_request(data: bytes, request_id: str, persistent_objects: dict):
    """Unpickle a payload against a live model's persistent objects; returns the tracer ready to execute
    (:func:`run_tracer`, or the hybrid translation, sets the restricted builtins it runs with).

    The block is compiled under a per-request file name, so nnsight's per-file source caches never mix two
    requests that came from files of the same name.
    """
    from nnsight.intervention import serialization

    try:
        tracer, (source, glbls, variables) = serialization.loads(
            data, persistent_objects, RestrictedUnpickler)
    except GatewayError:
        raise
    except Exception as e:
        raise BadRequestError(f"could not read the request payload ({type(e).__name__}: {e}); the gateway speaks "
                              "nnsight 0.8.x.") from None
    if not isinstance(source, str) or not isinstance(glbls, dict) or not isinstance(variables, dict):
        raise BadRequestError("the request payload is not an nnsight 0.8 traced block.")
    check_source(source, "the traced block")
    frame = tracer.info.frame
    filename = f"{frame.f_code.co_filename} [request {request_id}]"
    frame.f_code.co_filename = filename
    tracer.info.code = compile(source, filename, "exec").replace(co_name=frame.f_code.co_name)
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    frame.f_globals, frame.f_locals = glbls, variables
    return tracer, source


def forget(filename: str) -> None:
    """Drop one request's entries from linecache and nnsight's per-file caches."""
    from nnsight.tracing import globals as nnsight_globals

    linecache.cache.pop(filename, None)
    for cache in (getattr(nnsight_globals, "SOURCES", {}), getattr(nnsight_globals, "BLOCKS", {})):
        for key in [k for k in cache if (k[0] if isinstance(k, tuple) else k) == filename]:
            cache.pop(key, None)


def run_tracer(tracer, log: Callable[[str], None], gradients: torch.nn.Module | None = None) -> dict[str, Any]:
    """Execute a loaded tracer with nnsight's machinery; returns the saved variables by name. The caller
    forgets the request's file name afterwards (:func:`forget`).

    Args:
        gradients: the model, when the request takes gradients (:func:`~ndif_compat.gradients.needs_gradients`):
            it then runs with gradient tracking, its parameters guarded (:class:`~ndif_compat.gradients.GradientGuard`);
            otherwise under ``torch.no_grad()``.
    Raises:
        GatewayError: typed; one the guards raised inside nnsight keeps its type.
    """
    from nnsight.tracing import tracer as nnsight_tracer

    frame = tracer.info.frame
    printed = _Printer(log)
    SAFE_BUILTINS_WITH_PRINT = {**SAFE_BUILTINS, "print": printed}
    frame.f_locals["__builtins__"] = SAFE_BUILTINS_WITH_PRINT
    frame.f_globals["__builtins__"] = SAFE_BUILTINS_WITH_PRINT
    nnsight_tracer.inc()
    try:
        with AuditGuard.install(), GradientGuard(gradients) if gradients is not None else torch.no_grad():
            tracer.execute(tracer.info.code)
        saves = nnsight_tracer._saves()
        return {k: v for k, v in frame.f_locals.items() if id(v) in saves and not k.startswith("__")}
    except GatewayError:
        raise
    except Exception as e:
        typed = _typed_cause(e)
        if typed is not None:
            raise type(typed)(f"{typed}\n{_where(e)}".rstrip()) from None
        raise ExecutionError(_describe(e)) from None
    finally:
        nnsight_tracer.dec()


def _typed_cause(e: BaseException) -> GatewayError | None:
    """The gateway's own error that nnsight wrapped (raised by a guard inside the request's code), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, GatewayError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _where(e: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "[request " in f.filename]
    return "".join(traceback.format_list(frames[-3:]))


def _describe(e: BaseException) -> str:
    """The remote error text: the exception and the user's own frames (nnsight internals left out)."""
    return f"{type(e).__name__}: {e}\n{_where(e)}".rstrip()


class _Printer:
    """``print`` for request code: lines go to the client as LOG status updates."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log

    def __call__(self, *args, sep=" ", end="\n", **_ignored) -> None:
        self.log(sep.join(str(a) for a in args))
