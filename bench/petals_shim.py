"""Runs inside the real-Petals venv (``make petals-env``), never in the project's own: makes petals 2.2.0.post1
importable on hivemind 1.1.12 by re-exporting onto ``hivemind`` the names 1.1.12 moved into submodules.

    from bench.petals_shim import import_petals
    petals = import_petals()

Standard library only (besides hivemind/petals themselves), so it imports nothing of the project.
"""

from __future__ import annotations

import importlib

MOVED = {
    "hivemind.p2p": ("P2P", "P2PContext", "PeerID"),
    "hivemind.utils": ("MAX_DHT_TIME_DISCREPANCY_SECONDS", "MSGPackSerializer", "TimedStorage", "get_dht_time",
                       "get_logger"),
    "hivemind.moe.server.runtime": ("Runtime",),
    "hivemind.utils.nested": ("nested_compare", "nested_flatten", "nested_map", "nested_pack"),
    "hivemind.utils.asyncio": ("anext",),
    "hivemind.utils.tensor_descr": ("BatchTensorDescriptor", "TensorDescriptor"),
    "hivemind.compression": ("deserialize_tensor_stream", "deserialize_torch_tensor", "serialize_torch_tensor"),
}
"""Submodule → names petals uses as ``from hivemind import NAME`` or ``hivemind.NAME``."""


def install() -> None:
    """Re-export every name of :data:`MOVED` onto the ``hivemind`` package (names already there are kept)."""
    hivemind = importlib.import_module("hivemind")
    for module, names in MOVED.items():
        source = importlib.import_module(module)
        for name in names:
            if not hasattr(hivemind, name):
                setattr(hivemind, name, getattr(source, name))


def import_petals():
    """Install the shim, then import and return ``petals``."""
    install()
    return importlib.import_module("petals")
