"""``swarm-node status``'s snapshot and text: coverage per layer, gaps with the command that fills them, a header
and a legend for the flags (issue 15)."""

from __future__ import annotations

from swarm.records import ServerRecord
from swarm.status import STAGES_LEGEND, model_snapshot, render_text

PEERS = ["/ip4/127.0.0.1/tcp/4000/p2p/QmFirst"]


def record(peer: str, start: int, end: int, **kw) -> ServerRecord:
    return ServerRecord(peer_id=peer, start=start, end=end, model_name="m", checkpoint_hash="ab" * 32, num_layers=6,
                        **kw)


def test_snapshot_counts_online_nodes_per_layer_and_names_the_gaps():
    now = 1000.0
    records = [(record("QmA", 0, 3, embed=True), now + 20), (record("QmB", 2, 4), now + 5),
               (record("QmC", 4, 6, head=True, state="offline"), now + 9)]
    display = {"QmA": {"device": "cpu", "started_at": now - 125, "queue": 1, "max_queue": 8}}
    snap = model_snapshot({"name": "m", "num_layers": 6, "hash": "ab" * 32}, records, display, now, PEERS)
    assert snap["coverage"] == [1, 1, 2, 1, 0, 0]
    assert [(g["start"], g["end"]) for g in snap["gaps"]] == [(4, 6)]
    assert snap["gaps"][0]["command"] == f"swarm-node serve --model m --blocks 4:6 --initial-peers {PEERS[0]}"
    a, b, c = snap["nodes"]
    assert (a["device"], a["queue"], a["uptime_s"], a["expires_in_s"]) == ("cpu", 1, 125.0, 20.0)
    assert (b["device"], b["queue"], b["uptime_s"]) == (None, None, None)  # an older node: shown as "?"
    assert c["state"] == "offline"

    text = render_text({"models": [snap]})
    lines = text.splitlines()
    assert lines[1].split() == ["LAYERS", "STAGES", "STATE", "LOAD", "QUEUE", "TOK/S", "DTYPE", "DEVICE", "VERSION",
                                "UPTIME", "PEER"]
    assert lines[2].split()[:3] == ["0:3", "E", "online"] and "2m05s" in lines[2]
    assert lines[4].split()[:3] == ["4:6", "H", "offline"]
    assert "gaps: 4:6" in text and snap["gaps"][0]["command"] in text and STAGES_LEGEND in text


def test_a_fully_served_model_has_no_gaps():
    snap = model_snapshot({"name": "m", "num_layers": 6}, [(record("QmA", 0, 6), 10.0)], {}, 0.0, PEERS)
    assert snap["gaps"] == [] and "gaps: none" in render_text({"models": [snap]})


def test_text_from_the_network_is_bounded_and_the_fill_command_quoted():
    """Anyone can announce a model: its name must not turn the suggested command into another one."""
    evil = "m; rm -rf ~ " + "x" * 500
    records = [(record("QmA", 0, 3, version="9" * 1000), 10.0)]
    snap = model_snapshot({"name": evil, "num_layers": 6}, records, {"QmA": {"device": ["not", "text"]}}, 0.0, PEERS)
    assert snap["gaps"][0]["command"].startswith("swarm-node serve --model 'm; rm -rf ~ xxx")
    assert len(snap["name"]) <= 120 and len(snap["nodes"][0]["version"]) <= 120
    assert snap["nodes"][0]["device"] is None and "?" in render_text({"models": [snap]})
