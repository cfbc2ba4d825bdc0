"""Kernel-enforced containment of one request's process (a *cell*, forked from the gateway's clean template).

:func:`enter` is called by a freshly forked, still single-threaded cell before it reads its request. After it:

- **No privileges, no network.** The cell moves into a new user namespace (it keeps no capability over anything
  outside it, even when the gateway runs as root) and a new network namespace (its only interface is a down
  loopback); ``no_new_privs`` is set, so nothing it does can regain privileges.
  seccomp also kills it on ``socket``/``connect``/``bind``/``listen``/``accept`` (it talks to the gateway only
  over the socket it inherited).
- **No new processes or programs.** seccomp kills it on ``execve``/``execveat``, ``fork``/``vfork``, ``clone``
  without ``CLONE_THREAD`` (threads are allowed; they die with the cell), ``ptrace``, ``process_vm_*``,
  namespace and mount calls, ``bpf``, ``io_uring`` (which would bypass seccomp), keyrings, ``perf_event_open``,
  ``userfaultfd``, module loading, System V and POSIX IPC (which would outlive it; it also has an IPC namespace
  of its own), ``F_SETOWN``/``F_SETSIG`` (``O_ASYNC`` signal delivery); signals, rlimits, priorities and
  scheduling may touch only itself. Where the kernel has Landlock ABI 6, signals to processes outside the cell
  and abstract UNIX sockets are also refused by Landlock, and TCP by Landlock's network rules (ABI 4).
- **Files.** Landlock (:mod:`landlock`) allows reading only the interpreter, its import path, system libraries,
  a few devices and the model's directory (:func:`readable_paths`; not ``/etc``, ``/home``, ``/root``, ``/tmp``),
  and writing only under the cell's scratch directory; no file may be executed. Landlock also refuses ``ptrace``-style access
  (``/proc/<pid>/mem``, ``/proc/<pid>/environ``) to processes outside the cell's domain, such as the gateway.
- **Bounded files.** ``RLIMIT_FSIZE`` bounds every file the cell writes, ``RLIMIT_NOFILE`` its open files,
  ``RLIMIT_CORE`` is 0.

Why these tools: seccomp and Landlock are unprivileged kernel mechanisms that a process applies to itself, so they
fit a fork-per-request design (a fresh fork of a preloaded template costs milliseconds; ``bwrap`` or a container
would start a new interpreter and reload the model for each request). They are applied through maintained
bindings from PyPI: ``pyseccomp`` (libseccomp) and ``landlock``. Each kernel feature is checked by :func:`probe`
at start-up; a missing one refuses to start (fail closed) unless the operator passes ``--unsafe-no-sandbox``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import SandboxUnavailableError

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWIPC = 0x08000000
CLONE_THREAD = 0x00010000
F_SETOWN, F_SETSIG, F_SETOWN_EX = 8, 10, 15
FIOSETOWN, SIOCSPGRP = 0x8901, 0x8902
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4

KILLED_SYSCALLS = (
    "execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev",
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen", "fsmount",
    "fsconfig", "fspick", "mount_setattr", "keyctl", "add_key", "request_key", "bpf", "perf_event_open",
    "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "kexec_load", "kexec_file_load",
    "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff", "personality",
    "open_by_handle_at", "name_to_handle_at", "kcmp", "tkill", "pidfd_open", "pidfd_send_signal", "pidfd_getfd",
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups", "setfsuid", "setfsgid",
    "capset", "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self", "seccomp",
    "memfd_secret", "process_madvise", "acct", "quotactl", "syslog", "vhangup", "lookup_dcookie",
    "shmget", "shmat", "shmctl", "shmdt", "msgget", "msgsnd", "msgrcv", "msgctl", "semget", "semop", "semtimedop",
    "semctl", "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify", "mq_getsetattr",
    "ioprio_set", "migrate_pages", "move_pages", "set_mempolicy_home_node",
)
"""System calls that end the cell (SIGSYS). None has a use while a request is computed (System V and POSIX IPC
objects would outlive the cell)."""
SIGNAL_SYSCALLS = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")
"""Signals go only to the cell itself (first argument: its pid)."""
SELF_ONLY_SYSCALLS = ("prlimit64", "sched_setaffinity", "sched_setscheduler", "sched_setparam", "sched_setattr")
"""Calls on a pid allowed only as pid 0, the caller itself (what glibc's setrlimit and friends pass)."""


@dataclass(frozen=True)
class SandboxPolicy:
    """What a cell may use."""

    max_file_bytes: int = 256 * 2**20
    """Largest file the cell may write (in its scratch directory)."""
    max_open_files: int = 256
    """Open file descriptors of the cell."""
    readable: tuple[str, ...] = ()
    """Paths the cell may read besides the interpreter's (:func:`readable_paths`): the model's directory."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise SandboxUnavailableError(f"{what} failed: {os.strerror(err)} (errno {err}). The kernel or its settings "
                                      "lack a feature the gateway's sandbox needs; see docs/ndif_compat.md, or pass "
                                      "--unsafe-no-sandbox for a trusted single-user setup.")


def enter(scratch: Path, policy: SandboxPolicy = SandboxPolicy()) -> None:
    """Contain this process for good (see the module docstring). Call it single-threaded, right after fork.

    Raises:
        SandboxUnavailableError: a step failed; the caller must not run the request.
    """
    _bindings()                                 # loaded before any restriction (libseccomp is found via ldconfig)
    libc = _libc()
    os.setsid()                                 # its own group: a signal to group 0 reaches only the cell
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (policy.max_file_bytes, policy.max_file_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (policy.max_open_files, policy.max_open_files))
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    _check(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWIPC), "unshare(CLONE_NEWUSER | CLONE_NEWNET | "
                                                                      "CLONE_NEWIPC)")
    _restrict_files(scratch, policy.readable)
    _restrict_scopes()
    _restrict_syscalls(os.getpid())


def readable_paths(extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """What a cell may read: the interpreter and its import path, system libraries, a few devices, its own /proc
    entry, CPU topology, and ``extra`` (the model's directory). Nothing else (no /etc, /home, /root, /tmp)."""
    candidates = [sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path, "/usr", "/lib", "/lib64", "/lib32",
                  "/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/sys/devices/system/cpu",
                  f"/proc/{os.getpid()}", *extra]
    found = []
    for path in candidates:
        if path and os.path.exists(path) and os.path.realpath(path) not in found:
            found.append(os.path.realpath(path))
    return tuple(found)


def _fresh_errno(fn, *args, **kwargs):
    """Call into the ``landlock`` binding with ctypes' errno cleared: it reads errno, not the return value, to
    detect a failed system call, and errno is not reset by a call that succeeds (a stale value read as a failure)."""
    ctypes.set_errno(0)
    return fn(*args, **kwargs)


def _restrict_files(scratch: Path, readable: tuple[str, ...]) -> None:
    import landlock
    from landlock import FSAccess

    try:
        handled = _fresh_errno(FSAccess.all)
        ruleset = _fresh_errno(landlock.Ruleset, handled)
        for path in readable_paths(readable):
            _fresh_errno(ruleset.allow, path,
                         rules=FSAccess.READ_FILE | (FSAccess.READ_DIR if os.path.isdir(path) else 0))
        _fresh_errno(ruleset.allow, str(scratch), rules=handled & ~FSAccess.EXECUTE)
        _fresh_errno(ruleset.apply)              # sets no_new_privs first
    except (OSError, landlock.LandlockError) as e:
        raise SandboxUnavailableError(f"Landlock could not be applied ({e}); it needs Linux >= 5.13 with Landlock "
                                      "enabled (lsm=...,landlock). Pass --unsafe-no-sandbox only for a trusted "
                                      "single-user setup.") from None


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


LANDLOCK_NET_ALL = 0b11                 # BIND_TCP | CONNECT_TCP (ABI 4)
LANDLOCK_SCOPES = 0b11                  # ABSTRACT_UNIX_SOCKET | SIGNAL (ABI 6)


def _restrict_scopes() -> None:
    """A second Landlock layer where the kernel has it (the ``landlock`` binding covers files only): no TCP bind or
    connect (ABI 4), no signals to processes outside the cell's domain and no abstract UNIX sockets (ABI 6). The
    seccomp filter covers the same ground on older kernels."""
    from landlock import landlock_abi_version

    abi = _fresh_errno(landlock_abi_version)
    attr = _RulesetAttr(0, LANDLOCK_NET_ALL if abi >= 4 else 0, LANDLOCK_SCOPES if abi >= 6 else 0)
    if not (attr.handled_access_net or attr.scoped):
        return
    libc = _libc()
    fd = libc.syscall(444, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), 0)
    if fd < 0:
        _check(-1, "landlock_create_ruleset (network and scopes)")
    try:
        _check(libc.syscall(446, fd, 0), "landlock_restrict_self (network and scopes)")
    finally:
        os.close(fd)


def _bindings():
    try:
        import landlock  # noqa: F401
        import pyseccomp
    except (ImportError, OSError) as e:         # pyseccomp loads libseccomp.so.2 at import
        raise SandboxUnavailableError(f"seccomp is unavailable ({e}); install libseccomp2 (Debian/Ubuntu: "
                                      "apt-get install libseccomp2).") from None
    return pyseccomp


def _restrict_syscalls(pid: int) -> None:
    seccomp = _bindings()
    try:
        f = seccomp.SyscallFilter(seccomp.ALLOW)
        for name in KILLED_SYSCALLS:
            try:
                f.add_rule(seccomp.KILL_PROCESS, name)
            except (OSError, ValueError):       # a call this architecture does not have (e.g. fork on arm64)
                continue
        # glibc tries clone3 first and falls back to clone, whose flags seccomp can read: threads only
        f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
        f.add_rule(seccomp.KILL_PROCESS, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_THREAD, 0))
        for name in SIGNAL_SYSCALLS:
            f.add_rule(seccomp.KILL_PROCESS, name, seccomp.Arg(0, seccomp.NE, pid))
        for name in SELF_ONLY_SYSCALLS:             # libseccomp cannot test one argument twice: 0 (itself) only
            f.add_rule(seccomp.KILL_PROCESS, name, seccomp.Arg(0, seccomp.NE, 0))
        for cmd in (F_SETOWN, F_SETOWN_EX, F_SETSIG):  # O_ASYNC would signal any process the kernel lets it name
            f.add_rule(seccomp.KILL_PROCESS, "fcntl", seccomp.Arg(1, seccomp.EQ, cmd))
        for request in (FIOSETOWN, SIOCSPGRP):
            f.add_rule(seccomp.KILL_PROCESS, "ioctl", seccomp.Arg(1, seccomp.EQ, request))
        f.add_rule(seccomp.KILL_PROCESS, "setpriority", seccomp.Arg(0, seccomp.NE, 0))  # not PRIO_PROCESS
        f.add_rule(seccomp.KILL_PROCESS, "setpriority", seccomp.Arg(1, seccomp.NE, 0))  # who: 0 is itself
        f.load()
    except OSError as e:
        raise SandboxUnavailableError(f"the seccomp filter could not be loaded ({e}).") from None


def probe(scratch_root: Path, policy: SandboxPolicy = SandboxPolicy()) -> None:
    """Check in a throw-away child that :func:`enter` works here and really contains it (a forbidden write and a
    socket fail). Call it before loading anything heavy.

    Raises:
        SandboxUnavailableError: with what is missing and what to do.
    """
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="probe-", dir=scratch_root))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                 # pragma: no cover (child)
        os.close(r)
        try:
            enter(scratch, policy)
            (scratch / "ok").write_text("ok")
            try:
                (scratch_root / "escaped").write_text("x")
                verdict = b"the sandbox let a cell write outside its scratch directory"
            except OSError:
                verdict = b"ok"
        except BaseException as e:
            verdict = str(e).encode()[:2000] or type(e).__name__.encode()
        os.write(w, verdict)
        os._exit(0)
    os.close(w)
    try:
        verdict = b""
        while chunk := os.read(r, 4096):
            verdict += chunk
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(r)
        import shutil
        shutil.rmtree(scratch, ignore_errors=True)
    if verdict != b"ok" or os.waitstatus_to_exitcode(status) != 0:
        raise SandboxUnavailableError(verdict.decode(errors="replace") or f"the probe cell ended with status "
                                      f"{os.waitstatus_to_exitcode(status)}")
