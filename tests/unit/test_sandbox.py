"""The request sandbox (ndif_compat.sandbox), entered by a forked child exactly as a gateway cell enters it.

Each case forks, enters the sandbox with a fresh scratch directory, runs one action and reports over a pipe; the
parent reads the report and the child's exit status (SIGSYS: seccomp ended it).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import resource
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from ndif_compat.sandbox import SandboxPolicy, enter, probe


def in_sandbox(tmp_path: Path, action) -> tuple[str, int]:
    """Run ``action(scratch)`` in a sandboxed child; returns (what it reported, its exit code or -signal)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        os.close(r)
        try:
            enter(scratch, SandboxPolicy(max_file_bytes=2**20))
            result = action(scratch)
        except BaseException as e:
            result = f"{type(e).__name__}: {e}"
        os.write(w, json.dumps(str(result)).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return (json.loads(data) if data else ""), os.waitstatus_to_exitcode(status)


def test_probe_passes_on_this_machine(tmp_path):
    probe(tmp_path)  # raises SandboxUnavailableError otherwise (the gateway then refuses to start)


def test_a_stale_errno_is_not_taken_for_a_failure(tmp_path):
    """The landlock binding reads errno to detect failures; a value left by an earlier call must not count."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        ctypes.set_errno(2)  # ENOENT, as a failed lookup earlier in the process leaves it
        try:
            enter(scratch, SandboxPolicy())
            os.write(w, b"entered")
        except BaseException as e:
            os.write(w, str(e).encode()[:500])
        os._exit(0)
    os.close(w)
    report = os.read(r, 1000)
    os.waitpid(pid, 0)
    assert report == b"entered", report


def test_own_limits_priority_and_signals_are_allowed(tmp_path):
    def action(scratch):
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        os.setpriority(os.PRIO_PROCESS, 0, 5)
        os.sched_setaffinity(0, os.sched_getaffinity(0))
        signal.signal(signal.SIGUSR1, lambda *a: None)
        os.kill(os.getpid(), signal.SIGUSR1)
        return "ok"
    assert in_sandbox(tmp_path, action) == ("ok", 0)


def test_computation_threads_and_scratch_work(tmp_path):
    def action(scratch):
        out = []
        t = threading.Thread(target=lambda: out.append((torch.ones(64, 64) @ torch.ones(64, 64)).sum().item()))
        t.start()
        t.join()
        (scratch / "f.txt").write_text("ok")
        return f"{out[0]} {(scratch / 'f.txt').read_text()}"
    assert in_sandbox(tmp_path, action) == (f"{64.0 ** 3} ok", 0)


def test_files_outside_the_scratch_directory_cannot_be_written_or_secrets_read(tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("secret")

    def action(scratch):
        results = []
        for attempt in (lambda: canary.write_text("x"), lambda: canary.read_text(), lambda: open("/etc/hostname").read(),
                        lambda: Path(f"/proc/{os.getppid()}/environ").read_bytes(),
                        lambda: torch.from_file(str(canary), size=1, dtype=torch.uint8),
                        lambda: (tmp_path / "new").write_text("x")):
            try:
                attempt()
                results.append("allowed")
            except OSError as e:
                results.append(type(e).__name__)
        return ",".join(results)
    report, code = in_sandbox(tmp_path, action)
    assert code == 0 and "allowed" not in report, report
    assert canary.read_text() == "secret" and not (tmp_path / "new").exists()


def test_file_size_is_bounded(tmp_path):
    report, code = in_sandbox(tmp_path, lambda scratch: (scratch / "big").write_bytes(b"x" * 2**21))
    assert code != 0 or "File too large" in report or "OSError" in report, (report, code)


@pytest.mark.parametrize("name, action", [
    ("fork", lambda scratch: os.fork()),
    ("subprocess", lambda scratch: subprocess.run(["true"])),
    ("system", lambda scratch: os.system("true")),
    ("socket", lambda scratch: socket.socket()),
    ("unix-socket", lambda scratch: socket.socket(socket.AF_UNIX)),
    ("signal-parent", lambda scratch: os.kill(os.getppid(), signal.SIGTERM)),
    ("unshare", lambda scratch: os.unshare(0) if hasattr(os, "unshare") else os.fork()),
    ("rlimit-of-parent", lambda scratch: resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (64, 64))),
    ("renice-parent", lambda scratch: os.setpriority(os.PRIO_PROCESS, os.getppid(), 10)),
    ("renice-user", lambda scratch: os.setpriority(os.PRIO_USER, 0, 10)),
    ("affinity-of-parent", lambda scratch: os.sched_setaffinity(os.getppid(), {0})),
    ("sigio-owner", lambda scratch: fcntl.fcntl(os.pipe()[0], fcntl.F_SETOWN, os.getppid())),
    ("sigio-signal", lambda scratch: fcntl.fcntl(os.pipe()[0], 10, signal.SIGKILL)),
    ("sysv-shm", lambda scratch: ctypes.CDLL(None).shmget(0, 4096, 0o1000 | 0o600)),
    ("posix-mq", lambda scratch: ctypes.CDLL(None).syscall(240, b"/q", 0o100 | 2, 0o600, None)),
])
def test_processes_programs_sockets_and_signals_end_the_cell(tmp_path, name, action):
    report, code = in_sandbox(tmp_path, action)
    assert code == -signal.SIGSYS, (name, report, code)


def test_a_missing_kernel_feature_fails_closed(tmp_path, monkeypatch):
    """Where Landlock cannot be applied, entering the sandbox raises (the gateway then refuses to start) instead of
    running unconfined."""
    import landlock

    class Broken:
        def __init__(self, *args, **kwargs):
            raise landlock.SyscallError(38, "Function not implemented", reason="Landlock is not supported")

    monkeypatch.setattr(landlock, "Ruleset", Broken)
    report, code = in_sandbox(tmp_path, lambda scratch: "ran unconfined")
    assert code == 0 and report.startswith("SandboxUnavailableError") and "Landlock" in report, report
