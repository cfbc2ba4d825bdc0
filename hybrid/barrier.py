"""``tracer.barrier(n)``: nnsight's meeting point for ``n`` invokes of one trace (cross-prompt patching).

::

    with lm.generate(max_new_tokens=3) as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(prompt):
            embeddings = lm.model.embed_tokens.output
            barrier()
        with tracer.invoke("_ _ _ _ _"):
            barrier()
            lm.model.embed_tokens.output = embeddings    # the first invoke's rows

nnsight runs each invoke in its own worker, in the order the model reaches what each asked for, so an invoke that
hands a value to another must wait at a barrier until the value exists. Our tracer records invokes one after the
other in the order they are written, and the graph's order is the model's, not the recording's: every value an
invoke made above its barrier already exists when a later-written invoke passes its own. So a barrier orders nothing
here; it checks that it is used as nnsight requires (inside invokes of its trace, each round reached by exactly ``n``
invokes), and refuses what nnsight would refuse: a round that not every invoke reached (nnsight: "A barrier was never
reached by every block it waits for"). An invoke's ``k``-th call belongs to round ``k``. An earlier-written invoke
cannot use a value a later-written one makes below a barrier (it does not exist yet while the earlier one is
recorded): Python raises ``NameError`` at that line, as nnsight does where a barrier's count is too low.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import TraceError
from .proxy import at_user_line

if TYPE_CHECKING:
    from .tracing import Tracer


class Barrier:
    """A meeting point for ``n`` invokes of one trace; call it from each of them.

    Attributes:
        n: how many invokes must reach each round.
    """

    def __init__(self, tracer: "Tracer", n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise TraceError(at_user_line(f"tracer.barrier(n) needs a positive number of invokes; got {n!r}"))
        self.n = n
        self._tracer = tracer
        self._calls: dict[int, int] = {}
        """invoke index -> how many times it called the barrier."""

    def __call__(self) -> None:
        """Arrive at the barrier from the current invoke (its next round)."""
        tracer = self._tracer
        invoke = tracer._current
        if tracer._state != "tracing" or invoke is None:
            raise TraceError(at_user_line("a barrier is called inside the `with tracer.invoke(...):` blocks of its "
                                          "trace"))
        index = tracer._invokes.index(invoke)
        self._calls[index] = self._calls.get(index, 0) + 1
        arrived = sum(1 for calls in self._calls.values() if calls >= self._calls[index])
        if arrived > self.n:
            raise TraceError(at_user_line(f"tracer.barrier({self.n}) was reached by {arrived} invokes in round "
                                          f"{self._calls[index]}; create it with the number of invokes that call it"))

    def check(self) -> None:
        """At the end of the trace: every round was reached by exactly ``n`` invokes (else nnsight's blocks would
        wait forever). Raises TraceError."""
        for round_ in range(1, max(self._calls.values(), default=0) + 1):
            arrived = sum(1 for calls in self._calls.values() if calls >= round_)
            if arrived != self.n:
                raise TraceError(f"a barrier was never reached by every invoke it waits for: tracer.barrier({self.n})"
                                 f" round {round_} was reached by {arrived}; create it with the number of invokes "
                                 "that call it")
