"""Gateway configuration: frozen dataclasses, one docstring per field; ``swarm-gateway serve`` maps 1:1 onto them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ExecutionLimits:
    """What one request may use on the gateway (enforced from outside the worker that runs it)."""

    timeout_s: float = 60.0
    """Wall time of one request's execution; past it the worker is killed and replaced."""
    max_memory_bytes: int = 6 * 2**30
    """Resident memory of a worker; past it the worker is killed and replaced."""
    max_request_bytes: int = 64 * 2**20
    """Size of a request payload after decompression."""
    max_result_bytes: int = 512 * 2**20
    """Size of a result (saved values, serialized)."""
    max_threads: int = 256
    """Threads of a request's process; past it the process is killed (a thread bomb would exhaust the host's
    pids)."""
    max_scratch_bytes: int = 256 * 2**20
    """Largest file a request's sandboxed process may write (only into its own scratch directory)."""


@dataclass(frozen=True)
class BackendSpec:
    """What a worker process loads and how it executes requests."""

    kind: str
    """``local`` (the whole model in the worker) or ``swarm`` (decoder layers on the swarm)."""
    model_path: Path
    """The served checkpoint directory."""
    initial_peers: tuple[str, ...] = ()
    """Swarm multiaddrs (``swarm`` only)."""
    hybrid: bool = True
    """``swarm`` only: push requests that translate into our intervention graph to the nodes (else run them on the
    gateway)."""
    threads: int = 1
    """torch threads of a worker."""


@dataclass(frozen=True)
class GatewayConfig:
    """One gateway: the model it serves, its backend, its workers, its keys and limits."""

    backend: BackendSpec
    names: tuple[str, ...]
    """Names a client may give the model (``LanguageModel("<name>")``); the first is the canonical one."""
    host: str = "127.0.0.1"
    port: int = 8289
    workers: int = 1
    """Worker processes (each holds the model or a swarm connection)."""
    api_keys: frozenset[str] = field(default_factory=frozenset)
    """Accepted keys (header ``ndif-api-key``); empty = no key needed."""
    rate_per_minute: float = 600.0
    """Requests one key (or one client address, without keys) may submit per minute (token bucket)."""
    burst: int = 60
    """Requests a key may submit at once before the rate applies."""
    limits: ExecutionLimits = ExecutionLimits()
    inline_result_bytes: int = 32 * 2**20
    """Results up to this size ride in the websocket's COMPLETED frame; larger ones are downloaded."""
    result_ttl_s: float = 600.0
    """How long a finished job's status and result stay available to GET /response and /result."""
    worker_start_timeout_s: float = 300.0
    sandbox: bool = True
    """Run each request in a kernel-contained process forked from a clean template (``ndif_compat.cells``);
    ``False`` (``--unsafe-no-sandbox``): persistent workers behind Python-level guardrails only, for a trusted
    single-user setup (the swarm backend has only these for now)."""
