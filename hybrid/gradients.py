"""Backward passes in the interpreter: the runtime side of ``with loss.backward():`` (:mod:`hybrid.backward` traces it).

An executor runs a pass from the pass's root when it holds the root (the ``backward`` node, during the forward), or
from the gradient of its span's output that the next executor sent (``InterpreterHook.backward``, on the way back).
Before each pass it hooks the tensors whose gradients the graph reads (``grad`` nodes of that pass): as autograd
reaches one, its gradient (a copy; autograd's own buffer is never written) becomes the node's value, the ops that are
now ready run (in-place edits of it included), ``grad_set`` nodes replace it, and what the graph holds then flows on.
The gradient of the span's input is kept per pass for the previous executor. A gradient that would reach a value
carried in from an earlier executor is refused: gradients cross executors only along the hidden states.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from .errors import HybridError, InvalidGraphError, OrderError
from .ir import Node
from .planner import backward_time_nodes
from .values import conform, to_device


class BackwardPasses:
    """Mixin of :class:`hybrid.interpreter.Interpreter`: its gradient state and backward passes."""

    def _init_backward(self, carried: dict[int, Any]) -> None:
        self._gradients: dict[tuple[int, int], list[Node]] = {}
        """(value id, backward pass) -> its ``grad`` / ``grad_set`` nodes here, in graph order."""
        for node in self.mine:
            if node.op in ("grad", "grad_set"):
                self._gradients.setdefault((node.args[0].id, node.call), []).append(node)
        self.passes = [n for n in self.graph.nodes if n.op == "backward"]
        """Every backward node of the graph, in pass order (whichever executor runs it)."""
        self._backward_time = backward_time_nodes(self.graph) if self.passes else set()
        if self.passes:  # gradients cross nodes only along the hidden states: refuse one that would reach a carry
            for k in carried:
                value = self.values.get(k)
                if isinstance(value, torch.Tensor) and value.is_floating_point() and self.graph.nodes[k].op != "load":
                    self.values[k] = value.detach().requires_grad_(True)
                    self.values[k].register_hook(partial(self._carried_grad, k))
        self.span_input: torch.Tensor | None = None
        """The tensor this executor's span starts from, when it requires grad: its gradient per pass goes to the
        previous executor (:attr:`input_grads`)."""
        self.input_grads: dict[int, torch.Tensor] = {}
        self.backward_pass: int | None = None

    @property
    def grad_mode(self) -> bool:
        """Whether the request runs backward passes (its forward must then track gradients)."""
        return bool(self.passes)

    def finish_backward(self) -> dict[int, Any]:
        """After every backward pass reached this executor: the values it sends back (:attr:`Plan.bcarry`)."""
        self._run_ready()
        missing = [n.id for n in self.mine if n.id not in self.done]
        for node_id in missing:
            node = self.graph.nodes[node_id]
            if node.op in ("grad", "grad_set"):
                raise OrderError(f"The gradient of node {node.args[0].id} (at {node.site or 'unknown'}) in backward "
                                 f"pass {node.call} was never computed: the loss of that pass does not depend on it.")
        self._refuse_missing(missing)
        return {k: self.values[k] for k in (self.plan.bcarry[self.me] if self.plan.bcarry else ()) if k in self.values}

    def receive(self, values: dict[int, Any]) -> None:
        """Values later executors sent back after their backward passes (those this executor reads)."""
        wanted = {r for n in self.mine for r in n.refs()}
        for k, v in values.items():
            if k in wanted and k not in self.done and 0 <= k < len(self.graph.nodes):
                value = to_device(v, self.device)
                self.values[k] = value
                self.ledger.add(k, value)
                self.done.add(k)
        self._run_ready()

    # ---- backward passes --------------------------------------------------------------------------------------

    def backward(self, index: int, roots: list[torch.Tensor], grads: list[torch.Tensor] | None,
                 retain_graph: bool) -> None:
        """Backward pass ``index`` from ``roots`` (with ``grads``) through what this executor computed: the
        gradients of its values reach their ``grad`` nodes (and ``grad_set`` / in-place writes change them) as
        autograd computes them, and the gradient of :attr:`span_input` is kept for the previous executor."""
        handles = []
        try:
            for (target, k), nodes in sorted(self._gradients.items()):
                if k != index:
                    continue
                value = self.values.get(target)
                if not isinstance(value, torch.Tensor) or not value.requires_grad:
                    raise InvalidGraphError(f"Node {nodes[0].id} (at {nodes[0].site or 'unknown'}) reads the gradient "
                                            f"of node {target}, which does not depend on the model's hidden states "
                                            "(it does not require grad).")
                handles.append(value.register_hook(partial(self._on_grad, target, index)))
            if self.span_input is not None and self.span_input.requires_grad:
                handles.append(self.span_input.register_hook(partial(self._on_input_grad, index)))
            self.backward_pass = index
            with torch.enable_grad():
                torch.autograd.backward(roots, grads, retain_graph=retain_graph)
        except HybridError:
            raise
        except RuntimeError as e:
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InvalidGraphError(f"Backward pass {index} failed: {text}") from None
        finally:
            self.backward_pass = None
            for handle in handles:
                handle.remove()

    def _on_grad(self, target: int, index: int, grad: torch.Tensor) -> torch.Tensor:
        current = grad.clone()  # autograd's own buffer is never written; edits go to this copy, which flows on
        for node in self._gradients[(target, index)]:
            if node.op == "grad":
                self._charge(node, current, self.ledger.added_bytes(current), self.ledger, self.saved_bytes)
                self._store(node, current)
                self.done.add(node.id)
                self._run_ready()  # in-place edits of this gradient run now, before it flows on
            else:
                self._run_ready()
                current = conform(self._resolve(node.args[1]), grad, f"the gradient of node {target}").clone()
                self.done.add(node.id)
            self._release(node)
        self._run_ready()
        return current

    def _carried_grad(self, node_id: int, grad: torch.Tensor) -> None:
        node = self.graph.nodes[node_id]
        raise OrderError(f"A gradient would flow into node {node_id} (traced at {node.site or 'unknown'}), a value "
                         "computed on an earlier node of the route and carried here; gradients cross nodes only "
                         "along the hidden states. Compute the loss from values of this node's modules, or use "
                         "placement='local' or 'swarm'.")

    def _on_input_grad(self, index: int, grad: torch.Tensor) -> None:
        self.input_grads[index] = grad

