"""The operation whitelist: the only things a graph can ask a node to do.

Tracing refuses anything else at the user's line; the interpreter refuses it again at the node (the node never
trusts the client). Random-number functions and raw allocation functions (``torch.zeros(n)``...) are absent on
purpose: results must be reproducible and every allocation bounded by tensors that already exist.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import DisallowedOpError

OPERATORS: dict[str, Callable] = {
    name: getattr(operator, name) for name in (
        "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg", "pos", "abs", "invert",
        "lt", "le", "gt", "ge", "eq", "ne", "and_", "or_", "xor", "getitem", "setitem",
        "iadd", "isub", "imul", "itruediv")
}

FUNCTIONS: dict[str, Callable] = {
    "torch.softmax": torch.softmax, "torch.log_softmax": torch.log_softmax, "torch.cat": torch.cat,
    "torch.stack": torch.stack, "torch.matmul": torch.matmul, "torch.einsum": torch.einsum, "torch.topk": torch.topk,
    "torch.argmax": torch.argmax, "torch.argmin": torch.argmin, "torch.max": torch.max, "torch.min": torch.min,
    "torch.mean": torch.mean, "torch.sum": torch.sum, "torch.norm": torch.norm, "torch.linalg.norm": torch.linalg.norm,
    "torch.abs": torch.abs, "torch.exp": torch.exp, "torch.log": torch.log, "torch.sqrt": torch.sqrt,
    "torch.clamp": torch.clamp, "torch.where": torch.where, "torch.gather": torch.gather,
    "torch.zeros_like": torch.zeros_like, "torch.ones_like": torch.ones_like, "torch.full_like": torch.full_like,
    "torch.sigmoid": torch.sigmoid, "torch.tanh": torch.tanh, "torch.sort": torch.sort, "torch.cumsum": torch.cumsum,
    "torch.diff": torch.diff, "torch.allclose": torch.allclose, "torch.flatten": torch.flatten,
    "torch.squeeze": torch.squeeze, "torch.unsqueeze": torch.unsqueeze, "torch.transpose": torch.transpose,
    "torch.nn.functional.softmax": F.softmax, "torch.nn.functional.log_softmax": F.log_softmax,
    "torch.nn.functional.layer_norm": F.layer_norm, "torch.nn.functional.normalize": F.normalize,
    "torch.nn.functional.cosine_similarity": F.cosine_similarity, "torch.nn.functional.kl_div": F.kl_div,
    "torch.nn.functional.cross_entropy": F.cross_entropy, "torch.nn.functional.relu": F.relu,
    "torch.nn.functional.gelu": F.gelu, "torch.nn.functional.silu": F.silu,
    # pure tensor functions researchers' own modules use (an SAE or transcoder as an nn.Module traces into these)
    "torch.nn.functional.linear": F.linear, "torch.relu": torch.relu, "torch.nn.functional.one_hot": F.one_hot,
    "torch.nan_to_num": torch.nan_to_num, "torch.nn.functional.rms_norm": F.rms_norm, "torch.outer": torch.outer,
    "torch.bmm": torch.bmm, "torch.index_select": torch.index_select, "torch.take_along_dim": torch.take_along_dim,
    "torch.tril": torch.tril, "torch.triu": torch.triu, "torch.square": torch.square,
    "torch.nn.functional.leaky_relu": F.leaky_relu, "torch.nn.functional.softplus": F.softplus,
    "torch.nn.functional.sigmoid": F.sigmoid, "torch.nn.functional.tanh": F.tanh,
}

METHODS: frozenset[str] = frozenset({
    "softmax", "log_softmax", "sum", "mean", "max", "min", "argmax", "argmin", "topk", "sort", "cumsum", "std", "var",
    "norm", "abs", "exp", "log", "sqrt", "pow", "square", "sigmoid", "tanh", "relu", "clamp", "neg",
    "add", "sub", "mul", "div", "matmul", "add_", "sub_", "mul_", "div_", "zero_", "fill_", "copy_", "clamp_",
    "masked_fill", "masked_fill_", "view", "reshape", "permute", "transpose", "unsqueeze", "squeeze", "flatten",
    "contiguous", "clone", "detach", "expand", "expand_as", "view_as", "reshape_as", "t", "chunk", "split",
    "gather", "index_select", "size", "dim", "item", "float", "half", "double", "bfloat16", "long", "int", "bool", "to",
    "eq", "ne", "lt", "le", "gt", "ge", "all", "any", "logsumexp", "amax", "amin", "diff", "roll", "flip",
    "__getitem__", "__setitem__", "requires_grad_",
})

#: Names a tracer may read as plain attributes of a traced value (not calls).
ATTRIBUTES: frozenset[str] = frozenset({"shape", "dtype", "ndim", "T"})


def function(name: str) -> Callable:
    fn = FUNCTIONS.get(name)
    if fn is None:
        raise DisallowedOpError(f"torch function {name!r} is not in the whitelist; allowed: {', '.join(sorted(FUNCTIONS))}")
    return fn


def operator_fn(name: str) -> Callable:
    fn = OPERATORS.get(name)
    if fn is None:
        raise DisallowedOpError(f"operator {name!r} is not in the whitelist; allowed: {', '.join(sorted(OPERATORS))}")
    return fn


def check_method(name: str) -> None:
    if name not in METHODS:
        raise DisallowedOpError(f"tensor method {name!r} is not in the whitelist; allowed: {', '.join(sorted(METHODS))}")


def check_to_args(args: tuple, kwargs: dict) -> None:
    """``.to`` may only change dtype (a device move is the node's business, never the graph's)."""
    if any(not isinstance(a, torch.dtype) for a in args) or set(kwargs) - {"dtype"}:
        raise DisallowedOpError("tensor.to(...) may only take a dtype, e.g. x.to(torch.float32)")


def function_name(fn: Callable) -> str | None:
    """The whitelist name of a torch callable, or None."""
    for name, candidate in FUNCTIONS.items():
        if candidate is fn:
            return name
    return None
