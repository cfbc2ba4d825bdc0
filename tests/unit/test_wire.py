"""Frames round-trip exactly, split above the message cap, and reject malformed input with typed errors."""

import asyncio

import msgpack
import pytest
import torch
from hivemind.proto import runtime_pb2

from swarm.errors import BadRequestError, CapacityError, PayloadTooLargeError
from swarm.wire import CHUNK_BYTES, encode_error, encode_frame, read_frame


async def _aiter(items):
    for item in items:
        yield item


def roundtrip(messages, **kw):
    return asyncio.run(read_frame(_aiter(list(messages)), **kw))


def test_roundtrip_exact_for_every_dtype_and_large_tensors():
    big = torch.randn(3, 700, 576)  # ~4.8 MB: over hivemind's 4 MiB message cap
    tensors = [big, torch.arange(10), torch.ones(2, 3, dtype=torch.bfloat16), torch.zeros(0, 4), torch.tensor([True, False])]
    messages = list(encode_frame(tensors, {"k": [1, "x"]}))
    assert all(m.ByteSize() < 4 * 1024 * 1024 for m in messages)
    assert len(messages) > 1 + len(tensors)
    out, meta = roundtrip(messages)
    assert meta == {"k": [1, "x"]}
    for a, b in zip(tensors, out):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_error_frames_come_back_as_the_same_type():
    with pytest.raises(CapacityError, match="full"):
        roundtrip(encode_error(CapacityError("cache full")))


def test_malformed_frames_are_bad_requests():
    with pytest.raises(BadRequestError, match="header"):
        roundtrip([runtime_pb2.ExpertRequest(metadata=b"\xff\x00garbage")])
    header = msgpack.packb({"v": 1, "meta": {}, "parts": [2]})
    with pytest.raises(BadRequestError, match="ended early"):
        roundtrip([runtime_pb2.ExpertRequest(metadata=header)])
    messages = list(encode_frame([torch.ones(4)], {}))
    messages[1].tensors[0].size[:] = [5]
    with pytest.raises(BadRequestError, match="needs"):
        roundtrip(messages)
    messages = list(encode_frame([torch.ones(4)], {}))
    messages[1].tensors[0].dtype = "complex128"
    with pytest.raises(BadRequestError, match="dtype"):
        roundtrip(messages)
    assert roundtrip([]) is None


def test_oversize_payload_is_refused_before_it_is_assembled():
    messages = encode_frame([torch.zeros(CHUNK_BYTES)], {})  # 4 MiB
    with pytest.raises(PayloadTooLargeError, match="limit"):
        roundtrip(messages, max_bytes=CHUNK_BYTES)


def test_half_precision_travels_at_two_bytes_per_element_bit_for_bit():
    x = torch.randn(4, 64, 576)
    fp32_bytes = sum(m.ByteSize() for m in encode_frame([x], {}))
    for dtype in (torch.bfloat16, torch.float16):
        half = x.to(dtype)
        half[0, 0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0], dtype=dtype)
        messages = list(encode_frame([half, torch.arange(3)], {}))
        assert sum(m.ByteSize() for m in messages) <= fp32_bytes / 2 + 4096, dtype
        (out, _), _ = roundtrip(messages)
        assert out.dtype == dtype and torch.equal(out.view(torch.int16), half.view(torch.int16))


def test_a_bfloat16_claim_on_another_dtype_is_refused():
    messages = list(encode_frame([torch.ones(3)], {}))
    header = msgpack.unpackb(messages[0].metadata)
    header["bf16"] = [0]
    messages[0] = runtime_pb2.ExpertRequest(metadata=msgpack.packb(header))
    with pytest.raises(BadRequestError, match="bfloat16 bits"):
        roundtrip(messages)


def test_frames_laid_out_by_hiveminds_serializer_read_the_same():
    """The chunk layout is hivemind's ``runtime_pb2.Tensor`` (our encoder copies the bytes itself, without a whole-
    tensor ``bytes`` first): tensors serialized by hivemind, bfloat16 widened to float32 bytes included, decode to
    the same values, and ours decode to what hivemind's deserializer makes of them."""
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
    tensors = [torch.tensor(3.5), torch.randn(5, 7), torch.randn(3, 4).to(torch.bfloat16), torch.arange(6).view(2, 3)]
    header = msgpack.packb({"v": 1, "meta": {}, "parts": [1] * len(tensors)})
    theirs = [runtime_pb2.ExpertRequest(metadata=header)]
    for t in tensors:
        part = serialize_torch_tensor(t)
        part.chunks = 1
        theirs.append(runtime_pb2.ExpertRequest(tensors=[part]))
    out, _ = roundtrip(theirs)
    for a, b in zip(tensors, out):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    odd = torch.randn(CHUNK_BYTES // 4 + 3)   # two chunks, the second short
    ours = list(encode_frame([odd], {}))
    assert [m.tensors[0].chunks for m in ours[1:]] == [2, 0]
    whole = runtime_pb2.Tensor()
    whole.CopyFrom(ours[1].tensors[0])
    whole.buffer = b"".join(m.tensors[0].buffer for m in ours[1:])
    assert torch.equal(deserialize_torch_tensor(whole), odd)
