"""Routes: which node runs which layers. The cheapest route wins: each hop costs its round trip.

A hop's cost is ``(hop_s + latency) × (1 + load) × trust × jitter`` (see :class:`RouteCosts`): with similar
latencies the route with fewer hops wins, a much faster route wins over a shorter one, a loaded node loses to its
replica, a node this client has no good history with costs ``untrusted_factor`` more than one it has, and every
client draws its own ``jitter`` per node, so routes of near-equal cost are spread over the swarm's clients instead of
all going to the node that claims the longest span.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import MissingBlocksError
from .records import ServerRecord
from .span_selection import missing_spans


@dataclass(frozen=True)
class Hop:
    """One node running layers ``[start, end)`` of the route (a sub-range of its span)."""

    record: ServerRecord
    start: int
    end: int

    @property
    def peer_id(self) -> str:
        return self.record.peer_id


@dataclass(frozen=True)
class RouteCosts:
    """What a client knows about nodes beyond their records, for :func:`plan_route`."""

    latency_s: dict[str, float] = field(default_factory=dict)
    """Peer id -> measured round trip (unknown: ``default_latency_s``)."""
    load: dict[str, float] = field(default_factory=dict)
    """Peer id -> load where the caller knows better than the record (a fresher ping, a node seen busy)."""
    trusted: frozenset[str] = frozenset()
    """Peers with a good history with this client (answers it used); the others cost ``untrusted_factor`` more."""
    jitter: dict[str, float] = field(default_factory=dict)
    """Peer id -> this client's random cost factor (≥ 1) for it; missing = 1."""
    suspects: dict[str, int] = field(default_factory=dict)
    """Peer id -> distinct clients reporting it as computing wrong numbers; each adds ``suspect_weight`` to its
    cost factor (weighed, never excluded on others' word)."""
    suspect_weight: float = 1.0
    hop_s: float = 0.02
    """Fixed cost of one hop (a round trip's overhead beyond the ping), so fewer hops win at similar latency."""
    default_latency_s: float = 0.1
    untrusted_factor: float = 1.0


def plan_route(records: list[ServerRecord], start: int, end: int, *, latency_s: dict[str, float] | None = None,
               exclude: frozenset[str] = frozenset(), model_name: str = "model", embed: bool = False,
               head: bool = False, load: dict[str, float] | None = None, costs: RouteCosts | None = None) -> list[Hop]:
    """Cover layers ``[start, end)`` at the lowest summed hop cost (see the module doc and :class:`RouteCosts`).

    ``latency_s`` and ``load`` are shortcuts for the fields of ``costs`` of the same name. A node's load is
    ``load[peer_id]`` where given, else the load its record announces.

    With ``embed`` the first hop must serve the embedding; with ``head`` the last hop must serve the head.

    Raises:
        MissingBlocksError: some layers in ``[start, end)`` have no usable node; the message names them.
    """
    costs = costs or RouteCosts()
    latency, loads = {**costs.latency_s, **(latency_s or {})}, {**costs.load, **(load or {})}
    usable = [r for r in records if r.online and r.peer_id not in exclude]

    def hop_cost(record: ServerRecord) -> float:
        peer = record.peer_id
        trust = 1.0 if peer in costs.trusted else costs.untrusted_factor
        return ((costs.hop_s + latency.get(peer, costs.default_latency_s)) * (1 + loads.get(peer, record.load))
                * trust * costs.jitter.get(peer, 1.0) * (1 + costs.suspect_weight * costs.suspects.get(peer, 0)))

    best: dict[int, tuple[float, int, list[Hop]]] = {start: (0.0, 0, [])}
    for layer in range(start, end):  # layers only increase along a route, so one pass in order is a DP
        if layer not in best:
            continue
        cost, hops, route = best[layer]
        for record in usable:
            if record.start <= layer < record.end:
                stop = min(record.end, end)
                if embed and layer == start and not record.embed:
                    continue
                if head and stop == end and not (record.head and record.end == end):
                    continue
                candidate = (cost + hop_cost(record), hops + 1, route + [Hop(record, layer, stop)])
                if stop not in best or candidate[:2] < best[stop][:2]:
                    best[stop] = candidate
    if end not in best:
        num_layers = max([r.num_layers for r in records] + [end])
        gaps = [(max(s, start), min(e, end)) for s, e in missing_spans(usable, num_layers) if s < end and e > start]
        if not gaps and (embed or head):
            raise MissingBlocksError(model_name, [(start, end)], hint="No online node serves the "
                                     + " and ".join(s for s, f in (("embedding", embed), ("head", head)) if f)
                                     + " stage; run them locally or start a node with that stage.")
        raise MissingBlocksError(model_name, gaps or [(start, end)],
                                 hint=f"({len(exclude)} peer(s) excluded after failures)" if exclude else "")
    return best[end][2]


class RouteTable(list):
    """A route (a list of :class:`Hop`) that prints as a table a reader can scan: layers (and the embedding / head
    stages where the route runs them on the node), the node's short peer id, its address and the latency this client
    measured to it ("?" where unknown)."""

    def __init__(self, hops: list[Hop], *, addresses: dict[str, str] | None = None,
                 latency_s: dict[str, float] | None = None, embed: bool = False, head: bool = False):
        super().__init__(hops)
        self.addresses, self.latency_s = addresses or {}, latency_s or {}
        self.embed, self.head = embed, head

    def __str__(self) -> str:
        rows = [("layers", "peer", "address", "latency")]
        for hop in self:
            stages = "+".join(s for s, on in (("embed", self.embed and hop is self[0]),
                                              ("head", self.head and hop is self[-1])) if on)
            latency = self.latency_s.get(hop.peer_id)
            rows.append((f"{hop.start}:{hop.end}" + (f" ({stages})" if stages else ""), "…" + hop.peer_id[-8:],
                         self.addresses.get(hop.peer_id, "?"), "?" if latency is None else f"{latency * 1e3:.1f} ms"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)

    __repr__ = __str__  # typed at a prompt, ``model.route()`` shows the table too
