"""Spot checks (issue 13, requirement 3): a node computing wrong numbers is caught, hop by hop, chained and in hybrid.

Layers 0:2 on one node; 2:4 on two honest replicas and on three nodes started with the test-only fault injection
(``swarm/cli.py``): ``SWARM_TEST_OUTPUT_NOISE=1e-2`` (Gaussian noise on every output), the same on batch row 1 only
(``SWARM_TEST_NOISE_ROW=1``), and on every 5th forward only (``SWARM_TEST_NOISE_EVERY=5``). Each client is steered to
one faulty node (its per-node route jitter is set; the other faulty nodes are made too expensive to be picked as
checkers). Without verification the wrong numbers reach the client; with ``verify=1.0`` every hop is recomputed
elsewhere, the disagreement is settled by a third opinion, the faulty node is excluded, and every result equals
local transformers, hop by hop, in chained forwards and in hybrid traces; the signed suspect report steers another
client away from the node. With ``verify=0.2`` (a seeded draw, so the count is reproducible) each fault is caught
within the bound derived below.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

import hybrid
import swarm.verification as verification
from swarm.errors import ResultMismatchError
from swarm.local_swarm import LocalSwarm
from swarm.remote_sequence import ClientConfig
from tests.integration.conftest import local_generate, local_model

NOISE = {"SWARM_TEST_OUTPUT_NOISE": "1e-2"}
FAULTS = {"all": NOISE, "row": {**NOISE, "SWARM_TEST_NOISE_ROW": "1"},
          "every5": {**NOISE, "SWARM_TEST_NOISE_EVERY": "5"}}
P = 0.2
ESCAPE = 1e-4
BOUND = {"all": math.ceil(math.log(ESCAPE) / math.log(1 - P)),  # 0.8^n < 1e-4: n = 42 requests
         "row": math.ceil(math.log(ESCAPE) / math.log(1 - P)),  # the same: a check of a row-1 fault sees row 1
         # every 5th forward is wrong: n requests contain >= floor(n/5) wrong answers, each checked with p
         "every5": 5 * math.ceil(math.log(ESCAPE) / math.log(1 - P))}  # 210


@pytest.fixture(scope="module")
def faulty(tiny_checkpoint_factory, tmp_path_factory):
    path = tiny_checkpoint_factory("llama", num_layers=4)
    swarm = LocalSwarm(tmp_path_factory.mktemp("spot-checks"))
    try:
        first = swarm.start(path, "--blocks", "0:2")
        honest = [swarm.start(path, "--blocks", "2:4", initial_peers=swarm.initial_peers) for _ in range(2)]
        faults = {kind: swarm.start(path, "--blocks", "2:4", initial_peers=swarm.initial_peers, env=env)
                  for kind, env in FAULTS.items()}
        yield path, swarm, first, honest, faults
    finally:
        swarm.close()


@pytest.fixture
def seeded():
    verification.seed_for_tests(13)
    yield
    verification.seed_for_tests(None)


def steer_to(client, peer_id: str, shun=()) -> None:
    """Route ``client`` through ``peer_id`` (cheapest), never through ``shun`` while others serve those layers."""
    client.route()  # learns the records and draws the per-node jitter
    jitter = client.sequence._jitter
    for peer in jitter:
        jitter[peer] = 1.0 if peer == peer_id else 50.0 if peer in shun else 5.0
    assert peer_id in [h.peer_id for h in client.route()]


def test_verify_catches_a_node_adding_noise_and_returns_only_verified_results(faulty, client_factory, seeded):
    path, swarm, first, honest, faults = faulty
    noisy, others = faults["all"].peer_id, {faults["row"].peer_id, faults["every5"].peer_id}
    ref = local_model(path)
    inputs = [torch.randint(3, 128, (2, 5 + i)) for i in range(5)]
    with torch.no_grad():
        want = [ref(ids).logits for ids in inputs]

    unchecked = client_factory(path, swarm, client_config=ClientConfig(verify=0.0))  # no draw may catch it here
    steer_to(unchecked, noisy, others)
    assert (unchecked(inputs[0]).logits - want[0]).abs().max().item() > 1e-3  # the fault reaches an unchecked client

    client = client_factory(path, swarm, client_config=ClientConfig(verify=1.0))
    steer_to(client, noisy, others)
    for ids, w in zip(inputs, want):
        assert (client(ids).logits - w).abs().max().item() <= 1e-5
    stats = client.sequence.stats
    assert stats.distrusted == [noisy] and stats.suspects == [noisy]
    assert stats.verify_mismatches == 1 and stats.verify_checks == 2 * len(inputs)
    assert stats.verify_skipped == len(inputs)  # layers 0:2 have no replica: those checks are skipped, free
    assert client.sequence.verify_traffic.calls > 0 and noisy not in [h.peer_id for h in client.route()]

    # Chained forwards (node → node, as hybrid runs them): each hop's check re-runs the chain avoiding that node.
    # (suspect_weight=0: this client ignores the report the first client published, so it can be steered to the node)
    chained = client_factory(path, swarm, client_config=ClientConfig(verify=1.0, suspect_weight=0.0))
    steer_to(chained, noisy, others)
    for ids, w in zip(inputs[:3], want):
        out, _, route, _ = chained.loop.run(chained.sequence.forward_chain(chained.local(ids, start=0, end=0,
                                                                                         embed=True)))
        assert (chained.local(out, start=0, end=0, head=True) - w).abs().max().item() <= 1e-5
        assert noisy not in [h.peer_id for h in route]
    assert chained.sequence.stats.distrusted == [noisy]

    # The catching clients published a signed suspect report: another client weighs it (one reporter, weighted 10 so
    # that measured latencies on a loaded machine cannot outweigh it, whatever this client's jitter), without
    # excluding it.
    observer = client_factory(path, swarm, client_config=ClientConfig(suspect_weight=10.0))
    observer.route()
    assert observer.sequence._suspects == {noisy: 1}
    for peer in observer.sequence._jitter:
        observer.sequence._jitter[peer] = 1.0 if peer == noisy else 50.0 if peer in others else 1.3
    assert noisy not in [h.peer_id for h in observer.route()]
    assert noisy not in observer.sequence.excluded()
    assert (observer(inputs[0]).logits - want[0]).abs().max().item() <= 1e-5

    # Honest nodes are never outvoted: 100 clean requests, every hop checked.
    probe = torch.randint(3, 128, (1, 4))
    for _ in range(100):
        client(probe)
    assert client.sequence.stats.distrusted == [noisy] and client.sequence.stats.verify_mismatches == 1
    assert all(n.proc.poll() is None for n in [first, *honest, *faults.values()])


@pytest.mark.parametrize("kind", ["all", "row", "every5"])
def test_each_fault_is_excluded_within_the_derived_bound(faulty, client_factory, seeded, kind):
    """verify=1.0: no wrong result reaches the client, whichever request the fault hits; verify=0.2: the node is
    excluded within BOUND[kind] requests (escape probability < 1e-4: 0.8^n for a node wrong on every request,
    0.8^floor(n/5) for one wrong on every 5th)."""
    path, swarm, _, _, faults = faulty
    target = faults[kind].peer_id
    shun = {f.peer_id for f in faults.values()} - {target}
    ref = local_model(path)
    ids = torch.randint(3, 128, (2, 6))  # two rows: the row fault corrupts row 1
    with torch.no_grad():
        want = ref(ids).logits

    full = client_factory(path, swarm, client_config=ClientConfig(verify=1.0, suspect_weight=0.0))
    steer_to(full, target, shun)
    for requests in range(1, 11):  # the every-5th node answers wrongly within 5 of its forwards
        assert (full(ids).logits - want).abs().max().item() <= 1e-5
        if full.sequence.stats.suspects:
            break
    assert full.sequence.stats.suspects == [target]

    sampled = client_factory(path, swarm, client_config=ClientConfig(verify=P, suspect_weight=0.0))
    steer_to(sampled, target, shun)
    for requests in range(1, BOUND[kind] + 1):
        sampled(ids)
        if sampled.sequence.stats.suspects:
            break
    assert sampled.sequence.stats.suspects == [target], f"not caught within the {BOUND[kind]}-request bound"
    print(f"verify={P}, fault {kind}: excluded after {requests} request(s) (bound {BOUND[kind]})")


def test_a_hybrid_trace_with_checks_returns_local_results_and_excludes_the_noisy_node(faulty, seeded):
    """The chained check covers the intervention graph's results (compared by hybrid's tolerance-aware
    ``results_agree``); tracer.stats counts the checks, and their traffic is apart from the trace's own."""
    path, swarm, _, _, faults = faulty
    noisy, others = faults["all"].peer_id, {faults["row"].peer_id, faults["every5"].peer_id}
    ref = local_model(path)
    ids = torch.tensor([[5, 9, 11, 3, 7]])
    captured = {}
    handle = ref.model.layers[3].register_forward_hook(
        lambda m, a, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        want_logits = ref(ids).logits
    handle.remove()
    lm = hybrid.LanguageModel(str(path), initial_peers=swarm.initial_peers,
                              client_config=ClientConfig(verify=1.0, suspect_weight=0.0))
    try:
        steer_to(lm.client, noisy, others)
        for attempt in range(2):
            with lm.trace(ids, placement="hybrid") as tracer:
                hidden = lm.model.layers[3].output.save()  # on the node: in the hook result
                logits = lm.lm_head.output.save()
            assert (hidden - captured["h"]).abs().max().item() <= 1e-5
            assert (logits - want_logits).abs().max().item() <= 1e-5
            stats = tracer.stats
            assert noisy not in stats["route"] and stats["round_trips"] == 1 and stats["verify_bytes"] > 0
            assert stats["verify_checks"] == 2 and stats["verify_skipped"] == 1  # 0:2 has no replica
            assert (stats["verify_mismatches"], stats["suspects"]) == ((1, [noisy]) if attempt == 0 else (0, []))
    finally:
        lm.close()


def test_generation_steps_are_checked_and_a_caught_node_is_replaced_mid_session(faulty, client_factory, seeded):
    """Hop-by-hop inference sessions: a checked step is recomputed statelessly (history + step) on another route;
    with verify=1.0 every step is, so a caught node's hop is rebuilt elsewhere and the generation stays exact."""
    path, swarm, _, _, faults = faulty
    noisy, others = faults["all"].peer_id, {faults["row"].peer_id, faults["every5"].peer_id}
    prompt = torch.randint(3, 128, (2, 5))
    want = local_generate(local_model(path), prompt, 4)
    client = client_factory(path, swarm, client_config=ClientConfig(verify=1.0, suspect_weight=0.0))
    steer_to(client, noisy, others)
    assert torch.equal(client.generate(prompt, max_new_tokens=4), want)
    stats = client.sequence.stats
    assert stats.suspects == [noisy] and stats.verify_mismatches == 1
    assert stats.verify_checks == 2 * 4 + 1  # two hops a step, four steps, and the caught step's resend on 2:4


def test_suspect_reports_expire(faulty, client_factory, monkeypatch):
    """A suspect report lives SUSPECT_TTL_S (240 s; 5 s here): then no client weighs it any more."""
    import swarm.remote_sequence as remote_sequence

    path, swarm, first, _, _ = faulty
    monkeypatch.setattr(remote_sequence, "SUSPECT_TTL_S", 5.0)
    reporter = client_factory(path, swarm, client_config=ClientConfig(verify=0.0))
    reader = client_factory(path, swarm, client_config=ClientConfig(verify=0.0))
    reader.route()
    expires = time.monotonic() + 5.0
    reporter.loop.run(reporter.sequence.report_suspect(first.peer_id, "test report"))
    reader.loop.run(reader.sequence.records(refresh=True))
    assert reader.sequence._suspects.get(first.peer_id) == 1
    time.sleep(max(0.0, expires - time.monotonic()) + 1.0)
    reader.loop.run(reader.sequence.records(refresh=True))
    assert first.peer_id not in reader.sequence._suspects


def test_hybrid_generation_steps_are_checked_and_a_caught_node_is_replaced(faulty, seeded, monkeypatch):
    """Chained inference sessions (hybrid lm.generate): a checked step replays the session on fresh sessions along a
    route avoiding the hop's node, step by step with each step's graph, and compares the answer and the saved values;
    with verify=1.0 the noisy node is caught at step 0, the session is rebuilt without it, and tokens and the saved
    hidden states equal local transformers. Caught after an unchecked step, it fails the generation instead."""
    path, swarm, _, honest, faults = faulty
    noisy, others = faults["all"].peer_id, {faults["row"].peer_id, faults["every5"].peer_id}
    faults_ids = others | {noisy}
    ref = local_model(path)
    prompt = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    steps = 4
    captured = []
    handle = ref.model.layers[3].register_forward_hook(
        lambda m, a, out: captured.append((out[0] if isinstance(out, tuple) else out)[:, -1].clone()))
    want = local_generate(ref, prompt, steps)
    handle.remove()
    assert len(captured) == steps
    lm = hybrid.LanguageModel(str(path), initial_peers=swarm.initial_peers,
                              client_config=ClientConfig(verify=1.0, suspect_weight=0.0))
    try:
        steer_to(lm.client, noisy, others)
        with lm.generate(prompt, max_new_tokens=steps, eos_token_id=None, placement="hybrid") as tracer:
            seen = hybrid.save([])
            for _ in tracer.iter[:steps]:
                seen.append(lm.model.layers[3].output[:, -1])  # on the noisy node's span: in the hook result
            ids = tracer.result.save()
        assert torch.equal(ids, want)
        assert len(seen) == steps
        for got, exp in zip(seen, captured):
            assert (got - exp).abs().max().item() <= 1e-5
        stats = tracer.stats
        assert stats["suspects"] == [noisy] and stats["verify_mismatches"] == 1
        # two hops a step; layers 0:2 have no replica, so their checks are skipped
        assert stats["verify_checks"] == 2 * steps and stats["verify_skipped"] == steps
        assert stats["verify_bytes"] > 0 and noisy not in stats["route"]
    finally:
        lm.close()

    # Honest nodes, a graph that writes on every step with a value of step 0 (carried through the client) and runs
    # the head on the node (which then answers the greedy token): every replay agrees, no false mismatch.
    def steered(model, **placement):
        with model.generate(prompt, max_new_tokens=steps, eos_token_id=None, **placement) as tracer:
            first = model.model.layers[1].output[:, -1]
            seen = hybrid.save([])
            for _ in tracer.iter[:steps]:
                model.model.layers[3].output[:, -1] += first * 3
                seen.append(model.lm_head.output[:, -1])
            ids = tracer.result.save()
        return ids, seen, tracer
    want_ids, want_seen, _ = steered(hybrid.LanguageModel(str(path)), placement="local")
    clean = hybrid.LanguageModel(str(path), initial_peers=swarm.initial_peers,
                                 client_config=ClientConfig(verify=1.0, suspect_weight=0.0))
    try:
        steer_to(clean.client, honest[0].peer_id, set(faults_ids))
        ids, seen, tracer = steered(clean, placement="hybrid")
        assert torch.equal(ids, want_ids)
        for got, exp in zip(seen, want_seen, strict=True):
            assert (got - exp).abs().max().item() <= 1e-5
        stats = tracer.stats
        assert (stats["verify_checks"], stats["verify_skipped"], stats["verify_mismatches"]) == (2 * steps, steps, 0)
        assert stats["suspects"] == [] and honest[0].peer_id in stats["route"]
    finally:
        clean.close()

    # A node caught after an unchecked answer of the session (step 0 not drawn, step 1 drawn): that answer may have
    # steered the generation, so no tokens come back.
    draws = iter([False, False] + [True] * 20)
    monkeypatch.setattr(verification, "should_check", lambda fraction: next(draws))
    late = hybrid.LanguageModel(str(path), initial_peers=swarm.initial_peers,
                                client_config=ClientConfig(verify=1.0, suspect_weight=0.0))
    try:
        steer_to(late.client, noisy, others)
        with pytest.raises(ResultMismatchError, match="after 1 unchecked step"):
            with late.generate(prompt, max_new_tokens=steps, eos_token_id=None, placement="hybrid") as tracer:
                tracer.result.save()
        assert late.client.sequence.stats.suspects == [noisy]
    finally:
        late.close()
