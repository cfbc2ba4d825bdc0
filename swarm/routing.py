"""Routes: which node runs which layers. Fewest hops first, then lowest measured latency."""

from __future__ import annotations

from dataclasses import dataclass

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


def plan_route(records: list[ServerRecord], start: int, end: int, *, latency_s: dict[str, float] | None = None,
               exclude: frozenset[str] = frozenset(), model_name: str = "model", embed: bool = False,
               head: bool = False, load: dict[str, float] | None = None) -> list[Hop]:
    """Cover layers ``[start, end)`` with the fewest hops; among those, the lowest summed latency × (1 + load).

    A node's load is ``load[peer_id]`` where the caller knows better (a fresher ping, a node seen busy), else the load
    its record announces; so among replicas the less-loaded one is chosen.

    With ``embed`` the first hop must serve the embedding; with ``head`` the last hop must serve the head.

    Raises:
        MissingBlocksError: some layers in ``[start, end)`` have no usable node; the message names them.
    """
    latency_s, load = latency_s or {}, load or {}
    usable = [r for r in records if r.online and r.peer_id not in exclude]
    best: dict[int, tuple[int, float, list[Hop]]] = {start: (0, 0.0, [])}
    for layer in range(start, end):  # layers only increase along a route, so one pass in order is a DP
        if layer not in best:
            continue
        hops, cost, route = best[layer]
        for record in usable:
            if record.start <= layer < record.end:
                stop = min(record.end, end)
                if embed and layer == start and not record.embed:
                    continue
                if head and stop == end and not (record.head and record.end == end):
                    continue
                candidate = (hops + 1, cost + latency_s.get(record.peer_id, 0.1) * (1 + load.get(record.peer_id, record.load)),
                             route + [Hop(record, layer, stop)])
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
