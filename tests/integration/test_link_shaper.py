"""The link shaper as the bench runs it (a relay subprocess on 127.0.0.1): achieved throughput within 10% of
the setting, added latency, and node/client classification by the dialer's source port."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.harness import free_port
from swarm.local_swarm import REPO

RATE_BPS = 3e6          # low enough for a loaded 2-core box to keep up
TRANSFER_BYTES = 6_000_000


@pytest.fixture
def relay(tmp_path):
    """``relay(link, node_link, node_ports)`` → (relay port, target port, stats file): a sink/echo server on the
    target port and a relay in front of it; both are stopped at the end."""
    procs, servers = [], []

    def start(link: str, node_link: str = "none", node_ports: tuple[int, ...] = ()):
        target = socket.create_server(("127.0.0.1", 0))
        servers.append(target)
        threading.Thread(target=_serve, args=(target,), daemon=True).start()
        listen = free_port()
        ready, stats = tmp_path / f"relay{len(procs)}.json", tmp_path / f"stats{len(procs)}.json"
        cmd = [sys.executable, "-m", "bench.link_shaper", "--route", f"{listen}:{target.getsockname()[1]}",
               "--link", link, "--node-link", node_link, "--node-ports", ",".join(map(str, node_ports)),
               "--ready-file", str(ready), "--stats-file", str(stats)]
        proc = subprocess.Popen(cmd, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        procs.append(proc)
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "relay did not start"
            time.sleep(0.05)
        return listen, stats

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)
    for server in servers:
        server.close()


def _serve(server: socket.socket) -> None:
    """Per connection: a first byte b"E" echoes everything back; otherwise count to EOF and answer b"done"."""
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        threading.Thread(target=_handle, args=(conn,), daemon=True).start()


def _handle(conn: socket.socket) -> None:
    with conn:
        mode = conn.recv(1)
        if mode == b"E":
            while data := conn.recv(65536):
                conn.sendall(data)
            return
        while conn.recv(1 << 20):
            pass
        conn.sendall(b"done")


def _upload(port: int, nbytes: int, source_port: int | None = None) -> float:
    """Send ``nbytes`` through the relay and wait for the sink's answer; returns the achieved bytes/s."""
    sock = socket.socket()
    if source_port is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", source_port))
    sock.connect(("127.0.0.1", port))
    with sock:
        t0 = time.perf_counter()
        sock.sendall(b"S" + bytes(nbytes - 1))
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(4) == b"done"
        return nbytes / (time.perf_counter() - t0)


def test_throughput_within_ten_percent_of_the_setting(relay):
    port, _ = relay(f"{RATE_BPS / 1e6:g}MB/s")
    achieved = _upload(port, TRANSFER_BYTES)
    assert achieved == pytest.approx(RATE_BPS, rel=0.10), f"achieved {achieved / 1e6:.2f} MB/s"


def test_latency_is_added_per_direction(relay):
    port, _ = relay("100MB/s,25ms")
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"E")
        rtts = []
        for _ in range(5):
            t0 = time.perf_counter()
            sock.sendall(b"ping")
            got = b""
            while len(got) < 4:
                got += sock.recv(4 - len(got))
            rtts.append(time.perf_counter() - t0)
    rtt = sorted(rtts)[len(rtts) // 2]
    assert 0.050 <= rtt < 0.050 + 0.1, f"round trip {rtt * 1e3:.1f} ms for 25 ms each way"


def test_dialers_from_node_ports_get_the_node_link(relay):
    node_port = free_port()
    port, stats = relay(f"{RATE_BPS / 1e6:g}MB/s", node_link="none", node_ports=(node_port,))
    _upload(port, 300_000, source_port=node_port)
    _upload(port, 200_000)
    time.sleep(1.2)  # the stats file is rewritten every 0.5 s
    counted = json.loads(Path(stats).read_text())
    assert counted["bytes"]["node_up"] == 300_000 and counted["bytes"]["client_up"] == 200_000
    assert counted["connections"] == {"node": 1, "client": 1}
