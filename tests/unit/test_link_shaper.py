"""The link shaper's parsing and pacing, on virtual time and in-memory streams (no sockets)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from bench.errors import BenchConfigError
from bench.link_shaper import LinkSpec, Pacer, pump


@pytest.mark.parametrize("text, bandwidth, latency", [
    ("60MB/s,20ms", 60e6, 0.02), ("100Mbit/s", 12.5e6, 0.0), ("20ms", None, 0.02), ("2MiB/s, 1s", 2 * 1024**2, 1.0),
    ("1.5GB/s,500us", 1.5e9, 5e-4),
])
def test_parse(text, bandwidth, latency):
    spec = LinkSpec.parse(text)
    assert spec.bandwidth_Bps == pytest.approx(bandwidth) if bandwidth else spec.bandwidth_Bps is None
    assert spec.latency_s == pytest.approx(latency)


@pytest.mark.parametrize("text", ["none", "", "off", None])
def test_parse_none(text):
    assert LinkSpec.parse(text) is None


@pytest.mark.parametrize("text, words", [("60MB", "unknown unit"), ("fast", "cannot parse"), ("0MB/s", "> 0"),
                                         ("60 parsecs", "unknown unit")])
def test_parse_errors_say_what_is_wrong(text, words):
    with pytest.raises(BenchConfigError, match=words):
        LinkSpec.parse(text)


def test_record_form():
    assert LinkSpec.parse("60MB/s,20ms").as_record() == {"bandwidth_Bps": 60e6, "latency_s": 0.02}


def test_pacer_holds_the_rate_on_virtual_time():
    async def main():
        pacer = Pacer(1e6, burst_s=0.02)
        t0 = trio.current_time()
        for _ in range(100):
            await pacer.transmit(10_000)
        return trio.current_time() - t0

    elapsed = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert elapsed == pytest.approx(1.0 - 0.02, rel=1e-6)   # a full bucket to start


def test_pacer_catches_up_at_most_its_burst():
    async def main():
        pacer = Pacer(1e6, burst_s=0.02)
        await pacer.transmit(1000)
        await trio.sleep(1.0)                 # idle: credit is capped at burst_s
        t0 = trio.current_time()
        await pacer.transmit(100_000)         # 0.1 s of data, 0.02 s of credit
        return trio.current_time() - t0

    elapsed = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert elapsed == pytest.approx(0.08, rel=1e-6)


def test_pump_delivers_everything_in_order_with_rate_and_latency():
    payload = bytes(range(256)) * 4000   # 1,024,000 bytes

    async def main():
        src_send, src_recv = trio.testing.memory_stream_one_way_pair()
        dst_send, dst_recv = trio.testing.memory_stream_one_way_pair()
        got = bytearray()
        first: list[float] = []
        delivered: list[int] = []
        t0 = trio.current_time()

        async def write():
            await src_send.send_all(payload)
            await src_send.aclose()

        async def read():
            while data := await dst_recv.receive_some(1 << 20):
                first.append(trio.current_time())
                got.extend(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            nursery.start_soon(read)
            nursery.start_soon(pump, src_recv, dst_send, Pacer(1e6, burst_s=0), 0.05, delivered.append)
        return bytes(got), first[0] - t0, trio.current_time() - t0, sum(delivered)

    got, first_s, total_s, counted = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert got == payload and counted == len(payload)
    assert first_s >= 0.05                          # nothing arrives before the latency
    assert total_s == pytest.approx(len(payload) / 1e6 + 0.05, rel=0.01)
