"""A volunteer node: join the DHT, load a span, serve it, announce it until stopped.

Life cycle (:func:`run_node`): start the DHT → resolve the checkpoint and choose the span → load only the span's
tensors → register the RPC handlers → announce ``online`` every ``announce_period_s`` with a record that
expires after ``record_ttl_s`` → on stop (SIGINT/SIGTERM) announce ``offline``, shut the DHT process down and return.
How the node's three processes (this one, the DHT process, ``p2pd``) take signals: :mod:`swarm.stop_signals`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import time
from pathlib import Path

import psutil
import torch
from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from . import __version__
from .checkpoint import checkpoint_hash, load_config, resolve_checkpoint
from .errors import BadRequestError, PeerUnreachableError
from .identity import load_identity
from .node_config import NodeConfig
from .record_validation import make_validators
from .records import (MAX_RECORD_TTL_S, MODELS_KEY, STATE_OFFLINE, STATE_ONLINE, ServerRecord, model_key,
                      records_from_dht_value)
from .span_hook import HookRegistry, install_dispatch
from .span_selection import choose_span
from .span_server import SpanServer
from .stages import DTYPES, Span, SpanModel
from .stop_signals import StopSignals, detach_daemons, die_with_parent, ignore_stop_signals

logger = logging.getLogger(__name__)


def _auto_num_blocks(per_layer_bytes: int, num_layers: int, device: str) -> int:
    if device.startswith("cuda"):
        free = torch.cuda.mem_get_info()[0]
    else:
        free = psutil.virtual_memory().available
    return max(1, min(num_layers, int(0.5 * free // max(per_layer_bytes, 1))))


class NodeDHT(DHT):
    """The node's DHT process: it ignores SIGINT/SIGTERM (the main process shuts it down after announcing offline),
    dies with the main process, and starts ``p2pd`` out of the node's process group, tied to its own life
    (:mod:`swarm.stop_signals`)."""

    def run(self) -> None:
        ignore_stop_signals()
        die_with_parent()
        detach_daemons()
        super().run()

    def terminate(self) -> None:
        """SIGTERM is ignored here, so "the hard way" (hivemind's shutdown after its grace period; multiprocessing
        at exit) is SIGKILL; ``p2pd`` then dies with this process."""
        self.kill()


def stop_dht(dht: DHT) -> None:
    """Shut the DHT process down (it stops ``p2pd`` and waits for it), killing it after hivemind's grace period."""
    dht.shutdown()
    dht.join(5)


async def run_node(config: NodeConfig, *, hooks: HookRegistry | None = None, stop: asyncio.Event | None = None,
                   signals: StopSignals | None = None) -> None:
    """Serve until ``stop`` is set (or, with ``signals`` installed, the first SIGINT/SIGTERM arrives)."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    if not config.new_swarm and not config.initial_peers:
        raise BadRequestError("Give --initial-peers of a running swarm, or --new-swarm to start one.")
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    maddr = f"/ip4/{config.host}/tcp/{config.port}"
    announce = None
    if config.announce_host or config.announce_port:
        announce = [f"/ip4/{config.announce_host or config.host}/tcp/{config.announce_port or config.port}"]
    path = resolve_checkpoint(config.model, config.cache_dir, progress=True)
    digest = checkpoint_hash(path)
    identity = load_identity(config.identity_path)
    try:
        validators, owner = make_validators(identity.private_key, (digest,))
        try:
            dht = NodeDHT(initial_peers=list(config.initial_peers), start=True, record_validators=validators,
                          host_maddrs=[maddr], identity_path=str(identity.path),
                          check_if_identity_free=identity.persistent,
                          **({"announce_maddrs": announce} if announce else {}))
        except Exception as e:  # hivemind reports a bad peer as a daemon error with a long traceback
            if not config.initial_peers:
                raise
            reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise PeerUnreachableError(f"Could not join the swarm through --initial-peers "
                                       f"{' '.join(config.initial_peers)} ({reason}). Check that this is the address "
                                       "the node printed, peer id included, and that the node still runs.") from e
    finally:
        if not identity.persistent:
            identity.path.unlink(missing_ok=True)  # the daemon has read it; the key stays in memory only
    if dht.peer_id.to_base58() != identity.peer_id:
        stop_dht(dht)
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

        async def announce_state(state: str, ttl: float) -> bool:
            """Store the record and the model entry; True if the DHT accepted both."""
            record = ServerRecord(**base, load=server.load, state=state)
            now = get_dht_time()
            # Fields for `swarm-node status` only (records tolerate unknown fields; routing ignores these).
            shown = dict(device=config.device, started_at=started_at, queue=server.computing,
                         max_queue=config.limits.max_queued_compute)
            return all(await asyncio.gather(
                dht.store(key, {**record.to_dict(), **shown}, expiration_time=now + ttl, subkey=owner, return_future=True),
                dht.store(MODELS_KEY, {"name": name, "num_layers": num_layers, "hash": digest, "key": key},
                          expiration_time=now + ttl, subkey=owner, return_future=True)))

        started_at = get_dht_time()
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
        if signals is not None:
            signals.serving(loop, stop)
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
                if await asyncio.wait_for(announce_state(STATE_OFFLINE, config.record_ttl_s), timeout=3):
                    logger.info("Announced offline")
                else:
                    logger.warning("The DHT refused the offline record; the online one expires within %.0f s",
                                   config.record_ttl_s)
            except Exception as e:  # the DHT may already be gone; the record then simply expires
                logger.warning("Could not announce offline: %s", e)
    finally:
        if server is not None:
            server.shutdown()
        stop_dht(dht)
        logger.info("Stopped")


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
