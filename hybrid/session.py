"""``lm.session()``: several traces as one experiment, where a later trace may use an earlier trace's values.

::

    with lm.session():
        with lm.trace(prompt_a):
            h = lm.model.layers[5].output[:, -1]          # no .save() needed to use it in a later trace
        with lm.trace(prompt_b):
            lm.model.layers[5].output[:, -1] = h
            out = lm.lm_head.output[:, -1].save()
    out                                                   # a tensor after the session block

As in nnsight, the traces run when the session block ends, in the order they were written. A value of an earlier
trace used by a later one is saved by the earlier trace and sent along with the later one's graph (as a tensor
attachment): it crosses the client link once each way, instead of the hidden states at every intervened layer.
Saved values are bound when the session ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from .errors import TraceError
from .tracing import Tracer, _bind_locals, _user_frame

if TYPE_CHECKING:
    from .graph_builder import GraphBuilder


class Session:
    """Collects the traces of one ``with lm.session():`` block and runs them when it ends."""

    def __init__(self) -> None:
        self._pending: list[tuple[Tracer, Callable[[], dict]]] = []
        self._builders: set[int] = set()
        self.traces: list[Tracer] = []
        """The session's traces in order (each with its ``stats`` once the session has run)."""
        self._state = "new"

    def __enter__(self) -> "Session":
        if self._state != "new":
            raise TraceError("a session can be entered only once; call lm.session() again")
        self._state = "open"
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        pending, self._pending, self._state = self._pending, [], "done"
        if exc_type is None:
            for tracer, run in pending:
                tracer._builder.resolve_externals()
                tracer.bind_values(run())
            _bind_locals(_user_frame())
        return False

    @property
    def open(self) -> bool:
        return self._state == "open"

    def adopt(self, tracer: Tracer) -> None:
        """Let ``tracer`` use values of this session's earlier traces."""
        self._builders.add(id(tracer._builder))
        self.traces.append(tracer)
        tracer._builder.accepts = self._accepts

    def defer(self, tracer: Tracer, run: Callable[[], dict]) -> None:
        """Run ``tracer``'s graph (``run() -> saved values``) when the session ends."""
        self._pending.append((tracer, run))

    def _accepts(self, builder: "GraphBuilder") -> bool:
        return id(builder) in self._builders and builder.values is None
