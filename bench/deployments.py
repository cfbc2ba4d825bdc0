"""Deployments the harness starts and stops: where the model is for each placement.

=============== ============================================================================================
``hpc``         nothing runs beforehand: each repetition's worker process loads the whole model (load time kept)
``centralized`` one preloaded node serving every stage (embedding, all layers, head)
``swarm``       ``num_nodes`` span nodes (default 3) splitting the layers; the ``swarm`` and ``hybrid``
                placements share it, so they are compared on the same nodes in the same run
``petals``      real Petals 2.2.0.post1 servers on the same spans, in their own venv (:mod:`bench.petals`)
=============== ============================================================================================

With a client link or node link set, one relay process (:mod:`bench.link_shaper`) sits in front of every node:
nodes listen on a private port and announce the relay's, so every dial goes through it.
"""

from __future__ import annotations

import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import json
import trio

from swarm.checkpoint import load_config
from swarm.embedded import default_cache_dir

from .errors import BenchConfigError
from .harness import Child, Harness, free_port
from .link_shaper import LinkSpec

DEPLOYMENTS = ("hpc", "centralized", "swarm", "petals")
PLACEMENT_DEPLOYMENT = {"hpc": "hpc", "centralized": "centralized", "swarm": "swarm", "hybrid": "swarm",
                        "petals": "petals"}
"""Which deployment serves each placement."""


@dataclass(frozen=True)
class DeploymentConfig:
    """One deployment of one model."""

    kind: str
    """One of :data:`DEPLOYMENTS`."""
    model: Path
    """Checkpoint directory (safetensors)."""
    num_nodes: int = 3
    """Span nodes of ``swarm`` / ``petals`` (the layers split as evenly as possible)."""
    link: LinkSpec | None = None
    """The client's link to every node (None: unshaped loopback)."""
    node_link: LinkSpec | None = None
    """Node↔node links."""
    threads: int = 1
    """torch threads per node."""
    timeout_s: float = 300.0
    """How long a node may take to become ready."""
    cache_dir: Path = field(default_factory=default_cache_dir)
    """Where derived checkpoints are kept (the Petals copy of ``model``)."""
    petals_venv: Path | None = None
    """The Petals venv (None: ``.petals-venv`` in the repository)."""


def split_spans(num_layers: int, num_nodes: int) -> list[tuple[int, int]]:
    """Half-open spans covering ``range(num_layers)``, sizes differing by at most one (earlier ones larger)."""
    if not 1 <= num_nodes <= num_layers:
        raise BenchConfigError(f"cannot split {num_layers} layers over {num_nodes} nodes")
    base, rest = divmod(num_layers, num_nodes)
    spans, start = [], 0
    for i in range(num_nodes):
        end = start + base + (1 if i < rest else 0)
        spans.append((start, end))
        start = end
    return spans


@dataclass
class Deployment:
    """A running deployment: what workers need to connect, and its children."""

    config: DeploymentConfig
    initial_peers: list[str] = field(default_factory=list)
    nodes: list[Child] = field(default_factory=list)
    relay: Child | None = None
    relay_stats_file: Path | None = None
    startup_s: list[float] = field(default_factory=list)
    """Seconds from spawn to ready, per node."""

    def relay_bytes(self) -> dict | None:
        """Bytes the relay has carried so far by class and direction (``client_up``, ...), or None unshaped."""
        if self.relay_stats_file is None or not self.relay_stats_file.exists():
            return None
        try:
            return json.loads(self.relay_stats_file.read_text())["bytes"]
        except (ValueError, KeyError):
            return None


def _node_cmd(config: DeploymentConfig, span: tuple[int, int], port: int, announce: int | None, ready: Path,
              initial_peers: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "swarm.cli", "serve", "--model", str(config.model), "--host", "127.0.0.1",
           "--port", str(port), "--blocks", f"{span[0]}:{span[1]}", "--num-threads", str(config.threads),
           "--ready-file", str(ready), "--announce-period", "5", "--record-ttl", "15"]
    if announce is not None:
        cmd += ["--announce-port", str(announce)]
    return cmd + (["--initial-peers", *initial_peers] if initial_peers else ["--new-swarm"])


@asynccontextmanager
async def deploy(harness: Harness, config: DeploymentConfig) -> AsyncIterator[Deployment]:
    """Start ``config``'s processes (relay first, then the first node, then the rest in parallel), yield the
    running deployment, and stop every process it started on the way out (also on error or cancel).

    Raises:
        BenchConfigError: unknown kind.
        DeploymentError: a process failed to become ready (its log tail is in the message).
        PetalsUnavailableError: ``petals`` without a working ``.petals-venv``.
    """
    if config.kind not in DEPLOYMENTS:
        raise BenchConfigError(f"unknown deployment {config.kind!r}; known: {', '.join(DEPLOYMENTS)}")
    deployment = Deployment(config)
    started = len(harness.children)
    try:
        if config.kind != "hpc":
            num_layers = load_config(config.model).num_hidden_layers
            spans = [(0, num_layers)] if config.kind == "centralized" else split_spans(num_layers, config.num_nodes)
            ports = [free_port() for _ in spans]
            announce: list[int | None] = [None] * len(spans)
            if config.link is not None or config.node_link is not None:
                announce = [free_port() for _ in spans]
                await _start_relay(harness, deployment, list(zip(announce, ports)))
            if config.kind == "petals":
                from .petals import start_petals_servers
                await start_petals_servers(harness, deployment, spans, ports, announce)
            else:
                await _start_nodes(harness, deployment, spans, ports, announce)
        yield deployment
    finally:
        await harness.kill_and_reap(harness.children[started:], timeout_s=15)


async def _start_relay(harness: Harness, deployment: Deployment, routes: list[tuple[int, int]]) -> None:
    config = deployment.config
    tag = f"{config.kind}-relay-{len(harness.children)}"
    ready = harness.workdir / f"{tag}.ready.json"
    stats = harness.workdir / f"{tag}.stats.json"
    cmd = [sys.executable, "-m", "bench.link_shaper", "--link", str(config.link or "none"),
           "--node-link", str(config.node_link or "none"), "--node-ports", ",".join(str(t) for _, t in routes),
           "--ready-file", str(ready), "--stats-file", str(stats)]
    for listen, target in routes:
        cmd += ["--route", f"{listen}:{target}"]
    deployment.relay = await harness.spawn(tag, cmd, ready_file=ready, timeout_s=60)
    deployment.relay_stats_file = stats


async def _start_nodes(harness: Harness, deployment: Deployment, spans, ports, announce) -> None:
    config = deployment.config

    async def start(i: int, initial_peers: list[str]) -> None:
        tag = f"{config.kind}-node{i}-{len(harness.children)}"
        ready = harness.workdir / f"{tag}.ready.json"
        t0 = trio.current_time()
        child = await harness.spawn(tag, _node_cmd(config, spans[i], ports[i], announce[i], ready, initial_peers),
                                    ready_file=ready, env={"OMP_NUM_THREADS": str(config.threads)},
                                    timeout_s=config.timeout_s)
        deployment.nodes.append(child)
        deployment.startup_s.append(trio.current_time() - t0)

    await start(0, [])
    deployment.initial_peers = list(deployment.nodes[0].info["maddrs"])
    async with trio.open_nursery() as nursery:
        for i in range(1, len(spans)):
            nursery.start_soon(start, i, deployment.initial_peers)
