"""Fair shares on a node (issue 10, req. 4), no sockets: who a client is, the session store evicting only the putting
client's values, and the compute slot handing over between layers round-robin."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from hybrid.session_store import SessionStore
from swarm.compute_slot import ComputeSlot
from swarm.errors import BadRequestError, CapacityError, OverloadedError, error_from_wire
from swarm.quotas import client_identity


def test_a_relayed_request_counts_against_origin_and_relay_and_cannot_pose_as_a_direct_caller():
    assert client_identity("Qmclient") == "Qmclient"
    on_second = client_identity("QmnodeA", "Qmclient")  # the client's chained request, relayed by node A
    assert on_second == "Qmclient<QmnodeA"
    assert client_identity("QmnodeB", on_second) == "Qmclient<QmnodeA<QmnodeB"
    # an attacker naming the victim as its origin gets its own identity: the authenticated caller is always last
    assert client_identity("Qmattacker", "Qmclient") not in ("Qmclient", on_second)
    assert client_identity("Qmattacker", "Qmclient<QmnodeA") != on_second
    for bad in ("", 7, "x" * 5000):
        with pytest.raises(BadRequestError, match="meta\\['origin'\\]"):
            client_identity("Qmx", bad)


def test_one_clients_puts_evict_only_its_own_values():
    store = SessionStore(max_bytes=10 * 40, ttl_s=60, max_owner_bytes=4 * 40)  # 10 values in all, 4 per client
    store.put("victim:0", torch.full((10,), 7.0), owner="victim")
    store.put("victim:1", torch.full((10,), 8.0), owner="victim")
    for i in range(60):  # the attack: many small puts from one client
        store.put(f"attacker:{i}", torch.zeros(10), owner="attacker")
    assert torch.equal(store.get("victim:0"), torch.full((10,), 7.0))
    assert torch.equal(store.get("victim:1"), torch.full((10,), 8.0))
    assert store.owner_bytes("attacker") == 4 * 40  # it kept its newest 4, evicting its own oldest
    store.get("attacker:59")


def test_a_store_full_of_other_clients_values_refuses_instead_of_evicting_them():
    store = SessionStore(max_bytes=4 * 40, ttl_s=60, max_owner_bytes=2 * 40)
    for owner in ("a", "b"):
        for i in range(2):
            store.put(f"{owner}:{i}", torch.zeros(10), owner=owner)
    with pytest.raises(CapacityError, match="session store is full.*never evicts"):
        store.put("c:0", torch.zeros(10), owner="c")
    assert store.bytes == 4 * 40


def test_overloaded_names_the_refusing_peer_across_the_wire():
    err = error_from_wire(OverloadedError("full", peer_id="QmnodeB").to_wire())
    assert type(err) is OverloadedError and err.peer_id == "QmnodeB"


def test_a_long_job_hands_the_slot_to_another_client_between_layers():
    slot, events = ComputeSlot(), []
    started = threading.Event()

    def long_job():
        with slot.held("flood"):
            for layer in range(6):
                if layer:
                    slot.pass_on("flood")
                events.append(("flood", layer))
                started.set()
                time.sleep(0.01)

    def short_job():
        started.wait()
        with slot.held("polite"):
            events.append(("polite", 0))

    threads = [threading.Thread(target=long_job), threading.Thread(target=short_job)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    polite_at = events.index(("polite", 0))
    assert polite_at < len(events) - 1, f"the short job waited for the whole long one: {events}"
    assert polite_at <= 2, f"the short job waited more than about one layer: {events}"
    assert [e for e in events if e[0] == "flood"] == [("flood", i) for i in range(6)]
    assert slot.handovers >= 1


def test_waiting_clients_take_turns_round_robin():
    slot, order = ComputeSlot(), []
    slot.acquire("holder")
    threads = []
    for client, n in (("a", 3), ("b", 1)):  # client a queues 3 jobs before b's one
        for i in range(n):
            t = threading.Thread(target=lambda c=client, i=i: (slot.acquire(c), order.append((c, i)), slot.release()))
            t.start()
            threads.append(t)
            while slot.waiting < len(threads):
                time.sleep(0.001)
    slot.release()
    for t in threads:
        t.join(10)
    assert order == [("a", 0), ("b", 0), ("a", 1), ("a", 2)]


def test_a_clients_queued_job_does_not_go_before_another_clients_first():
    slot, order = ComputeSlot(), []
    slot.acquire("flood")  # the flood's first job runs
    threads = []
    for client in ("flood", "polite"):  # its second job queued before the polite client's first
        t = threading.Thread(target=lambda c=client: (slot.acquire(c), order.append(c), slot.release()))
        t.start()
        threads.append(t)
        while slot.waiting < len(threads):
            time.sleep(0.001)
    slot.release()
    for t in threads:
        t.join(10)
    assert order == ["polite", "flood"]
