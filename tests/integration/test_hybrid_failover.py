"""A node killed mid-generation while every step carries an intervention graph: the client reroutes to a replica and
replays the lost KV cache step by step *with each step's graph*, so tokens and saved values equal the local run."""

from __future__ import annotations

import signal

import pytest
import torch

import hybrid
from hybrid.generation import SwarmSteps
from tests.integration.conftest import start_with_replicas

pytestmark = pytest.mark.usefixtures("one_thread")


def steered_generation(lm, prompt: torch.Tensor, **placement):
    """Layer 1's last-position state of step 0 is added at layer 4 on every step; layer 4's output is saved."""
    with lm.generate(prompt, max_new_tokens=6, eos_token_id=None, **placement) as tracer:
        first = lm.model.layers[1].output[:, -1]
        seen = hybrid.save([])
        for step in tracer.iter[:6]:
            lm.model.layers[4].output[:, -1] += first * 3
            seen.append(lm.model.layers[4].output[:, -1])
        ids = tracer.result.save()
    return ids, seen


def test_kill_mid_hybrid_generation_replays_the_interventions(tiny_checkpoint_factory, swarm_factory, monkeypatch):
    path = tiny_checkpoint_factory("llama", num_layers=6)
    swarm = swarm_factory()
    replicas = start_with_replicas(swarm, path)
    prompt = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    want_ids, want_seen = steered_generation(hybrid.LanguageModel(str(path)), prompt, placement="local")

    killed: list[str] = []
    step_once = SwarmSteps.__call__

    def kill_before_step_3(self, s, *args):
        if s == 3 and not killed:
            [peer] = [h.peer_id for h in self.sessions[0].route if h.peer_id in replicas]
            replicas[peer].kill(signal.SIGKILL)
            killed.append(peer)
        return step_once(self, s, *args)

    monkeypatch.setattr(SwarmSteps, "__call__", kill_before_step_3)
    with hybrid.LanguageModel(str(path), initial_peers=swarm.initial_peers) as lm:
        ids, seen = steered_generation(lm, prompt, placement="hybrid")
        assert killed, "the test did not kill anything"
        assert lm.client.sequence.stats.reroutes >= 1
    assert torch.equal(ids, want_ids)
    assert len(seen) == len(want_seen) == 6
    for step, (got, want) in enumerate(zip(seen, want_seen)):
        assert (got - want).abs().max().item() <= 1e-5, f"step {step}"
