"""Values a trace knows on the client, not computed in the graph (``tracer.result``, ``lm.inputs``): a placeholder
while tracing, bound once the trace ran; ``.save()`` keeps it for the caller, and a view taken inside
``tracer.invoke(...)`` reads that invoke's ``rows`` of the ``whole`` value."""

from __future__ import annotations

from typing import Any


class ClientValue:
    """Base of :class:`hybrid.steps.GeneratedTokens` and :class:`hybrid.root_inputs.RootInputs`."""

    def __init__(self, whole: "ClientValue | None" = None, rows: slice | None = None) -> None:
        self.saved = False
        self._value: Any = None
        self._whole, self._rows = whole, rows

    def save(self) -> "ClientValue":
        self.saved = True
        return self

    @property
    def bound(self) -> bool:
        return self._whole.bound if self._whole is not None else self._value is not None
