"""``swarm-node status``: what the swarm serves, who serves it, load and gaps."""

from __future__ import annotations

from hivemind.dht import DHT

from .record_validation import swarm_dht
from .records import MODELS_KEY, ServerRecord, owner_peer_id, records_from_dht_value
from .span_selection import missing_spans


def collect_status(dht: DHT) -> list[tuple[dict, list[ServerRecord]]]:
    """Every model announced in the swarm with its node records."""
    found = dht.get(MODELS_KEY, latest=True)
    entries: dict[str, dict] = {}  # one entry per node that serves the model; keep one per model key
    if found is not None and isinstance(found.value, dict):
        for subkey, item in found.value.items():
            info = item.value if isinstance(item.value, dict) else {}
            if owner_peer_id(subkey) is not None and isinstance(info.get("key"), str):
                entries.setdefault(info["key"], info)
    return [(info, records_from_dht_value(dht.get(key, latest=True))) for key, info in entries.items()]


def print_status(initial_peers: list[str]) -> int:
    dht, _ = swarm_dht(initial_peers, client_mode=True)
    try:
        models = collect_status(dht)
    finally:
        dht.shutdown()
    if not models:
        print("No models announced in this swarm (are the initial peers right?).")
        return 1
    for info, records in models:
        num_layers = int(info.get("num_layers", 0))
        print(f"model {info.get('name', '?')}  ({num_layers} layers, hash {str(info.get('hash', ''))[:16]})")
        for r in sorted(records, key=lambda r: (r.start, r.end)):
            stages = "".join(s for s, f in (("E", r.embed), ("H", r.head)) if f) or "-"
            print(f"  {r.start:>4}:{r.end:<4} {stages:<2} {r.state:<8} load={r.load:<3} "
                  f"{r.throughput:8.1f} tok/s  {r.dtype:<8} v{r.version}  {r.peer_id}")
        gaps = missing_spans(records, num_layers) if num_layers else []
        print("  gaps: " + (", ".join(f"{s}:{e}" for s, e in gaps) if gaps else "none (every layer is served)"))
    return 0
