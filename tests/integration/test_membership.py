"""Joining without --blocks, `swarm-node status`, going offline on SIGTERM, and the missing-blocks error."""

import signal
import subprocess
import sys

import pytest
import torch

from swarm.errors import MissingBlocksError
from swarm.local_swarm import REPO


def status(swarm) -> str:
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "status", "--initial-peers", *swarm.initial_peers],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_join_status_offline_and_missing_blocks(tiny_checkpoint_factory, swarm_factory, client_factory):
    path = tiny_checkpoint_factory("mistral", num_layers=6)
    swarm = swarm_factory()
    first = swarm.start(path, "--num-blocks", "3")
    # A long TTL: the record would stay "online" for two minutes unless the node marks itself offline.
    second = swarm.start(path, "--num-blocks", "3", "--record-ttl", "120", initial_peers=swarm.initial_peers)
    assert (first.info["start"], first.info["end"]) == (0, 3)
    assert (second.info["start"], second.info["end"]) == (3, 6), "a joining node should take the uncovered span"

    text = status(swarm)
    assert "0:3" in text and "3:6" in text and "gaps: none" in text
    assert first.peer_id in text and second.peer_id in text

    client = client_factory(path, swarm)
    ids = torch.randint(3, 128, (1, 5))
    client(ids)

    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(timeout=30) == 0
    text = status(swarm)
    assert "gaps: 3:6" in text
    [line] = [line for line in text.splitlines() if second.peer_id in line]
    assert "offline" in line

    with pytest.raises(MissingBlocksError) as info:
        client(ids)
    assert info.value.missing == [(3, 6)]
    assert "--blocks 3:6" in str(info.value)
