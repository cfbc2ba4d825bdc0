"""Frames: tensors plus a small metadata dict, carried as a run of hivemind protobuf messages.

hivemind caps one message at 4 MiB, so a frame is sent as one metadata message followed by each tensor's
serialized bytes cut into chunks of at most :data:`CHUNK_BYTES`:

    message 0:  metadata = msgpack({"v": WIRE_VERSION, "meta": {...}, "parts": [n_0, n_1, ...]})
    message 1.. tensors = [one chunk]    (n_0 chunks of tensor 0, then n_1 of tensor 1, ...)

bfloat16 travels at 2 bytes per element: its bits as an ``int16`` tensor, listed in the header's ``"bf16"`` (tensor
indices); hivemind's own bfloat16 serialization widens to float32 bytes. A reader that does not know the field refuses
the ``int16`` tensor rather than misread it.

A large frame may travel *striped* over several streams at once (:func:`stripe`): libp2p's yamux gives every new
stream a 256 KiB flow-control window that grows only as round trips pass, so one fresh stream moves ~256 KiB per round
trip at first (1.6 MB took ~200 ms on a 60 MB/s, 40 ms-round-trip link). ``k`` streams start with ``k`` windows. The
first stream's header then has ``"stripes": {"id", "count": k}``; stream ``i`` (``1 ≤ i < k``) starts with a
header ``{"v", "stripe": {"id", "index": i}}``, and chunk ``j`` of the frame (counted over all tensors) travels on
stream ``j mod k``. The reader (:func:`read_frame` with ``stripes``) drains all of them at once.

An error travels as a frame with no tensors and ``meta = {"error": {"code", "message"}}``; the receiving side
raises it again as the same :class:`~swarm.errors.SwarmError` subclass. Nothing here pickles.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Iterator, Sequence, Type

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor
from hivemind.proto import runtime_pb2

from .errors import BadRequestError, PayloadTooLargeError, SwarmError, error_from_wire

WIRE_VERSION = 1
CHUNK_BYTES = 240 << 10
"""Bytes of one tensor chunk message: a chunk and its framing fit a yamux stream's initial 256 KiB window, so the
first chunk of every stripe goes out at once (a chunk just over the window would wait a round trip for its tail)."""
MAX_STRIPES = 8
"""Most streams one frame travels on."""
STRIPE_BYTES = CHUNK_BYTES
"""A frame gets at least one stream per this many bytes (up to :data:`MAX_STRIPES`; see :func:`stripe_count`)."""
WINDOW_BYTES = 256 << 10
"""A fresh yamux stream's flow-control window: what one stream sends before its first round trip."""
MESSAGE_OVERHEAD = 64
"""Bytes a message costs on a stream beyond its protobuf size (length prefixes, yamux frame headers), with margin."""
ALLOWED_DTYPES = frozenset({"float32", "float16", "bfloat16", "int64", "int32", "bool", "uint8"})

Message = runtime_pb2.ExpertRequest | runtime_pb2.ExpertResponse


def encode_frame(tensors: Sequence[torch.Tensor], meta: dict,
                 message_type: Type[Message] = runtime_pb2.ExpertRequest) -> Iterator[Message]:
    """Yield the messages of one frame. ``meta`` must be msgpack-serializable (dicts, lists, str, numbers)."""
    plain = [t.detach().cpu().contiguous() for t in tensors]
    bf16 = [i for i, t in enumerate(plain) if t.dtype == torch.bfloat16]
    header = {"v": WIRE_VERSION, "meta": meta, "parts": [_chunk_count(t) for t in plain]}
    if bf16:
        header["bf16"] = bf16
    yield message_type(metadata=msgpack.packb(header, use_bin_type=True))
    for t in plain:
        yield from _chunks(t.view(torch.int16) if t.dtype == torch.bfloat16 else t, message_type)


def stripe_count(messages: Sequence[Message], limit: int = MAX_STRIPES) -> int:
    """How many streams a frame's ``messages`` should travel on (at most ``limit``): the fewest, from one per
    :data:`STRIPE_BYTES`, for which every stream's share (chunk ``j`` on stream ``j mod k``) fits a fresh stream's
    :data:`WINDOW_BYTES`, so that no stream waits a round trip for its window to grow. A frame of several tensors
    has chunks of unequal sizes: with one stream per 240 KiB, two large chunks could share a stream (a logit lens's
    carried values of 20 layers after the hidden state took 2 round trips instead of 1). Where no count up to
    ``limit`` fits (frames of several MB), the count whose largest share is smallest."""
    sizes = [m.ByteSize() + MESSAGE_OVERHEAD for m in messages]
    chunks = sizes[1:]
    most = max(1, min(limit, len(chunks)))
    least = max(1, min(most, -(-sum(chunks) // STRIPE_BYTES)))
    best = (float("inf"), least)
    for k in range(least, most + 1):
        share = max(sum(chunks[i::k]) + (sizes[0] if i == 0 else 0) for i in range(k))
        if share <= WINDOW_BYTES:
            return k
        best = min(best, (share, k))
    return best[1]


def stripe(messages: Sequence[Message], count: int, stripe_id: str) -> list[list[Message]]:
    """Split one frame's ``messages`` (as :func:`encode_frame` yields them) over ``count`` streams (see the module
    docstring); ``count == 1`` returns them as they are."""
    if count <= 1:
        return [list(messages)]
    first, chunks = messages[0], list(messages[1:])
    message_type = type(first)
    header = msgpack.unpackb(first.metadata, raw=False, strict_map_key=False)
    header["stripes"] = {"id": stripe_id, "count": count}
    streams = [[message_type(metadata=msgpack.packb(header, use_bin_type=True))] + chunks[0::count]]
    for i in range(1, count):
        opener = message_type(metadata=msgpack.packb({"v": WIRE_VERSION, "stripe": {"id": stripe_id, "index": i}},
                                                      use_bin_type=True))
        streams.append([opener] + chunks[i::count])
    return streams


def stripe_header(message: Message) -> tuple[str, int]:
    """``(id, index)`` of a stripe stream's first message. Raises BadRequestError when it is not one."""
    try:
        header = msgpack.unpackb(message.metadata, raw=False, strict_map_key=False)
        stripe_id, index = header["stripe"]["id"], header["stripe"]["index"]
        if header.get("v") != WIRE_VERSION or not isinstance(stripe_id, str) or not 0 < len(stripe_id) <= 64 \
                or not isinstance(index, int) or not 0 < index < MAX_STRIPES:
            raise ValueError("bad stripe fields")
    except Exception as e:
        raise BadRequestError(f"Malformed stripe header ({type(e).__name__}: {e}); expected msgpack "
                              f"{{'v', 'stripe': {{'id': str, 'index': 1..{MAX_STRIPES - 1}}}}}.") from None
    return stripe_id, index


def encode_error(error: SwarmError, message_type: Type[Message] = runtime_pb2.ExpertResponse) -> Iterator[Message]:
    return encode_frame([], {"error": error.to_wire()}, message_type)


def _chunk_count(tensor: torch.Tensor) -> int:
    return max(1, -(-tensor.numel() * tensor.element_size() // CHUNK_BYTES))


def _chunks(tensor: torch.Tensor, message_type: Type[Message]) -> Iterator[Message]:
    """One message per :data:`CHUNK_BYTES` of ``tensor``'s bytes (a contiguous CPU tensor), the first with its shape
    and dtype (the layout of hivemind's ``runtime_pb2.Tensor``, uncompressed). Each chunk's bytes are copied once
    out of the tensor and once into its message, not through a whole-tensor ``bytes`` first: a copy of a large
    frame costs page faults on fresh memory, and a 100 MB frame's copies used to take longer than its link time's
    margin."""
    data = memoryview(tensor.numpy()).cast("B") if tensor.numel() else memoryview(b"")
    count = _chunk_count(tensor)
    for i in range(count):
        message = message_type()
        part = message.tensors.add()
        part.buffer = bytes(data[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES])
        if i == 0:
            part.compression = runtime_pb2.CompressionType.NONE
            part.chunks = count
            part.size.extend(tensor.shape)
            part.dtype = str(tensor.dtype).replace("torch.", "")
        yield message


async def read_frame(messages: AsyncIterator[Message], *, max_bytes: int | None = None, max_tensors: int = 64,
                     accept_error: bool = True, stripes=None) -> tuple[list[torch.Tensor], dict] | None:
    """Read one frame; return ``(tensors, meta)``, or None when the stream ended before a frame began.

    ``accept_error=False`` (a server reading requests) refuses error frames instead of raising them. ``stripes``:
    ``await stripes(id, count)`` → the frame's other ``count - 1`` streams (index order, each after its stripe
    header), for a striped frame; None refuses striped frames.

    Raises:
        BadRequestError: malformed header, wrong number of chunks, unknown dtype, shape/bytes mismatch, or an
            error frame when ``accept_error`` is False.
        PayloadTooLargeError: the frame's tensor bytes exceed ``max_bytes``.
        SwarmError (subclass): the frame is an error sent by the other side.
    """
    try:
        first = await anext(messages)
    except StopAsyncIteration:
        return None
    try:
        header = msgpack.unpackb(first.metadata, raw=False, strict_map_key=False)
        meta, parts, bf16 = header["meta"], header["parts"], header.get("bf16", [])
        if not isinstance(meta, dict) or not isinstance(parts, list) or not all(isinstance(p, int) and p > 0 for p in parts):
            raise TypeError("bad header layout")
        if not isinstance(bf16, list) or not all(isinstance(i, int) and 0 <= i < len(parts) for i in bf16):
            raise TypeError("bad 'bf16' list")
    except Exception as e:
        raise BadRequestError(f"Malformed frame header ({type(e).__name__}: {e}); expected msgpack "
                              f"{{'v', 'meta': dict, 'parts': [int]}}.") from None
    if "error" in meta:
        if not accept_error:
            raise BadRequestError(f"A request frame must not carry meta['error'] (got {meta['error']!r:.200}); "
                                  f"send tensors and request fields.")
        raise error_from_wire(meta["error"])
    if header.get("v") != WIRE_VERSION:
        raise BadRequestError(f"Wire version {header.get('v')!r} is not supported; this node speaks {WIRE_VERSION}.")
    if len(parts) > max_tensors:
        raise BadRequestError(f"Frame carries {len(parts)} tensors; at most {max_tensors} are allowed.")
    total = [0]

    async def drain(stream: AsyncIterator[Message], count: int) -> list[runtime_pb2.Tensor]:
        chunks = []
        for _ in range(count):
            try:
                message = await anext(stream)
            except StopAsyncIteration:
                raise BadRequestError("Frame ended early: fewer tensor chunks than its header announced.") from None
            if len(message.tensors) != 1:
                raise BadRequestError("Each tensor chunk message must carry exactly one tensor part.")
            part = message.tensors[0]
            buffer = part.buffer  # a copy out of the message, which can then go (a chunk is held once, not twice)
            total[0] += len(buffer)
            if max_bytes is not None and total[0] > max_bytes:
                raise PayloadTooLargeError(f"Request tensors exceed this node's limit of {max_bytes} bytes; "
                                           f"send a smaller batch or sequence.")
            chunks.append((_Part(part.compression, part.chunks, tuple(part.size), part.dtype, part.requires_grad),
                           buffer))
        return chunks

    n = sum(parts)
    spec = header.get("stripes")
    if spec is None:
        chunks = await drain(messages, n)
    else:
        if stripes is None:
            raise BadRequestError("This frame is striped over several streams; this call takes one stream only.")
        if not isinstance(spec, dict) or not isinstance(spec.get("id"), str) or not isinstance(spec.get("count"), int) \
                or not 1 < spec["count"] <= MAX_STRIPES:
            raise BadRequestError(f"Malformed 'stripes' in a frame header; expected {{'id': str, 'count': "
                                  f"2..{MAX_STRIPES}}}.")
        k = spec["count"]
        others = await stripes(spec["id"], k)
        try:
            per_stream = await gather_or_cancel([drain(messages, len(range(0, n, k)))] +
                                                [drain(s, len(range(i, n, k))) for i, s in enumerate(others, 1)])
        finally:
            for other in others:
                if hasattr(other, "aclose"):
                    await other.aclose()
        chunks = [per_stream[j % k][j // k] for j in range(n)]
    tensors, offset = [], 0
    for count in parts:
        tensors.append(_combine(chunks[offset:offset + count], bf16=len(tensors) in bf16))
        offset += count
    return tensors, meta


async def gather_or_cancel(coroutines: list) -> list:
    """``asyncio.gather`` that cancels the others when one fails and waits until they have stopped, so no stream is
    left being read by an orphan (closing a stream a cancelled reader is still inside raises ``RuntimeError:
    aclose(): asynchronous generator is already running``, which would hide the first failure's typed error)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(frozen=True)
class _Part:
    """A chunk's tensor fields (only the first chunk of a tensor sets them), without its bytes."""

    compression: int
    chunks: int
    size: tuple
    dtype: str
    requires_grad: bool


def _combine(chunks: list[tuple[_Part, bytes]], *, bf16: bool = False) -> torch.Tensor:
    head = chunks[0][0]
    if head.compression != runtime_pb2.CompressionType.NONE:
        raise BadRequestError("Only uncompressed tensors are accepted.")
    if bf16 and head.dtype != "int16":
        raise BadRequestError(f"A tensor listed as bfloat16 bits must arrive as int16; got {head.dtype!r}.")
    if head.dtype not in ALLOWED_DTYPES and not bf16:
        raise BadRequestError(f"Tensor dtype {head.dtype!r} is not accepted; use one of {sorted(ALLOWED_DTYPES)}.")
    if head.chunks != len(chunks):
        raise BadRequestError(f"Tensor announced {head.chunks} chunks but {len(chunks)} arrived.")
    numel = 1
    for s in head.size:
        numel *= s
    nbytes = sum(len(buffer) for _, buffer in chunks)
    # hivemind carries bfloat16 as float32 bytes (ours travel as int16 bits, see the module docstring)
    itemsize = 4 if head.dtype == "bfloat16" else torch.empty((), dtype=getattr(torch, head.dtype)).element_size()
    if numel * itemsize != nbytes:
        raise BadRequestError(f"Tensor of shape {list(head.size)} and dtype {head.dtype} needs {numel * itemsize} "
                              f"bytes but {nbytes} arrived.")
    try:
        if head.dtype == "bfloat16":  # hivemind's widened form: its own decoder converts it back
            whole = runtime_pb2.Tensor(compression=head.compression, buffer=b"".join(b for _, b in chunks),
                                       size=head.size, dtype=head.dtype, requires_grad=head.requires_grad)
            return deserialize_torch_tensor(whole)
        dtype = getattr(torch, head.dtype)
        # one copy into a writable buffer the tensor then shares (torch.frombuffer copies nothing)
        tensor = (torch.frombuffer(bytearray().join(b for _, b in chunks), dtype=dtype) if nbytes
                  else torch.empty(0, dtype=dtype)).reshape(head.size)
        if head.requires_grad:
            tensor.requires_grad_(True)
        return tensor.view(torch.bfloat16) if bf16 else tensor
    except Exception as e:
        raise BadRequestError(f"Could not decode tensor: {type(e).__name__}: {e}") from None
