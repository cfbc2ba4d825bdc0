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
    assert server._admit({"start": 0, "end": 2}, "a")  # below the bound: admitted (and counted for client a)
    server.computing = 2
    with pytest.raises(OverloadedError, match=r"2 job\(s\) running or queued.*--max-queued-compute\) is 2.*replica"):
        server._admit({"start": 0, "end": 2}, "b")
    assert not server._admit({"session_id": "s", "close": True}, "b")  # closing costs no compute
    server.computing = 0
    server.queue.done("a")


def test_one_client_cannot_fill_the_whole_queue(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory("llama", num_layers=2)
    server = SpanServer(SpanModel.load(path, Span(0, 2, embed=True, head=True)),
                        limits=ServerLimits(max_queued_compute=8, max_client_queued_compute=2))
    try:
        for _ in range(2):
            server._admit({}, "flood")
        with pytest.raises(OverloadedError, match=r"This client already has 2 request.*--max-client-queued-compute"):
            server._admit({}, "flood")
        assert server._admit({}, "other")  # another client is still admitted
        server.queue.done("flood")
        assert server._admit({}, "flood")  # an answered request frees its place
    finally:
        server.shutdown()


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


@pytest.mark.parametrize("flag", ["--max-client-queued-compute", "--max-client-sessions"])
def test_per_client_bounds_below_one_are_refused_before_serving(flag, capsys):
    from swarm.cli import _serve, build_parser

    args = build_parser().parse_args(["serve", "--model", "no-such-model", flag, "0"])
    assert _serve(args, None) == 2
    assert f"{flag} must be at least 1" in capsys.readouterr().err


def test_every_server_limit_is_a_serve_flag_with_its_default_in_the_help():
    import dataclasses

    from swarm.cli import build_parser

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    actions = {a.dest: a for a in serve._actions}
    for f in dataclasses.fields(ServerLimits):
        assert actions[f.name].default == f.default and f"Default: {f.default}." in actions[f.name].help
