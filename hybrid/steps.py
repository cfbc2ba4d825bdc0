"""Generation steps while tracing: ``tracer.iter[...]`` / ``tracer.all()`` and ``tracer.result``, as in nnsight 0.8.

::

    with lm.generate(prompt, max_new_tokens=3) as tracer:
        for step in tracer.iter[:2]:                    # steps 0 and 1
            lm.model.layers[5].output[:, -1] += steer   # each step's own getter/setter (call = step)
        ids = tracer.result.save()                      # (B, T + 3) after the block

Step ``s`` is forward call ``s`` of the generation: the prompt in step 0, one new token per later step.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Iterator

import torch

from .errors import TraceError

if TYPE_CHECKING:
    from .tracing import Tracer


class Steps:
    """A selection of generation steps; loop over it to bind module reads and writes to each step in turn."""

    def __init__(self, tracer: "Tracer", start: int = 0, stop: int | None = None, steps: list[int] | None = None):
        self._tracer, self.start, self.stop, self.steps = tracer, start, stop, steps

    def __getitem__(self, key: slice | int | list[int]) -> "Steps":
        if isinstance(key, slice):
            if key.step not in (None, 1):
                raise TraceError(f"tracer.iter[{key.start}:{key.stop}:{key.step}]: a step size is not supported; "
                                 "list the steps: tracer.iter[[0, 2, 4]]")
            return Steps(self._tracer, key.start or 0, key.stop)
        if isinstance(key, (list, tuple)):
            return Steps(self._tracer, steps=[int(k) for k in key])
        return Steps(self._tracer, int(key), int(key) + 1)

    def indices(self) -> list[int]:
        """The selected steps that the generation makes (``tracer.steps`` of them)."""
        wanted = self.steps if self.steps is not None else range(self.start, self.stop or self._tracer.steps)
        if any(s < 0 for s in wanted):
            raise TraceError(f"generation steps cannot be negative; got {list(wanted)}")
        made = [s for s in wanted if s < self._tracer.steps]
        if len(made) < len(wanted):
            warnings.warn(f"steps {[s for s in wanted if s >= self._tracer.steps]} are past the last of the "
                          f"{self._tracer.steps} this run makes; the loop leaves them out", stacklevel=3)
        return made

    def __iter__(self) -> Iterator[int]:
        previous = self._tracer.call
        try:
            for step in self.indices():
                self._tracer.call = step
                yield step
        finally:
            self._tracer.call = previous

    def __enter__(self) -> Any:
        raise TraceError("`with tracer.iter[...]:` is deprecated in nnsight and not supported here; loop instead: "
                         "`for step in tracer.iter[...]:`")

    def __exit__(self, *exc: Any) -> bool:
        return False


class GeneratedTokens:
    """``tracer.result``: the generated token ids ``(B, T + N)``; ``.save()`` it to use it after the block."""

    def __init__(self) -> None:
        self.saved = False
        self._value: torch.Tensor | None = None

    def save(self) -> "GeneratedTokens":
        self.saved = True
        return self

    @property
    def bound(self) -> bool:
        return self._value is not None

    @property
    def value(self) -> torch.Tensor:
        if self._value is None:
            raise TraceError("tracer.result has no value yet: it exists after the `with lm.generate(...)` block")
        return self._value

    def bind(self, tokens: torch.Tensor) -> None:
        self._value = tokens

    def __repr__(self) -> str:
        return f"<GeneratedTokens {'bound' if self.bound else 'pending'}>"
