"""``model.route()`` prints a table a reader can scan (issue 15), and is still the list of hops code iterates."""

from __future__ import annotations

from swarm.records import ServerRecord
from swarm.routing import Hop, RouteTable


def _record(peer: str, start: int, end: int) -> ServerRecord:
    return ServerRecord(peer, start, end, "m", "h", 30, embed=start == 0, head=end == 30)


def test_route_prints_layers_short_peer_address_and_latency():
    a, b = "QmPgGWuBoxc7khQUTJGab9L971xZeEGyMLvmisXACk2bkh", "QmXc3tP5AdtammX25oxRA8TeSZCURfLDnXdPZnkDVahXHm"
    hops = [Hop(_record(a, 0, 20), 0, 20), Hop(_record(b, 10, 30), 20, 30)]
    table = RouteTable(hops, addresses={a: "/ip4/127.0.0.1/tcp/4001"}, latency_s={a: 0.0025}, head=True)
    assert table == hops and table[1].peer_id == b
    lines = str(table).splitlines()
    assert lines[0].split() == ["layers", "peer", "address", "latency"]
    assert lines[1].split() == ["0:20", "…XACk2bkh", "/ip4/127.0.0.1/tcp/4001", "2.5", "ms"]
    assert lines[2].split() == ["20:30", "(head)", "…kDVahXHm", "?", "?"]
    assert repr(table) == str(table) and "ServerRecord" not in repr(table)
