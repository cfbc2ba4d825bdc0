"""``swarm-node status``: what the swarm serves, who serves it, load and gaps, as text or as a snapshot dict.

:func:`snapshot` reads the DHT once and returns plain JSON-able data (the text output, the status page and its
``/api/status`` endpoint all render it; :mod:`swarm.status_page` serves it live). Besides the routing fields of
:class:`swarm.records.ServerRecord`, nodes announce a few fields for display only (``device``, ``started_at``,
``queue``, ``max_queue``); older nodes lack them and show ``?``.
"""

from __future__ import annotations

import shlex
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hivemind.dht import DHT

MAX_LAYERS = 4096
"""A model entry claiming more layers is ignored: anyone can write one, and coverage is one number per layer."""
MAX_TEXT = 120
"""Longest text shown from a record (names, versions, devices come from the network)."""

STAGES_LEGEND = "STAGES: E = also serves the embedding, H = also serves the final norm + LM head, - = layers only"
STATE_LEGEND = "STATE: online serves; offline announced it stopped (its record expires soon); joining is loading"


def _display_fields(found) -> dict[str, dict]:
    """Peer id -> the display-only fields of its record (validated records only; see :func:`snapshot`)."""
    from .records import owner_peer_id
    out: dict[str, dict] = {}
    if found is None or not isinstance(found.value, dict):
        return out
    for subkey, item in found.value.items():
        value, owner = item.value, owner_peer_id(subkey)
        if owner is not None and isinstance(value, dict) and value.get("peer_id") == owner:
            out[owner] = {k: value.get(k) for k in ("device", "started_at", "queue", "max_queue")}
    return out


def _text(value) -> str | None:
    return value[:MAX_TEXT] if isinstance(value, str) else None


def _number(value, kind=float):
    return kind(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def model_snapshot(info: dict, records_with_expiry: list, display: dict[str, dict], now: float,
                   initial_peers: list[str]) -> dict:
    """One model's part of the snapshot: its nodes, per-layer coverage, and the gaps with a command filling each."""
    from .span_selection import coverage, missing_spans
    num_layers = int(info.get("num_layers", 0) or 0)
    records = [record for record, _ in records_with_expiry]
    nodes = []
    for record, expires in sorted(records_with_expiry, key=lambda re: (re[0].start, re[0].end, re[0].peer_id)):
        extra = display.get(record.peer_id, {})
        started = _number(extra.get("started_at"))
        nodes.append(dict(peer_id=record.peer_id, start=record.start, end=record.end, embed=record.embed,
                          head=record.head, state=record.state, load=record.load, throughput=record.throughput,
                          dtype=_text(record.dtype), version=_text(record.version),
                          hooks=[_text(h) for h in record.hooks[:16]], device=_text(extra.get("device")),
                          queue=_number(extra.get("queue"), int), max_queue=_number(extra.get("max_queue"), int),
                          uptime_s=None if started is None else max(0.0, now - started),
                          expires_in_s=max(0.0, expires - now)))
    gaps = missing_spans(records, num_layers) if num_layers else []
    peers = " ".join(shlex.quote(p) for p in initial_peers)
    name = _text(info.get("name")) or "?"
    return dict(name=name, hash=_text(info.get("hash")) or "", num_layers=num_layers,
                coverage=coverage(records, num_layers), nodes=nodes,
                gaps=[dict(start=s, end=e, command=f"swarm-node serve --model {shlex.quote(name)} --blocks {s}:{e} "
                           f"--initial-peers {peers}") for s, e in gaps])


def collect_status(dht: "DHT") -> list[tuple[dict, list]]:
    """Every model announced in the swarm with its node records (kept for callers of the old form)."""
    return [(info, [r for r, _ in records]) for info, records, _ in _collect(dht)]


def _collect(dht: "DHT") -> list[tuple[dict, list, dict]]:
    from .records import MODELS_KEY, owner_peer_id, records_with_expiration
    found = dht.get(MODELS_KEY, latest=True)
    entries: dict[str, dict] = {}  # one entry per node that serves the model; keep one per model key
    if found is not None and isinstance(found.value, dict):
        for subkey, item in found.value.items():
            info = item.value if isinstance(item.value, dict) else {}
            layers = info.get("num_layers")
            if (owner_peer_id(subkey) is not None and isinstance(info.get("key"), str)
                    and isinstance(layers, int) and 0 < layers <= MAX_LAYERS):
                entries.setdefault(info["key"], info)
    out = []
    for key, info in entries.items():
        value = dht.get(key, latest=True)
        out.append((info, records_with_expiration(value), _display_fields(value)))
    return out


def snapshot(dht: "DHT", initial_peers: list[str]) -> dict:
    """The whole swarm as plain data: ``{"updated": unix time, "models": [model_snapshot, ...]}``."""
    from hivemind.utils import get_dht_time
    now = get_dht_time()
    models = [model_snapshot(info, records, display, now, initial_peers) for info, records, display in _collect(dht)]
    return dict(updated=time.time(), models=sorted(models, key=lambda m: m["name"]))


def _duration(seconds: float | None) -> str:
    """``42s``, ``5m12s``, ``2h05m``, ``3d04h``; ``?`` if unknown."""
    if seconds is None:
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def render_text(snap: dict) -> str:
    """The text ``swarm-node status`` prints: per model a header line, a table of nodes, the gaps, a legend."""
    lines = []
    for model in snap["models"]:
        lines.append(f"model {model['name']}  ({model['num_layers']} layers, hash {model['hash'][:16]})")
        lines.append(f"  {'LAYERS':<9} {'STAGES':<6} {'STATE':<8} {'LOAD':>4} {'QUEUE':>5} {'TOK/S':>9} "
                     f"{'DTYPE':<8} {'DEVICE':<6} {'VERSION':<8} {'UPTIME':>6}  PEER")
        for n in model["nodes"]:
            stages = "".join(s for s, f in (("E", n["embed"]), ("H", n["head"])) if f) or "-"
            queue = "?" if n["queue"] is None else str(n["queue"])
            lines.append(f"  {str(n['start']) + ':' + str(n['end']):<9} {stages:<6} {n['state']:<8} {n['load']:>4} "
                         f"{queue:>5} {n['throughput']:>9.1f} {n['dtype'] or '?':<8} {n['device'] or '?':<6} "
                         f"{'v' + (n['version'] or '?'):<8} {_duration(n['uptime_s']):>6}  {n['peer_id']}")
        if model["gaps"]:
            lines.append("  gaps: " + ", ".join(f"{g['start']}:{g['end']}" for g in model["gaps"])
                         + "  (no online node serves these layers; to serve them:)")
            lines += [f"    {g['command']}" for g in model["gaps"]]
        else:
            lines.append("  gaps: none (every layer is served)")
    lines += ["", STAGES_LEGEND, STATE_LEGEND,
              "LOAD: requests in flight + open sessions; QUEUE: compute jobs running or queued; TOK/S: measured "
              "forward speed of the span (batch 1)"]
    return "\n".join(lines)


def join_swarm(initial_peers: list[str]) -> "DHT":
    """A client DHT peer of the swarm; a malformed or dead address is one line (StartupError/PeerUnreachableError)."""
    from .errors import PeerUnreachableError
    from .startup_checks import check_initial_peers
    check_initial_peers(initial_peers)
    from .record_validation import swarm_dht
    try:
        dht, _ = swarm_dht(initial_peers, client_mode=True)
    except Exception as e:  # hivemind reports a bad peer as a daemon error with a long traceback
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise PeerUnreachableError(f"Could not join the swarm through --initial-peers {' '.join(initial_peers)} "
                                   f"({reason}). Check the address the node printed, peer id included.") from e
    return dht


def print_status(initial_peers: list[str]) -> int:
    dht = join_swarm(initial_peers)
    try:
        snap = snapshot(dht, initial_peers)
    finally:
        dht.shutdown()
    if not snap["models"]:
        print("No models announced in this swarm (are the initial peers right?).")
        return 1
    print(render_text(snap))
    return 0


def serve_status(initial_peers: list[str], host: str, port: int, *, refresh_s: float = 5.0) -> int:
    """``swarm-node status --serve PORT``: see :mod:`swarm.status_page`."""
    from .status_page import serve
    return serve(initial_peers, host, port, refresh_s=refresh_s)
