"""hybrid: trace an experiment once (nnsight syntax), run each piece on the node that owns the module.

Public surface:
"""

from .errors import (  # noqa: F401
    DisallowedOpError as DisallowedOpError,
    HybridError as HybridError,
    InvalidGraphError as InvalidGraphError,
    LimitExceededError as LimitExceededError,
    OrderError as OrderError,
    TraceError as TraceError,
    UnknownModuleError as UnknownModuleError,
)
from .language_model import LanguageModel as LanguageModel  # noqa: F401
from .tracing import save as save  # noqa: F401
