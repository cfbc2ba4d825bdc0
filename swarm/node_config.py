"""What ``swarm-node serve`` takes (:class:`NodeConfig`), apart from the node that runs it.

Kept light (no torch, transformers or hivemind at import) so the CLI can build its parser and answer ``--help``
at once; :mod:`swarm.node` imports the heavy parts when a node really starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BadRequestError

if TYPE_CHECKING:
    from .span_server import ServerLimits


def _default_limits() -> "ServerLimits":
    from .span_server import ServerLimits
    return ServerLimits()


@dataclass(frozen=True)
class NodeConfig:
    """Everything ``swarm-node serve`` takes; the CLI maps its flags 1:1 onto these fields."""

    model: str = "smollm2-135m"
    """Alias of an embedded model or a local Hugging Face checkpoint directory (safetensors)."""
    blocks: tuple[int, int] | None = None
    """Layers to serve, half-open ``(start, end)``; None picks the least-covered span of ``num_blocks``."""
    num_blocks: int | None = None
    """Span size when ``blocks`` is None; None derives it from free memory."""
    serve_embed: bool = True
    """Also serve the embedding when the span starts at layer 0."""
    serve_head: bool = True
    """Also serve the final norm + LM head when the span ends at the last layer."""
    initial_peers: tuple[str, ...] = ()
    """Multiaddrs of peers already in the swarm; empty with ``new_swarm``."""
    new_swarm: bool = False
    """Start a new swarm (no initial peers)."""
    host: str = "0.0.0.0"
    """Address to listen on."""
    port: int = 0
    """TCP port to listen on (0 = any free port)."""
    announce_host: str | None = None
    """Public address others should dial, if it differs from ``host``."""
    announce_port: int | None = None
    """Port others should dial, if it differs from ``port`` (e.g. a relay in front of the node)."""
    device: str = "cpu"
    """``cpu`` or ``cuda``."""
    dtype: str = "float32"
    """Weight and activation dtype: float32, bfloat16 or float16."""
    num_threads: int | None = None
    """torch intra-op threads (None = torch's default)."""
    cache_dir: Path | None = None
    """Where embedded models are prepared."""
    record_ttl_s: float = 30.0
    """A DHT record expires this long after its last refresh."""
    announce_period_s: float = 10.0
    """How often the record is refreshed."""
    limits: ServerLimits = field(default_factory=_default_limits)
    """Request limits the node enforces."""
    ready_file: Path | None = None
    """If set, a JSON file with peer id, addresses and span is written here once the node serves."""
    identity_path: Path | None = None
    """RSA identity file (libp2p format): the node's peer id and the key that signs its records. Generated there if
    missing and kept, so the peer id survives restarts; without it, a new identity each run."""
    test_announce_blocks: tuple[int, int] | None = None
    """TEST ONLY (fault injection; set by the environment variable SWARM_TEST_ANNOUNCE_BLOCKS=START:END, never by a
    flag): announce these layers in the record and the info RPC while serving ``blocks``, i.e. lie about the span."""
    test_info_tells_truth: bool = False
    """TEST ONLY (SWARM_TEST_INFO_TELLS_TRUTH=1): with ``test_announce_blocks``, lie in the record only."""
    test_output_noise: float = 0.0
    """TEST ONLY (SWARM_TEST_OUTPUT_NOISE=<std>): add Gaussian noise of this std to the output of the span's last
    layer, every time (so its hook saves, head and answer are wrong)."""
    test_noise_row: int | None = None
    """TEST ONLY (SWARM_TEST_NOISE_ROW=<i>): with ``test_output_noise``, only batch row ``i`` gets the noise."""
    test_noise_every: int = 1
    """TEST ONLY (SWARM_TEST_NOISE_EVERY=<k>): with ``test_output_noise``, only every ``k``-th forward of the span
    (the ``k``-th, ``2k``-th, ...) gets the noise."""

    def __post_init__(self):
        from .records import MAX_RECORD_TTL_S  # hivemind: imported only once a node is configured
        if not 0 < self.record_ttl_s <= MAX_RECORD_TTL_S:
            raise BadRequestError(f"--record-ttl must be in (0, {MAX_RECORD_TTL_S:.0f}] s (DHT peers refuse records "
                                  f"expiring further ahead); got {self.record_ttl_s}.")
