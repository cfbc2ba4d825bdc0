"""The span hook: the node's one extension point for per-request code around its submodules.

``swarm`` knows nothing about tracing. A request may name a hook *kind* and *version* and carry an opaque
payload (bytes); the node looks the kind up in the :class:`HookRegistry` it was started with (``hybrid`` fills
it at the entry point), builds a :class:`SpanHook` for that request only, and runs the span with it active.
Each submodule call of the span then passes through the hook's :meth:`SpanHook.before` and
:meth:`SpanHook.after`. The hook's :meth:`SpanHook.result` bytes travel back with the response.

Dispatch is per thread: hooks are installed once on every submodule (:func:`install_dispatch`) and do nothing
unless a request's hook is active on the calling thread, so concurrent requests never see each other's hooks.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from .errors import HookError, SwarmError


@dataclass(frozen=True)
class HookContext:
    """What a hook factory learns about the request it serves."""

    model: nn.Module
    """The node's :class:`~swarm.stages.SpanModel` (read-only use)."""
    start: int
    """First layer this request runs (inclusive)."""
    end: int
    """Last layer this request runs (exclusive)."""
    embed: bool
    """The request runs the embedding here."""
    head: bool
    """The request runs the head here."""
    step: int
    """Index of the inference step within its session (0 for plain forward/backward)."""
    hop: int = 0
    """Position of this node in a chained forward (0 = the node the client called)."""
    carry: bytes = b""
    """The previous hop's :meth:`SpanHook.result` in a chained forward (empty on the first hop)."""
    client: str = ""
    """Who the request counts against on this node (:func:`swarm.quotas.client_identity`): a hook's shared state
    (e.g. values kept for a later request) is charged to, and evicted within, this client's quota."""


class SpanHook(Protocol):
    """Per-request interposer. Called on the node's compute thread."""

    def before(self, path: str, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Called before ``path`` runs; return replacement ``(args, kwargs)`` or None to keep them."""

    def after(self, path: str, output: Any) -> Any:
        """Called after ``path`` ran; return the (possibly replaced) output."""

    def result(self) -> bytes:
        """Bytes to send back with the response once the span has run."""

    # Optional: ``skip(path) -> (output,) | None``, asked just before ``path``'s forward runs (after ``before``):
    # a 1-tuple is used as the module's output without running it (its submodules then never run; ``after`` still
    # sees the output), None runs the module.
    # Optional: ``run(path, args, kwargs) -> (output,) | None``, asked next: a 1-tuple is the module's output as the
    # hook computed it from these arguments with the node's own module (e.g. its forward instrumented to report the
    # operations inside it); None runs the module's forward as usual.


HookFactory = Callable[[bytes, HookContext], SpanHook]


@dataclass(frozen=True)
class HookBudgets:
    """What one request's span hook may use on this node, whatever the request asks for; the hook enforces them
    before doing the work (``swarm-node serve --max-request-memory-mb ... --max-save-mb ...``)."""

    max_request_memory_mb: int = 2048
    """Most memory (MiB) one request's span hook may hold at once: the module values it reads, what its ops make
    and what it carries onward. Checked before each op allocates; a request that needs more is refused."""
    max_save_mb: int = 512
    """Most MiB of saved values one request may send back from this node."""
    max_store_mb: int = 256
    """MiB of values all clients' sessions may keep on this node for later requests (``lm.session()``)."""
    max_client_store_mb: int = 64
    """MiB of kept values one client may hold; past it, or when the store is full, a client evicts only its own
    oldest values, never another client's (a put that its own values cannot make room for is refused)."""


class HookRegistry:
    """Maps ``(kind, version)`` to a factory that builds a :class:`SpanHook` from the request's payload.

    Args:
        budgets: the node's per-request budgets, for the plugins that register here to enforce.
    """

    def __init__(self, budgets: HookBudgets = HookBudgets()) -> None:
        self.budgets = budgets
        self._factories: dict[tuple[str, int], HookFactory] = {}

    def register(self, kind: str, version: int, factory: HookFactory) -> None:
        self._factories[(kind, int(version))] = factory

    def kinds(self) -> list[str]:
        return sorted(f"{k}/v{v}" for k, v in self._factories)

    def build(self, kind: str, version: int, payload: bytes, context: HookContext) -> SpanHook:
        """Raises HookError for an unknown kind/version or a payload the factory rejects."""
        factory = self._factories.get((str(kind), int(version)))
        if factory is None:
            raise HookError(f"This node has no span hook {kind!r} v{version}; it serves {self.kinds() or 'none'}. "
                            f"Upgrade the node or the client so their versions match.")
        return factory(payload, context)


_active = threading.local()


@contextmanager
def active_hook(hook: SpanHook | None) -> Iterator[None]:
    """Make ``hook`` the one that submodule calls on this thread pass through."""
    previous = getattr(_active, "hook", None)
    _active.hook = hook
    try:
        yield
    finally:
        _active.hook = previous


def install_dispatch(model: nn.Module) -> None:
    """Register pass-through hooks on every submodule of ``model`` (once, at load time)."""
    for path, module in model.named_modules():
        if not path:
            continue
        module.register_forward_pre_hook(_make_pre(path), with_kwargs=True)
        module.register_forward_hook(_make_post(path))
        module.forward = _skippable(path, module.forward)


def _skippable(path: str, forward: Callable) -> Callable:
    """``forward``, unless the active hook's optional ``skip(path)`` gives the output to use instead (torch runs the
    pre-hooks before and the forward hooks after this, so the hook sees the module's events either way)."""
    def call(*args: Any, **kwargs: Any) -> Any:
        hook = getattr(_active, "hook", None)
        skip = getattr(hook, "skip", None)
        if skip is not None:
            replaced = _guard(path, lambda: skip(path))
            if replaced is not None:
                return replaced[0]
        run = getattr(hook, "run", None)
        if run is not None:  # not guarded: what fails in there is the forward itself (or the hook's typed errors)
            ran = run(path, args, kwargs)
            if ran is not None:
                return ran[0]
        return forward(*args, **kwargs)
    return call


def _make_pre(path: str):
    def pre(module: nn.Module, args: tuple, kwargs: dict):
        hook = getattr(_active, "hook", None)
        if hook is None:
            return None
        return _guard(path, lambda: hook.before(path, args, kwargs))
    return pre


def _make_post(path: str):
    def post(module: nn.Module, args: tuple, output: Any):
        hook = getattr(_active, "hook", None)
        if hook is None:
            return None
        return _guard(path, lambda: hook.after(path, output))
    return post


def _guard(path: str, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except SwarmError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, torch.cuda.OutOfMemoryError) as e:
        raise HookError(f"Span hook failed at {path}: {type(e).__name__}: {e}") from e
