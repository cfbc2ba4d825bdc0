"""Overload answers a typed OverloadedError quickly (issue 10, req. 4); no sockets.

A node whose compute executor already holds ``max_queued_compute`` jobs refuses a new request before queueing any
work for it; the client counts the refusing peer as busy (loaded, routed around), never as dead.
"""

from __future__ import annotations

import pytest

from swarm.errors import OverloadedError
from swarm.remote_sequence import ClientConfig, RemoteSequence
from swarm.span_server import ServerLimits, SpanServer
from swarm.stages import Span, SpanModel


@pytest.fixture(scope="module")
def server(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory("llama", num_layers=2)
    server = SpanServer(SpanModel.load(path, Span(0, 2, embed=True, head=True)),
                        limits=ServerLimits(max_queued_compute=2))
    yield server
    server.shutdown()


def test_a_full_compute_queue_refuses_new_work_but_not_closes(server):
    server.computing = 1
    server._admit({"start": 0, "end": 2})  # below the bound: admitted
    server.computing = 2
    with pytest.raises(OverloadedError, match=r"2 job\(s\) running or queued.*--max-queued-compute\) is 2.*replica"):
        server._admit({"start": 0, "end": 2})
    server._admit({"session_id": "s", "close": True})  # closing costs no compute
    server.computing = 0


def test_an_overloaded_peer_counts_as_busy_never_as_dead():
    seq = RemoteSequence(None, None, None, key="k", model_name="m", num_layers=12, checkpoint_hash="h",
                         config=ClientConfig(busy_load=8.0))
    seq.note_failure("full", OverloadedError("queue full"))
    assert "full" not in seq.excluded()
    assert seq.loads()["full"] == 8.0


def test_a_queue_bound_below_one_is_refused_before_serving(capsys):
    from swarm.cli import _serve, build_parser

    args = build_parser().parse_args(["serve", "--model", "no-such-model", "--max-queued-compute", "0"])
    assert _serve(args, None) == 2
    assert "--max-queued-compute must be at least 1" in capsys.readouterr().err
