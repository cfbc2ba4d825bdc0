"""The memory budget of one request on one executor, checked before anything is allocated.

- :class:`Ledger` counts the bytes of the tensors that live values hold (each tensor once, however many values hold
  it; a view counts in full, as if it were copied — conservative, and what a save sends).
- :func:`check_python_op` bounds the work of an operator on Python values *before* it runs: no integer beyond
  :data:`MAX_INT`, no sequence (list, tuple, str) longer than :data:`MAX_SEQUENCE` from ``*`` or ``+``.
- :func:`refusal` words a :class:`LimitExceededError`: the op, the user's line when the graph carries it, the size
  and the limit.

Tensor sizes come from meta inference (:mod:`hybrid.meta`); the interpreter charges every value to a ledger before
the op that makes it runs, and frees values after their last use.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch

from .errors import LimitExceededError
from .ir import Node, leaves

#: Largest magnitude of a Python integer a graph may hold or compute (int64 range).
MAX_INT = 2 ** 63
#: Longest list, tuple or string an operator on Python values may make (``[x] * n``, ``a + b``).
MAX_SEQUENCE = 4096

_SEQUENCES = (list, tuple, str)


def tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors inside ``value`` (tensors, lists, tuples and dict values, recursively)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors(v)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def sent_bytes(value: Any) -> int:
    """Bytes of ``value`` as sent back (every tensor in full, views materialized)."""
    return sum(tensor_bytes(t) for t in tensors(value))


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def where(node: Node) -> str:
    """``node 12 (method matmul, traced at exp.py:33)``: the op of an error message."""
    what = node.module if node.op in ("getter", "setter", "module") else node.target
    site = f", traced at {node.site}" if node.site else ""
    return f"node {node.id} ({node.op} {what}{site})"


def refusal(node: Node, message: str) -> LimitExceededError:
    return LimitExceededError(f"Refused before running {where(node)}: {message}.")


class Ledger:
    """Bytes of the tensors held by live values (by node id), each tensor counted once.

    Args:
        key: identity of a tensor (``id``; a dry run maps a fake to the real tensor it stands for).
    """

    def __init__(self, key: Callable[[torch.Tensor], int] = id) -> None:
        self.key = key
        self.total = 0
        self.peak = 0
        self._held: dict[int, list[int]] = {}
        self._tensors: dict[int, list[int]] = {}  # key -> [bytes, holders]

    def copy(self, key: Callable[[torch.Tensor], int]) -> "Ledger":
        other = Ledger(key)
        other.total, other.peak = self.total, self.peak
        other._held = {k: list(v) for k, v in self._held.items()}
        other._tensors = {k: list(v) for k, v in self._tensors.items()}
        return other

    def added_bytes(self, value: Any) -> int:
        """Bytes :meth:`add` of ``value`` would add (tensors not yet held)."""
        seen: set[int] = set()
        total = 0
        for t in tensors(value):
            k = self.key(t)
            if k not in self._tensors and k not in seen:
                seen.add(k)
                total += tensor_bytes(t)
        return total

    def add(self, node_id: int, value: Any) -> None:
        self.drop(node_id)
        keys = []
        for t in tensors(value):
            k = self.key(t)
            entry = self._tensors.get(k)
            if entry is None:
                entry = self._tensors[k] = [tensor_bytes(t), 0]
                self.total += entry[0]
            entry[1] += 1
            keys.append(k)
        self._held[node_id] = keys
        self.peak = max(self.peak, self.total)

    def drop(self, node_id: int) -> None:
        for k in self._held.pop(node_id, ()):
            entry = self._tensors[k]
            entry[1] -= 1
            if entry[1] == 0:
                self.total -= entry[0]
                del self._tensors[k]


def check_python_op(node: Node, args: list, kwargs: dict) -> None:
    """Refuse an operator on Python values whose result would be a huge integer or sequence, before computing it.

    Raises:
        LimitExceededError: ``int ** int`` at or beyond :data:`MAX_INT`, or ``seq * n`` / ``seq + seq`` longer than
            :data:`MAX_SEQUENCE`.
    """
    if node.op != "operator" or kwargs or len(args) != 2:
        return
    a, b = args
    if node.target == "pow" and _is_int(a) and _is_int(b) and b > 0 and abs(a) > 1:
        if b * math.log2(abs(a)) >= 63:
            raise refusal(node, f"{a} ** {b} has about {int(b * math.log2(abs(a)))} bits; integers are limited "
                                f"to 64 bits (|x| < 2**63)")
    elif node.target in ("mul", "imul") and (_is_int(a) and isinstance(b, _SEQUENCES)
                                             or isinstance(a, _SEQUENCES) and _is_int(b)):
        seq, n = (b, a) if _is_int(a) else (a, b)
        if len(seq) * n > MAX_SEQUENCE:
            raise refusal(node, f"repeating a {type(seq).__name__} of {len(seq)} items {n} times makes "
                                f"{len(seq) * n} items; the limit is {MAX_SEQUENCE}")
    elif node.target in ("add", "iadd") and isinstance(a, _SEQUENCES) and isinstance(b, _SEQUENCES):
        if len(a) + len(b) > MAX_SEQUENCE:
            raise refusal(node, f"joining sequences of {len(a)} and {len(b)} items makes {len(a) + len(b)}; the "
                                f"limit is {MAX_SEQUENCE}")


def check_python_value(node: Node, value: Any) -> None:
    """Refuse a Python integer result beyond :data:`MAX_INT` (inputs are bounded, so computing it was cheap)."""
    if _is_int(value) and abs(value) >= MAX_INT:
        raise refusal(node, f"its result has {abs(value).bit_length()} bits; integers are limited to 64 bits "
                            f"(|x| < 2**63)")
    if isinstance(value, (list, tuple)):
        for v in value:
            if _is_int(v) and abs(v) >= MAX_INT:
                raise refusal(node, "its result holds an integer beyond 64 bits (|x| < 2**63)")


def literal_ints_ok(value: Any) -> bool:
    """Whether every integer literal in an argument is within :data:`MAX_INT` (checked at validation)."""
    return all(abs(v) < MAX_INT for v in leaves(value) if _is_int(v))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
