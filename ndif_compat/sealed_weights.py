"""Model parameters and buffers in sealed, read-only shared memory: any write, through any alias, faults.

    mapping = seal_weights(model)       # in the template process, after loading, before forking cells

Every parameter and buffer is copied once into a ``memfd`` that is then sealed against writes, growth and shrinking
(``F_SEAL_WRITE``...), mapped ``PROT_READ`` + ``MAP_SHARED``, and the tensors are rebound to views of that mapping.
The kernel then refuses every way to write the weights: a store through any alias (``.numpy()``, ``.data``,
``untyped_storage()``, ``as_strided``, DLPack, ``from_numpy``...) faults (SIGSEGV), and ``mprotect`` cannot add
``PROT_WRITE`` to a shared mapping of a write-sealed file (EACCES). Forked cells share the same physical pages, so
a cell costs no copy of the weights. Each tensor keeps its address modulo the page size, so CPU kernels take the
same alignment-dependent paths and results are bit-identical to the unsealed model.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import warnings

import torch

SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
PAGE = mmap.PAGESIZE


def _tensors(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.Tensor]]:
    found, seen = [], set()
    for owner in module.modules():
        for kind in (owner._parameters, owner._buffers):
            for name, t in kind.items():
                if t is not None and (id(owner), name) not in seen:
                    seen.add((id(owner), name))
                    found.append((owner, name, t))
    return found


def seal_weights(module: torch.nn.Module) -> mmap.mmap:
    """Move every parameter and buffer of ``module`` (CPU tensors) into sealed read-only memory, in place.

    Returns the mapping (keep it alive as long as the module). Tensors that shared memory (tied weights) still do.
    """
    entries = _tensors(module)
    offsets: dict[int, int] = {}                     # id(tensor) -> offset of its bytes
    size = 0
    for _, _, t in entries:
        if t.device.type != "cpu":
            raise ValueError(f"seal_weights handles CPU tensors; {t.device} given")
        if id(t) not in offsets:                    # same address modulo the page as before: CPU kernels pick
            start = size + (t.data_ptr() - size) % PAGE  # their paths by alignment, so results stay bit-identical
            offsets[id(t)] = start
            size = start + t.numel() * t.element_size()
    fd = os.memfd_create("swarm-gateway-weights", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, max(size, 1))
        writable = mmap.mmap(fd, max(size, 1), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        for _, _, t in entries:
            raw = t.detach().contiguous().view(-1).view(torch.uint8) if t.numel() else None
            if raw is not None:
                start = offsets[id(t)]
                writable[start:start + raw.numel()] = raw.numpy().data
        writable.close()
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        mapping = mmap.mmap(fd, max(size, 1), mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    views: dict[int, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                # "the given buffer is not writable": that is the point
        for _, _, t in entries:
            if id(t) not in views:
                nbytes = t.numel() * t.element_size()
                flat = torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=offsets[id(t)]) \
                    if nbytes else torch.empty(0, dtype=torch.uint8)
                views[id(t)] = flat.view(t.dtype).view(t.shape)
    with torch.no_grad():
        for owner, name, t in entries:
            view = views[id(t)]
            if isinstance(t, torch.nn.Parameter):
                t.data = view
            else:
                owner._buffers[name] = view
    return mapping
