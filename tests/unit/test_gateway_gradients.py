"""Gradients in gateway requests, without sockets: what the source check admits, which requests take gradients, and
the guard that keeps the model's parameters out of autograd."""

from __future__ import annotations

import pytest
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
