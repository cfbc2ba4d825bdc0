"""ndif_compat: the server side of nnsight 0.8's remote protocol, on our deployments (see docs/ndif_compat.md).

Public surface:
"""

from .config import BackendSpec as BackendSpec  # noqa: F401
from .config import ExecutionLimits as ExecutionLimits  # noqa: F401
from .config import GatewayConfig as GatewayConfig  # noqa: F401
from .errors import GatewayError as GatewayError  # noqa: F401
