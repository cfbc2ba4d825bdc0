"""DHT records: what a node announces about itself, and where.

Each model has one DHT key, ``swarm.v1.model.<hash16>`` (the first 16 hex digits of the checkpoint hash), whose
subkeys are peer ids and whose values are :class:`ServerRecord` dicts. A record expires unless the node
refreshes it. The key ``swarm.v1.models`` lists the models the swarm has seen (subkey = model key), so
``swarm-node status`` can show everything without being told a model.

Records are tolerant: unknown fields are ignored and missing optional fields take defaults, so nodes of
different versions share a swarm.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

MODELS_KEY = "swarm.v1.models"
STATE_ONLINE = "online"
STATE_JOINING = "joining"
STATE_OFFLINE = "offline"


def model_key(checkpoint_hash: str) -> str:
    return f"swarm.v1.model.{checkpoint_hash[:16]}"


@dataclass(frozen=True)
class ServerRecord:
    """One node's announcement."""

    peer_id: str
    """Base58 libp2p peer id."""
    start: int
    """First layer served (inclusive)."""
    end: int
    """Last layer served (exclusive)."""
    model_name: str
    """Human name of the model (alias or directory name)."""
    checkpoint_hash: str
    """sha256 of config + safetensors contents; clients only use nodes whose hash equals theirs."""
    num_layers: int
    """Layers in the whole model."""
    embed: bool = False
    """Serves the embedding stage."""
    head: bool = False
    """Serves the head stage (final norm + LM head)."""
    dtype: str = "float32"
    """Dtype of the weights and of the hidden states it accepts."""
    version: str = "0"
    """Software version of the node."""
    throughput: float = 0.0
    """Measured tokens/s of one forward over the span (batch 1)."""
    load: int = 0
    """Requests in flight plus open inference sessions."""
    state: str = STATE_ONLINE
    """``online``, ``joining`` or ``offline``."""
    hooks: tuple[str, ...] = field(default_factory=tuple)
    """Span hook kinds the node accepts (``kind/vN``)."""

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["hooks"] = list(self.hooks)
        return out

    @classmethod
    def from_dict(cls, value: dict) -> "ServerRecord | None":
        """Parse a record; None (logged) if required fields are missing or mistyped."""
        if not isinstance(value, dict):
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in value.items() if k in known}
        if "hooks" in kwargs:
            kwargs["hooks"] = tuple(str(h) for h in kwargs["hooks"] or ())
        try:
            record = cls(**kwargs)
        except TypeError as e:
            logger.warning("Ignoring malformed server record %r: %s", value, e)
            return None
        ints_ok = all(isinstance(getattr(record, n), int) for n in ("start", "end", "num_layers"))
        if not ints_ok or not (0 <= record.start < record.end <= record.num_layers):
            logger.warning("Ignoring server record with a bad span: %r", value)
            return None
        return record

    @property
    def online(self) -> bool:
        return self.state == STATE_ONLINE

    def covers(self, layer: int) -> bool:
        return self.start <= layer < self.end


def records_from_dht_value(value) -> list[ServerRecord]:
    """Turn the result of ``dht.get(model_key(...), latest=True)`` into records (subkey = peer id)."""
    return [record for record, _ in records_with_expiration(value)]


def records_with_expiration(value) -> list[tuple[ServerRecord, float]]:
    """Like :func:`records_from_dht_value`, with each record's DHT expiration time."""
    if value is None or not isinstance(value.value, dict):
        return []
    records = []
    for peer_id, item in value.value.items():
        record = ServerRecord.from_dict(item.value)
        if record is not None and record.peer_id == peer_id:
            records.append((record, float(item.expiration_time)))
    return records
