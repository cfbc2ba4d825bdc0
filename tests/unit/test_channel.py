"""The gateway ↔ cell channel: bounded JSON + bytes frames, never unpickled."""

from __future__ import annotations

import socket
import threading

import pytest

from ndif_compat.channel import Channel, ChannelError


@pytest.fixture()
def pair():
    a, b = socket.socketpair()
    ends = Channel(a.detach()), Channel(b.detach())
    yield ends
    for end in ends:
        end.close()


def test_messages_round_trip(pair):
    a, b = pair
    a.send("done", {"path": "gateway"}, b"\x00" * 1000)
    a.send("log", {"text": "hi"})
    assert b.recv(max_body=1000) == ("done", {"path": "gateway"}, b"\x00" * 1000)
    assert b.recv(max_body=0) == ("log", {"text": "hi"}, b"")


def test_a_body_over_the_limit_is_refused_before_it_is_read(pair):
    a, b = pair
    sender = threading.Thread(target=a.send, args=("done", {}, b"x" * 10_000))
    sender.start()
    with pytest.raises(ChannelError, match="over the limit"):
        b.recv(max_body=100)
    b.close()
    sender.join(5)


@pytest.mark.parametrize("header", [b"not json", b'{"kind": 1, "meta": {}, "body": 0}', b'{"kind": "x"}',
                                    b'{"kind": "x", "meta": [], "body": 0}', b'{"kind": "x", "meta": {}, "body": -1}',
                                    b"\x80\x04\x95" + b"pickle"])
def test_malformed_headers_are_refused(pair, header):
    a, b = pair
    a.conn.send_bytes(header)
    with pytest.raises(ChannelError):
        b.recv(max_body=100)


def test_a_header_over_its_limit_is_refused(pair):
    a, b = pair
    sender = threading.Thread(target=a.conn.send_bytes, args=(b"{" * (128 * 2**10),))
    sender.start()
    with pytest.raises(ChannelError):
        b.recv(max_body=100)
    b.close()
    sender.join(5)


def test_a_closed_peer_is_end_of_file(pair):
    a, b = pair
    a.close()
    with pytest.raises(EOFError):
        b.recv(max_body=100)
