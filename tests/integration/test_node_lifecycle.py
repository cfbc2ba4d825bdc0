"""A node stops cleanly on a signal to its whole process group, and refuses a port that is in use (issue 15).

Three tiny nodes start together (one module fixture); each test then stops one its own way. "Clean" is checked
from the outside: exit status, the node's own log, and every process the node had started (the DHT process, and
``p2pd``, which runs in a session of its own) is gone, found by walking /proc's parent links while the node ran.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from swarm.local_swarm import REPO, LocalSwarm


def _stat(pid: int) -> tuple[int, str] | None:
    """``(parent pid, start time)`` of a live process, or None (gone, or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else (int(fields[1]), fields[19])


def descendants(root: int) -> dict[int, str]:
    """Every live process below ``root`` (and ``root``), by pid, with its start time (pids get reused)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            parents[int(entry)] = st
    found, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        if pid in parents:
            found[pid] = parents[pid][1]
            frontier += [child for child, (ppid, _) in parents.items() if ppid == pid]
    return found


def survivors(processes: dict[int, str]) -> list[str]:
    left = []
    for pid, started in processes.items():
        st = _stat(pid)
        if st is not None and st[1] == started:
            left.append(f"{pid}: {Path(f'/proc/{pid}/cmdline').read_bytes()[:80]!r}")
    return left


@pytest.fixture(scope="module")
def nodes(tiny_checkpoint_factory, tmp_path_factory):
    """Three one-node swarms of a tiny Llama, started in parallel; each with its processes as they ran."""
    path = tiny_checkpoint_factory("llama", num_layers=2)
    swarms = [LocalSwarm(tmp_path_factory.mktemp(f"lifecycle{i}")) for i in range(3)]
    try:
        with ThreadPoolExecutor(3) as pool:
            started = list(pool.map(lambda s: s.start(path, "--blocks", "0:2"), swarms))
        yield [(node, descendants(node.proc.pid)) for node in started]
    finally:
        for swarm in swarms:
            swarm.close()


def gone_by(processes: dict[int, str], deadline: float) -> list[str]:
    """Wait until every process is gone or ``deadline`` (monotonic) passes; the ones still running.

    The DHT process and p2pd go before the node exits; torch's shared-memory manager (``torch_shm_manager``, in
    the node's process group) exits by itself about 2 s after its last client, and init reaps the orphans."""
    while (left := survivors(processes)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def test_a_second_node_on_a_used_port_exits_2_naming_the_port(nodes, tmp_path):
    node, _ = nodes[0]
    port = int(node.maddrs[0].split("/tcp/")[1].split("/")[0])
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "serve", "--model", str(tmp_path), "--new-swarm",
                          "--host", "127.0.0.1", "--port", str(port)],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 2, out.stderr
    assert f"--port {port} is already in use" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("index, sig", [(0, signal.SIGINT), (1, signal.SIGTERM)])
def test_a_process_group_signal_stops_the_node_cleanly(nodes, index, sig):
    node, processes = nodes[index]
    assert len(processes) >= 3, f"expected the node, its DHT process and p2pd: {processes}"
    deadline = time.monotonic() + 10
    os.killpg(node.proc.pid, sig)
    assert node.proc.wait(timeout=10) == 0, node.log()[-3000:]
    log = node.log()
    assert "Announced offline" in log and "Traceback" not in log, log[-3000:]
    assert gone_by(processes, deadline) == [], f"left running 10 s after {sig.name}"


def test_a_second_signal_exits_at_once_and_leaves_nothing(nodes):
    """The DHT process is frozen (SIGSTOP), so the clean stop hangs on announcing offline; the second signal must
    end the node at once, and the kernel then kills the frozen DHT process and p2pd (PR_SET_PDEATHSIG)."""
    node, processes = nodes[2]
    [dht] = [pid for pid in processes if _stat(pid)[0] == node.proc.pid and b"python" in
             Path(f"/proc/{pid}/cmdline").read_bytes()]
    os.kill(dht, signal.SIGSTOP)
    os.killpg(node.proc.pid, signal.SIGINT)
    time.sleep(1.0)
    assert node.proc.poll() is None, "the clean stop should wait for the (frozen) DHT"
    deadline = time.monotonic() + 10
    os.killpg(node.proc.pid, signal.SIGINT)
    assert node.proc.wait(timeout=2) == 128 + signal.SIGINT, node.log()[-3000:]
    assert "SIGINT again: exiting now" in node.log()
    assert gone_by(processes, deadline) == []


@pytest.mark.parametrize("argv, message", [
    (["serve", "--initial-peers", "127.0.0.1:32905"], "is not a multiaddr (it must begin with /)"),
    (["serve", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmPeer"], "No --initial-peers answers: 127.0.0.1:1"),
    (["status", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmPeer"], "No --initial-peers answers: 127.0.0.1:1"),
    (["serve", "--model", "/no/such/dir", "--new-swarm"], "--model '/no/such/dir' is neither"),
])
def test_bad_addresses_and_paths_exit_2_in_one_line_before_importing_torch(argv, message):
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "swarm.cli", *argv, "--host", "127.0.0.1"]
                         if argv[0] == "serve" else [sys.executable, "-X", "importtime", "-m", "swarm.cli", *argv],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    lines = [line for line in out.stderr.splitlines() if not line.startswith("import time:")]
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr[-2000:]
    assert not imported & {"torch", "hivemind", "transformers"}
