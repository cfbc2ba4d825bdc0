"""Messages between the gateway and a cell over a socket: a JSON header frame, then an optional bytes frame.

Nothing is pickled: a cell runs hostile code, so what it sends is read as bounded JSON and raw bytes only. Every
frame's length is checked against the receiver's limit before the frame is read.

    channel = Channel(sock_fd)
    channel.send("done", {"path": "gateway"}, result_bytes)
    kind, meta, body = channel.recv(max_body=limit)
"""

from __future__ import annotations

import json
from multiprocessing.connection import Connection

from .errors import GatewayError

MAX_HEADER_BYTES = 64 * 2**10


class ChannelError(GatewayError):
    """The peer sent something that is not a well-formed message within the limits, or closed the channel."""


class Channel:
    """One end of a cell's socket (takes ownership of the file descriptor)."""

    def __init__(self, fd: int):
        self.conn = Connection(fd)

    def fileno(self) -> int:
        return self.conn.fileno()

    def send(self, kind: str, meta: dict | None = None, body: bytes = b"") -> None:
        header = json.dumps({"kind": kind, "meta": meta or {}, "body": len(body)}).encode()
        self.conn.send_bytes(header)
        if body:
            self.conn.send_bytes(body)

    def poll(self, timeout_s: float) -> bool:
        return self.conn.poll(timeout_s)

    def recv(self, max_body: int) -> tuple[str, dict, bytes]:
        """The next message. Raises ChannelError (malformed, over ``max_body``) or EOFError (closed)."""
        try:
            header = json.loads(self._recv_bytes(MAX_HEADER_BYTES))
            kind, meta, size = header["kind"], header["meta"], header["body"]
            if not isinstance(kind, str) or not isinstance(meta, dict) or type(size) is not int or size < 0:
                raise ValueError("bad header fields")
            if size > max_body:
                raise ChannelError(f"a message of {size} bytes is over the limit of {max_body}")
            body = self._recv_bytes(max_body) if size else b""
            if len(body) != size:
                raise ValueError("body size differs from its header")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ChannelError(f"malformed message from a cell: {e}") from None
        return kind, meta, body

    def _recv_bytes(self, limit: int) -> bytes:
        try:
            return self.conn.recv_bytes(limit)
        except (ConnectionResetError, BrokenPipeError):
            raise EOFError("the peer closed the channel") from None

    def close(self) -> None:
        self.conn.close()
