"""DHT records: what a node announces about itself, and where.

Each model has one DHT key, ``swarm.v2.model.<hash16>_servers`` (the first 16 hex digits of the checkpoint hash),
whose subkeys are the nodes' owner markers (``[owner:<RSA public key>]``, see :mod:`swarm.record_validation`) and
whose values are :class:`ServerRecord` dicts signed by that key. A record expires unless the node refreshes it, and
never more than :data:`MAX_RECORD_TTL_S` ahead. The key ``swarm.v2_models`` lists the models the swarm has seen
(one entry per node, subkey = its owner marker), so ``swarm-node status`` can show everything without being told a
model.

Records are tolerant: unknown fields are ignored, so nodes of different versions share a swarm. A record is used
only if its subkey carries exactly one owner key and its ``peer_id`` is that key's peer id (the DHT validators
enforce this on every peer that has them; :func:`records_with_expiration` checks again on read).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field

from hivemind.utils import get_dht_time

from .identity import peer_id_of

logger = logging.getLogger(__name__)
_OWNER_RE = re.compile(rb"\[owner:(.+?)\]")

MODELS_PREFIX = "swarm.v2"
MODELS_KEY = f"{MODELS_PREFIX}_models"  # = SchemaValidator's ``{prefix}_{field}`` for ModelsSchema.models
MAX_RECORD_TTL_S = 300.0
"""No DHT record may expire further ahead than this (a node's ``record_ttl_s`` must be at most this)."""
STATE_ONLINE = "online"
STATE_JOINING = "joining"
STATE_OFFLINE = "offline"


def model_prefix(checkpoint_hash: str) -> str:
    return f"swarm.v2.model.{checkpoint_hash[:16]}"


def model_key(checkpoint_hash: str) -> str:
    """The DHT key of a model's server records (``{prefix}_servers``, as ModelServersSchema names it)."""
    return f"{model_prefix(checkpoint_hash)}_servers"


def suspects_key(checkpoint_hash: str) -> str:
    """The DHT key of clients' signed reports of nodes caught computing wrong numbers (SuspectsSchema names it)."""
    return f"{model_prefix(checkpoint_hash)}_suspects"


SUSPECT_TTL_S = 240.0
"""A suspect report expires this long after it was made (unless the reporter sees the node misbehave again)."""


def owner_peer_id(subkey) -> str | None:
    """The peer id of the one owner key in a record's subkey; None if it has none, several, or a bad one."""
    if not isinstance(subkey, bytes):
        return None
    keys = set(_OWNER_RE.findall(subkey))
    if len(keys) != 1:
        return None
    try:
        return peer_id_of(keys.pop())
    except ValueError:
        return None


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
    latest = get_dht_time() + MAX_RECORD_TTL_S
    for subkey, item in value.value.items():
        owner = owner_peer_id(subkey)
        record = ServerRecord.from_dict(item.value) if owner is not None else None
        if record is None or record.peer_id != owner or float(item.expiration_time) > latest:
            continue
        records.append((record, float(item.expiration_time)))
    return records


def suspect_reporters(value) -> dict[str, int]:
    """Peer id -> how many distinct reporters (owner keys) suspect it, from ``dht.get(suspects_key(...))``.

    Each report's subkey is ``<suspect peer id> + [owner:<reporter key>]`` and its value ``{"suspect": peer id,
    ...}``; reports that do not match, or expire beyond the record TTL limit, are ignored."""
    if value is None or not isinstance(value.value, dict):
        return {}
    reporters: dict[str, set[bytes]] = {}
    latest = get_dht_time() + MAX_RECORD_TTL_S
    for subkey, item in value.value.items():
        report = item.value
        if (owner_peer_id(subkey) is None or not isinstance(report, dict) or not isinstance(report.get("suspect"), str)
                or not subkey.startswith(report["suspect"].encode()) or float(item.expiration_time) > latest):
            continue
        reporters.setdefault(report["suspect"], set()).add(_OWNER_RE.findall(subkey)[0])
    return {peer: len(keys) for peer, keys in reporters.items()}
