"""``swarm-node status --serve``: the live page in a real headless browser (Debian's Chromium, installed by
``make setup``), driven over the DevTools protocol. One page load: it shows a tiny swarm's first node and the gap,
then the second node joining (no gap), then that node leaving (offline, the gap again); the DOM is read at each step.

``SWARM_UPDATE_SCREENSHOT=1`` also writes the screenshot taken at the end (one node online, one offline, a gap and
the command that fills it) to docs/figures/status_page.png; the committed one came from this test.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import websocket  # websocket-client (requirements.lock)

from swarm.local_swarm import REPO, LocalSwarm



SCREENSHOT = REPO / "docs" / "figures" / "status_page.png"


class Page:
    """A Chromium page driven over the DevTools protocol (just what this test needs)."""

    def __init__(self, ws_url: str):
        self.ws = websocket.create_connection(ws_url, timeout=10, suppress_origin=True)
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == msg_id:
                assert "error" not in reply, reply
                return reply["result"]

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"]
        return result.get("value")

    def wait_for(self, expression: str, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"the page never showed {what}; it shows:\n{self.eval('document.body.innerText')}")


STATE = """(() => {
  const rows = [...document.querySelectorAll("tr.node-row")].map(r => [...r.cells].map(c => c.textContent));
  const cov = [...document.querySelectorAll("[id^=coverage-] .cell")].map(c => Number(c.dataset.count));
  const gaps = [...document.querySelectorAll(".gap")].map(g => g.textContent);
  return JSON.stringify({rows, cov, gaps});
})()"""


def state(page: Page) -> dict:
    return json.loads(page.eval(STATE))


def _start_chromium(url: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    chromium = shutil.which("chromium")
    assert chromium, "chromium is not on PATH: `make setup` installs it (Debian package `chromium`)"
    proc = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--remote-debugging-port=0", f"--user-data-dir={workdir / 'chromium'}",
                             "--window-size=1100,820", "--hide-scrollbars", url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 30
    for line in proc.stderr:
        if m := re.search(r"DevTools listening on ws://([\d.:]+)/", line):
            break
        assert time.monotonic() < deadline, "chromium did not start"
    else:
        raise AssertionError(f"chromium exited with {proc.wait()}")
    targets = json.loads(urllib.request.urlopen(f"http://{m.group(1)}/json/list", timeout=5).read())
    [target] = [t for t in targets if t["type"] == "page"]
    return proc, target["webSocketDebuggerUrl"]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def test_status_page_shows_nodes_joining_and_leaving(tiny_checkpoint_factory, tmp_path):
    path = tiny_checkpoint_factory("llama", num_layers=4)
    processes: list[subprocess.Popen] = []
    with LocalSwarm(tmp_path) as swarm:
        try:
            first = swarm.start(path, "--blocks", "0:2", env={"SWARM_HOOKS": "0"})
            status = subprocess.Popen([sys.executable, "-m", "swarm.cli", "status", "--serve", "0", "--refresh", "0.5",
                                       "--initial-peers", *swarm.initial_peers], stdout=subprocess.PIPE, text=True,
                                      cwd=REPO, start_new_session=True)
            processes.append(status)
            url = status.stdout.readline().split()[2]  # "Status page: http://127.0.0.1:PORT/ ..."
            api = json.loads(urllib.request.urlopen(url + "api/status", timeout=5).read())
            assert set(api) >= {"updated", "models", "refresh_s"}
            browser, ws_url = _start_chromium(url, tmp_path)
            processes.append(browser)
            page = Page(ws_url)

            page.wait_for("document.querySelectorAll('tr.node-row').length === 1", 30, "the first node")
            shown = state(page)
            assert shown["cov"] == [1, 1, 0, 0]
            assert shown["rows"][0][:3] == ["0:2", "E", "online"] and shown["rows"][0][-1] == first.peer_id
            assert "Layers 2:4 are not served" in shown["gaps"][0] and "--blocks 2:4" in shown["gaps"][0]

            second = swarm.start(path, "--blocks", "2:4", env={"SWARM_HOOKS": "0"}, initial_peers=swarm.initial_peers)
            page.wait_for("document.querySelectorAll('tr.node-row.online').length === 2", 30, "the second node")
            shown = state(page)
            assert shown["cov"] == [1, 1, 1, 1] and shown["gaps"] == ["No gaps: every layer is served."]
            row = next(r for r in shown["rows"] if r[-1] == second.peer_id)
            assert row[:5] == ["2:4", "H", "online", "v0.1.0", "cpu"]
            second.proc.send_signal(signal.SIGTERM)  # a clean stop: the node announces it goes offline
            page.wait_for("document.querySelectorAll('tr.node-row.offline').length === 1", 30, "the node leaving")
            shown = state(page)
            assert shown["cov"] == [1, 1, 0, 0] and "Layers 2:4 are not served" in shown["gaps"][0]
            png = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
            assert png.startswith(b"\x89PNG") and len(png) > 10_000
            if os.environ.get("SWARM_UPDATE_SCREENSHOT") == "1":
                SCREENSHOT.write_bytes(png)
        finally:
            for proc in processes:
                _kill_group(proc)
