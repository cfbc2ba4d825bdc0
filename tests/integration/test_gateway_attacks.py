"""Hostile requests against ``swarm-gateway serve --local``: what the gateway must contain (threat model of
``docs/ndif_compat.md``; DESIGN.md: "request code runs in a kernel-contained worker (no secrets, no network, no
processes, read-only weights, one request per clean worker), and nothing from a request is unpickled outside it").

One gateway serves the whole module, with two API keys in ``$SWARM_GATEWAY_API_KEYS`` (the attacker's, a victim's)
and a private copy of the SmolLM2 checkpoint (attacks try to write it). One client process
(``attack_payloads.py``, the real nnsight client) sends every attack of :data:`attack_payloads.ATTACKS`, each with a
second user's request submitted while it is in flight and another after it; both must equal a clean run bit for bit.
Around it this module plants the canaries and reads them afterwards:

- secrets (both API keys, a file outside any scratch directory) must not appear in anything the attacker receives:
  status texts, LOG lines, error text, returned values;
- files: a directory per attack (``target.txt`` plus whatever the attack tries to create), the secret's directory
  and the checkpoint copy are snapshotted (names, sizes, mtimes, hashes) before and after;
- processes: children the attacks start rename themselves (``comm``) or carry a token in their command line; none
  may be alive after the run, and the gateway's process tree may not have grown;
- network: a TCP listener on 127.0.0.1 that attacks try to reach;
- other processes: a "sink" process (not the gateway's) records the harmless signals attacks try to send it; its
  limits and priority are compared before and after;
- kernel objects that outlive processes: SysV shared memory, message queues, semaphores, POSIX message queues;
- no "CAPABILITY" line (an attack reporting it forked, spawned, signalled its parent, or connected) may come back.

Each attack is its own test id (the run happens once, in a module fixture; the tests read its record). An attack
passes when it fails cleanly (the client gets an nnsight ``RemoteError`` whose text starts with an error class
name, e.g. ``SandboxViolationError: ...``) or its output is harmless, and nothing above was violated.

Debugging: ``ATTACKS_ONLY=name1,name2`` runs only those attacks (the others then fail as not run).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from ndif_compat.local_gateway import GatewayProcess as Gateway
from tests.integration import attack_payloads as payloads

REPO = Path(__file__).resolve().parents[2]
CLIENT = Path(payloads.__file__)
SETTLE_S = 3.0
"""After the last request: time for a delayed action (a thread or child writing after 1-1.5 s) to show."""
LINGER_S = 900
"""How long an escaped child would stay alive (the module kills the ones it finds)."""
TYPED = re.compile(r"^[A-Z][A-Za-z0-9]*Error: ")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


# ---- canaries ---------------------------------------------------------------------------------------------------

class Listener:
    """A TCP listener on 127.0.0.1 recording every connection (and its first bytes: the attack's name)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.hits: list[str] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    data = conn.recv(256)
                except OSError:
                    data = b""
            self.hits.append(data.decode("latin-1"))

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


SINK = r"""
import signal, sys, time
log = sys.argv[1]
wanted = {signal.SIGUSR1, signal.SIGUSR2}
signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
open(log + ".ready", "w").close()
while True:
    info = signal.sigtimedwait(wanted, 1.0)
    if info:
        with open(log, "a") as f:
            f.write("%d\n" % info.si_signo)
"""
"""A process that only records the signals it receives (SIGUSR1 and SIGUSR2 would otherwise end it)."""
SIGNAL_ATTACKS = {signal.SIGUSR1: "proc_signal_parent", signal.SIGUSR2: "proc_sigio_signal"}
"""Which attack sends which signal to the sink."""


IPC_TABLES = {"shm": "shared memory", "msg": "message queue", "sem": "semaphore set"}


def ipc_objects(key: int) -> list[str]:
    """SysV IPC objects with this key (/proc/sysvipc), and whether POSIX message queues named ``names`` exist."""
    found = []
    for table, what in IPC_TABLES.items():
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/sysvipc/{table}").read_text().splitlines()[1:]:
                if line.split() and line.split()[0] == str(key):
                    found.append(f"SysV {what} (key {key})")
    return found


def remove_ipc_objects(key: int, mq_names: list[str]) -> list[str]:
    """Remove this test's IPC objects (by its key and queue names); returns the POSIX queues that existed."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for get, args, remove in ((libc.shmget, (0, 0), lambda i: libc.shmctl(i, 0, None)),
                              (libc.msgget, (0,), lambda i: libc.msgctl(i, 0, None)),
                              (libc.semget, (0, 0), lambda i: libc.semctl(i, 0, 0))):
        ident = get(key, *args)
        if ident >= 0:
            remove(ident)
    return [name for name in mq_names if libc.mq_unlink(name.encode()) == 0]


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= 8 << 20:
            h.update(f.read())
        else:  # the checkpoint: head, tail and samples (the mtime catches a write anywhere)
            for offset in (0, size // 4, size // 2, 3 * size // 4, max(0, size - (1 << 20))):
                f.seek(offset)
                h.update(f.read(1 << 20))
    return h.hexdigest()


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file under root: (size, mtime_ns, hash); directories by name."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink() or not path.is_file():
            found[rel] = ("dir",) if path.is_dir() else ("other",)
        else:
            st = path.stat()
            found[rel] = (st.st_size, st.st_mtime_ns, _digest(path))
    return found


def changes(before: dict, after: dict) -> list[str]:
    out = []
    for rel in sorted(set(before) | set(after)):
        if rel not in before:
            out.append(f"created {rel}")
        elif rel not in after:
            out.append(f"removed {rel}")
        elif before[rel] != after[rel]:
            what = "content" if before[rel][2:] != after[rel][2:] else "mtime"
            out.append(f"modified {rel} ({what})")
    return out


def settled_tree(pid: int, timeout_s: float = 15.0) -> dict[int, dict]:
    """The gateway's process tree once its size has not changed for 2 s (spare processes started)."""
    tree, since, deadline = process_tree(pid), time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() < deadline and time.monotonic() - since < 2.0:
        time.sleep(0.25)
        now = process_tree(pid)
        if len(now) != len(tree):
            tree, since = now, time.monotonic()
    return tree


def process_tree(pid: int) -> dict[int, dict]:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    tree = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            tree[p.pid] = {"pid": p.pid, "name": p.name(), "cmdline": " ".join(p.cmdline())[:300],
                           "create_time": p.create_time()}
    return tree


def marked_processes(token: str, comm: str, since: float) -> list[dict]:
    """Processes an attack started: renamed to ``comm-<i>`` or carrying ``token-<i>`` in their command line."""
    found = []
    for p in psutil.process_iter(["pid", "ppid", "name", "cmdline", "create_time"]):
        info = p.info
        if (info["create_time"] or 0) < since or info["pid"] == os.getpid():
            continue
        cmd = " ".join(info["cmdline"] or [])
        if (info["name"] or "").startswith(comm) or token in cmd:
            found.append({"pid": info["pid"], "ppid": info["ppid"], "name": info["name"], "cmdline": cmd[:300],
                          "create_time": info["create_time"]})
    return found


# ---- the campaign -----------------------------------------------------------------------------------------------

@dataclass
class Campaign:
    """Everything one run of all attacks left behind."""

    out: dict
    secrets: dict[str, str]
    file_changes: dict[str, list[str]]
    """Per attack name (its own directory), plus "checkpoint", "secret" and "other"."""
    survivors: list[dict]
    tree_before: dict[int, dict]
    tree_after: dict[int, dict]
    hits: list[str]
    signals: list[int]
    """Signals the sink process received."""
    sink_changes: list[str]
    """What changed about the sink process (limits, priority)."""
    ipc_left: list[str]
    ping: str
    client_log: str
    attack_of_index: dict[int, str] = field(default_factory=dict)

    def record(self, name: str) -> dict | None:
        return self.out.get("attacks", {}).get(name)

    def texts(self, record: dict) -> list[tuple[str, str]]:
        """Everything the attacker received, labelled by where."""
        found = [("error", record.get("error") or "")]
        found += [(f"{status} status", text) for status, text in record.get("statuses", [])]
        result = record.get("result")
        if isinstance(result, dict):
            found += [(f"returned value {k!r}", v) for k, v in result.items()]
        elif result:
            found.append(("returned value", str(result)))
        return found

    def owner(self, process: dict) -> str | None:
        """The attack that started a marked process (by its comm or command-line token), else by time."""
        match = re.search(r"-(\d+)$", process.get("name") or "") or re.search(r"swarm-attack-\w+-(\d+)",
                                                                              process.get("cmdline", ""))
        if match and int(match.group(1)) in self.attack_of_index:
            return self.attack_of_index[int(match.group(1))]
        for name, record in self.out.get("attacks", {}).items():
            if record["t0"] - 0.5 <= process["create_time"] <= record["t1"] + SETTLE_S:
                return name
        return None

    def extra_tree_processes(self) -> list[dict]:
        """Processes in the gateway's tree beyond its count before the attacks (new ones, youngest first)."""
        grown = len(self.tree_after) - len(self.tree_before)
        new = sorted((p for pid, p in self.tree_after.items() if pid not in self.tree_before),
                     key=lambda p: -p["create_time"])
        return new[:grown] if grown > 0 else []

    def problems(self, name: str) -> list[str]:
        record = self.record(name)
        if record is None:
            if self.out.get("stopped_after"):
                return [f"not run: the gateway stopped answering after {self.out['stopped_after']}"]
            return [f"the attack did not run (the client stopped before it); client output:\n{self.client_log[-3000:]}"]
        problems = []
        if not record["posted"]:
            problems.append(f"the request never reached the gateway (client-side failure): {record['error']}")
        if record["outcome"] == "client_error":
            problems.append(f"no typed answer from the gateway: {record['error'].splitlines()[0][:500]}")
        elif record["outcome"] == "remote_error" and not TYPED.match(record["error"]):
            problems.append(f"the error is not typed (should start with an error class name): "
                            f"{record['error'][:500]!r}")
        texts = self.texts(record)
        for secret_name, secret in self.secrets.items():
            where = [label for label, text in texts if secret in text]
            if where:
                problems.append(f"the {secret_name} leaked (in the {', '.join(where)})")
        capabilities = dict.fromkeys(line.strip()[:300] for _, text in texts for line in text.splitlines()
                                     if "CAPABILITY" in line)
        problems += [f"the request acted outside its sandbox: {line}" for line in capabilities]
        problems += [f"file outside the scratch directory: {c}" for c in self.file_changes.get(name, [])]
        problems += [f"file of the served checkpoint: {c}" for c in record.get("checkpoint_changes", [])]
        for signo in sorted(set(self.signals)):
            if SIGNAL_ATTACKS.get(signo) == name:
                problems.append(f"the request delivered signal {signo} to a process outside its sandbox")
        if name == "proc_other_process_limits":
            problems += [f"the request changed another process: {c}" for c in self.sink_changes]
        if name == "proc_ipc_objects_outlive_request":
            problems += [f"a kernel object outlived the request: {c}" for c in self.ipc_left]
        for process in self.survivors + self.extra_tree_processes():
            if self.owner(process) == name:
                problems.append(f"a process survived the request: pid {process['pid']} {process['name']!r} "
                                f"{process['cmdline'][:150]!r}")
        if any(hit == name for hit in self.hits):
            problems.append("the request opened a network connection to 127.0.0.1")
        for when in ("concurrent", "following"):
            check = record[when]
            if not check["equal"]:
                problems.append(f"the second user's {when} request differs from the clean run: {check['error']}")
        if "after_reset" in record and not record["after_reset"]["equal"]:
            problems.append(f"(the gateway stayed corrupted after a reset request too: "
                            f"{record['after_reset']['error']})")
        return problems


@pytest.fixture(scope="module")
def campaign(smollm2_dir, tmp_path_factory):
    """Plant the canaries, start the gateway, run every attack from one client process, collect what changed."""
    root = tmp_path_factory.mktemp("gateway-attacks")
    ckpt = root / "model" / "smollm2-135m"  # a private copy: attacks try to write it; the name stays the alias
    shutil.copytree(smollm2_dir, ckpt)
    names = list(payloads.ATTACKS)
    canaries = root / "canaries"
    target = "canary target file: nothing may change it\n"
    dirs = {}
    for i, name in enumerate(names):
        d = canaries / f"{i:02d}-{name}"
        d.mkdir(parents=True)
        (d / "target.txt").write_text(target)
        dirs[name] = str(d)
    tag = uuid.uuid4().hex
    secrets = {"attacker API key": f"{payloads.CANARY_PREFIX}attacker-{tag[:16]}",
               "victim API key": f"{payloads.CANARY_PREFIX}victim-{tag[16:]}",
               "secret file": f"{payloads.CANARY_PREFIX}file-{uuid.uuid4().hex}"}
    secret_dir = root / "secret"
    secret_dir.mkdir()
    secret_file = secret_dir / "secret.txt"
    secret_file.write_text(secrets["secret file"] + "\n")
    token, comm = f"swarm-attack-{tag[:8]}", f"sw{tag[:8]}"
    listener = Listener()
    sink_log = root / "signals.log"
    sink = subprocess.Popen([sys.executable, "-c", SINK, str(sink_log)])
    while not Path(str(sink_log) + ".ready").exists():
        assert sink.poll() is None, "the signal sink did not start"
        time.sleep(0.05)
    sink_state = {"open-files limit": psutil.Process(sink.pid).rlimit(psutil.RLIMIT_NOFILE),
                  "nice": psutil.Process(sink.pid).nice()}
    ipc_key = int(tag[:7], 16) + 1
    mq_names = [f"/{token}-{i}" for i in range(len(names))]
    workdir = root / "gateway"
    workdir.mkdir()
    since = time.time() - 1

    with pytest.MonkeyPatch.context() as mp:  # the gateway's environment (GatewayProcess copies os.environ)
        mp.setenv("SWARM_GATEWAY_API_KEYS", f"{secrets['attacker API key']},{secrets['victim API key']}")
        gateway = Gateway(workdir, "--local", str(ckpt), "--timeout-s", "20", "--workers", "1",
                          "--rate-per-minute", "1000000", "--burst", "1000000")
    try:
        tree_before = settled_tree(gateway.proc.pid)
        before = {"canaries": snapshot(canaries), "checkpoint": snapshot(ckpt), "secret": snapshot(secret_dir)}
        ctx = {"model": "smollm2-135m", "attacker_key": secrets["attacker API key"],
               "victim_key": secrets["victim API key"], "canary_dirs": dirs, "secret": str(secret_file),
               "secret_len": len(secrets["secret file"]) + 1, "target_len": len(target), "port": listener.port,
               "token": token, "comm": comm, "workdir": str(workdir), "ckpt": str(ckpt), "linger_s": LINGER_S,
               "request_timeout_s": 45, "sink_pid": sink.pid, "ipc_key": ipc_key,
               "only": [n for n in os.environ.get("ATTACKS_ONLY", "").split(",") if n]}
        ctx_path, out_path = root / "ctx.json", root / "outcomes.json"
        ctx_path.write_text(json.dumps(ctx))
        env = {**os.environ, "NDIF_HOST": gateway.url, "HF_ENDPOINT": gateway.url, "HF_HOME": str(root / "hf"),
               "NDIF_API_KEY": secrets["attacker API key"], "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        env.pop("SWARM_GATEWAY_API_KEYS", None)
        try:
            done = subprocess.run([sys.executable, str(CLIENT), str(ctx_path), str(out_path)], env=env, cwd=root,
                                  capture_output=True, text=True, timeout=1500)
            client_log = done.stdout + done.stderr
        except subprocess.TimeoutExpired as e:
            client_log = f"client timed out\n{e.stdout or ''}{e.stderr or ''}"
        time.sleep(SETTLE_S)
        out = json.loads(out_path.read_text()) if out_path.exists() else {}
        after = {"canaries": snapshot(canaries), "checkpoint": snapshot(ckpt), "secret": snapshot(secret_dir)}
        file_changes: dict[str, list[str]] = {}
        for change in changes(before["canaries"], after["canaries"]):
            rel = change.split(" ", 1)[1].split(" ")[0]
            owner = next((n for n, d in dirs.items() if rel.split("/")[0] == Path(d).name), "other")
            file_changes.setdefault(owner, []).append(change)
        file_changes["checkpoint"] = changes(before["checkpoint"], after["checkpoint"])
        file_changes["secret"] = changes(before["secret"], after["secret"])
        survivors = marked_processes(token, comm, since)
        tree_after = settled_tree(gateway.proc.pid)
        signals = [int(line) for line in sink_log.read_text().split()] if sink_log.exists() else []
        sink_now = {"open-files limit": psutil.Process(sink.pid).rlimit(psutil.RLIMIT_NOFILE),
                    "nice": psutil.Process(sink.pid).nice()}
        sink_changes = [f"its {k} went from {sink_state[k]} to {sink_now[k]}" for k in sink_state
                        if sink_state[k] != sink_now[k]]
        ipc_left = ipc_objects(ipc_key)
        ipc_left += [f"POSIX message queue {q}" for q in remove_ipc_objects(ipc_key, mq_names)]
        try:
            import httpx
            ping = httpx.get(f"{gateway.url}/ping", timeout=10).text
        except Exception as e:  # noqa: BLE001 - the test reports it
            ping = f"{type(e).__name__}: {e}"
        yield Campaign(out, secrets, file_changes, survivors, tree_before, tree_after, listener.hits, signals,
                       sink_changes, ipc_left, ping, client_log, {i: n for i, n in enumerate(names)})
    finally:
        for process in marked_processes(token, comm, since):  # only processes our attacks started
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(process["pid"], signal.SIGKILL)
        gateway.close()
        listener.close()
        remove_ipc_objects(ipc_key, mq_names)
        sink.kill()
        sink.wait(10)
        shutil.rmtree(ckpt, ignore_errors=True)


# ---- tests ------------------------------------------------------------------------------------------------------

def test_the_second_users_clean_runs_are_bit_identical(campaign):
    """The reference every attack is judged against: two clean runs of the second user's request agree."""
    repeat = campaign.out.get("baseline_repeat", {})
    assert repeat.get("equal"), f"clean runs differ: {repeat}\n{campaign.client_log[-3000:]}"


@pytest.mark.parametrize("name", list(payloads.ATTACKS))
def test_attack_is_contained(name, campaign):
    """The attack fails with a typed error or does nothing harmful: no secret or capability comes back, no file
    outside the scratch directory changes, no process it started survives, no connection goes out, and the
    second user's concurrent and following requests equal the clean run bit for bit."""
    problems = campaign.problems(name)
    doc = " ".join(payloads.ATTACKS[name].doc.split())
    record = campaign.record(name) or {}
    answer = record.get("outcome", "nothing") + (f": {record['error'][:300]!r}" if record.get("error") else "")
    answer = answer.split("\\n")[0]
    assert not problems, (f"{name} ({payloads.ATTACKS[name].kind}: {doc})\n  gateway answered {answer}\n  - "
                          + "\n  - ".join(problems))


def test_no_file_outside_the_scratch_directory_changed(campaign):
    """The canary directories, the secret's directory and the served checkpoint are as they were."""
    changed = {k: v for k, v in campaign.file_changes.items() if v}
    assert not changed, "files changed:\n" + "\n".join(f"  {k}: {v}" for k, v in changed.items())


def test_no_process_survives(campaign):
    """No process an attack started is alive after the run; the gateway's process tree did not grow."""
    lines = [f"  pid {p['pid']} {p['name']!r} {p['cmdline'][:120]!r} (attack: {campaign.owner(p)})"
             for p in campaign.survivors + campaign.extra_tree_processes()]
    assert not lines, "processes survived:\n" + "\n".join(lines)


def test_no_network_connection(campaign):
    hits = campaign.hits
    assert not hits, f"attacks connected to the canary port on 127.0.0.1: {hits}"


def test_no_other_process_was_touched(campaign):
    """The sink (a process of this test, not of the gateway) received no signal; its limits and priority held."""
    touched = [f"received {signal.Signals(s).name} (from {SIGNAL_ATTACKS.get(s)})" for s in campaign.signals]
    touched += campaign.sink_changes
    assert not touched, "the sink process: " + "; ".join(touched)


def test_no_kernel_object_outlives_a_request(campaign):
    """No SysV IPC object or POSIX message queue made by a request is left (they would outlive its process and be
    readable by the next one)."""
    left = campaign.ipc_left
    assert not left, f"left behind: {left}"


def test_gateway_keeps_serving(campaign):
    """After every attack the gateway answers, and the second user's request still equals the clean run."""
    done, final, ping = campaign.out.get("done"), campaign.out.get("final", {}), campaign.ping
    assert done, f"the client did not finish:\n{campaign.client_log[-4000:]}"
    assert final.get("equal"), f"the last request differs from the clean run: {final.get('error')}"
    assert "ok" in ping, f"/ping: {ping}"
