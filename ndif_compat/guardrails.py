"""Guardrails for the code an nnsight request carries: the first filter, inside the sandbox.

The boundary is the kernel (:mod:`ndif_compat.sandbox`: each request in a fresh contained process with read-only
weights, see ``docs/ndif_compat.md``); Python-level checks cannot contain Python code sharing an interpreter with
its target. These give the common cases a clear, early error, and are all ``--unsafe-no-sandbox`` has. Layers:

1. :class:`RestrictedUnpickler` — the payload is a pickle; only an explicit list of globals may be loaded
   (nnsight's tracer/envoy classes, torch tensor rebuilding, a few builtin types). Module references must be
   on :data:`ALLOWED_MODULES`. Functions arrive only as source and are checked like the block; tensor storages
   are read with torch's ``weights_only`` loader.
2. :func:`check_source` — the block and every shipped function are parsed and refused when they import a module
   outside :data:`ALLOWED_MODULES`, name a forbidden builtin (``open``, ``exec``, ``__import__``, ...), touch an
   attribute that starts with ``_`` or is on :data:`FORBIDDEN_ATTRIBUTES` (file I/O, storage, hooks), or assign/
   delete an attribute other than an envoy's :data:`ASSIGNABLE_ATTRIBUTES` (modules, functions and classes are
   shared by every request of a worker). Shipped functions run with :data:`SAFE_BUILTINS` too.
3. :data:`SAFE_BUILTINS` — the builtins the code runs with (no ``open``/``exec``/``eval``/``compile``/
   ``getattr``...); ``__import__`` only admits :data:`ALLOWED_MODULES`.
4. :func:`protected_module` — the modules a request sees are copies without names that reach files from C
   (``torch.save``/``load``/``from_file``, ``numpy.fromfile``...), compilers, devices or process-wide state.
5. :class:`AuditGuard` — a :pep:`578` audit hook that, while a request runs on this thread, refuses Python-level
   file opens, sockets, subprocesses, ``os.system``/``exec``/``fork``, ``ctypes`` and imports of modules not yet
   loaded. (File access done inside C extensions raises no audit event; layers 2 and 4 cover those.)
6. :class:`ParameterSeal` — every parameter and buffer is fingerprinted (identity, storage, version counter);
   a request that changed one fails and its worker is replaced (weights reloaded).
7. Limits the supervisor enforces from outside (:mod:`ndif_compat.workers`): wall time and resident memory.
"""

from __future__ import annotations

import ast
import builtins
import contextvars
import functools
import io
import os
import pickle
import sys
import threading
import types
from typing import Any

import torch

from .errors import BadRequestError, UnsafeRequestError

ALLOWED_MODULES = frozenset({"torch", "math", "nnsight", "collections", "functools", "itertools", "operator",
                             "typing", "einops", "numpy"})
"""Top-level modules a request may import or reference."""

FORBIDDEN_NAMES = frozenset({
    "open", "exec", "eval", "compile", "__import__", "globals", "locals", "vars", "getattr", "setattr", "delattr",
    "breakpoint", "input", "exit", "quit", "help", "memoryview", "__builtins__", "__loader__", "__spec__",
    "classmethod", "staticmethod", "super", "object", "type", "os", "sys", "subprocess", "socket", "shutil",
    "importlib", "ctypes", "pathlib", "io", "builtins", "pickle", "marshal"})
"""Names the code may not mention at all."""

FORBIDDEN_ATTRIBUTES = frozenset({
    "load", "from_file", "fromfile", "tofile", "load_state_dict", "state_dict", "hub", "jit", "ops",
    "classes", "library", "utils", "cpp_extension", "backends", "distributed", "multiprocessing", "storage",
    "untyped_storage", "data", "set_", "share_memory_", "register_forward_hook", "register_forward_pre_hook",
    "register_full_backward_hook", "register_backward_hook", "register_module", "register_parameter",
    "register_buffer", "apply", "to_empty", "zero_grad", "f_globals", "f_locals", "gi_frame",
    "tb_frame", "modules", "system", "popen", "environ", "compile", "set_default_dtype", "set_num_threads",
    "set_default_device", "manual_seed", "seed", "dump", "dumps", "loads", "export", "profiler", "package",
    "memmap", "savez", "savetxt", "serialization", "set_grad_enabled", "set_detect_anomaly",
    "set_multithreading_enabled", "saved_tensors_hooks", "disable_saved_tensors_hooks", "register_multi_grad_hook",
    "allow_mutation_on_saved_tensors", "register_post_accumulate_grad_hook"})
"""Attribute names the code may not touch (I/O, storage, hooks, global torch and autograd state). Gradients of
activations are allowed (``requires_grad_``, ``.grad``, ``with loss.backward():``); :mod:`ndif_compat.gradients`
keeps the model's parameters out of them."""

ASSIGNABLE_ATTRIBUTES = frozenset({"output", "input", "inputs", "grad", "requires_grad"})
"""The only attributes request code may assign (nnsight envoys' interventions, ``layer.output = ...``; a tensor's
``.grad`` inside ``with loss.backward():`` and ``requires_grad``, which :class:`~ndif_compat.gradients.GradientGuard`
refuses on parameters, and :func:`~ndif_compat.gradients.check_tensor_class` checks on ``torch.Tensor``). Modules,
functions and classes a request sees are shared by every request of a worker (the module views are cached and
their submodules, functions and classes are the real ones), so assigning or deleting any other attribute could
change what later requests, of any user, run."""

SAFE_BUILTIN_NAMES = (
    "abs all any ascii bin bool bytearray bytes callable chr complex dict dir divmod enumerate filter float format "
    "frozenset hasattr hash hex id int isinstance issubclass iter len list map max min next oct ord pow print "
    "property range repr reversed round set slice sorted str sum tuple zip True False None Ellipsis NotImplemented "
    "ArithmeticError AssertionError AttributeError Exception IndexError KeyError LookupError NameError "
    "NotImplementedError RuntimeError StopIteration TypeError ValueError ZeroDivisionError __build_class__ "
    "__name__").split()


MODULE_DENIED = frozenset({
    "save", "load", "from_file", "hub", "serialization", "jit", "utils", "ops", "classes", "library", "backends",
    "distributed", "multiprocessing", "package", "profiler", "compile", "export", "cuda", "mps", "xpu",
    "savez", "savez_compressed", "savetxt", "loadtxt", "fromfile", "genfromtxt", "memmap", "lib", "ctypeslib",
    "f2py", "testing", "os", "sys", "io", "set_default_dtype", "set_default_device", "set_num_threads",
    "manual_seed", "seed", "set_printoptions", "set_grad_enabled"})
"""Names removed from the modules a request sees: these reach files in C (where the audit hook cannot see them),
compilers, devices or process-wide state."""

_PROTECTED: dict[str, types.ModuleType] = {}


def protected_module(module: types.ModuleType) -> types.ModuleType:
    """A copy of an allowed module without :data:`MODULE_DENIED` names (functions and classes are the real ones)."""
    view = _PROTECTED.get(module.__name__)
    if view is None:
        view = types.ModuleType(module.__name__, getattr(module, "__doc__", None))
        view.__dict__.update({k: v for k, v in vars(module).items() if k not in MODULE_DENIED and not
                              (k.startswith("__") and k not in ("__name__", "__doc__", "__version__"))})
        _PROTECTED[module.__name__] = view
    return view


def _guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level != 0 or name.split(".")[0] not in ALLOWED_MODULES:
        raise UnsafeRequestError(f"import of {name!r} is not allowed on this gateway; allowed: "
                                 f"{', '.join(sorted(ALLOWED_MODULES))}.")
    module = builtins.__import__(name, globals, locals, fromlist, level)
    return protected_module(module)


SAFE_BUILTINS: dict[str, Any] = {n: getattr(builtins, n) for n in SAFE_BUILTIN_NAMES if hasattr(builtins, n)}
SAFE_BUILTINS["__import__"] = _guarded_import


def check_source(source: str, where: str = "the request") -> None:
    """Refuse code that reaches outside the sandbox.

    Raises:
        UnsafeRequestError: naming the line and what is forbidden.
        BadRequestError: the source does not parse.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise BadRequestError(f"{where} does not parse: {e}") from None
    module_names = set(ALLOWED_MODULES)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            module_names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            module_names.update(a.asname or a.name for a in node.names)
    for node in ast.walk(tree):
        line = getattr(node, "lineno", "?")
        problem = None
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or "."]
            bad = [n for n in names if getattr(node, "level", 0) or n.split(".")[0] not in ALLOWED_MODULES]
            if bad:
                problem = (f"import of {bad[0]!r} is not allowed (allowed modules: "
                           f"{', '.join(sorted(ALLOWED_MODULES))})")
        elif isinstance(node, ast.Name) and node.id in FORBIDDEN_NAMES:
            problem = f"the name {node.id!r} is not allowed (no file, network, process or interpreter access)"
        elif isinstance(node, ast.Name) and node.id.startswith("__"):
            problem = f"the name {node.id!r} is not allowed"
        elif isinstance(node, ast.Attribute) and (node.attr.startswith("_") or node.attr in FORBIDDEN_ATTRIBUTES):
            problem = f"the attribute {node.attr!r} is not allowed (private, I/O, storage, hooks or global state)"
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)):
            root = _root_name(node)
            verb = "deleting" if isinstance(node.ctx, ast.Del) else "assigning"
            if isinstance(node.ctx, ast.Del) or node.attr not in ASSIGNABLE_ATTRIBUTES:
                problem = (f"{verb} the attribute {node.attr!r} is not allowed (modules, functions and classes are "
                           "shared by every request; only an envoy's .output/.input/.inputs or a tensor's "
                           ".grad/.requires_grad may be assigned)")
            elif root in module_names:
                problem = (f"assigning an attribute of the module {root!r} is not allowed (modules are shared by "
                           "every request)")
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            problem = "global/nonlocal statements are not allowed"
        elif isinstance(node, (ast.AsyncFunctionDef, ast.Await, ast.AsyncFor, ast.AsyncWith)):
            problem = "async code is not allowed"
        if problem:
            raise UnsafeRequestError(f"{where}, line {line}: {problem}.")


def _root_name(node: ast.expr) -> str | None:
    """The name an attribute/subscript/call chain starts from (``torch`` for ``torch.nn.functional.softmax``)."""
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call, ast.Starred)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


# ---- restricted unpickling --------------------------------------------------------------------------------------

_ALLOWED_GLOBALS = {
    ("nnsight.intervention.envoy", "Envoy"), ("nnsight.intervention.tracer", "InterleavingTracer"),
    ("nnsight.intervention.tracer", "Barrier"), ("nnsight.modeling.language", "LanguageModel"),
    ("nnsight.modeling.transformers", "TransformersModel"), ("nnsight.modeling.transformers", "GeneratorEnvoy"),
    ("nnsight.modeling.transformers", "TransformersModel._call"), ("nnsight.tracing.tracer", "Tracer"),
    ("nnsight.tracing.tracer", "Tracer.Info"), ("nnsight.tracing.util", "SerializedFrame"),
    ("nnsight.intervention.tracer", "InterleavingTracer.Info"), ("nnsight.modeling.language", "LanguageModel._call"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"), ("torch", "Size"),
    ("torch._tensor", "_rebuild_from_type_v2"), ("torch", "Tensor"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("builtins", "list"), ("builtins", "dict"), ("builtins", "tuple"), ("builtins", "range"), ("builtins", "complex"),
    ("types", "SimpleNamespace"), ("copyreg", "_reconstructor"), ("builtins", "object"),
    ("cloudpickle.cloudpickle", "_fill"), ("nnsight.intervention.serialization", "_fill"),
}
_STORAGE_TYPES = {f"{t}Storage" for t in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char",
                                          "Byte", "Bool")}
_BUILTIN_TYPES = {"MethodType", "SimpleNamespace"}


def _module_ref(name: str):
    if name.split(".")[0] not in ALLOWED_MODULES:
        raise UnsafeRequestError(f"the request references the module {name!r}; only "
                                 f"{', '.join(sorted(ALLOWED_MODULES))} may be used.")
    __import__(name)
    return protected_module(sys.modules[name])


def _builtin_type(name: str):
    if name not in _BUILTIN_TYPES:
        raise UnsafeRequestError(f"the request carries a {name!r} object (compiled code?); send functions as "
                                 "source (define them in a file, not in exec'd strings).")
    return getattr(types, name)


SHIPPED_SOURCES: contextvars.ContextVar[list[str]] = contextvars.ContextVar("shipped_sources")
"""Sources of the functions shipped with the request being unpickled (set a list before unpickling)."""
SHIPPED_EDITS: contextvars.ContextVar[list[str]] = contextvars.ContextVar("shipped_edits")
"""Sources of the ``lm.edit()`` blocks shipped with the request being unpickled (set a list before unpickling)."""


def _is_nnsight_own(source: str, origin_filename: str, origin_line: int) -> bool:
    """Whether ``source`` is, character for character, the function at ``origin_line`` of the same file of the
    nnsight installed here (nnsight ships some of its own functions by value, e.g. ``generate``)."""
    import inspect
    import textwrap
    from pathlib import Path

    import nnsight

    marker = "/nnsight/"
    if marker not in origin_filename or not isinstance(origin_line, int) or origin_line < 1:
        return False
    local = Path(nnsight.__file__).parent / origin_filename.rsplit(marker, 1)[1]
    if not local.is_file() or ".." in origin_filename.rsplit(marker, 1)[1]:
        return False
    lines = local.read_text().splitlines(keepends=True)
    try:
        block = inspect.getblock(lines[origin_line - 1:])
    except (IndexError, SyntaxError):
        return False
    return textwrap.dedent("".join(block)) == source


def _checked_load_function(source, name, defaults, kwdefaults, annotations, origin_filename, origin_line):
    from nnsight.intervention.serialization import _load_function

    own = _is_nnsight_own(source, origin_filename, origin_line)
    if not own:
        check_source(source, f"function {name!r}")
        SHIPPED_SOURCES.get([]).append(source)
    func = _load_function(source, name, defaults, kwdefaults, annotations, origin_filename, origin_line)
    if not own:  # nnsight gives it the real builtins (its `import torch` would be the real torch, with save/load);
        # a function keeps the builtins of its creation, so it is rebuilt on the same globals dict (`_fill` fills it)
        func.__globals__["__builtins__"] = SAFE_BUILTINS
        rebuilt = types.FunctionType(func.__code__, func.__globals__, func.__name__, func.__defaults__,
                                     func.__closure__)
        rebuilt.__kwdefaults__, rebuilt.__annotations__ = func.__kwdefaults__, func.__annotations__
        rebuilt.__qualname__, rebuilt.__module__ = func.__qualname__, func.__module__
        func = rebuilt
    return func


@functools.cache
def _edit_class():
    """nnsight's ``Mediator`` as it arrives in a request: the stored block of an ``lm.edit()``, which rides in the
    edited envoy's ``_edits``. It is reduced to source + the values it names (as the traced block is), so its source is
    checked like the block's and recorded among the request's sources (the gateway's source analysis reads it), and it
    runs with the restricted builtins (``exec`` would otherwise fill in the real ones)."""
    from nnsight.intervention.interleaver import Mediator

    class CheckedEdit(Mediator):
        def __setstate__(self, state: dict) -> None:
            reduced = state.get("reduced") if isinstance(state, dict) else None
            if not (isinstance(reduced, tuple) and len(reduced) == 3 and isinstance(reduced[0], str)
                    and isinstance(reduced[1], dict) and isinstance(reduced[2], dict)
                    and set(state) <= {"reduced", "copy", "presaved"}):
                raise UnsafeRequestError("the request carries an edit (lm.edit()) that is not an nnsight 0.8 stored "
                                         "block; refused.")
            check_source(reduced[0], "the lm.edit() block")
            SHIPPED_SOURCES.get([]).append(reduced[0])
            SHIPPED_EDITS.get([]).append(reduced[0])
            super().__setstate__(state)
            self.source = reduced[0]  # the gateway's hybrid translation records the edit from it
            self.glbls["__builtins__"] = SAFE_BUILTINS
            dict.__setitem__(self.lcls, "__builtins__", SAFE_BUILTINS)  # exec's globals: the scope itself

    CheckedEdit.__name__ = CheckedEdit.__qualname__ = "Mediator"
    return CheckedEdit


def _load_storage_bytes(data: bytes):
    """A tensor storage pickled by ``Tensor.__reduce_ex__`` (``torch.storage._load_from_bytes``, i.e. a full
    ``torch.load``), read with torch's ``weights_only`` unpickler instead: storages, tensors and plain data only."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafeRequestError("the request's payload passes a non-bytes value to a storage loader; refused.")
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:
        raise UnsafeRequestError(f"a tensor in the request's payload is not plain tensor data ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200] if str(e) else ''}); refused.") from None


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles an nnsight payload, loading only allow-listed globals; ``persistent_load`` resolves the
    model's modules by id (the model is never in the payload)."""

    def __init__(self, file: io.BufferedIOBase, persistent_objects: dict | None):
        super().__init__(file)
        self.persistent_objects = persistent_objects or {}

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, str) and pid in self.persistent_objects:
            return self.persistent_objects[pid]
        raise BadRequestError(f"the request refers to {pid!r}, which this gateway's model does not have; was the "
                              "trace built for another model?")

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and (name in _STORAGE_TYPES or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if module == "cloudpickle.cloudpickle" and name == "subimport":
            return _module_ref
        if module == "cloudpickle.cloudpickle" and name == "_builtin_type":
            return _builtin_type
        if module == "nnsight.intervention.serialization" and name == "_load_function":
            return _checked_load_function
        if module == "torch.storage" and name == "_load_from_bytes":
            return _load_storage_bytes
        if module == "nnsight.intervention.interleaver" and name == "Mediator":
            return _edit_class()
        if module == "builtins" and name in ("getattr", "eval", "exec", "__import__", "open", "compile"):
            raise UnsafeRequestError(f"the request's payload calls builtins.{name}; refused.")
        raise UnsafeRequestError(f"the request's payload needs {module}.{name}, which the gateway does not load "
                                 "(only nnsight tracing objects, tensors, plain data and source functions).")


# ---- audit hook -------------------------------------------------------------------------------------------------

_BLOCKED_EVENTS = ("open", "socket.", "subprocess.", "os.system", "os.exec", "os.fork", "os.posix_spawn",
                   "os.spawn", "os.kill", "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chdir", "os.chmod",
                   "os.listdir", "os.scandir", "os.putenv", "os.unsetenv", "shutil.", "ctypes.", "pty.",
                   "sys.addaudithook", "sys.setprofile", "webbrowser.",
                   "urllib.", "http.", "ftplib.", "smtplib.", "resource.setrlimit", "signal.")


_CODE_SUFFIXES = (".py", ".pyc", ".so")


def _is_module_code_read(args: tuple) -> bool:
    """Whether an ``open`` event reads a module's code from the import path (a lazy import inside torch, say):
    allowed, so a request is accepted or refused the same way whatever the process imported before it."""
    if len(args) < 3 or not isinstance(args[0], str) or args[1] not in ("r", "rb", None):
        return False
    if isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND):
        return False
    path = os.path.realpath(args[0])
    if not path.endswith(_CODE_SUFFIXES):
        return False
    roots = [os.path.realpath(p) for p in sys.path if p and os.path.isabs(p)]
    return any(path.startswith(root.rstrip("/") + "/") for root in roots)


class AuditGuard:
    """A process-wide :pep:`578` hook that is armed only on the thread running a request (``with guard:``).

    While armed, file opens (except reads of module code from the import path, so lazy imports of installed
    modules work in every process alike), sockets, subprocesses, process control, ``ctypes`` and imports of modules
    outside the allowed packages that are not loaded yet raise :class:`UnsafeRequestError`. Audit hooks cannot be removed, so install it once per process.
    """

    _installed: "AuditGuard | None" = None

    def __init__(self):
        self._armed: set[int] = set()

    @classmethod
    def install(cls) -> "AuditGuard":
        if cls._installed is None:
            guard = cls()
            sys.addaudithook(guard._hook)
            cls._installed = guard
        return cls._installed

    def _hook(self, event: str, args: tuple) -> None:
        if threading.get_ident() not in self._armed:
            return
        if event == "import":
            name = args[0]
            if name in sys.modules or name.split(".")[0] in ALLOWED_MODULES:
                return
            self._refuse(f"import of {name!r}")
        if event == "open" and _is_module_code_read(args):
            return
        if event.startswith(_BLOCKED_EVENTS):
            target = args[0] if args and isinstance(args[0], (str, bytes, int)) else ""
            self._refuse(f"{event} {target!r}".strip())

    def _refuse(self, what: str) -> None:
        raise UnsafeRequestError(f"the request tried {what}: file, network and process access are not allowed "
                                 "on this gateway.")

    def __enter__(self) -> "AuditGuard":
        self._armed.add(threading.get_ident())
        return self

    def __exit__(self, *exc) -> None:
        self._armed.discard(threading.get_ident())


class ParameterSeal:
    """Fingerprints of a model's parameters and buffers: ``changed()`` names those a request wrote to."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.prints = self._fingerprints()

    def _fingerprints(self) -> dict[str, tuple]:
        found = {}
        for kind, items in (("param", self.module.named_parameters()), ("buffer", self.module.named_buffers())):
            for name, t in items:
                found[f"{kind}:{name}"] = (id(t), t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.requires_grad)
        return found

    def changed(self) -> list[str]:
        now = self._fingerprints()
        return sorted(k.split(":", 1)[1] for k in set(now) | set(self.prints) if now.get(k) != self.prints.get(k))
