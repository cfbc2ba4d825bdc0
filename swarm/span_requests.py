"""Parsing a span request at the node's boundary: tensors and meta checked against the span and the limits, the
onward hops of a chained call, and a hook's result. Every failure is a typed :class:`BadRequestError` (or subclass).
See :mod:`swarm.span_server` for the request metadata."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import BadRequestError, HookError, SequenceTooLongError, SwarmError
from .span_hook import HookContext, HookRegistry, SpanHook
from .stages import SpanModel

TENSOR_NAMES = frozenset({"inputs", "attention_mask", "position_ids", "grad_outputs", "hook_payload", "hook_carry"})


@dataclass
class SpanRequest:
    """A checked request: its tensors on the node's device, the layers to run, its hook and its client."""

    tensors: dict[str, torch.Tensor]
    start: int
    end: int
    embed: bool
    head: bool
    hook: SpanHook | None
    hop: int = 0
    client: str = ""
    """Who the request counts against (:func:`swarm.quotas.client_identity`)."""


def parse_request(model: SpanModel, hooks: HookRegistry, tensors: list[torch.Tensor], meta: dict, *,
                  max_batch_tokens: int, max_length: int, dtype: torch.dtype, device: torch.device, step: int = 0,
                  past: int = 0, client: str = "") -> SpanRequest:
    """Check a request's tensors and meta against the node's span and limits, and build its span hook.

    Raises:
        BadRequestError (and subclasses): anything malformed or outside the span; SequenceTooLongError over
            ``max_length``; HookError from the hook's factory.
    """
    names = meta.get("names")
    if (not isinstance(names, list) or len(names) != len(tensors) or not all(isinstance(n, str) for n in names)
            or not set(names) <= TENSOR_NAMES):
        raise BadRequestError(f"meta['names'] must list one name per tensor from {sorted(TENSOR_NAMES)}; got {names!r}.")
    if len(set(names)) != len(names):
        raise BadRequestError(f"Duplicate tensor names: {names}.")
    named = dict(zip(names, tensors))
    span = model.span
    start, end = meta.get("start", span.start), meta.get("end", span.end)
    embed, head = meta.get("embed", False), meta.get("head", False)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
        raise BadRequestError(f"start/end must be integers; got {start!r}, {end!r}.")
    if not (span.start <= start <= end <= span.end) or (start == end and not (embed or head)):
        raise BadRequestError(f"Layers {start}:{end} are not within this node's span {span.start}:{span.end}.")
    if embed and not (span.embed and start == 0):
        raise BadRequestError("This node does not serve the embedding for this request (needs start == 0 and an embed span).")
    if head and not (span.head and end == span.end):
        raise BadRequestError("This node does not serve the head for this request (needs end == num_layers and a head span).")
    if "inputs" not in named:
        raise BadRequestError("The request has no 'inputs' tensor.")
    x = named["inputs"]
    config = model.config
    if embed:
        if x.dtype not in (torch.int64, torch.int32) or x.ndim != 2:
            raise BadRequestError(f"Token ids must be a 2D int64 tensor (B, T); got {x.dtype} {tuple(x.shape)}.")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= config.vocab_size):
            raise BadRequestError(f"Token ids must be in [0, {config.vocab_size}); got [{int(x.min())}, {int(x.max())}].")
    else:
        if x.ndim != 3 or x.shape[-1] != config.hidden_size:
            raise BadRequestError(f"Hidden states must be (B, T, {config.hidden_size}); got {tuple(x.shape)}.")
        if x.dtype != dtype:
            raise BadRequestError(f"Hidden states must be {dtype} on this node; got {x.dtype}.")
    batch, length = x.shape[0], x.shape[1]
    if batch == 0 or length == 0:
        raise BadRequestError(f"Empty input of shape {tuple(x.shape)}.")
    if batch * length > max_batch_tokens:
        raise BadRequestError(f"Batch × length = {batch * length} exceeds this node's limit of "
                              f"{max_batch_tokens} tokens per call; split the batch.")
    if length > max_length:
        raise SequenceTooLongError(f"Sequence of length {length} exceeds this node's limit of {max_length}.")
    mask = named.get("attention_mask")
    if mask is not None:
        if mask.ndim != 2 or mask.shape[0] != batch or mask.shape[1] != past + length or mask.dtype not in (torch.int64, torch.int32, torch.bool):
            raise BadRequestError(f"attention_mask must be an integer (B={batch}, past+T={past + length}) tensor; got {mask.dtype} {tuple(mask.shape)}.")
    pos = named.get("position_ids")
    if pos is not None:
        if pos.dtype != torch.int64 or pos.ndim != 2 or pos.shape[1] != length or pos.shape[0] not in (1, batch):
            raise BadRequestError(f"position_ids must be int64 (1 or B, T={length}); got {pos.dtype} {tuple(pos.shape)}.")
        if int(pos.min()) < 0:
            raise BadRequestError(f"position_ids must be in [0, {max_length}); got min {int(pos.min())}.")
        if int(pos.max()) >= max_length:
            raise SequenceTooLongError(f"position_ids must be in [0, {max_length}) on this node; "
                                       f"got max {int(pos.max())}.")
    hook = None
    if meta.get("hook") is not None:
        spec = meta["hook"]
        if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str) or not isinstance(spec.get("version"), int):
            raise BadRequestError("meta['hook'] must be {'kind': str, 'version': int}.")
        payload = named.get("hook_payload")
        if payload is None or payload.dtype != torch.uint8 or payload.ndim != 1:
            raise BadRequestError("A hook request must carry 'hook_payload' as a 1D uint8 tensor.")
        hop = meta.get("hop", 0)
        if not isinstance(hop, int) or isinstance(hop, bool) or hop < 0:
            raise BadRequestError(f"meta['hop'] must be a non-negative integer; got {hop!r}.")
        carry = named.get("hook_carry")
        if carry is not None and (carry.dtype != torch.uint8 or carry.ndim != 1):
            raise BadRequestError("'hook_carry' must be a 1D uint8 tensor.")
        context = HookContext(model, start, end, bool(embed), bool(head), step, hop,
                              carry.numpy().tobytes() if carry is not None else b"", client)
        hook = hooks.build(spec["kind"], spec["version"], payload.numpy().tobytes(), context)
    return SpanRequest({k: v.to(device) for k, v in named.items()}, start, end, bool(embed), bool(head), hook,
                    meta.get("hop", 0) if hook is not None else 0, client)


def parse_chain(chain, max_chain: int) -> list[dict]:
    """Validate ``meta['next']``: the onward hops of a chained forward."""
    if not isinstance(chain, list) or len(chain) > max_chain:
        raise BadRequestError(f"meta['next'] must be a list of at most {max_chain} hops.")
    hops = []
    for hop in chain:
        ok = (isinstance(hop, dict) and isinstance(hop.get("peer"), str)
              and all(isinstance(hop.get(k), int) and not isinstance(hop.get(k), bool) for k in ("start", "end"))
              and isinstance(hop.get("head", False), bool))
        if not ok:
            raise BadRequestError(f"Each onward hop must be {{'peer': str, 'start': int, 'end': int, 'head': bool}}; got {hop!r}.")
        hops.append({"peer": hop["peer"], "start": hop["start"], "end": hop["end"], "head": hop.get("head", False)})
    return hops


def parse_inference_chain(chain, max_chain: int) -> list[dict]:
    """Validate ``meta['next']`` of a chained inference step: onward hops with their sessions."""
    hops = parse_chain(chain, max_chain)
    for hop, raw in zip(hops, chain):
        session_id, spec = raw.get("session_id"), raw.get("open")
        last_only, argmax = raw.get("last_only", False), raw.get("argmax", False)
        if not (isinstance(session_id, str) and 0 < len(session_id) <= 128 and (spec is None or isinstance(spec, dict))
                and isinstance(last_only, bool) and isinstance(argmax, bool)):
            raise BadRequestError("Each onward inference hop needs 'session_id' (str), and may have 'open' (dict), "
                                  f"'last_only' (bool) and 'argmax' (bool); got {raw!r}.")
        hop.update(session_id=session_id, open=spec, last_only=last_only, argmax=argmax)
    return hops


def hook_result(hook: SpanHook) -> bytes:
    """The hook's result bytes; a failure there is the hook's (a typed HookError), not the node's."""
    try:
        return hook.result()
    except SwarmError:
        raise
    except Exception as e:
        raise HookError(f"Span hook failed to produce its result: {type(e).__name__}: {e}") from e

