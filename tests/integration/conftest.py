"""Fixtures that start real node processes on 127.0.0.1; every process is killed when its fixture ends."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm import SwarmModel
from swarm.local_swarm import LocalSwarm as Swarm


@pytest.fixture
def swarm_factory(tmp_path):
    """``swarm_factory()`` → a :class:`Swarm` whose nodes are killed at the end of the test."""
    swarms = []

    def make() -> Swarm:
        swarm = Swarm(tmp_path / f"swarm{len(swarms)}")
        swarm.workdir.mkdir()
        swarms.append(swarm)
        return swarm

    yield make
    for swarm in swarms:
        swarm.close()


def start_split(swarm: Swarm, model, spans: list[tuple[int, int]], *extra: str) -> Swarm:
    """Start one node per span, the first creating the swarm."""
    for i, (start, end) in enumerate(spans):
        swarm.start(model, "--blocks", f"{start}:{end}", *extra, initial_peers=swarm.initial_peers if i else None)
    return swarm


def local_model(path) -> torch.nn.Module:
    """The independent reference: plain transformers, whole model, fp32."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def local_generate(ref: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """transformers' greedy generation with EOS switched off, so exactly ``max_new_tokens`` come out unaltered
    (``min_new_tokens`` would instead mask EOS out of the logits and change the argmax)."""
    ref.generation_config.eos_token_id = None
    with torch.no_grad():
        return ref.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kwargs)


@pytest.fixture
def client_factory():
    clients = []

    def make(path, swarm: Swarm, **kwargs) -> SwarmModel:
        client = SwarmModel.from_pretrained(str(path), initial_peers=swarm.initial_peers, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
