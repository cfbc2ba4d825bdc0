"""``swarm-node status --serve PORT``: a live web page of the swarm, and its data as JSON (like Petals' health
monitor).

- ``GET /``: one self-contained HTML page (no external assets). Per model: coverage as one bar per layer (how many
  online nodes serve it), each node's span drawn on the same layer axis, a table of nodes (version, device,
  throughput, load, queue, uptime) and the gaps with the command that fills each. It polls ``/api/status``.
- ``GET /api/status``: :func:`swarm.status.snapshot` as JSON, plus ``refresh_s``.

One DHT client re-reads the swarm every ``refresh_s`` in the main thread; HTTP requests are answered from the last
snapshot by a thread pool and never touch the DHT, so a busy page cannot load the swarm. Stops on SIGINT/SIGTERM.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger(__name__)

MAX_SNAPSHOT_BYTES = 4 << 20
"""A snapshot larger than this (a swarm flooding the DHT with records) is cut to its first models, not served whole."""


class _Snapshot:
    def __init__(self, refresh_s: float):
        self.lock = threading.Lock()
        self.body = json.dumps({"updated": None, "models": [], "refresh_s": refresh_s, "error": None}).encode()
        self.refresh_s = refresh_s

    def set(self, snap: dict, error: str | None = None) -> None:
        snap = {**snap, "refresh_s": self.refresh_s, "error": error}
        body = json.dumps(snap).encode()
        while len(body) > MAX_SNAPSHOT_BYTES and snap["models"]:
            snap["models"] = snap["models"][:-1]
            snap["error"] = "snapshot cut: too many records"
            body = json.dumps(snap).encode()
        with self.lock:
            self.body = body

    def get(self) -> bytes:
        with self.lock:
            return self.body


def make_server(snapshot: _Snapshot, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/api/status":
                self._send(200, "application/json", snapshot.get())
            elif path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", PAGE.encode())
            else:
                self._send(404, "text/plain", b"not found: try / or /api/status\n")

        def _send(self, code: int, kind: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):
            logger.debug("%s %s", self.address_string(), fmt % args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve(initial_peers: list[str], host: str, port: int, *, refresh_s: float = 5.0) -> int:
    """Serve the page until SIGINT/SIGTERM; returns the exit status."""
    from .startup_checks import check_port_free
    from .status import join_swarm, snapshot
    check_port_free(host, port)  # before joining the DHT: a busy port is a one-line error at once
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    state = _Snapshot(refresh_s)
    server = make_server(state, host, port)
    threading.Thread(target=server.serve_forever, name="status-page", daemon=True).start()
    try:
        dht = join_swarm(initial_peers)
    except BaseException:
        server.shutdown()
        raise
    print(f"Status page: http://{host}:{server.server_address[1]}/  (JSON: /api/status; Ctrl-C stops)", flush=True)
    try:
        while not stop.is_set():
            try:
                state.set(snapshot(dht, initial_peers))
            except Exception as e:  # the DHT may be briefly unreachable; keep the last snapshot, say why
                logger.warning("Could not read the swarm: %s", e)
                state.set(json.loads(state.get()), error=f"could not read the swarm: {e}")
            stop.wait(refresh_s)
    finally:
        server.shutdown()
        dht.shutdown()
    return 0


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>swarm status</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d2330; background: #f7f8fa; }
 h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 0 0 8px; }
 .muted { color: #6b7280; } .err { color: #b91c1c; }
 section.model { background: #fff; border: 1px solid #e3e6eb; border-radius: 8px; padding: 16px; margin: 16px 0; }
 .grid { display: grid; gap: 2px; margin: 4px 0; }
 .cell { height: 22px; border-radius: 2px; font-size: 11px; text-align: center; line-height: 22px; color: #fff; }
 .c0 { background: #dc2626; } .c1 { background: #f59e0b; } .c2 { background: #16a34a; }
 .row { display: grid; grid-template-columns: 150px 1fr; align-items: center; gap: 8px; margin: 2px 0; }
 .lbl { font: 12px ui-monospace, monospace; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
 .span { height: 16px; border-radius: 3px; background: #2563eb; }
 .span.offline { background: #9ca3af; } .span.joining { background: #a78bfa; }
 table { border-collapse: collapse; width: 100%; margin-top: 12px; font-size: 13px; }
 th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eef0f3; }
 th { color: #6b7280; font-weight: 600; } td.num, th.num { text-align: right; }
 code { font: 12px ui-monospace, monospace; background: #f1f3f6; padding: 2px 6px; border-radius: 4px; }
 .gap { margin: 6px 0; } .legend span { display: inline-block; width: 12px; height: 12px; border-radius: 2px;
 vertical-align: middle; margin: 0 4px 0 12px; }
</style></head>
<body>
<h1>Swarm status</h1>
<div class="muted" id="meta">loading…</div>
<div class="legend muted">coverage per layer:<span class="c0"></span>none<span class="c1"></span>1 node
 <span class="c2"></span>2+ nodes</div>
<div id="models"></div>
<script>
"use strict";
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) { if (k === "class") e.className = v; else e.setAttribute(k, v); }
  for (const k of kids) e.append(k);
  return e;
};
const dur = s => s == null ? "?" : s < 60 ? `${Math.floor(s)}s` : s < 3600 ? `${Math.floor(s / 60)}m`
  : s < 86400 ? `${Math.floor(s / 3600)}h${String(Math.floor(s % 3600 / 60)).padStart(2, "0")}m`
  : `${Math.floor(s / 86400)}d`;
function layerGrid(n) { const g = el("div", {class: "grid"}); g.style.gridTemplateColumns = `repeat(${n}, 1fr)`;
  return g; }
function renderModel(m) {
  const sec = el("section", {class: "model", "data-model": m.name});
  const online = m.nodes.filter(n => n.state === "online").length;
  sec.append(el("h2", {}, `${m.name} `, el("span", {class: "muted"},
    `${m.num_layers} layers · ${online} online node(s) · hash ${m.hash.slice(0, 16)}`)));
  const cov = layerGrid(m.num_layers); cov.id = `coverage-${m.name}`;
  m.coverage.forEach((c, i) => cov.append(el("div", {class: `cell c${Math.min(c, 2)}`, title: `layer ${i}: ${c} node(s)`,
    "data-layer": i, "data-count": c}, String(c))));
  sec.append(el("div", {class: "row"}, el("div", {class: "lbl"}, "coverage"), cov));
  for (const n of m.nodes) {
    const g = layerGrid(m.num_layers);
    const bar = el("div", {class: `span ${n.state}`, title: `${n.start}:${n.end} ${n.state}`});
    bar.style.gridColumn = `${n.start + 1} / ${n.end + 1}`; g.append(bar);
    sec.append(el("div", {class: "row node", "data-peer": n.peer_id}, el("div", {class: "lbl", title: n.peer_id},
      `${n.start}:${n.end} ${n.peer_id.slice(-8)}`), g));
  }
  const head = ["layers", "stages", "state", "version", "device", "dtype", "tok/s", "load", "queue", "uptime", "peer id"];
  const num = new Set(["tok/s", "load", "queue", "uptime"]);
  const table = el("table", {}, el("tr", {}, ...head.map(h => el("th", num.has(h) ? {class: "num"} : {}, h))));
  for (const n of m.nodes) {
    const stages = (n.embed ? "E" : "") + (n.head ? "H" : "") || "-";
    const cells = [`${n.start}:${n.end}`, stages, n.state, `v${n.version ?? "?"}`, n.device ?? "?", n.dtype ?? "?",
      n.throughput.toFixed(1), n.load, n.queue == null ? "?" : `${n.queue}/${n.max_queue}`, dur(n.uptime_s), n.peer_id];
    table.append(el("tr", {class: `node-row ${n.state}`}, ...cells.map((c, i) =>
      el("td", num.has(head[i]) ? {class: "num"} : {}, String(c)))));
  }
  sec.append(table, el("div", {class: "muted"}, "stages: E = embedding, H = final norm + LM head; load = requests " +
    "in flight + open sessions; queue = compute jobs running or queued / limit"));
  const gaps = el("div", {class: "gaps"});
  if (m.gaps.length === 0) gaps.append(el("p", {class: "gap"}, "No gaps: every layer is served."));
  for (const g of m.gaps) gaps.append(el("p", {class: "gap err"}, `Layers ${g.start}:${g.end} are not served. `,
    "Serve them with: ", el("code", {}, g.command)));
  sec.append(gaps);
  return sec;
}
async function refresh() {
  let snap;
  try {
    const r = await fetch("/api/status", {cache: "no-store"}); snap = await r.json();
  } catch (e) { document.getElementById("meta").textContent = `cannot reach this page's server: ${e}`; return 2000; }
  const models = document.getElementById("models");
  models.replaceChildren(...snap.models.map(renderModel));
  if (snap.models.length === 0) models.append(el("p", {}, snap.updated ? "No models announced in this swarm." :
    "Reading the swarm…"));
  const when = snap.updated ? new Date(snap.updated * 1000).toLocaleTimeString() : "not yet";
  const meta = document.getElementById("meta");
  meta.textContent = `updated ${when}; refreshes every ${snap.refresh_s} s`;
  meta.dataset.updated = snap.updated ?? "";
  if (snap.error) meta.append(el("span", {class: "err"}, ` · ${snap.error}`));
  return Math.max(500, snap.refresh_s * 1000 / 2);
}
(async function loop() { const wait = await refresh(); setTimeout(loop, wait); })();
</script>
</body></html>
"""
