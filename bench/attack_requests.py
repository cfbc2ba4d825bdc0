"""Issue 10's attacks on a node, as a hostile client sends them: raw requests, no client-side checks
(:mod:`bench.node_attacks` measures what each costs the node and its other users).

Each attack in :data:`ATTACKS` is ``attack(attacker, sizes)``; it returns when the node answered (and raises the
error it answered with). :func:`outcome` names an answer: ``ok``, a typed error's code, or ``untyped:<type>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hybrid.ir import Graph, Ref
from hybrid.planner import Executor, Plan
from hybrid.request import HOOK_KIND, HOOK_VERSION, encode_request
from swarm.errors import CapacityError, InternalNodeError, SwarmError
from swarm.handles import FORWARD, INFERENCE
from swarm.transport import call


@dataclass(frozen=True)
class Sizes:
    """How big each attack is (``--quick`` scales them down)."""

    chain_ops: int = 9_000
    chain_side: int = 256
    list_repeat: int = 2_000_000_000
    outer_n: int = 20_000
    expanded_side: int = 16_384
    power: int = 10 ** 7
    json_ops: int = 800_000
    session_opens: int = 9
    batch_tokens: int = 16_384
    chunks: int = 2048
    flood_requests: int = 20
    flood_side: int = 8000
    """A value of 8000² floats (244 MiB) nearly fills a node's default 256 MiB session store: each put evicts the rest."""
    window_s: float = 6.0
    baseline_rounds: int = 5


QUICK = Sizes(chain_ops=2_000, chain_side=128, outer_n=12_000, json_ops=200_000, batch_tokens=4096, chunks=256,
              flood_requests=10, flood_side=4096, window_s=1.5, baseline_rounds=2)


# ---- the attacks: raw requests, as a hostile client sends them ------------------------------------------------

def _graph_request(graph: Graph, keep: dict[int, str] | None = None) -> tuple[dict, dict]:
    plan = Plan([Executor("node", 0, 5)], [0] * len(graph.nodes), [graph.saved()], [])
    payload = encode_request(graph, plan, 0, keep=keep)
    return ({"inputs": torch.tensor([[5, 6, 7]]),
             "hook_payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)},
            {"hook": {"kind": HOOK_KIND, "version": HOOK_VERSION}})


def matmul_chain(s: Sizes) -> Graph:
    g = Graph()
    m = g.attach(torch.eye(s.chain_side))
    prev = g.add("operator", target="matmul", args=[m, m])
    for _ in range(s.chain_ops - 1):
        prev = g.add("operator", target="matmul", args=[Ref(prev.id), m])
    prev.save = True
    return g


def list_mul(s: Sizes) -> Graph:
    g = Graph()
    g.add("operator", target="mul", args=[[0], s.list_repeat])
    return g


def outer_product(s: Sizes) -> Graph:
    g = Graph()
    col = g.add("operator", target="mul", args=[g.attach(torch.ones(s.outer_n, 1)), 1.0])
    row = g.add("method", target="t", args=[Ref(col.id)])
    g.add("operator", target="matmul", args=[Ref(col.id), Ref(row.id)], save=True)
    return g


def expanded_saves(s: Sizes) -> Graph:
    g = Graph()
    h = g.add("getter", module="model.layers.1", kind="output", call=0)
    total = g.add("method", target="sum", args=[Ref(h.id)])
    for _ in range(4):
        g.add("method", target="expand", args=[Ref(total.id), s.expanded_side, s.expanded_side], save=True)
    return g


def constant_pow(s: Sizes) -> Graph:
    g = Graph()
    g.add("operator", target="pow", args=[10, s.power], save=True)
    return g


def store_flood_graph(s: Sizes) -> Graph:
    """One request keeping a ``flood_side²`` float value in the node's session store (``keep``)."""
    g = Graph()
    h = g.add("getter", module="model.layers.1", kind="output", call=0)
    total = g.add("method", target="sum", args=[Ref(h.id)])
    g.add("method", target="expand", args=[Ref(total.id), s.flood_side, s.flood_side])
    return g


@dataclass
class Attacker:
    """A hostile client's raw calls to one node (its own p2p and event loop)."""

    client: object
    peer_id: str
    max_length: int
    """The node's longest sequence."""
    open_batch: int
    """Batch of each session the attacker opens: with ``max_length``, a ninth of the node's default KV cache."""
    sessions: list[str] = field(default_factory=list)
    sent: int = 0

    def send(self, handle: str, tensors: dict, meta: dict, timeout_s: float = 300) -> None:
        meta = {"start": 0, "end": 4, "embed": True, "head": True, **meta}
        self.client.loop.run(call(self.client.sequence.p2p, self.peer_id, handle, tensors, meta,
                                  timeout_s=timeout_s), timeout_s=timeout_s + 10)

    def graph(self, build, s: Sizes, keep: bool = False) -> None:
        graph = build(s)
        self.sent += 1
        self.send(FORWARD, *_graph_request(graph, {len(graph.nodes) - 1: f"flood:{self.sent}"} if keep else None))

    def big_json(self, s: Sizes) -> None:
        from bench.node_event_loop import huge_graph_payload
        payload = huge_graph_payload(s.json_ops)
        self.send(FORWARD, {"inputs": torch.tensor([[5, 6, 7]]),
                            "hook_payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)},
                  {"hook": {"kind": HOOK_KIND, "version": HOOK_VERSION}})

    def session_opens(self, s: Sizes) -> None:
        """Open sessions until the node's KV cache is full: ``session_opens`` that each reserve a ninth of it for the
        longest history the node allows, then ever smaller ones until even one token of one row is refused."""
        batch, length = self.open_batch, self.max_length
        for _ in range(s.session_opens + 64):
            sid = f"hostile-{len(self.sessions)}"
            try:
                self.send(INFERENCE, {"inputs": torch.full((batch, 1), 5)},
                          {"session_id": sid, "open": {"max_length": length}})
            except CapacityError:
                if batch == length == 1:
                    return  # the cache is full
                batch, length = (batch // 2, length) if batch > 1 else (1, length // 2)
                continue
            self.sessions.append(sid)

    def big_batch(self, s: Sizes) -> None:
        length = min(self.max_length, s.batch_tokens)
        self.send(FORWARD, {"inputs": torch.randint(3, 100, (s.batch_tokens // length, length))}, {})

    def chunks(self, s: Sizes) -> None:
        sid, n = f"hostile-{len(self.sessions)}", min(s.chunks, self.max_length)
        self.sessions.append(sid)
        self.send(INFERENCE, {"inputs": torch.randint(3, 100, (1, n))},
                  {"session_id": sid, "open": {"max_length": n}, "chunks": [1] * n})

    def store_flood(self, s: Sizes) -> None:
        for _ in range(s.flood_requests):
            self.graph(store_flood_graph, s, keep=True)

    def close_sessions(self) -> None:
        for sid in self.sessions:
            try:
                self.send(INFERENCE, {}, {"session_id": sid, "close": True}, timeout_s=30)
            except SwarmError:
                pass
        self.sessions.clear()


ATTACKS = {
    "matmul chain": lambda a, s: a.graph(matmul_chain, s),
    "list mul": lambda a, s: a.graph(list_mul, s),
    "outer product": lambda a, s: a.graph(outer_product, s),
    "expanded saves": lambda a, s: a.graph(expanded_saves, s),
    "pow on constants": lambda a, s: a.graph(constant_pow, s),
    "big JSON graph": Attacker.big_json,
    "many session opens": Attacker.session_opens,
    "big batch": Attacker.big_batch,
    "chunks": Attacker.chunks,
    "session-store flood": Attacker.store_flood,
}


def outcome(error: BaseException | None) -> str:
    """``ok``, the typed error's code, or ``untyped:<type>`` (an InternalNodeError counts as untyped)."""
    if error is None:
        return "ok"
    if isinstance(error, SwarmError) and not isinstance(error, InternalNodeError):
        return error.code
    return f"untyped:{type(error).__name__}"
