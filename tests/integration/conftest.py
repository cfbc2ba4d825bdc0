"""Fixtures that start real node processes on 127.0.0.1; every process is killed when its fixture ends."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import hybrid
from swarm import SwarmModel
from swarm.local_swarm import LocalSwarm as Swarm

SMOLLM2_THIRDS = [(0, 10), (10, 20), (20, 30)]


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


def start_with_replicas(swarm: Swarm, model, *, layers: int = 6, replicas: int = 2) -> dict:
    """Layers ``0:layers/2`` on one node and ``layers/2:layers`` on ``replicas`` nodes; returns the replicas by
    peer id (the nodes a failover test kills)."""
    half = layers // 2
    swarm.start(model, "--blocks", f"0:{half}")
    nodes = [swarm.start(model, "--blocks", f"{half}:{layers}", initial_peers=swarm.initial_peers)
             for _ in range(replicas)]
    return {node.peer_id: node for node in nodes}


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


@pytest.fixture(scope="module")
def one_thread():
    """The nodes run one torch thread; local references do too, so reductions match bit for bit (restored after).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_swarm(smollm2_dir, tmp_path_factory):
    """A 3-node SmolLM2 swarm (layers 0:10, 10:20, 20:30) shared by the whole test session (tests must not stop or
    reconfigure its nodes: failover tests start their own)."""
    swarm = Swarm(tmp_path_factory.mktemp("smollm2-swarm"))
    try:
        start_split(swarm, smollm2_dir, SMOLLM2_THIRDS)
        yield swarm
    finally:
        swarm.close()


@pytest.fixture(scope="session")
def remote_lm(smollm2_dir, smollm2_swarm):
    """``hybrid.LanguageModel`` connected to :func:`smollm2_swarm`."""
    lm = hybrid.LanguageModel(str(smollm2_dir), initial_peers=smollm2_swarm.initial_peers)
    try:
        yield lm
    finally:
        lm.close()


@pytest.fixture(scope="session")
def local_lm(smollm2_dir):
    """``hybrid.LanguageModel`` without peers (placement="local")."""
    return hybrid.LanguageModel(str(smollm2_dir))


@pytest.fixture(scope="module")
def tiny_node(tiny_checkpoint_factory, tmp_path_factory):
    """``(checkpoint path, node, client)``: one node serving a tiny 4-layer Llama whole, and a swarm client of it."""
    path = tiny_checkpoint_factory("llama", num_layers=4)
    with Swarm(tmp_path_factory.mktemp("tiny-node")) as swarm:
        node = swarm.start(path, "--blocks", "0:4")
        client = SwarmModel.from_pretrained(str(path), initial_peers=swarm.initial_peers)
        try:
            yield path, node, client
        finally:
            client.close()


@pytest.fixture(scope="session")
def central_lm(smollm2_dir, tmp_path_factory):
    """``hybrid.LanguageModel`` on a deployment where one node serves every stage of SmolLM2 (``centralized``)."""
    swarm = Swarm(tmp_path_factory.mktemp("smollm2-central"))
    try:
        swarm.start(smollm2_dir, "--blocks", "0:30")
        with hybrid.LanguageModel(str(smollm2_dir), initial_peers=swarm.initial_peers) as lm:
            yield lm
    finally:
        swarm.close()


@pytest.fixture(scope="session")
def ns(smollm2_dir):
    """Real nnsight 0.8.1 on SmolLM2, fp32, run locally: the reference for nnsight parity."""
    import nnsight
    return nnsight.LanguageModel(str(smollm2_dir), dispatch=True, dtype=torch.float32)


@pytest.fixture
def lm_for(request):
    """``lm_for(placement)`` → the LanguageModel that runs that placement (starting its deployment if needed)."""
    def get(placement: str):
        name = {"local": "local_lm", "hybrid": "remote_lm", "swarm": "remote_lm", "centralized": "central_lm"}
        return request.getfixturevalue(name[placement])
    return get
