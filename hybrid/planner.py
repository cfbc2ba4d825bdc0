"""The planner: cut a graph over the executors of a route, each node at the earliest stage holding its inputs.

Stages of a decoder LM: ``0`` = embedding, ``1..L`` = layers ``0..L-1``, ``L+1`` = head (final norm + LM head).
An *executor* runs a contiguous range of stages: the client (its local embedding or head) or one node of the
route. Time is the position of a module event in forward order (``(call, index in ShapeInfo.events)``):

- a getter happens at its module event; a setter must happen at its module event too;
- any other node happens as soon as its last input exists (max of its inputs' times), so it runs on the
  executor that produces that input — the earliest stage holding all its inputs;
- a value computed on executor *k* and read on executor *j > k* is *carried* from *k* to *j* with the hidden
  states (node → node), and saved values travel on to the end of the route and back to the client.

A setter (or an in-place write into a module's value) fed by a later module is refused (:class:`OrderError`):
the model has already moved past that module when the value exists (NDIF paper §3.1).

Backward passes (:mod:`hybrid.backward`): a ``backward`` node runs where its root is, when the root exists. The
gradient of ``x`` (a ``grad`` node) exists in backward time ``(BACKWARD + pass, -time of x)``: after every forward
event, later passes later, and within a pass in reverse forward order; it is computed on the executor that computed
``x``. A node reading gradients runs on the earliest executor among them (backward flows from the last executor to the
first) when its last input exists. Values a backward-time node needs from later executors, and saved backward-time
values, travel back with the answer, executor to executor (:attr:`Plan.bcarry`). A write into a gradient fed by a
gradient computed later in the backward is refused, like a setter fed by a later module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import OrderError, UnknownModuleError
from .ir import Graph, Node
from .validation import validate

#: Methods and operators that write into their first argument.
INPLACE_METHODS = frozenset({"add_", "sub_", "mul_", "div_", "zero_", "fill_", "copy_", "clamp_", "masked_fill_",
                             "__setitem__"})
INPLACE_OPERATORS = frozenset({"setitem", "iadd", "isub", "imul", "itruediv"})
#: Ops whose result shares memory with their first argument (writes through them reach the module's value).
VIEW_METHODS = frozenset({"view", "reshape", "permute", "transpose", "unsqueeze", "squeeze", "flatten",
                          "expand", "expand_as", "view_as", "t", "__getitem__", "contiguous", "detach"})

_LAYER = re.compile(r"^model\.layers\.(\d+)(\.|$)")


def module_stage(path: str, num_layers: int) -> int:
    """Stage index of a module path. Raises UnknownModuleError for modules outside embed/layers/norm/head."""
    if path == "model.embed_tokens" or path.startswith("model.embed_tokens."):
        return 0
    match = _LAYER.match(path)
    if match and int(match.group(1)) < num_layers:
        return int(match.group(1)) + 1
    if path in ("model.norm", "lm_head") or path.startswith(("model.norm.", "lm_head.")):
        return num_layers + 1
    raise UnknownModuleError(f"Module {path!r} cannot be intervened on: only model.embed_tokens, model.layers.<i>"
                             f"[.<submodule>] (i < {num_layers}), model.norm and lm_head run on the swarm.")


def is_inplace(node: Node) -> bool:
    return (node.op == "method" and node.target in INPLACE_METHODS) or (
        node.op == "operator" and node.target in INPLACE_OPERATORS)


@dataclass(frozen=True)
class Executor:
    """One place that runs part of the graph: a contiguous range of stages ``[first, last]``."""

    name: str
    """``client`` or a peer id."""
    first: int
    last: int


@dataclass
class Plan:
    executors: list[Executor]
    assignment: list[int]
    """Executor index of every graph node."""
    carry: list[list[int]]
    """carry[k]: node ids whose values leave executor k onward (needed later, or saved)."""
    times: list[tuple[int, int]]
    inputs: list[int] = field(default_factory=list)
    """Nodes of earlier generation steps that this step reads: the client passes their values to executor 0."""
    stages: list[int] = field(default_factory=list)
    """Stage of every node (where its inputs first all exist)."""
    head_last: bool = False
    """The head runs on the last position alone, as ``generate`` does: asked for (``trim_head``) and the graph reads
    the head's output only there (``lm_head.output[:, -1]``..., :func:`reads_last_logits_only`)."""
    bcarry: list[list[int]] = field(default_factory=list)
    """bcarry[k]: node ids whose values executor k sends back after the backward passes (saved gradients, and values
    an earlier executor's backward-time nodes read). Empty for a graph without ``backward``."""

    def to_json(self) -> dict:
        doc = {"executors": [[e.name, e.first, e.last] for e in self.executors], "assignment": self.assignment,
               "carry": self.carry}
        if any(self.bcarry):
            doc["bcarry"] = self.bcarry
        if self.head_last:
            doc["head_last"] = True
        return doc


#: First element of a backward-time ``times`` entry (plus the pass index); forward times are ``(call, event)``.
BACKWARD = 1 << 40


def is_backward_time(time: tuple) -> bool:
    return time[0] >= BACKWARD


def backward_time_nodes(graph: Graph) -> set[int]:
    """Ids of the nodes that run in backward time: gradients and everything computed from them (from the graph
    alone, as a node that did not get the plan's times can tell)."""
    found: set[int] = set()
    for node in graph.nodes:
        if node.op in ("grad", "grad_set") or (node.op != "backward" and any(r in found for r in node.refs())):
            found.add(node.id)
    return found


#: Assignment of a node computed in an earlier step of a generation (its value is already with the client).
PAST = -1
#: Assignment of a node of a later step of a generation (it does not run in this request).
FUTURE = -2


def node_step(time: tuple[int, int]) -> int:
    """The forward call (generation step) in which a node with this time runs; constants run in step 0."""
    return max(time[0], 0)


def plan_graph(graph: Graph, events: list[tuple[str, str]], num_layers: int, executors: list[Executor], *,
               step: int | None = None, held: dict[int, int] | None = None, trim_head: bool = False) -> Plan:
    """Assign every node to an executor; raise OrderError / UnknownModuleError for graphs that cannot run.

    Args:
        events: forward order of module events ``(path, kind)`` for one call of the model.
        step: plan only the nodes of this forward call (generation step): nodes of earlier steps are
            :data:`PAST` (the client holds their values and sends those this step reads as the first carry),
            nodes of later steps :data:`FUTURE`; values of this step that later steps read are carried to the end
            of the route and back to the client. None plans every node into one forward.
        held: ``load`` node id -> the stage whose node holds that session value (it is loaded there, in every
            step, and carried onward). A ``load`` not in ``held`` is the client's: :data:`PAST`, sent as the first
            carry like a value of an earlier step.
        trim_head: run the head only on the last position when the graph reads nothing else of it
            (:func:`reads_last_logits_only`; the executor then runs it on padded last-position rows, which give the
            full head's values bit for bit on CPU, see :func:`hybrid.node_plugin.last_rows_padded`; on by default
            in ``hybrid.LanguageModel``).
    """
    held = held or {}
    validate(graph)
    index = {event: i for i, event in enumerate(events)}
    times: list[tuple[int, int]] = []
    stages: list[int] = []
    alias_root: list[int | None] = []
    roots: list[tuple] = []
    """Time of each backward pass's root."""
    for node in graph.nodes:
        refs = node.refs()
        if node.op in ("getter", "setter"):
            key = (node.module, node.kind)
            if key not in index:
                raise UnknownModuleError(f"The model never calls {node.module!r} ({node.kind}); check the module path.")
            time = (node.call or 0, index[key])
            stage = module_stage(node.module, num_layers)
            if node.op == "setter":
                late = [r for r in refs if times[r] > time]
                if late:
                    raise OrderError(_late_message(graph, node, late[0], times))
                if any(stages[r] > stage for r in refs):  # a session value held by a later node
                    raise OrderError(f"Node {node.id} sets {node.module}.{node.kind} with a session value held by a "
                                     "node that runs after it.")
        elif node.op == "load":
            time, stage = (-1, -1), held.get(node.id, 0)
        elif node.op in ("grad", "grad_set"):
            time, stage = _gradient_time(graph, node, times, stages, roots)
        elif any(is_backward_time(times[r]) for r in refs):  # reads gradients
            time = max(times[r] for r in refs)
            # on the earliest executor among its gradients (backward runs last executor first), when the last exists
            stage = min(stages[r] for r in refs if is_backward_time(times[r]))
            late = [r for r in refs if not is_backward_time(times[r]) and times[r] > roots[time[0] - BACKWARD]]
            if late:
                raise OrderError(f"Node {node.id} uses gradients of backward pass {time[0] - BACKWARD} with a value "
                                 f"that depends on {_origin(graph, late[0], times)}, which the model computes after "
                                 "that backward pass ran.")
            if node.op in ("module", "backward"):
                raise OrderError(f"Node {node.id} ({node.op}) uses a gradient; gradients can be read, combined and "
                                 "written, but not fed to the model's modules or to another backward.")
        else:
            time = max((times[r] for r in refs), default=(-1, -1))
            stage = max((stages[r] for r in refs), default=0)
            if node.op == "backward":
                if step is not None:
                    raise OrderError("Backward passes run in lm.trace(...), not in generation steps.")
                roots.append(time)
            if node.op == "module":
                home = module_stage(node.module, num_layers)
                if stage > home:
                    source = _origin(graph, max(refs, key=lambda r: times[r]), times)
                    raise OrderError(f"Node {node.id} applies {node.module} to a value that depends on "
                                     f"{source}, which the model computes after {node.module}'s "
                                     f"stage; a module can only be applied to values that exist when it runs.")
                stage = home
        if is_inplace(node) and node.args:
            root = alias_root[node.args[0].id] if hasattr(node.args[0], "id") else None
            if root is not None and time > times[root]:
                culprit = max(refs, key=lambda r: times[r])
                raise OrderError(_late_message(graph, graph.nodes[root], culprit, times, write=True))
            if root is not None and stage > stages[root]:  # a session value held by a later node
                raise OrderError(f"Node {node.id} writes into {graph.nodes[root].module} a session value held by a "
                                 "node that runs after it.")
        times.append(time)
        stages.append(stage)
        if node.op in ("getter", "grad"):
            alias_root.append(node.id)
        elif node.op == "method" and node.target in VIEW_METHODS or node.op == "operator" and node.target == "getitem":
            first = node.args[0] if node.args else None
            alias_root.append(alias_root[first.id] if hasattr(first, "id") else None)
        else:
            alias_root.append(None)

    def owner(stage: int) -> int:
        for k, ex in enumerate(executors):
            if ex.first <= stage <= ex.last:
                return k
        raise UnknownModuleError(f"No executor of the route runs stage {stage}.")

    def assign(node_id: int) -> int:
        if graph.nodes[node_id].op == "load":  # loaded in every step where it is needed
            return owner(stages[node_id]) if node_id in held else PAST
        if step is not None and node_step(times[node_id]) != step:
            return PAST if node_step(times[node_id]) < step else FUTURE
        return owner(stages[node_id])

    assignment = [assign(n.id) for n in graph.nodes]
    carry: list[list[int]] = [[] for _ in executors]
    for k in range(len(executors)):
        needed = set()
        for node in graph.nodes:
            here = assignment[node.id]
            if here > k:  # a later executor of this step reads it: values from earlier executors or steps
                needed.update(r for r in node.refs() if PAST <= assignment[r] <= k)
            elif here == FUTURE:  # a later step reads it: this step's values go back to the client
                needed.update(r for r in node.refs() if 0 <= assignment[r] <= k)
        needed.update(n.id for n in graph.nodes if n.save and 0 <= assignment[n.id] <= k)
        carry[k] = sorted(needed)
    inputs = sorted({r for n in graph.nodes if assignment[n.id] >= 0 for r in n.refs() if assignment[r] == PAST})
    bcarry: list[list[int]] = [[] for _ in executors]
    if roots:
        for k in range(len(executors)):
            back = {n.id for n in graph.nodes if n.save and assignment[n.id] == k and is_backward_time(times[n.id])}
            for node in graph.nodes:
                if 0 <= assignment[node.id] < k and is_backward_time(times[node.id]):
                    back.update(r for r in node.refs() if assignment[r] == k)
            bcarry[k] = sorted(back)
    return Plan(list(executors), assignment, carry, times, inputs, stages, trim_head and reads_last_logits_only(graph),
                bcarry)


def saves_last_logits(graph: Graph) -> bool:
    """Whether the graph saves the head's output rows themselves (``lm_head.output[:, -1].save()``): then the client
    receiving the last hidden state ``(B, D)`` and running its own head moves fewer bytes than the node sending the
    logits ``(B, V)`` (V > D in every LM); a graph that saves only something small computed from them (an argmax)
    moves fewer bytes with the head on the node."""
    outputs = {n.id for n in graph.nodes if n.op == "getter" and n.module == "lm_head" and n.kind == "output"}
    return any(n.save and n.op == "operator" and n.target == "getitem" and n.args and getattr(n.args[0], "id", None)
               in outputs for n in graph.nodes)


def reads_last_logits_only(graph: Graph) -> bool:
    """Whether every use of the head's output is an index ``[i, -1, ...]`` (position -1 of dim 1) and nothing reads or
    writes the final norm or the head's input: then the head may run on the last position only, with equal results
    (the lens's own ``lm_head(...)`` calls are separate and unaffected)."""
    outputs = set()
    for node in graph.nodes:
        if node.op in ("getter", "setter") and (node.module == "model.norm" or node.module.startswith("model.norm.")
                                                or (node.module == "lm_head" and (node.kind == "input" or node.op == "setter"))):
            return False
        if node.op == "getter" and node.module == "lm_head":
            if node.save:  # the whole output comes back
                return False
            outputs.add(node.id)
    for node in graph.nodes:
        uses = [r for r in node.refs() if r in outputs]
        if not uses:
            continue
        index = node.args[1] if len(node.args) == 2 else None
        last = (node.op == "operator" and node.target == "getitem" and uses == [node.args[0].id]
                and isinstance(index, tuple) and len(index) >= 2 and index[0] is not Ellipsis
                and type(index[1]) is int and index[1] == -1)
        if not last:
            return False
    return True


def _gradient_time(graph: Graph, node: Node, times: list, stages: list, roots: list) -> tuple[tuple, int]:
    """Time and stage of a ``grad`` / ``grad_set`` node: when and where the gradient of its value is computed."""
    target = node.args[0].id
    if is_backward_time(times[target]):
        raise OrderError(f"Node {node.id} asks for the gradient of a gradient (node {target}); second derivatives "
                         "are not supported.")
    if graph.nodes[target].op == "load" or times[target] > roots[node.call]:
        raise OrderError(f"Node {node.id} asks for the gradient of node {target} in backward pass {node.call}, but "
                         f"that value {'comes from another trace' if graph.nodes[target].op == 'load' else 'is computed after the pass ran'}"
                         "; read gradients of values computed before the loss.")
    time = (BACKWARD + node.call, *(-t for t in times[target]))
    if node.op == "grad_set":
        late = [r for r in node.refs()[1:] if times[r] > time]
        if late:
            raise OrderError(f"Node {node.id} replaces the gradient of node {target} with a value that depends on "
                             f"{_origin(graph, late[0], times)}, which exists only later in the backward pass; "
                             "gradients arrive in reverse module order.")
    return time, stages[target]


def _late_message(graph: Graph, node: Node, late: int, times: list, write: bool = False) -> str:
    source = _origin(graph, late, times)
    if node.op == "grad":
        return (f"Node {node.id}'s gradient (of node {node.args[0].id}, backward pass {node.call}) is written with a "
                f"value that depends on {source}, which exists only later in the backward pass: gradients arrive in "
                "reverse module order, so a gradient can only be edited with values available when it is computed.")
    what = f"writes into {node.module}.{node.kind}" if write else f"sets {node.module}.{node.kind}"
    return (f"Node {node.id} {what} with a value that depends on {source}, which the model computes later. "
            f"A module's value can only be changed with values available when the module runs.")


def _origin(graph: Graph, node_id: int, times: list) -> str:
    """The latest module a value depends on (following the latest input by ``times``), for error messages."""
    node = graph.nodes[node_id]
    if node.op == "getter":
        return f"{node.module}.{node.kind}"
    if node.op == "grad":
        return f"the gradient of {_origin(graph, node.args[0].id, times)}"
    refs = node.refs()
    return _origin(graph, max(refs, key=lambda r: times[r]), times) if refs else "a constant"
