"""swarm: a span swarm on hivemind. Nodes serve contiguous layer spans; clients route hidden states through them.

Public surface (everything else is private to the package):
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    BadRequestError as BadRequestError,
    CapacityError as CapacityError,
    MissingBlocksError as MissingBlocksError,
    ModelNotFoundError as ModelNotFoundError,
    PeerUnreachableError as PeerUnreachableError,
    SwarmError as SwarmError,
)
from .model import SwarmModel as SwarmModel  # noqa: E402
from .remote_sequence import ClientConfig as ClientConfig  # noqa: E402
from .span_hook import HookContext as HookContext, HookRegistry as HookRegistry, SpanHook as SpanHook  # noqa: E402
from .stages import Span as Span, SpanModel as SpanModel  # noqa: E402
