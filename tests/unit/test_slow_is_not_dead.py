"""Clients tell slow from dead (issue 10, req. 5); no sockets: the transport runs against a fake P2P.

A call that times out while the peer still answers pings is :class:`PeerBusyError`, and the client does not
exclude that peer (it only counts as loaded for a while, so routes prefer its replicas); a peer that fails liveness is
excluded, longer after each failure in a row, until it answers a ping again.
"""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
from hivemind.proto import runtime_pb2

from swarm.errors import PeerBusyError, PeerUnreachableError
from swarm.records import ServerRecord
from swarm.remote_sequence import ClientConfig, RemoteSequence
from swarm.routing import plan_route
from swarm.transport import call

PEER = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


class FakeP2P:
    """A peer whose streamed calls never answer; its pings answer (``alive``) or hang."""

    def __init__(self, alive: bool) -> None:
        self.alive = alive
        self.pings = 0

    async def iterate_protobuf_handler(self, peer_id, handle, messages, response_type):
        async def never():
            await asyncio.sleep(3600)
            yield runtime_pb2.ExpertResponse()
        return never()

    async def call_protobuf_handler(self, peer_id, handle, request, response_type):
        self.pings += 1
        if not self.alive:
            await asyncio.sleep(3600)
        return runtime_pb2.ExpertResponse(metadata=msgpack.packb({"load": 3}))


def run_call(p2p: FakeP2P, **kwargs):
    return asyncio.run(call(p2p, PEER, "swarm.v1.forward", {}, {}, **kwargs))


def test_a_timeout_while_pings_answer_is_busy_not_unreachable():
    p2p = FakeP2P(alive=True)
    with pytest.raises(PeerBusyError, match="busy, not dead"):
        run_call(p2p, timeout_s=0.3, liveness_s=0.05)
    assert p2p.pings >= 2  # the liveness pings during the call, and the one after its deadline


def test_a_missed_ping_is_unreachable():
    with pytest.raises(PeerUnreachableError) as info:
        run_call(FakeP2P(alive=False), timeout_s=0.3, liveness_s=0.05)
    assert not isinstance(info.value, PeerBusyError)


def sequence(**config) -> RemoteSequence:
    return RemoteSequence(None, None, None, key="k", model_name="m", num_layers=12, checkpoint_hash="h",
                          config=ClientConfig(**config))


def test_busy_peers_are_not_excluded_dead_ones_are_with_backoff():
    seq = sequence(ban_s=10.0, max_ban_s=35.0)
    seq.note_failure("slow", PeerBusyError("slow"))
    assert "slow" not in seq.excluded()
    assert seq.loads()["slow"] == ClientConfig().busy_load

    exclusions = []
    for _ in range(4):
        seq.note_failure("dead", PeerUnreachableError("gone"))
        exclusions.append(seq._banned["dead"] - time.monotonic())
    assert "dead" in seq.excluded()
    assert [round(x) for x in exclusions] == [10, 20, 35, 35]  # doubled each time, up to max_ban_s

    seq.saw_alive("dead", {"load": 2})  # it answered a ping: the next failure starts from ban_s again
    seq.note_failure("dead", PeerUnreachableError("gone"))
    assert round(seq._banned["dead"] - time.monotonic()) == 10
    assert seq.loads()["dead"] == 2.0


def rec(peer: str, load: int = 0) -> ServerRecord:
    return ServerRecord(peer_id=peer, start=0, end=12, model_name="m", checkpoint_hash="h", num_layers=12, load=load)


def test_routes_prefer_the_less_loaded_replica():
    latency = {"a": 0.01, "b": 0.01}
    assert plan_route([rec("a", load=5), rec("b", load=0)], 0, 12, latency_s=latency)[0].peer_id == "b"
    # a fresher load (a ping's answer, or a replica seen busy) overrides the record's
    seq = sequence()
    seq.mark_busy("b")
    route = plan_route([rec("a", load=1), rec("b", load=0)], 0, 12, latency_s=latency, load=seq.loads())
    assert route[0].peer_id == "a"
    # the busy peer is still used where nobody else serves its layers
    assert plan_route([rec("b")], 0, 12, latency_s=latency, load=seq.loads())[0].peer_id == "b"
