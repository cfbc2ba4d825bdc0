"""swarm: a span swarm on hivemind. Nodes serve contiguous layer spans; clients route hidden states through them.

Public surface (everything else is private to the package). The names are imported on first use (PEP 562), so
``swarm-node --help`` and other light entry points do not pay for torch, transformers and hivemind.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "BadRequestError": ".errors", "CapacityError": ".errors", "MissingBlocksError": ".errors",
    "ModelNotFoundError": ".errors", "PeerUnreachableError": ".errors", "SwarmError": ".errors",
    "SwarmModel": ".model", "ClientConfig": ".remote_sequence",
    "HookContext": ".span_hook", "HookRegistry": ".span_hook", "SpanHook": ".span_hook",
    "Span": ".stages", "SpanModel": ".stages",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'swarm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from .errors import (BadRequestError, CapacityError, MissingBlocksError, ModelNotFoundError,  # noqa: F401
                         PeerUnreachableError, SwarmError)
    from .model import SwarmModel  # noqa: F401
    from .remote_sequence import ClientConfig  # noqa: F401
    from .span_hook import HookContext, HookRegistry, SpanHook  # noqa: F401
    from .stages import Span, SpanModel  # noqa: F401
