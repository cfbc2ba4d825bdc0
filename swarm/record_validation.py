"""DHT record validators every peer of the swarm installs (nodes and clients), so forged stores are refused.

Built from hivemind's own validators, no new crypto:

- :class:`hivemind.dht.crypto.RSASignatureValidator`: a subkey holding ``[owner:<RSA public key>]`` may only be
  written with a signature by that key. A node writes its record under such a subkey (:func:`record_subkey`).
- :class:`hivemind.dht.schema.SchemaValidator`: the model's servers key and the models key accept only
  owner-marked subkeys and values of the record's types (strict; unknown fields allowed, so newer nodes can add
  fields without older peers refusing their records; fields are only ever added, never removed).
- :class:`BindingValidator` (here): an owner-marked server record must name the peer id of its owner key (libp2p
  derives RSA peer ids from the key, see :func:`swarm.identity.peer_id_of`), so nobody can sign a record *about*
  another peer with their own key; and no record may expire more than :data:`MAX_RECORD_TTL_S` from now, so a
  bad record cannot be parked in the DHT for long.

A peer without these validators (a plain hivemind client) can still send forged stores; peers that have them
refuse the stores and drop forged records from lookup answers, and clients re-check on read
(:func:`swarm.records.records_with_expiration`).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Union

import pydantic.v1 as pydantic
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from .identity import peer_id_of
from .p2p_noise import quiet_p2pd_shutdown
from .records import MAX_RECORD_TTL_S, MODELS_PREFIX, model_prefix

logger = logging.getLogger(__name__)

_Int = pydantic.conint(ge=0, strict=True)
_Number = Union[pydantic.StrictFloat, _Int]


class ServerRecordSchema(pydantic.BaseModel):
    """The types of a :class:`swarm.records.ServerRecord` as stored (every field of this version required)."""

    peer_id: pydantic.StrictStr
    start: _Int
    end: _Int
    model_name: pydantic.StrictStr
    checkpoint_hash: pydantic.StrictStr
    num_layers: _Int
    embed: pydantic.StrictBool
    head: pydantic.StrictBool
    dtype: pydantic.StrictStr
    version: pydantic.StrictStr
    throughput: _Number
    load: _Int
    state: pydantic.StrictStr
    hooks: List[pydantic.StrictStr]

    class Config:
        extra = pydantic.Extra.allow  # fields of newer versions pass (and come back unchanged)


class ModelServersSchema(pydantic.BaseModel):
    servers: Dict[BytesWithPublicKey, ServerRecordSchema]


class SuspectReportSchema(pydantic.BaseModel):
    """A client's report that ``suspect`` computed wrong numbers (outvoted by two other routes in a spot check)."""

    suspect: pydantic.StrictStr
    reason: pydantic.StrictStr

    class Config:
        extra = pydantic.Extra.allow


class SuspectsSchema(pydantic.BaseModel):
    suspects: Dict[BytesWithPublicKey, SuspectReportSchema]


class ModelEntrySchema(pydantic.BaseModel):
    name: pydantic.StrictStr
    num_layers: _Int
    hash: pydantic.StrictStr
    key: pydantic.StrictStr

    class Config:
        extra = pydantic.Extra.allow


class ModelsSchema(pydantic.BaseModel):
    models: Dict[BytesWithPublicKey, ModelEntrySchema]


class BindingValidator(RecordValidatorBase):
    """Refuses records that expire beyond ``max_ttl_s`` from now, and owner-marked records whose ``peer_id`` field is
    not the owner key's peer id. Runs after the signature is checked and stripped (lower priority)."""

    def __init__(self, max_ttl_s: float = MAX_RECORD_TTL_S):
        self.max_ttl_s = max_ttl_s

    def validate(self, record: DHTRecord) -> bool:
        if record.expiration_time > get_dht_time() + self.max_ttl_s:
            logger.debug("Refusing a DHT record expiring %.0f s from now (limit %.0f s)",
                         record.expiration_time - get_dht_time(), self.max_ttl_s)
            return False
        keys = RSASignatureValidator._PUBLIC_KEY_RE.findall(record.subkey or b"")
        if not keys:
            return True
        try:
            value = DHTProtocol.serializer.loads(record.value)
        except Exception:
            return True  # not ours to judge; the schema validator refuses bad values under our keys
        if isinstance(value, dict) and "peer_id" in value:
            try:
                owner = peer_id_of(keys[0])
            except ValueError:
                return False
            if value["peer_id"] != owner:
                logger.debug("Refusing a record about peer %r signed by peer %s", value["peer_id"], owner)
                return False
        return True

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, BindingValidator):
            return False
        self.max_ttl_s = min(self.max_ttl_s, other.max_ttl_s)
        return True


def make_validators(private_key: Optional[RSAPrivateKey] = None, checkpoint_hashes: tuple[str, ...] = (),
                    ) -> tuple[list[RecordValidatorBase], bytes]:
    """The validators for a swarm peer, and its owner marker (``[owner:...]`` bytes) to put in its subkeys.

    ``private_key`` is the node's identity key (a client may leave it out: it signs nothing). The servers schema is
    installed for each model in ``checkpoint_hashes`` (the DHT sees only hashed keys, so a peer enforces schemas for
    the models it knows; signatures, bindings and the TTL limit hold for every record).
    """
    signer = RSASignatureValidator(private_key)
    validators: list[RecordValidatorBase] = [signer, BindingValidator(),
                                             SchemaValidator(ModelsSchema, allow_extra_keys=True, prefix=MODELS_PREFIX)]
    for digest in checkpoint_hashes:
        validators.append(SchemaValidator(ModelServersSchema, allow_extra_keys=True, prefix=model_prefix(digest)))
        validators.append(SchemaValidator(SuspectsSchema, allow_extra_keys=True, prefix=model_prefix(digest)))
    return validators, signer.local_public_key


def swarm_dht(initial_peers, *, private_key: Optional[RSAPrivateKey] = None, checkpoint_hashes: tuple[str, ...] = (),
              **kwargs) -> tuple[DHT, bytes]:
    """Start a DHT peer with the swarm's validators installed; returns it and its owner marker."""
    validators, marker = make_validators(private_key, checkpoint_hashes)
    quiet_p2pd_shutdown()
    dht = DHT(initial_peers=list(initial_peers), start=True, record_validators=validators, **kwargs)
    return dht, marker
