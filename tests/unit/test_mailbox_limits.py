"""The direct-answer mailbox is bounded (issue 16; swarm/direct_reply.py): an answer that does not fit is refused
with MailboxFullError (a CapacityError that crosses the wire as its type), collectors already waiting get the same
error at once, and no bytes stay held. No sockets."""

from __future__ import annotations

import asyncio

import pytest

from swarm.direct_reply import Mailbox
from swarm.errors import CapacityError, MailboxFullError, error_from_wire


def _run(coro):
    return asyncio.run(coro)


def test_an_answer_larger_than_the_mailbox_is_refused_and_its_waiting_collector_told_at_once():
    async def main():
        box = Mailbox(max_bytes=100, hold_s=5.0)
        collector = asyncio.ensure_future(box.collect("client", "r1", 0, 1, timeout_s=30.0))
        await asyncio.sleep(0)  # the collector waits first (the usual order: it opens with the chain)
        with pytest.raises(MailboxFullError, match=r"answer of 101 bytes is larger than.*100 bytes.*--max-mailbox-by"):
            box.deliver("client", "r1", ["x"], 101)
        with pytest.raises(MailboxFullError):  # at once, not after its 30 s timeout
            await asyncio.wait_for(collector, 1.0)
        assert box.held_bytes == 0 and not box._slots  # nothing leaks
        box.deliver("client", "r2", ["y"], 100)  # the mailbox still takes an answer that fits
        assert await box.collect("client", "r2", 0, 1, timeout_s=1.0) == ["y"]
        assert box.held_bytes == 0 and not box._slots
    _run(main())


def test_a_mailbox_full_of_uncollected_answers_refuses_until_they_are_collected_or_dropped():
    async def main():
        box = Mailbox(max_bytes=100, hold_s=0.05)
        box.deliver("a", "r1", ["a1"], 60)
        with pytest.raises(MailboxFullError, match=r"holds 60 of its 100 bytes.*needs 50"):
            box.room_for(50)  # the early check, before the answer is encoded
        with pytest.raises(MailboxFullError):
            box.deliver("b", "r2", ["b2"], 50)
        assert box.held_bytes == 60
        assert await box.collect("a", "r1", 0, 1, timeout_s=1.0) == ["a1"]
        assert box.held_bytes == 0
        box.deliver("b", "r3", ["b3"], 100)  # never collected: dropped after hold_s
        await asyncio.sleep(0.1)
        assert box.held_bytes == 0 and not box._slots
    _run(main())


def test_an_answer_delivered_twice_is_refused_and_the_first_kept():
    from swarm.errors import BadRequestError

    async def main():
        box = Mailbox(max_bytes=100, hold_s=5.0)
        box.deliver("a", "r1", ["first"], 10)
        with pytest.raises(BadRequestError, match="answered on this node already"):
            box.deliver("a", "r1", ["second"], 10)
        assert await box.collect("a", "r1", 0, 1, timeout_s=1.0) == ["first"]
        assert box.held_bytes == 0
    _run(main())


def test_mailbox_full_crosses_the_wire_as_its_type():
    error = error_from_wire(MailboxFullError("full").to_wire())
    assert type(error) is MailboxFullError and isinstance(error, CapacityError) and str(error) == "full"


@pytest.mark.parametrize("flags, message", [(["--max-mailbox-bytes", "0"], "--max-mailbox-bytes must be at least 1"),
                                            (["--mailbox-hold-s", "0"], "--mailbox-hold-s must be a positive"),
                                            (["--mailbox-hold-s", "inf"], "--mailbox-hold-s must be a positive")])
def test_a_mailbox_that_cannot_hold_anything_is_refused_before_serving(flags, message, capsys):
    from swarm.cli import _serve, build_parser

    args = build_parser().parse_args(["serve", "--model", "no-such-model", *flags])
    assert _serve(args, None) == 2
    assert message in capsys.readouterr().err
