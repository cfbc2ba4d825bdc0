"""The line-rate bench (bench.line_rate) moves its frames through the link shaper, once each: the shaper's own
counters show every frame's bytes on the client link, on one stream and striped over several (issue 16, req. 2).
Whether that is fast is the bench's check (``python -m bench.line_rate``), not this test's."""

import asyncio

from bench.line_rate import measure
from bench.link_spec import LinkSpec


def test_frames_cross_the_shaped_link_once_whether_striped_or_not(tmp_path):
    size = 1_500_000
    rows = asyncio.run(measure(LinkSpec.parse("200MB/s,5ms"), [size], tmp_path, streams=(1, 8),
                              stats_period_s=0.05))
    assert sorted((r["direction"], r["streams"]) for r in rows) == [("down", 1), ("down", 8), ("up", 1), ("up", 8)]
    for row in rows:
        # the frame's bytes plus framing (protobuf, hivemind, yamux, TLS): never less, never a second copy
        assert size <= row["shaper_bytes"] < 1.02 * size, row
