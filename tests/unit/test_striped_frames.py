"""Striped frames (swarm.wire.stripe) read back bit for bit, and the mailbox of direct answers
(swarm.direct_reply.Mailbox) pairs answers with their collectors in either order, for the named peer only."""

import asyncio

import pytest
import torch

from swarm.direct_reply import Mailbox
from swarm.errors import BadRequestError, MailboxFullError, PayloadTooLargeError, PeerBusyError
from swarm.wire import (CHUNK_BYTES, MAX_STRIPES, MESSAGE_OVERHEAD, WINDOW_BYTES, encode_frame, read_frame, stripe,
                        stripe_count, stripe_header)


async def _aiter(items):
    for item in items:
        yield item


def _read_striped(streams, **kw):
    async def run():
        sides = []
        for index, side in enumerate(streams[1:], 1):
            it = _aiter(side)
            first = await anext(it)
            assert stripe_header(first)[1] == index
            sides.append(it)

        async def others(stripe_id, count):
            assert count == len(streams)
            return sides
        return await read_frame(_aiter(streams[0]), stripes=others, **kw)
    return asyncio.run(run())


def test_a_striped_frame_reads_back_bit_for_bit():
    tensors = [torch.randn(3, 100, 576), torch.arange(7), torch.randn(5, 4).to(torch.bfloat16),
               torch.randn(1000, 300)]
    messages = list(encode_frame(tensors, {"k": "v"}))
    count = stripe_count(messages)
    assert count == MAX_STRIPES  # ~1.9 MB: one stream per chunk, up to the limit
    assert all(len(t.buffer) <= CHUNK_BYTES for m in messages[1:] for t in m.tensors)
    streams = stripe(messages, count, "abc")
    assert sum(len(s) for s in streams) == len(messages) + count - 1  # every chunk once, one opener per stripe
    out, meta = _read_striped(streams)
    assert meta == {"k": "v"}
    for got, want in zip(out, tensors, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


def _largest_share(streams) -> int:
    """Bytes of the fullest stream of a striped frame, as :func:`stripe` cut it (what must fit a fresh window)."""
    return max(sum(m.ByteSize() + MESSAGE_OVERHEAD for m in stream) for stream in streams)


def test_no_stream_of_a_frame_of_several_tensors_waits_for_its_window():
    """A chained hop's frame as a logit lens sends it (hidden states, masks, the graph, 20 layers' carried values):
    one stream per 240 KiB put two large chunks on one stream, over a fresh stream's window (one round trip more).
    The count chosen is the fewest whose every stream fits, found here by trying every count."""
    frames = [[torch.zeros(8, 16, 576), torch.ones(8, 16, dtype=torch.int64), torch.arange(16).expand(8, 16),
               torch.zeros(20_000, dtype=torch.uint8), torch.zeros(368_800, dtype=torch.uint8)],
              [torch.zeros(8, 16, 576), torch.ones(8, 16, dtype=torch.int64), torch.zeros(20_000, dtype=torch.uint8),
               torch.zeros(184_400, dtype=torch.uint8)],
              [torch.zeros(8, 16, 576), torch.zeros(3_000, dtype=torch.uint8)],
              *[[torch.zeros(int(n), dtype=torch.uint8) for n in torch.randint(1, 400_000, (int(k),),
                                                                              generator=torch.Generator().manual_seed(k))]
                for k in range(2, 7)]]
    for tensors in frames:
        messages = list(encode_frame(tensors, {"names": ["x"] * len(tensors)}))
        fits = [k for k in range(1, min(MAX_STRIPES, len(messages) - 1) + 1)
                if _largest_share(stripe(messages, k, "s" * 16)) <= WINDOW_BYTES]
        count = stripe_count(messages)
        assert fits and count == min(fits), (count, fits)
        out, _ = _read_striped(stripe(messages, count, "s" * 16)) if count > 1 else \
            asyncio.run(read_frame(_aiter(messages)))
        assert all(torch.equal(a, b) for a, b in zip(out, tensors, strict=True))
    lens = list(encode_frame(frames[0], {}))  # the old rule (one stream per 240 KiB) gave 3 streams here
    old = -(-sum(m.ByteSize() for m in lens[1:]) // CHUNK_BYTES)
    assert _largest_share(stripe(lens, old, "s" * 16)) > WINDOW_BYTES >= _largest_share(
        stripe(lens, stripe_count(lens), "s" * 16))


def test_a_small_frame_is_not_striped_and_a_striped_one_needs_its_stripes():
    small = list(encode_frame([torch.ones(10)], {}))
    assert stripe_count(small) == 1 and stripe(small, 1, "x") == [small]
    streams = stripe(list(encode_frame([torch.randn(300_000)], {})), 4, "x")
    with pytest.raises(BadRequestError, match="striped"):
        asyncio.run(read_frame(_aiter(streams[0])))  # a reader that takes one stream refuses it
    with pytest.raises(PayloadTooLargeError):  # the byte limit counts every stripe
        _read_striped(streams, max_bytes=900_000)


def test_mailbox_pairs_answers_and_collectors_in_either_order():
    async def run():
        box = Mailbox(hold_s=5)
        # collectors first (the usual order: the client opens them when it sends the request)
        waiting = [asyncio.ensure_future(box.collect("client", "r1", i, 2, 5)) for i in range(2)]
        await asyncio.sleep(0)
        box.deliver("client", "r1", ["answer"], 6)
        assert [await w for w in waiting] == [["answer"], ["answer"]]
        assert box.held_bytes == 0 and not box._slots  # collected by both: forgotten
        # the answer first: held until its collectors come
        box.deliver("client", "r2", ["later"], 5)
        assert box.held_bytes == 5
        assert await box.collect("client", "r2", 0, 1, 5) == ["later"]
        assert box.held_bytes == 0
        # only the peer the answer names gets it; a second collector of one stripe is refused
        box.deliver("client", "r3", ["mine"], 4)
        with pytest.raises(PeerBusyError):
            await box.collect("someone-else", "r3", 0, 1, 0.05)
        first = await box.collect("client", "r3", 0, 2, 5)
        with pytest.raises(BadRequestError):
            await box.collect("client", "r3", 0, 2, 5)
        assert first == ["mine"]
        # a full mailbox refuses to hold, typed (tests/unit/test_mailbox_limits.py)
        with pytest.raises(MailboxFullError):
            Mailbox(max_bytes=3).deliver("client", "r4", ["big"], 4)
    asyncio.run(run())
