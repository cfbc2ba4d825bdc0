"""The link shaper's parsing and pacing, on virtual time and in-memory streams (no sockets)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from bench.errors import BenchConfigError
from bench.link_shaper import LinkSpec, Pacer, pump
from bench.link_spec import BIT_UNITS, BYTE_UNITS


# Every accepted spelling, with the bytes per second it stands for. Capital B = bytes; "bit"/"bps" = bits.
ACCEPTED = {
    "B/s": 1, "kB/s": 1e3, "KB/s": 1e3, "MB/s": 1e6, "GB/s": 1e9, "KiB/s": 1024, "MiB/s": 1024**2, "GiB/s": 1024**3,
    "bit/s": 1 / 8, "kbit/s": 125, "Kbit/s": 125, "Mbit/s": 125e3, "Gbit/s": 125e6,
    "kbps": 125, "Kbps": 125, "Mbps": 125e3, "Gbps": 125e6,
}


def test_the_documented_spellings_are_the_accepted_ones():
    assert set(ACCEPTED) == set(BYTE_UNITS) | set(BIT_UNITS)


@pytest.mark.parametrize("unit", sorted(ACCEPTED))
def test_every_accepted_bandwidth_spelling(unit):
    for text in (f"8{unit}", f"8 {unit},20ms"):
        spec = LinkSpec.parse(text)
        assert spec.bandwidth_Bps == pytest.approx(8 * ACCEPTED[unit], rel=1e-12)
        assert spec.latency_s == pytest.approx(0.02 if "," in text else 0.0)


@pytest.mark.parametrize("text, latency", [("20ms", 0.02), ("1s", 1.0), ("500us", 5e-4), ("500µs", 5e-4),
                                           ("1.5e2ms", 0.15)])
def test_every_accepted_latency_spelling(text, latency):
    spec = LinkSpec.parse(text)
    assert spec.bandwidth_Bps is None and spec.latency_s == pytest.approx(latency)


@pytest.mark.parametrize("text, bandwidth, latency", [
    ("60MB/s,20ms", 60e6, 0.02), ("100Mbit/s", 12.5e6, 0.0), ("100Mbps", 12.5e6, 0.0), ("20ms", None, 0.02),
    ("2MiB/s, 1s", 2 * 1024**2, 1.0), ("1.5GB/s,500us", 1.5e9, 5e-4), ("20ms,60MB/s", 60e6, 0.02),
])
def test_parse(text, bandwidth, latency):
    spec = LinkSpec.parse(text)
    assert spec.bandwidth_Bps == pytest.approx(bandwidth) if bandwidth else spec.bandwidth_Bps is None
    assert spec.latency_s == pytest.approx(latency)


@pytest.mark.parametrize("text", ["none", "", "off", None])
def test_parse_none(text):
    assert LinkSpec.parse(text) is None


# Spellings whose meaning hangs on one letter's case (issue 15: 100Mb/s was read as 100 MB/s, 60MBps as 7.5 MB/s).
@pytest.mark.parametrize("text", ["100Mb/s", "100mb/s", "60MBps", "60mbps", "60MBPS", "1Gb/s", "1gb/s", "10kb/s",
                                  "10Kb/s", "5b/s", "100mB/s", "1GBps", "1kBps", "100Mb/s,20ms"])
def test_case_confusable_spellings_are_refused_naming_the_accepted_ones(text):
    with pytest.raises(BenchConfigError, match="bits or bytes") as caught:
        LinkSpec.parse(text)
    for unit in ("MB/s", "Mbit/s", "Mbps", "KB/s", "Gbit/s"):
        assert unit in caught.value.message


@pytest.mark.parametrize("text, words", [("60MB", "unknown unit 'MB'"), ("fast", "cannot parse"), ("0MB/s", "> 0"),
                                         ("60 parsecs", "unknown unit"), ("20MS", "did you mean 'ms'"),
                                         ("1MB/s,2MB/s", "two bandwidths"), ("1ms,2ms", "two latencies")])
def test_parse_errors_say_what_is_wrong(text, words):
    with pytest.raises(BenchConfigError, match=words):
        LinkSpec.parse(text)


def test_record_form():
    assert LinkSpec.parse("60MB/s,20ms").as_record() == {"bandwidth_Bps": 60e6, "latency_s": 0.02}
    assert LinkSpec.parse("100Mbit/s,5ms").as_record() == {"bandwidth_Bps": 12.5e6, "latency_s": 0.005}


@pytest.mark.parametrize("text", ["60MB/s,20ms", "100Mbit/s", "2MiB/s,1s", "3Kbps,7us", "1.5GB/s,500us",
                                  "1e-3ms", "1bit/s", "0.1MiB/s,0.3ms"])
def test_str_reads_back_to_the_same_spec(text):
    # str(spec) is what the relay process is given: it must shape exactly the link that is recorded.
    spec = LinkSpec.parse(text)
    assert LinkSpec.parse(str(spec)) == spec


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
