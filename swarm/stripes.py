"""The receiving side of striped frames (:func:`swarm.wire.stripe`): a frame's extra streams, matched to its first.

A striped request arrives as its first stream (the RPC's own handle, whose header names the stripes) and ``k - 1``
streams on handle :data:`swarm.handles.STRIPE`, in any order. Each stripe stream is *offered* here under
``(caller, stripe id, index)`` and stays open until the first stream's reader has read it (or ``wait_s`` passes);
only streams of the same authenticated caller are matched, so no one can feed chunks into another peer's frame.

Bounds: a caller may have at most ``max_per_peer`` stripe streams waiting here; a first stream waits at most
``wait_s`` for its stripes, then the request is refused.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator

from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from .errors import BadRequestError, OverloadedError, SwarmError
from .handles import STRIPE
from .wire import encode_error, encode_frame, stripe_header

logger = logging.getLogger(__name__)

Key = tuple[str, str, int]


@dataclass
class StripeBoard:
    """Stripe streams waiting for their frame's reader, and readers waiting for their stripes."""

    wait_s: float = 30.0
    max_per_peer: int = 64
    _pending: dict[Key, tuple[AsyncIterator, asyncio.Future]] = field(default_factory=dict)
    _wanted: dict[Key, asyncio.Future] = field(default_factory=dict)
    _open: dict[Key, asyncio.Future] = field(default_factory=dict)

    async def offer(self, peer: str, stripe_id: str, index: int, stream: AsyncIterator) -> None:
        """Hand ``stream`` (after its stripe header) to its frame's reader; return once the reader is done with it.

        Raises:
            BadRequestError: a second stream with the same id and index, or no reader took it within ``wait_s``.
            OverloadedError: the caller has ``max_per_peer`` stripe streams waiting here already.
        """
        key = (peer, stripe_id, index)
        if key in self._open:
            raise BadRequestError(f"Stripe {index} of frame {stripe_id!r} arrived twice.")
        if sum(1 for k in self._open if k[0] == peer) >= self.max_per_peer:
            raise OverloadedError(f"{self.max_per_peer} stripe streams of this peer are already open here; wait for "
                                  f"their frames to be read.")
        done = asyncio.get_running_loop().create_future()
        self._open[key] = done
        try:
            wanted = self._wanted.pop(key, None)
            if wanted is not None and not wanted.done():
                wanted.set_result((stream, done))
            else:
                self._pending[key] = (stream, done)
            try:
                await asyncio.wait_for(asyncio.shield(done), self.wait_s)
            except asyncio.TimeoutError:
                raise BadRequestError(f"Stripe {index} of frame {stripe_id!r} was not read within {self.wait_s:.0f} "
                                      f"s: its first stream never came.") from None
        finally:
            del self._open[key]
            self._pending.pop(key, None)

    async def take(self, peer: str, stripe_id: str, count: int) -> list[AsyncIterator]:
        """Stripe streams ``1 .. count - 1`` of ``peer``'s frame ``stripe_id``, waiting up to ``wait_s`` for them.
        Each is released to its handler when the reader closes it (``aclose()``)."""
        loop = asyncio.get_running_loop()
        futures = []
        for index in range(1, count):
            key = (peer, stripe_id, index)
            if key in self._wanted:
                raise BadRequestError(f"Frame {stripe_id!r} is already being read.")
            future = loop.create_future()
            pending = self._pending.pop(key, None)
            if pending is not None:
                future.set_result(pending)
            else:
                self._wanted[key] = future
            futures.append((key, future))
        try:
            got = await asyncio.wait_for(asyncio.gather(*(f for _, f in futures)), self.wait_s)
        except asyncio.TimeoutError:
            raise BadRequestError(f"The {count - 1} other stream(s) of striped frame {stripe_id!r} did not all arrive "
                                  f"within {self.wait_s:.0f} s.") from None
        finally:
            for key, future in futures:
                if self._wanted.get(key) is future:
                    del self._wanted[key]
        return [_released(stream, done) for stream, done in got]


async def _released(stream: AsyncIterator, done: asyncio.Future) -> AsyncIterator:
    """``stream``, marking ``done`` when its reader closes it (or stops reading it)."""
    try:
        async for message in stream:
            yield message
    finally:
        if not done.done():
            done.set_result(None)


async def serve_stripes(p2p: P2P, board: StripeBoard) -> None:
    """Register the :data:`~swarm.handles.STRIPE` handle on ``p2p``: each stream is offered on ``board`` and answered
    with an empty frame (or an error frame) once its frame's reader is done with it."""
    async def handle(requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext):
        try:
            try:
                first = await anext(requests)
            except StopAsyncIteration:
                raise BadRequestError("Empty stripe stream.") from None
            stripe_id, index = stripe_header(first)
            await board.offer(context.remote_id.to_base58(), stripe_id, index, requests)
            messages = encode_frame([], {"names": []}, runtime_pb2.ExpertResponse)
        except SwarmError as e:
            logger.info("Rejected a stripe from %s: %s", context.remote_id, e)
            messages = encode_error(e)
        for message in messages:
            yield message
    await p2p.add_protobuf_handler(STRIPE, handle, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True)
