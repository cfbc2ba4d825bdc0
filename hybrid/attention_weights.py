"""Which attention calls of a request must materialise their weights (``self_attn.output[1]``).

Nodes run SDPA attention, whose output tuple is ``(attn_output, None)``. A graph that uses the second part of an
attention module's output needs that call to run eagerly (:mod:`swarm.attention`), and only that call: reading
``self_attn.output[0]`` keeps SDPA. The flag is derived from the graph itself, so the node decides on what it will
run, not on a claim of the client: an attention getter is flagged unless every node that reads it takes part ``0``.
(Inside an invoke of several, reading ``self_attn.output`` narrows both parts to the invoke's rows, which reads
part 1: the call then runs eagerly too.)
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .ir import Graph, Ref


def is_attention(module: torch.nn.Module | None) -> bool:
    """Whether ``module`` is a transformers attention module, whose output is ``(attn_output, attn_weights)``."""
    return module is not None and type(module).__name__.endswith("Attention") and hasattr(module, "o_proj")


def weight_reads(graph: Graph, is_attention_path: Callable[[str], bool]) -> set[tuple[str, int]]:
    """``(module path, call)`` of every attention call (``is_attention_path``) whose output's weights the graph uses:
    an output getter read other than as ``getter[0]`` (``output[1]``, the whole tuple saved or passed on...)."""
    getters = {node.id: node for node in graph.nodes
               if node.op == "getter" and node.kind == "output" and is_attention_path(node.module)}
    if not getters:
        return set()
    flagged: set[tuple[str, int]] = set()
    for node in graph.nodes:
        for ref in set(node.refs()):
            getter = getters.get(ref)
            if getter is None:
                continue
            first_part = (node.op == "operator" and node.target == "getitem" and len(node.args) == 2
                          and node.args[0] == Ref(ref) and node.args[1] == 0 and not node.kwargs)
            if not first_part:
                flagged.add((getter.module, getter.call))
    flagged.update((g.module, g.call) for g in getters.values() if g.save)
    return flagged


def weights_optional(new: Any, old: Any, module: torch.nn.Module | None) -> Any:
    """The fake an attention module's output is checked against when ``new`` replaces it: the weights part is
    ``None`` when ``new`` gives ``None`` there (``self_attn.output = (x, None)``, as SDPA models return; the
    weights are then not read, so the node runs SDPA and its value has ``None`` there too)."""
    if (is_attention(module) and isinstance(old, tuple) and len(old) == 2 and isinstance(new, (tuple, list))
            and len(new) == 2 and new[1] is None):
        return (old[0], None)
    return old
