"""Record validators and the read-side checks, without sockets (issue 13, requirement 1)."""

from __future__ import annotations

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.timed_storage import ValueWithExpiration

from swarm.errors import BadRequestError
from swarm.identity import load_identity, peer_id_of
from swarm.node import NodeConfig
from swarm.record_validation import make_validators
from swarm.records import MAX_RECORD_TTL_S, ServerRecord, model_key, records_with_expiration

DIGEST = "ab" * 32


@pytest.fixture(scope="module")
def identity(tmp_path_factory):
    return load_identity(tmp_path_factory.mktemp("id") / "node.key")


def _record(peer_id: str, **extra) -> dict:
    return {**ServerRecord(peer_id=peer_id, start=0, end=2, model_name="m", checkpoint_hash=DIGEST,
                           num_layers=4).to_dict(), **extra}


def _signed(validators, marker: bytes, value: dict, expiration_time: float) -> DHTRecord:
    composite = CompositeValidator(validators)
    record = DHTRecord(DHTID.generate(source=model_key(DIGEST)).to_bytes(), DHTProtocol.serializer.dumps(marker),
                       DHTProtocol.serializer.dumps(value), expiration_time)
    return DHTRecord(record.key, record.subkey, composite.sign_value(record), expiration_time)


def test_peer_id_of_a_public_key_is_the_libp2p_peer_id(identity):
    assert peer_id_of(identity.private_key.get_public_key().to_bytes()) == \
        PeerID.from_identity(identity.path.read_bytes()).to_base58() == identity.peer_id
    assert load_identity(identity.path).peer_id == identity.peer_id  # persisted: same identity next run


def test_validators_accept_own_records_with_unknown_fields_and_refuse_forgeries(identity):
    validators, marker = make_validators(identity.private_key, (DIGEST,))
    peer = CompositeValidator(make_validators(None, (DIGEST,))[0])  # another DHT peer
    soon = get_dht_time() + 30
    assert peer.validate(_signed(validators, marker, _record(identity.peer_id, future_field=[1]), soon))
    assert not peer.validate(_signed(validators, marker, _record(identity.peer_id), get_dht_time() + 10 * MAX_RECORD_TTL_S))
    assert not peer.validate(_signed(validators, marker, _record("QmSomeoneElse"), soon))
    assert not peer.validate(_signed(validators, marker, {**_record(identity.peer_id), "start": 0.0}, soon))
    mallory, mallory_marker = make_validators(None, (DIGEST,))
    forged = _signed(mallory, mallory_marker, _record(identity.peer_id), soon)
    assert not peer.validate(DHTRecord(forged.key, DHTProtocol.serializer.dumps(marker), forged.value, soon))


def test_clients_ignore_records_without_a_matching_owner(identity):
    _, marker = make_validators(identity.private_key)
    soon = get_dht_time() + 30
    value = ValueWithExpiration({
        marker: ValueWithExpiration(_record(identity.peer_id), soon),
        identity.peer_id: ValueWithExpiration(_record(identity.peer_id), soon),  # v1-style subkey: unsigned
        marker + b"x": ValueWithExpiration(_record("QmSomeoneElse"), soon),
    }, soon)
    assert [r.peer_id for r, _ in records_with_expiration(value)] == [identity.peer_id]
    far = ValueWithExpiration({marker: ValueWithExpiration(_record(identity.peer_id), soon + 2 * MAX_RECORD_TTL_S)}, soon)
    assert records_with_expiration(far) == []


def test_record_ttl_beyond_the_limit_is_a_config_error():
    with pytest.raises(BadRequestError, match="--record-ttl"):
        NodeConfig(record_ttl_s=MAX_RECORD_TTL_S + 1)


def test_suspect_reports_count_distinct_reporters_and_ignore_bad_ones(identity):
    from swarm.records import suspect_reporters
    _, mine = make_validators(identity.private_key)
    _, other = make_validators(load_identity(None).private_key)
    soon = get_dht_time() + 30
    report = {"suspect": "QmBad", "reason": "outvoted"}
    value = ValueWithExpiration({
        b"QmBad" + mine: ValueWithExpiration(report, soon),
        b"QmBad" + other: ValueWithExpiration(report, soon),
        b"QmOther" + other: ValueWithExpiration(report, soon),  # subkey names another peer than the report
        b"QmBad": ValueWithExpiration(report, soon),  # unsigned
        b"QmLate" + mine: ValueWithExpiration({"suspect": "QmLate", "reason": "x"}, soon + 2 * MAX_RECORD_TTL_S),
    }, soon)
    assert suspect_reporters(value) == {"QmBad": 2}
