"""Gradients in gateway requests, without sockets: what the source check admits, which requests take gradients, and
the guard that keeps the model's parameters out of autograd."""

from __future__ import annotations

import threading

import pytest
import nnsight  # noqa: F401  (as in the gateway: nnsight's Tensor.backward is installed, whatever the test order)
import torch

from ndif_compat.errors import GradientUnavailableError, ParameterGradientError, ParametersModifiedError, \
    UnsafeRequestError
from ndif_compat.gradients import GradientGuard, check_tensor_class, needs_gradients
from ndif_compat.guardrails import check_source


@pytest.mark.parametrize("source", [
    "h.requires_grad_(True)",
    "h.requires_grad = True",
    "h.grad[:] = 0",
    "h.grad = h.grad * 2",
    "with metric.backward(retain_graph=True):\n    g = h.grad.save()",
    "metric.backward()",
])
def test_check_source_admits_gradients_of_activations(source):
    check_source(source, "the block")


@pytest.mark.parametrize("source, fragment", [
    ("torch.autograd.set_detect_anomaly(True)", "'set_detect_anomaly'"),
    ("torch.autograd.set_grad_enabled(True)", "'set_grad_enabled'"),
    ("with torch.autograd.graph.saved_tensors_hooks(f, g):\n    pass", "'saved_tensors_hooks'"),
    ("torch.autograd.set_multithreading_enabled(True)", "'set_multithreading_enabled'"),
    ("h.register_post_accumulate_grad_hook(f)", "'register_post_accumulate_grad_hook'"),
    ("lm.zero_grad()", "'zero_grad'"),
    ("del h.grad", "deleting the attribute 'grad'"),
    ("torch.Tensor.grad = f", "attribute of the module 'torch'"),
    ("h.is_leaf = True", "assigning the attribute 'is_leaf'"),
])
def test_check_source_still_refuses_autograd_state_and_shared_objects(source, fragment):
    with pytest.raises(UnsafeRequestError) as info:
        check_source(source, "the block")
    assert fragment in str(info.value)


@pytest.mark.parametrize("source, expected", [
    ("h = lm.model.layers[0].output.save()", False),
    ("x = torch.softmax(lm.lm_head.output, -1)", False),
    ("h.requires_grad_(True)", True),
    ("h.requires_grad = True", True),
    ("with m.backward():\n    pass", True),
    ("g = h.grad", True),
    ("with torch.enable_grad():\n    pass", True),
    ("from torch import enable_grad", True),
    ("f = operator.attrgetter('requires' + '_grad_')", True),
    ("torch.autograd.grad(m, h)", True),
    ("from torch.autograd import functional", True),
    ("f = operator.attrgetter('grad')", True),
    ("backwards = list(reversed(lm.model.layers))\nh = backwards[3].output.save()", False),
    ("with lm.trace('She graduated from the university of'):\n    pass", False),
])
def test_needs_gradients(source, expected):
    assert needs_gradients([source]) is expected
    assert needs_gradients(["x = 1", source]) is expected


def _model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model.requires_grad_(False)
    model.register_buffer("scale", torch.ones(4))
    return model


def _request(source: str, **names):
    """Run ``source`` as request code (compiled under a request's file name)."""
    exec(compile(source, "<block> [request t]", "exec"), {"torch": torch, **names})


@pytest.mark.parametrize("source, what", [
    ("m[0].weight.requires_grad_(True)", ".requires_grad_()"),
    ("m[0].weight.requires_grad_()", ".requires_grad_()"),
    ("m[0].weight.requires_grad = True", ".requires_grad = ..."),
    ("g = m[1].bias.grad", ".grad"),
    ("m[0].weight.grad = torch.zeros(4, 4)", ".grad = ..."),
    ("m[0].weight.register_hook(lambda g: g)", ".grad"),
    ("m[0].weight.retain_grad()", ".retain_grad()"),
    ("m.scale.requires_grad_(True)", ".requires_grad_()"),
    ("m.requires_grad_(True)", ".requires_grad_()"),
    ("x = torch.ones(4, requires_grad=True)\ntorch.autograd.grad(m(x).sum(), [x, m[0].weight])", "(inputs=...)"),
    ("x = torch.ones(4, requires_grad=True)\nm(x).sum().backward(inputs=[m[0].bias])", "(inputs=...)"),
])
def test_guard_refuses_gradients_of_parameters_and_buffers(source, what):
    model = _model()
    with GradientGuard(model), pytest.raises(ParameterGradientError) as info:
        _request(source, m=model)
    assert what in str(info.value) and "gradients of weights are not served" in str(info.value)
    assert not any(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def test_guard_serves_gradients_of_activations_with_grad_mode_on():
    model = _model()
    with torch.no_grad():
        with GradientGuard(model):
            assert torch.is_grad_enabled()
            _request("x = torch.ones(2, 4)\nh = m[0](x)\nh.requires_grad_(True)\nh.retain_grad()\n"
                     "m[1](h).pow(2).sum().backward()\ngrad = h.grad\nm[0].weight.requires_grad_(False)", m=model)
        assert not torch.is_grad_enabled()
    x = torch.ones(2, 4)
    h = model[0](x).requires_grad_(True)
    model[1](h).pow(2).sum().backward()
    want = h.grad
    got = {}
    with GradientGuard(model):
        _request("x = torch.ones(2, 4)\nh = m[0](x).requires_grad_(True)\nm[1](h).pow(2).sum().backward()\n"
                 "out['g'] = h.grad", m=model, out=got)
    assert torch.equal(got["g"], want)


def test_guard_turns_a_missing_gradient_read_by_the_request_into_a_typed_error():
    model = _model()
    with GradientGuard(model):
        with pytest.raises(GradientUnavailableError, match="outside a `with loss.backward\\(\\):` block"):
            _request("h = torch.ones(3, requires_grad=True) * 2\ng = h.grad")
        assert torch.ones(3, requires_grad=True).grad is None     # library code (not the request's) gets None


def test_check_tensor_class_notices_a_replaced_descriptor():
    check_tensor_class()
    original = torch.Tensor.__dict__.get("grad")
    torch.Tensor.grad = property(lambda self: None)
    try:
        with pytest.raises(ParametersModifiedError, match="torch.Tensor.grad"):
            check_tensor_class()
    finally:
        if original is None:
            del torch.Tensor.grad
        else:
            torch.Tensor.grad = original
    check_tensor_class()


# ---- the swarm backend's gateway path: decoder segments as autograd nodes ------------------------------------------

class _Calls:
    """Stands in for the swarm: layer ``k`` is ``tanh(x * (1 + k/10))``; the backward recomputes, as a node does."""

    def __init__(self):
        self.log: list[tuple[str, int, int]] = []

    @staticmethod
    def layers(x, start, end):
        for k in range(start, end):
            x = torch.tanh(x * (1 + k / 10))
        return x

    def forward(self, hidden, mask, positions, start, end):
        self.log.append(("forward", start, end))
        assert not hidden.requires_grad
        return self.layers(hidden, start, end)

    def backward(self, hidden, grad, mask, positions, start, end):
        self.log.append(("backward", start, end))
        with torch.enable_grad():
            x = hidden.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.layers(x, start, end), x, grad)
        return g


def test_swarm_segments_are_autograd_nodes_whose_backward_asks_the_nodes():
    from ndif_compat.swarm_layers import SwarmLayer, SwarmStack

    calls = _Calls()
    stack = SwarmStack(calls, 4)
    layers = [SwarmLayer(i, stack) for i in range(4)]
    stack.cut_at({2})
    x = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    h = x
    for layer in layers:
        h = layer(h)
    (h * torch.arange(5.0)).sum().backward(retain_graph=True)
    first = x.grad.clone()
    (h * torch.arange(5.0)).sum().backward()                      # stateless on the nodes: a second backward works
    want_x = x.detach().clone().requires_grad_(True)
    (_Calls.layers(want_x, 0, 4) * torch.arange(5.0)).sum().backward()
    assert torch.allclose(first, want_x.grad, atol=1e-6) and torch.allclose(x.grad, 2 * want_x.grad, atol=1e-6)
    assert calls.log == [("forward", 0, 2), ("forward", 2, 4), ("backward", 2, 4), ("backward", 0, 2),
                         ("backward", 2, 4), ("backward", 0, 2)]
    calls.log.clear()
    with torch.no_grad():                                       # a request without gradients: plain calls
        for layer in layers:
            x = layer(x)
    assert calls.log == [("forward", 0, 2), ("forward", 2, 4)]


def _broker_request(received: list):
    from types import SimpleNamespace

    from ndif_compat.broker import BrokerRequest

    traffic = SimpleNamespace(bytes_sent=0, bytes_received=0, calls=0)
    client = SimpleNamespace(sequence=SimpleNamespace(traffic=traffic))
    lm = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=4, hidden_size=5), dtype=torch.float32,
                         client=client)
    broker = SimpleNamespace(lm=lm, _lock=threading.Lock())
    request = BrokerRequest(broker)
    request.calls = SimpleNamespace(backward=lambda *args: received.append(args) or args[1] * 3)
    return request


def test_broker_checks_a_backward_call_before_asking_the_swarm():
    from hybrid.values import pack_values, unpack_values

    from ndif_compat.errors import BadRequestError

    received: list = []
    request = _broker_request(received)
    hidden, grad = torch.ones(2, 3, 5), torch.full((2, 3, 5), 0.5)
    _, body = request.handle({"op": "backward", "start": 1, "end": 3}, pack_values({0: hidden, 3: grad}))
    assert torch.equal(unpack_values(body)[0], grad * 3) and received[0][4:] == (1, 3)
    for meta, values in [({"start": 1, "end": 3}, {0: hidden}),                          # no gradient
                         ({"start": 1, "end": 3}, {0: hidden, 3: grad[:, :2]}),          # wrong shape
                         ({"start": 1, "end": 3}, {0: hidden, 3: torch.ones(2, 3, 5, dtype=torch.long)}),
                         ({"start": 3, "end": 9}, {0: hidden, 3: grad})]:                # outside the model
        with pytest.raises(BadRequestError):
            request.handle({"op": "backward", **meta}, pack_values(values))
    assert len(received) == 1


def test_a_gradient_through_a_cached_generation_is_refused_with_a_typed_error():
    from ndif_compat.errors import GradientUnsupportedError
    from ndif_compat.swarm_layers import SwarmLayer, SwarmStack

    stack = SwarmStack(_Calls(), 2)
    stack.max_new_tokens = 3
    with pytest.raises(GradientUnsupportedError, match="KV-cache session"):
        SwarmLayer(0, stack)(torch.ones(1, 2, 5, requires_grad=True))
