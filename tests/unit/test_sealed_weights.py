"""Sealed read-only weights (ndif_compat.sealed_weights): same results, and every write through any alias faults."""

from __future__ import annotations

import ctypes
import os
import signal

import numpy as np
import pytest
import torch
from torch import nn

from ndif_compat.sealed_weights import seal_weights


@pytest.fixture(scope="module")
def sealed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 50, bias=False))
    model[3].weight = model[0].weight  # tied, as embeddings and heads often are
    model.register_buffer("scale", torch.tensor([2.0]))
    ids = torch.arange(10).view(2, 5)
    with torch.no_grad():
        before = model(ids) * model.scale
    mapping = seal_weights(model)
    return model, ids, before, mapping


def test_results_are_bit_identical_and_ties_kept(sealed):
    model, ids, before, _ = sealed
    with torch.no_grad():
        assert torch.equal(model(ids) * model.scale, before)
    assert model[3].weight.data_ptr() == model[0].weight.data_ptr()


def in_child(action) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        try:
            with torch.no_grad():
                action()
            os._exit(0)
        except BaseException:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


WRITES = {
    "in-place": lambda m: m[1].weight.mul_(0),
    "data": lambda m: m[1].weight.data.zero_(),
    "detach": lambda m: m[1].weight.detach().add_(1),
    "numpy": lambda m: m[1].weight.numpy().__setitem__((0, 0), 5.0),
    "from_numpy": lambda m: torch.from_numpy(m[1].weight.numpy()).mul_(0),
    "untyped_storage": lambda m: torch.tensor([], dtype=torch.uint8).set_(m[1].weight.untyped_storage()).fill_(1),
    "as_strided": lambda m: m[1].weight.as_strided((4,), (1,)).fill_(1),
    "dlpack": lambda m: torch.from_dlpack(m[1].weight.detach()).fill_(1),
    "numpy-dlpack": lambda m: np.from_dlpack(m[1].weight.detach()).__setitem__((0, 0), 5.0),
    "buffer": lambda m: m.scale.fill_(3),
    "tied": lambda m: m[3].weight.mul_(0),
    "copy_": lambda m: m[2].bias.copy_(torch.ones(16)),
}


@pytest.mark.parametrize("name", WRITES)
def test_every_write_faults(sealed, name):
    model, ids, before, _ = sealed
    assert in_child(lambda: WRITES[name](model)) == -signal.SIGSEGV
    with torch.no_grad():
        assert torch.equal(model(ids) * model.scale, before)


def test_mprotect_cannot_make_the_weights_writable(sealed):
    model = sealed[0]
    libc = ctypes.CDLL(None, use_errno=True)
    page = model[1].weight.data_ptr() & ~(os.sysconf("SC_PAGE_SIZE") - 1)
    assert libc.mprotect(ctypes.c_void_p(page), os.sysconf("SC_PAGE_SIZE"), 3) == -1
    assert ctypes.get_errno() == 13  # EACCES: a shared mapping of a write-sealed memfd
