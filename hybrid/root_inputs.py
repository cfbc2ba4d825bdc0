"""``lm.inputs``: the root model's inputs, as nnsight 0.8.1 gives them, known on the client.

nnsight's ``model.inputs`` in a trace is the root forward's ``(args, kwargs)``: ``((), {"input_ids": (B, T),
"attention_mask": (B, T)})``, plus ``"position_ids"`` when some row of the batch is left-padded (nnsight supplies
them, :func:`hybrid.tracing.nnsight_position_ids`); inside ``tracer.invoke(...)`` every tensor is narrowed to that
invoke's rows. Our client tokenizes every invoke itself, so these values never need a node: they are bound on the
client when the trace runs and cross no link (the nodes receive the token ids as the request's inputs anyway).

While tracing, ``lm.inputs`` is a :class:`RootInputs` placeholder: index it (``lm.inputs[1]["input_ids"][:, -1]``,
applied to the real tensors on the client) and ``.save()`` it or a part. It is not a value of the graph, so it cannot
feed a node-side op; the message says what to use instead (``lm.model.embed_tokens.input`` is the token ids as a
traced value).
"""

from __future__ import annotations

from typing import Any

import torch

from .client_values import ClientValue
from .errors import TraceError


class RootInputs(ClientValue):
    """``lm.inputs`` (or a part of it, ``keys`` applied in order) for the rows ``rows`` of the batch; a plain value
    once the trace ran (:meth:`bind` on the whole, with the batch's final tokens and mask)."""

    def __init__(self, whole: "RootInputs | None" = None, rows: slice | None = None, keys: tuple = ()) -> None:
        super().__init__(whole, rows)
        self._keys = keys

    @property
    def value(self) -> Any:
        if self._whole is None:
            if self._value is None:
                raise TraceError("lm.inputs has no value yet: it exists after the `with lm.trace(...)` block")
            return self._value
        value = self._whole.value
        if self._rows is not None:
            value = _narrow(value, self._rows)
        for key in self._keys:
            value = value[key]
        return value

    def bind(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None) -> None:
        """The whole batch's inputs, as the root forward gets them in nnsight."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        self._value = ((), kwargs)

    def __getitem__(self, key: Any) -> "RootInputs":
        return RootInputs(self._whole or self, self._rows, (*self._keys, key))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        raise TraceError(f"lm.inputs{''.join(f'[{k!r}]' for k in self._keys)}.{name}: the root model's inputs are "
                         "known on the client, not computed in the graph, so while tracing they can only be indexed "
                         "and saved (`ids = lm.inputs[1]['input_ids'].save()`, then compute with `ids` after the "
                         "block); for the token ids as a traced value use lm.model.embed_tokens.input")

    def __repr__(self) -> str:
        return f"<lm.inputs{''.join(f'[{k!r}]' for k in self._keys)} {'bound' if self.bound else 'pending'}>"


def _narrow(value: Any, rows: slice) -> Any:
    """``value`` with every tensor cut to ``rows`` (dim 0 is the batch for each of the root's inputs)."""
    if isinstance(value, torch.Tensor):
        return value[rows]
    if isinstance(value, tuple):
        return tuple(_narrow(v, rows) for v in value)
    if isinstance(value, dict):
        return {k: _narrow(v, rows) for k, v in value.items()}
    return value
