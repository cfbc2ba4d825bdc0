"""Module paths a request names, checked against the model before anything runs.

A typo in a traced path (``lm.model.layers[50]`` on a 30-layer model, ``lm.model.layerz``) would otherwise reach the
researcher as nnsight's ``'Envoy' object has no attribute '50'`` from deep inside the execution, or, on the swarm
backend, make the hybrid translation give up and fall back first. Reading the request's source (its ``ast``), every
chain of attributes and constant indices rooted at a name bound to the model (or one of its envoys) is walked over
the model's module tree; the first step the model does not have is refused with :class:`UnknownModuleError`, naming
the path as written, its line, and what is valid there (the index range, or the submodules).

Only definite mistakes are refused: a chain through a name the block assigns itself, a computed index, or anything
past a module (``.output``, ``.weight``, a method) is left to the execution, which is exact either way. A module that
stands in for one held elsewhere (the swarm backend's decoder layers) is walked through its ``module_tree`` (the real
layer on the meta device); one without it is not judged.
"""

from __future__ import annotations

import ast
from typing import Any

import torch

from .errors import UnknownModuleError


def check_module_paths(sources: list[str], names: dict[str, Any]) -> None:
    """Refuse the request if ``sources`` (the block and the functions it ships) name a submodule the model lacks.

    Args:
        names: the request's variables (its frame's globals and locals); those bound to an nnsight envoy are roots.
    Raises:
        UnknownModuleError: the first path the model does not have (as written, with its line and what is valid).
    """
    from nnsight.intervention.envoy import Envoy

    roots = {name: value for name, value in names.items() if isinstance(value, Envoy)}
    if not roots:
        return
    for source in sources:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        assigned = {t.id for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.For,
                                                                   ast.With, ast.NamedExpr))
                    for t in ast.walk(n) if isinstance(t, ast.Name) and isinstance(t.ctx, ast.Store)}
        outermost = _outermost_chains(tree)
        for node in outermost:
            chain, root = _chain(node)
            if root is not None and root in roots and root not in assigned:
                _walk(roots[root], root, chain, node.lineno)


def _outermost_chains(tree: ast.AST) -> list[ast.expr]:
    """Attribute/subscript expressions that are not themselves the base of a longer chain."""
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, (ast.Attribute, ast.Subscript))}
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Attribute, ast.Subscript)) and id(n) not in inner]


def _chain(node: ast.expr) -> tuple[list[tuple[str, Any]], str | None]:
    """``lm.model.layers[5].output`` → ``([("attr", "model"), ("attr", "layers"), ("index", 5), ...], "lm")``; the
    chain stops (``("other", None)``) at anything else (a call, a computed index)."""
    steps: list[tuple[str, Any]] = []
    while True:
        if isinstance(node, ast.Attribute):
            steps.append(("attr", node.attr))
            node = node.value
        elif isinstance(node, ast.Subscript):
            key = node.slice
            if isinstance(key, ast.Constant) and type(key.value) is int:
                steps.append(("index", key.value))
            elif isinstance(key, ast.UnaryOp) and isinstance(key.op, ast.USub) and isinstance(key.operand, ast.Constant) \
                    and type(key.operand.value) is int:
                steps.append(("index", -key.operand.value))
            else:
                steps.append(("other", None))
            node = node.value
        elif isinstance(node, ast.Name):
            return steps[::-1], node.id
        else:
            return [], None


def _walk(envoy: Any, root: str, chain: list[tuple[str, Any]], line: int) -> None:
    module: torch.nn.Module = envoy._module
    written = root
    for kind, value in chain:
        if kind == "other":
            return
        tree = getattr(module, "module_tree", None)  # a stand-in (the swarm backend's layers) says what it stands for
        module = tree if isinstance(tree, torch.nn.Module) else module
        if kind == "index":
            children = list(module._modules.values())
            if not isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)):
                return  # indexing an output or a tensor-like value: not a module path
            n = len(children)
            if not -n <= value < n:
                raise UnknownModuleError(
                    f"line {line}: {written}[{value}] does not exist: {written} has {n} entries (indices 0 to {n - 1}, "
                    f"or -{n} to -1). Check the layer number against the model's config (num_hidden_layers = {n}).")
            module, written = children[value], f"{written}[{value}]"
            continue
        if value in module._modules:
            module, written = module._modules[value], f"{written}.{value}"
            continue
        if hasattr(type(envoy), value) or hasattr(module, value) or (written == root and value in vars(envoy)):
            return  # an envoy's API (.output, .input, .save, ...), a parameter, a method or attribute of the module
        if not type(module).__module__.startswith(("torch.", "transformers.")):
            return  # a stand-in whose insides live elsewhere (the swarm backend's decoder layers): not ours to judge
        children = ", ".join(module._modules) or "none"
        raise UnknownModuleError(
            f"line {line}: {written}.{value} does not exist: {written} ({type(module).__name__}) has no submodule or "
            f"attribute {value!r}; its submodules: {children}.")
