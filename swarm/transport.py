"""The client's side of the wire: one call = one request frame out, one response frame back, with a deadline.

A broken connection or a missed deadline becomes :class:`PeerUnreachableError` (the caller may reroute); an
error frame from the node is raised as its own type (the caller must not retry the same request elsewhere).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import AsyncIterator

import msgpack
import torch
from hivemind.p2p import PeerID
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from .errors import BadRequestError, PeerBusyError, PeerUnreachableError
from .handles import INFO, STRIPE
from .wire import MAX_STRIPES, encode_frame, read_frame, stripe, stripe_count, stripe_header


@dataclass
class Traffic:
    """Bytes and calls on one side of a link (serialized message sizes, metadata included)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    calls: int = 0

    def add(self, other: "Traffic") -> None:
        self.bytes_sent += other.bytes_sent
        self.bytes_received += other.bytes_received
        self.calls += other.calls


async def _counted(messages, traffic: Traffic | None) -> AsyncIterator:
    for message in messages:
        if traffic is not None:
            traffic.bytes_sent += message.ByteSize()
        yield message


async def _drain(stream: AsyncIterator, traffic: Traffic | None) -> None:
    """Read a stripe stream's answer (an empty frame) to its end; its errors show on the frame's first stream."""
    try:
        async for message in stream:
            if traffic is not None:
                traffic.bytes_received += message.ByteSize()
    except Exception:  # noqa: BLE001 - the first stream reports what went wrong
        pass


async def _counting(stream: AsyncIterator, traffic: Traffic | None) -> AsyncIterator:
    async for message in stream:
        if traffic is not None:
            traffic.bytes_received += message.ByteSize()
        yield message


async def call(p2p: P2P, peer_id: str, handle: str, tensors: dict[str, torch.Tensor], meta: dict,
               *, timeout_s: float, traffic: Traffic | None = None,
               liveness_s: float | None = None, max_stripes: int = MAX_STRIPES,
               pull: int = 1) -> tuple[dict[str, torch.Tensor], dict]:
    """Send named ``tensors`` + ``meta`` to ``handle`` on ``peer_id``; return the named response tensors + meta.

    ``traffic``, if given, is credited with the bytes sent and received and one call. With ``liveness_s``, a call
    still unanswered after that long pings the peer every ``liveness_s``; a peer that does not answer a ping
    within ``liveness_s`` is declared unreachable at once, so a vanished machine (no connection reset) is
    detected in seconds, not at ``timeout_s``.

    A large request travels striped over up to ``max_stripes`` streams (:func:`swarm.wire.stripe`: every new
    stream starts with a small flow-control window, so one stream runs far below a long, fast link at first).
    ``pull > 1`` opens that many streams to ``handle`` (meta ``stripe``: its index, ``of``: ``pull``) and reads the
    answer striped over them (the collect stream of :mod:`swarm.direct_reply`).

    Raises:
        PeerBusyError: no answer within ``timeout_s``, but (with ``liveness_s``) the peer still answers pings.
        PeerUnreachableError: connection failed or broke, a missed ping, or no answer within ``timeout_s``.
        SwarmError subclasses: the node answered with an error.
    """
    meta = {**meta, "names": list(tensors)}
    if pull > 1:
        requests = [list(encode_frame(list(tensors.values()), {**meta, "stripe": i, "of": pull})) for i in range(pull)]
    else:
        messages = list(encode_frame(list(tensors.values()), meta))
        requests = stripe(messages, stripe_count(messages, max_stripes), secrets.token_hex(8))
    peer = PeerID.from_base58(peer_id)

    async def exchange():
        if traffic is not None:
            traffic.calls += 1
        opened = await asyncio.gather(*(
            p2p.iterate_protobuf_handler(peer, handle if i == 0 or pull > 1 else STRIPE, _counted(request, traffic),
                                         runtime_pb2.ExpertResponse)
            for i, request in enumerate(requests)), return_exceptions=True)
        streams = [s for s in opened if not isinstance(s, BaseException)]
        drains = []
        try:
            for s in opened:
                if isinstance(s, BaseException):
                    raise s
            if pull > 1:
                async def own(stripe_id: str, count: int):
                    if count != pull:
                        raise BadRequestError(f"Peer {peer_id} striped its answer over {count} streams; {pull} were "
                                              f"opened.")
                    sides = []
                    for index, side in enumerate(streams[1:], 1):
                        side = _counting(side, traffic)
                        try:
                            first = await anext(side)
                        except StopAsyncIteration:
                            raise PeerUnreachableError(f"Peer {peer_id} closed stripe {index} of {handle}.") from None
                        if stripe_header(first) != (stripe_id, index):
                            raise BadRequestError(f"Peer {peer_id} sent stripe streams out of order.")
                        sides.append(side)
                    return sides
                frame = await read_frame(_counting(streams[0], traffic), stripes=own)
            else:
                drains = [asyncio.ensure_future(_drain(side, traffic)) for side in streams[1:]]
                frame = await read_frame(_counting(streams[0], traffic))
        finally:
            for task in drains:
                task.cancel()
            await asyncio.gather(*drains, return_exceptions=True)
            for stream in streams:
                await stream.aclose()
        if frame is None:
            raise PeerUnreachableError(f"Peer {peer_id} closed the stream of {handle} without answering.")
        return frame

    async def watchdog():
        while True:
            await asyncio.sleep(liveness_s)
            await ping(p2p, peer_id, timeout_s=liveness_s)  # raises PeerUnreachableError

    async def guarded():
        if liveness_s is None:
            return await exchange()
        work, guard = asyncio.ensure_future(exchange()), asyncio.ensure_future(watchdog())
        try:
            await asyncio.wait({work, guard}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                return work.result()
            guard.result()  # the watchdog only ends by raising
        finally:
            for task in (work, guard):
                task.cancel()

    try:
        out, reply = await asyncio.wait_for(guarded(), timeout=timeout_s)
    except asyncio.TimeoutError:
        if liveness_s is not None:  # slow or dead? one more ping tells
            try:
                await ping(p2p, peer_id, timeout_s=liveness_s)
            except PeerUnreachableError:
                pass
            else:
                raise PeerBusyError(f"Peer {peer_id} answers pings but did not finish {handle} within "
                                    f"{timeout_s:.1f} s: it is busy, not dead.") from None
        raise PeerUnreachableError(f"Peer {peer_id} did not answer {handle} within {timeout_s:.1f} s.") from None
    except (ConnectionError, OSError, asyncio.IncompleteReadError, EOFError) as e:
        raise PeerUnreachableError(f"Connection to peer {peer_id} broke during {handle}: {type(e).__name__}: {e}") from e
    except Exception as e:
        if type(e).__name__ in ("P2PDaemonError", "P2PHandlerError", "ControlFailure", "DispatchFailure"):
            raise PeerUnreachableError(f"Peer {peer_id} failed {handle}: {e}") from e
        raise
    names = reply.get("names", [])
    if len(names) != len(out):
        raise BadRequestError(f"Peer {peer_id} sent a response whose names do not match its tensors.")
    return dict(zip(names, out)), reply


async def ping(p2p: P2P, peer_id: str, *, timeout_s: float = 5.0) -> tuple[float, dict]:
    """Round-trip time of the node's info RPC, and the info it returned."""
    t0 = time.perf_counter()
    try:
        response = await asyncio.wait_for(
            p2p.call_protobuf_handler(PeerID.from_base58(peer_id), INFO, runtime_pb2.ExpertRequest(),
                                      runtime_pb2.ExpertResponse), timeout=timeout_s)
    except Exception as e:
        raise PeerUnreachableError(f"Peer {peer_id} did not answer a ping: {type(e).__name__}: {e}") from e
    return time.perf_counter() - t0, msgpack.unpackb(response.metadata, raw=False)
