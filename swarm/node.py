"""A volunteer node: join the DHT, load a span, serve it, announce it until stopped.

Life cycle (:func:`run_node`): start the DHT → resolve the checkpoint and choose the span → load only the span's
tensors → register the RPC handlers → announce ``online`` every ``announce_period_s`` with a record that
expires after ``record_ttl_s`` → on stop (SIGINT/SIGTERM) announce ``offline`` and shut down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from hivemind.utils import get_dht_time

from . import __version__
from .checkpoint import checkpoint_hash, load_config, resolve_checkpoint
from .errors import BadRequestError
from .identity import load_identity
from .record_validation import swarm_dht
from .records import (MAX_RECORD_TTL_S, MODELS_KEY, STATE_OFFLINE, STATE_ONLINE, ServerRecord, model_key,
                      records_from_dht_value)
from .span_hook import HookRegistry, install_dispatch
from .span_selection import choose_span
from .span_server import ServerLimits, SpanServer
from .stages import DTYPES, Span, SpanModel

logger = logging.getLogger(__name__)


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
    limits: ServerLimits = field(default_factory=ServerLimits)
    """Request limits the node enforces."""
    ready_file: Path | None = None
    """If set, a JSON file with peer id, addresses and span is written here once the node serves."""
    identity_path: Path | None = None
    """RSA identity file (libp2p format): the node's peer id and the key that signs its records. Generated there if
    missing and kept, so the peer id survives restarts; None = a new identity each run."""
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
        if not 0 < self.record_ttl_s <= MAX_RECORD_TTL_S:
            raise BadRequestError(f"--record-ttl must be in (0, {MAX_RECORD_TTL_S:.0f}] s (DHT peers refuse records "
                                  f"expiring further ahead); got {self.record_ttl_s}.")


def _auto_num_blocks(per_layer_bytes: int, num_layers: int, device: str) -> int:
    if device.startswith("cuda"):
        free = torch.cuda.mem_get_info()[0]
    else:
        free = psutil.virtual_memory().available
    return max(1, min(num_layers, int(0.5 * free // max(per_layer_bytes, 1))))


async def run_node(config: NodeConfig, *, hooks: HookRegistry | None = None, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set or SIGINT/SIGTERM arrives."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    if not config.new_swarm and not config.initial_peers:
        raise BadRequestError("Give --initial-peers of a running swarm, or --new-swarm to start one.")
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    maddr = f"/ip4/{config.host}/tcp/{config.port}"
    announce = None
    if config.announce_host or config.announce_port:
        announce = [f"/ip4/{config.announce_host or config.host}/tcp/{config.announce_port or config.port}"]
    path = resolve_checkpoint(config.model, config.cache_dir, progress=True)
    digest = checkpoint_hash(path)
    identity = load_identity(config.identity_path)
    try:
        dht, owner = swarm_dht(config.initial_peers, private_key=identity.private_key, checkpoint_hashes=(digest,),
                               host_maddrs=[maddr], identity_path=str(identity.path),
                               check_if_identity_free=identity.persistent,
                               **({"announce_maddrs": announce} if announce else {}))
    finally:
        if not identity.persistent:
            identity.path.unlink(missing_ok=True)  # the daemon has read it; the key stays in memory only
    if dht.peer_id.to_base58() != identity.peer_id:
        dht.shutdown()
        raise BadRequestError(f"The p2p daemon's peer id {dht.peer_id} is not the identity key's {identity.peer_id}; "
                              "records would not validate. Is the identity file an RSA key?")
    server = None
    try:
        model_config = load_config(path)
        num_layers = model_config.num_hidden_layers
        key = model_key(digest)
        name = config.model if not Path(config.model).exists() else Path(config.model).resolve().name
        if config.blocks is not None:
            start, end = config.blocks
        else:
            found = await dht.get(key, latest=True, return_future=True)
            peers = records_from_dht_value(found)
            dtype_bytes = torch.empty((), dtype=DTYPES[config.dtype]).element_size()
            per_layer = _layer_params(model_config) * dtype_bytes
            size = config.num_blocks or _auto_num_blocks(per_layer, num_layers, config.device)
            start, end = choose_span(peers, num_layers, size)
            logger.info("Chose layers %d:%d (least covered, %d known nodes)", start, end, len(peers))
        span = Span(start, end, embed=config.serve_embed and start == 0, head=config.serve_head and end == num_layers)
        rss_before_load = psutil.Process().memory_info().rss
        t0 = time.perf_counter()
        model = SpanModel.load(path, span, dtype=DTYPES[config.dtype], device=config.device)
        install_dispatch(model)
        if config.test_output_noise:
            _add_output_noise(model, config.test_output_noise, row=config.test_noise_row,
                              every=config.test_noise_every)
        logger.info("Loaded %s of %s in %.1f s (%.1f MB of weights)", span, name, time.perf_counter() - t0,
                    model.weight_bytes() / 1e6)
        throughput = _measure_throughput(model)
        hooks = hooks or HookRegistry()
        claimed = config.test_announce_blocks or (start, end)
        if config.test_announce_blocks:
            logger.warning("TEST FAULT INJECTION: announcing layers %d:%d while serving %d:%d", *claimed, start, end)
        base = dict(peer_id=dht.peer_id.to_base58(), start=claimed[0], end=claimed[1], model_name=name, checkpoint_hash=digest,
                    num_layers=num_layers, embed=span.embed, head=span.head, dtype=config.dtype,
                    version=__version__, throughput=throughput, hooks=tuple(hooks.kinds()))
        truth = {"start": start, "end": end} if config.test_info_tells_truth else {}
        server = SpanServer(model, limits=config.limits, hooks=hooks,
                            info={**base, "hooks": list(base["hooks"]), "weight_bytes": model.weight_bytes(), **truth})
        server.signer = identity.private_key  # commitments signed for third parties (swarm.commitments)
        p2p = await dht.replicate_p2p()
        await server.register(p2p)
        expire = asyncio.create_task(server.expire_sessions_forever())

        async def announce_state(state: str, ttl: float) -> None:
            record = ServerRecord(**base, load=server.load, state=state)
            now = get_dht_time()
            await asyncio.gather(
                dht.store(key, record.to_dict(), expiration_time=now + ttl, subkey=owner, return_future=True),
                dht.store(MODELS_KEY, {"name": name, "num_layers": num_layers, "hash": digest, "key": key},
                          expiration_time=now + ttl, subkey=owner, return_future=True))

        await announce_state(STATE_ONLINE, config.record_ttl_s)
        maddrs = [str(a) for a in dht.get_visible_maddrs()]
        print(f"Serving {span} of {name} as {base['peer_id']}", flush=True)
        print("Others can join with: --initial-peers " + " ".join(maddrs), flush=True)
        if config.ready_file is not None:
            ready = {**base, "hooks": list(base["hooks"]), "maddrs": maddrs, "pid": os.getpid(),
                     "weight_bytes": model.weight_bytes(), "peak_rss_bytes": peak_rss_bytes(),
                     "rss_before_load_bytes": rss_before_load}
            tmp = Path(str(config.ready_file) + ".tmp")
            tmp.write_text(json.dumps(ready))
            os.replace(tmp, config.ready_file)
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), timeout=config.announce_period_s)
                except asyncio.TimeoutError:
                    await announce_state(STATE_ONLINE, config.record_ttl_s)
        finally:
            expire.cancel()
            logger.info("Stopping: announcing offline")
            try:
                await asyncio.wait_for(announce_state(STATE_OFFLINE, config.record_ttl_s), timeout=3)
            except Exception as e:  # the DHT may already be gone; the record then simply expires
                logger.warning("Could not announce offline: %s", e)
    finally:
        if server is not None:
            server.shutdown()
        dht.shutdown()


def _add_output_noise(model: SpanModel, std: float, *, row: int | None = None, every: int = 1) -> None:
    """TEST ONLY fault injection: the output of the span's last layer gets Gaussian noise of ``std`` (only batch row
    ``row`` where given; only every ``every``-th time it runs), before anything reads it: span hooks (a hybrid
    graph's saves), the head and the answer all see the wrong numbers, as from a node that computes them wrongly."""
    logger.warning("TEST FAULT INJECTION: adding noise (std %g) to %s of %s output", std,
                   "every row" if row is None else f"row {row}", "every" if every == 1 else f"every {every}th")
    calls = [0]

    def noisy(out: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if not out.is_floating_point() or calls[0] % every:
            return out
        noise = std * torch.randn_like(out)
        if row is not None:
            keep = torch.zeros(out.shape[0], *([1] * (out.ndim - 1)), dtype=out.dtype, device=out.device)
            keep[row:row + 1] = 1
            noise = noise * keep
        return out + noise

    if model.span.end > model.span.start:
        def after_layer(module, args, out):
            return (noisy(out[0]), *out[1:]) if isinstance(out, tuple) else noisy(out)
        model.layer(model.span.end - 1).register_forward_hook(after_layer, prepend=True)
        return
    inner = model.forward
    model.forward = lambda *args, **kwargs: noisy(inner(*args, **kwargs))


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Peak resident memory of a process (this one by default).

    Reads VmHWM on Linux: ``ru_maxrss`` survives fork + exec, so a node started by a big parent would report
    the parent's peak.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if pid == "self" else 0


def _layer_params(config) -> int:
    d, f = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    return d * (d + 2 * kv) + config.num_attention_heads * head_dim * d + 3 * d * f + 2 * d


def _measure_throughput(model: SpanModel, tokens: int = 16) -> float:
    """Tokens per second of one forward over the span (batch 1), a rough number for routing."""
    x = torch.zeros(1, tokens, model.config.hidden_size, dtype=next(model.parameters()).dtype,
                    device=next(model.parameters()).device)
    with torch.no_grad():
        t0 = time.perf_counter()
        model(x)
        return tokens / max(time.perf_counter() - t0, 1e-6)
