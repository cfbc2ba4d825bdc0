"""Authenticated records (issue 13, requirement 1): only a node can write its record.

A plain hivemind client (no validators, as an attacker would run) tries to overwrite an honest node's record with an
offline flag, another span and a far-future expiry, under the node's own subkey, under its bare peer id, and under
the attacker's own key: every DHT peer refuses each store, the honest record stays, and clients route to the node
with results equal to local transformers. A record of another version, with a field this one does not know, is
accepted.
"""

from __future__ import annotations

import torch
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarm.checkpoint import checkpoint_hash
from swarm.identity import load_identity
from swarm.record_validation import swarm_dht
from swarm.records import STATE_OFFLINE, ServerRecord, model_key
from tests.integration.conftest import local_model


def _forged(honest: ServerRecord) -> dict:
    return {**honest.to_dict(), "state": STATE_OFFLINE, "start": 1, "end": 2, "load": 0}


def test_forged_records_are_refused_and_routing_is_unaffected(tiny_checkpoint_factory, swarm_factory,
                                                              client_factory):
    path = tiny_checkpoint_factory("llama", num_layers=4)
    swarm = swarm_factory()
    first = swarm.start(path, "--blocks", "0:2")
    second = swarm.start(path, "--blocks", "2:4", initial_peers=swarm.initial_peers)
    client = client_factory(path, swarm)
    key = model_key(checkpoint_hash(path))
    found = client.dht.get(key, latest=True)
    [(subkey, item)] = [(s, i) for s, i in found.value.items() if i.value["peer_id"] == second.peer_id]
    honest = ServerRecord.from_dict(item.value)

    plain = DHT(initial_peers=swarm.initial_peers, client_mode=True, start=True)  # an attacker's client
    plain_v1 = DHT(initial_peers=swarm.initial_peers, client_mode=True, start=True)  # str subkeys (hivemind cannot
    # sort str and bytes subkeys of one key in one process)
    mallory_key = RSAPrivateKey()
    mallory = RSASignatureValidator(mallory_key)
    signing = DHT(initial_peers=swarm.initial_peers, client_mode=True, start=True, record_validators=[mallory])
    try:
        far, soon = get_dht_time() + 10_000, get_dht_time() + 5
        attempts = {
            "node's subkey, far expiry": plain.store(key, _forged(honest), far, subkey=subkey),
            "node's subkey, short expiry (no signature)": plain.store(key, _forged(honest), soon, subkey=subkey),
            "bare peer id subkey": plain_v1.store(key, _forged(honest), soon, subkey=second.peer_id),
            "attacker's own key, record about the node": signing.store(key, _forged(honest), soon,
                                                                       subkey=mallory.local_public_key),
        }
        assert not any(attempts.values()), f"some DHT peer accepted a forged record: {attempts}"

        records = client.loop.run(client.sequence.records(refresh=True))
        assert sorted((r.peer_id, r.start, r.end, r.state) for r in records) == sorted(
            [(first.peer_id, 0, 2, "online"), (second.peer_id, 2, 4, "online")])
        ids = torch.randint(3, 128, (2, 7))
        with torch.no_grad():
            want = local_model(path)(ids).logits
        assert (client(ids).logits - want).abs().max().item() <= 1e-5
        assert [h.peer_id for h in client.route()] == [first.peer_id, second.peer_id]
    finally:
        for dht in (plain, plain_v1, signing):
            dht.shutdown()


def test_records_of_another_version_with_unknown_fields_are_accepted(tiny_checkpoint_factory, swarm_factory,
                                                                     client_factory, tmp_path):
    path = tiny_checkpoint_factory("llama", num_layers=4)
    swarm = swarm_factory()
    node = swarm.start(path, "--blocks", "0:4")
    client = client_factory(path, swarm)
    digest = checkpoint_hash(path)
    identity = load_identity(tmp_path / "newer.key")
    newer, marker = swarm_dht(swarm.initial_peers, private_key=identity.private_key, checkpoint_hashes=(digest,),
                              identity_path=str(identity.path), client_mode=True)
    try:
        peer_id = newer.peer_id.to_base58()
        assert peer_id == identity.peer_id
        record = {**ServerRecord(peer_id=peer_id, start=2, end=4, model_name="m", checkpoint_hash=digest,
                                 num_layers=4, version="99.0").to_dict(),
                  "future_field": {"anything": [1, 2]}, "proof_of_work": 7}
        assert newer.store(model_key(digest), record, get_dht_time() + 30, subkey=marker)
        records = client.loop.run(client.sequence.records(refresh=True))
        by_peer = {r.peer_id: r for r in records}
        assert set(by_peer) == {node.peer_id, peer_id}
        assert (by_peer[peer_id].start, by_peer[peer_id].end, by_peer[peer_id].version) == (2, 4, "99.0")
    finally:
        newer.shutdown()
