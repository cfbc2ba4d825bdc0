"""The direct-answer mailbox is bounded (issue 16; swarm/direct_reply.py): an answer that does not fit is refused
with MailboxFullError (a CapacityError that crosses the wire as its type), collectors already waiting get the same
error at once, and no bytes stay held. No sockets."""

from __future__ import annotations

import asyncio

import pytest

from swarm.direct_reply import Mailbox
from swarm.errors import BadRequestError, CapacityError, MailboxFullError, OverloadedError, error_from_wire


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
    asyncio.run(main())


def test_a_mailbox_full_of_uncollected_answers_refuses_until_they_are_collected_or_dropped():
    async def main():
        box = Mailbox(max_bytes=100, hold_s=0.05)
        box.deliver("a", "r1", ["a1"], 60)
        with pytest.raises(MailboxFullError, match=r"holds 60 of its 100 bytes.*needs 50"):
            box.room_for("b", 50)  # the early check, before the answer is encoded
        with pytest.raises(MailboxFullError):
            box.deliver("b", "r2", ["b2"], 50)
        assert box.held_bytes == 60
        assert await box.collect("a", "r1", 0, 1, timeout_s=1.0) == ["a1"]
        assert box.held_bytes == 0
        box.deliver("b", "r3", ["b3"], 100)  # never collected: dropped after hold_s
        await asyncio.sleep(0.1)
        assert box.held_bytes == 0 and not box._slots
    asyncio.run(main())


def test_an_answer_delivered_twice_is_refused_and_the_first_kept():

    async def main():
        box = Mailbox(max_bytes=100, hold_s=5.0)
        box.deliver("a", "r1", ["first"], 10)
        with pytest.raises(BadRequestError, match="answered on this node already"):
            box.deliver("a", "r1", ["second"], 10)
        assert await box.collect("a", "r1", 0, 1, timeout_s=1.0) == ["first"]
        assert box.held_bytes == 0
    asyncio.run(main())


def test_mailbox_full_crosses_the_wire_as_its_type():
    error = error_from_wire(MailboxFullError("full").to_wire())
    assert type(error) is MailboxFullError and isinstance(error, CapacityError) and str(error) == "full"


@pytest.mark.parametrize("flags, message", [(["--max-mailbox-bytes", "0"], "--max-mailbox-bytes must be at least 1"),
                                            (["--max-client-mailbox-bytes", "0"],
                                             "--max-client-mailbox-bytes must be at least 1"),
                                            (["--mailbox-hold-s", "0"], "--mailbox-hold-s must be a positive"),
                                            (["--mailbox-hold-s", "inf"], "--mailbox-hold-s must be a positive")])
def test_a_mailbox_that_cannot_hold_anything_is_refused_before_serving(flags, message, capsys):
    from swarm.cli import _serve, build_parser

    args = build_parser().parse_args(["serve", "--model", "no-such-model", *flags])
    assert _serve(args, None) == 2
    assert message in capsys.readouterr().err


def test_one_client_that_never_collects_cannot_take_the_mailbox_from_others():
    async def main():
        box = Mailbox(max_bytes=1000, max_peer_bytes=300, max_per_peer=3, max_slots=5, hold_s=5.0)
        box.deliver("flood", "r1", ["x"], 200)
        with pytest.raises(MailboxFullError, match=r"this client's answers.*hold 200 of its 300 bytes.*--max-client-ma"):
            box.deliver("flood", "r2", ["x"], 200)
        box.deliver("flood", "r3", ["x"], 1)
        box.deliver("flood", "r4", ["x"], 1)
        with pytest.raises(MailboxFullError, match=r"this client has 3 answers waiting here \(at most 3\)"):
            box.deliver("flood", "r5", ["x"], 1)  # tiny answers: bounded in number too, not only in bytes
        with pytest.raises(OverloadedError, match="already has 3 answers"):
            await box.collect("flood", "r6", 0, 1, timeout_s=5.0)  # nor can it park collectors instead
        box.deliver("other", "r1", ["y"], 200)  # another client is still served
        assert await box.collect("other", "r1", 0, 1, timeout_s=1.0) == ["y"]
        for peer in ("p1", "p2"):  # many identities: the node-wide bound on answers held or awaited
            box.deliver(peer, "r", ["z"], 1)
        with pytest.raises(MailboxFullError, match=r"all clients 5 \(at most 5\)"):
            box.deliver("p3", "r", ["z"], 1)
        with pytest.raises(OverloadedError, match="already holds 5 answers"):
            await box.collect("p3", "r", 0, 1, timeout_s=5.0)
        assert box.held_bytes == 204 and box._peers["flood"] == [3, 202]
    asyncio.run(main())


def test_reply_to_must_name_the_requesting_client_and_come_with_a_request_id():
    from swarm.direct_reply import reply_to_of

    assert reply_to_of({"reply_to": "me", "request_id": "r"}, "me") == "me"
    assert reply_to_of({"reply_to": "me", "request_id": "r"}, "me<node1<node2") == "me"  # third hop of a chain
    assert reply_to_of({}, "me") is None
    with pytest.raises(BadRequestError, match="client that sends the request"):
        reply_to_of({"reply_to": "victim", "request_id": "r"}, "me")  # parking answers in a victim's share
    with pytest.raises(BadRequestError, match="needs meta\\['request_id'\\]"):
        reply_to_of({"reply_to": "me"}, "me")  # an answer nobody could ask for
