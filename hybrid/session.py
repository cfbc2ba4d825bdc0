"""``lm.session()``: several traces as one experiment, where a later trace may use an earlier trace's values.

::

    with lm.session() as session:
        with lm.trace(prompt_a):
            h = lm.model.layers[5].output[:, -1]          # no .save() needed to use it in a later trace
        with lm.trace(prompt_b):
            lm.model.layers[5].output[:, -1] = h
            out = lm.lm_head.output[:, -1].save()
    out                                                   # a tensor after the session block

As in nnsight, the traces run when the session block ends, in the order they were written. A value of an earlier
trace used by a later one is a ``load`` node of the later graph, keyed by the session's random id. Where both traces
are pushed (``hybrid``/``centralized``) and the node that computes the value comes no later in the route than its
use, it stays on that node (:mod:`hybrid.session_store`): the earlier trace keeps it there and the later trace loads
it there, so it never crosses the client link. Otherwise (a value from a later layer used at an earlier one, a value
computed by the client's own embedding or head, or the ``local``/``swarm`` placements) the earlier trace saves it and
the client sends it with the later graph. Saved values are bound when the session ends.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Callable

import torch

from .errors import OrderError, TraceError
from .planner import Executor, plan_graph
from .request import SessionLinks
from .source_view import instrument_for
from .tracing import Tracer, _bind_locals, _user_frame

if TYPE_CHECKING:
    from .proxy import Proxy

PUSHED = ("hybrid", "centralized")


class Session:
    """Collects the traces of one ``with lm.session():`` block and runs them when it ends.

    Attributes:
        traces: the session's traces in order (each with its ``stats`` once the session has run).
        kept: ``(trace index, node id)`` of the values that stayed on a node for a later trace.
    """

    def __init__(self, lm: Any) -> None:
        self.lm = lm
        self.id = uuid.uuid4().hex
        self.traces: list[Tracer] = []
        self.kept: set[tuple[int, int]] = set()
        self._pending: list[tuple[Tracer, str, Callable[[SessionLinks], dict]]] = []
        self._state = "new"

    def __enter__(self) -> "Session":
        if self._state != "new":
            raise TraceError("a session can be entered only once; call lm.session() again")
        self._state = "open"
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        pending, self._pending, self._state = self._pending, [], "done"
        if exc_type is None:
            links, relayed = self._links([(t, p) for t, p, _ in pending])
            for (tracer, _, run), link, through_client in zip(pending, links, relayed):
                supplied = {node: proxy.value for node, proxy in through_client.items()}  # earlier traces ran
                tracer.bind_values(run(SessionLinks(link.keep, link.held, supplied)))
            _bind_locals(_user_frame())
        return False

    @property
    def open(self) -> bool:
        return self._state == "open"

    def adopt(self, tracer: Tracer) -> None:
        """Let ``tracer`` use values of this session's earlier traces."""
        index = len(self.traces)
        self.traces.append(tracer)
        tracer._builder.importer = lambda proxy: self._key(index, proxy)

    def defer(self, tracer: Tracer, placement: str, run: Callable[[SessionLinks], dict]) -> None:
        """Run ``tracer``'s graph in ``placement`` (``run(links) -> saved values``) when the session ends."""
        self._pending.append((tracer, placement, run))

    def _key(self, index: int, proxy: "Proxy") -> str:
        source = self._source(proxy)
        if source is None or source >= index:
            raise TraceError("a value traced in another trace can only be used in a later trace of the same "
                             "`with lm.session():`")
        return f"{self.id}:{source}:{proxy.node_id}"

    def _source(self, proxy: "Proxy") -> int | None:
        return next((i for i, t in enumerate(self.traces) if t._builder is proxy._builder), None)

    def _links(self, traces: list[tuple[Tracer, str]]) -> tuple[list[SessionLinks], list[dict[int, "Proxy"]]]:
        """Decide, for every shared value, whether it stays on its node or goes through the client. Returns each
        trace's links (``keep`` and ``held``) and, per trace, its ``load`` nodes the client fills (with the proxies
        whose values they take, once those traces have run)."""
        n = self.lm.config.num_hidden_layers
        for trace, _ in traces:
            instrument_for(self.lm.skeleton, trace.graph)
        events = self.lm.skeleton.shapes(torch.zeros((1, 1), dtype=torch.long), None).events
        whole = [Executor("all", 0, n + 1)]
        stages = [plan_graph(t.graph, events, n, whole).stages for t, _ in traces]
        imports = [(i, node, self._source(proxy), proxy)
                   for i, (t, _) in enumerate(traces) for node, proxy in t._builder.imports.items()]
        stay: dict[tuple[int, int], bool] = {}
        for i, node, j, proxy in imports:
            stage = stages[j][proxy.node_id]
            ok = traces[i][1] in PUSHED and traces[j][1] in PUSHED and 1 <= stage <= n
            if ok:
                try:
                    plan_graph(traces[i][0].graph, events, n, whole, held={node: stage})
                except OrderError:  # used before the node that holds it runs: through the client instead
                    ok = False
            stay[(j, proxy.node_id)] = stay.get((j, proxy.node_id), True) and ok
        links = [SessionLinks({}, {}) for _ in traces]
        relayed: list[dict[int, Proxy]] = [{} for _ in traces]
        for i, node, j, proxy in imports:
            if stay[(j, proxy.node_id)]:
                links[j].keep[proxy.node_id] = self._key(i, proxy)
                links[i].held[node] = stages[j][proxy.node_id]
                self.kept.add((j, proxy.node_id))
            else:
                proxy.save()
                relayed[i][node] = proxy
        return links, relayed
