"""``tracer.cache(...)``: many modules' values at once, as nnsight 0.8.1 records them.

::

    with lm.trace(prompts) as tracer:
        cache = tracer.cache(modules=[lm.model.layers[3], "model.model.layers.4.mlp"], include_inputs=True)
        lm.model.layers[3].output[:] = 0
    cache["model.model.layers.3"].output            # nnsight's keys: the root model is "model"
    cache.model.model.layers[4].mlp.input             # or by navigation

How: the cache is a list of getters recorded when the ``with`` block ends (:meth:`Tracer._run` calls
:func:`finalize` hooks), after every intervention, so each holds the module's value *after* the interventions (as
nnsight records them), saved; on a node they are ordinary saved getters, so in ``hybrid`` each value comes back from
the node that computed it. Like nnsight: declared before the invoke reads or writes any module (``ValueError``
otherwise), inside an invoke it holds that invoke's rows, and in ``lm.generate`` a module has one entry per step.

Differences, each stated where it applies: the root model's and ``model.model``'s outputs (transformers' output
objects, which the stages never build) are not cached, nor ``model.rotary_emb`` (it runs on every node, outside
any stage); attention modules are cached as ``(attn_output, None)``, as
SDPA returns them (read ``self_attn.output[1]`` explicitly for the weights); ``.inputs`` (every argument) is refused,
``.input`` (the first) is cached; modules inside a skipped module never run, so they have no entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .attention_weights import is_attention
from .errors import DisallowedOpError, TraceError, UnknownModuleError
from .planner import module_stage
from .proxy import Proxy, TupleProxy, at_user_line

ROOT = "model"
"""nnsight's name of the root model: cache keys are ``"model." + path`` (``model.model.layers.0``)."""
UNCACHED = ("", "model")
"""Our paths of modules whose output is not cached (the root and the inner ``model``: output objects)."""


@dataclass
class Entry:
    """One forward call of one module: its output and its first input (each a traced value until the trace ran)."""

    output: Any = None
    first_input: Any = None

    @property
    def input(self) -> Any:
        return _value(self.first_input)


class Cache:
    """What one ``tracer.cache(...)`` selected, and the traced values it recorded (``{path: [Entry per call]}``)."""

    def __init__(self, tracer: Any, paths: list[str], *, device: Any, dtype: torch.dtype | None,
                 include_output: bool, include_inputs: bool) -> None:
        self.tracer, self.paths = tracer, paths
        self.device, self.dtype = device, dtype
        self.include_output, self.include_inputs = include_output, include_inputs
        self.invoke = tracer._current
        self.entries: dict[str, list[Entry]] = {}

    def finalize(self) -> None:
        """Record a saved getter per selected module event (after the interventions: the block has ended)."""
        tracer = self.tracer
        calls = range(tracer.steps) if tracer.generation else [tracer.call]
        for call in calls:
            skipped = [n.module for n in tracer.graph.nodes
                       if n.op == "setter" and n.call == call and n.kwargs.get("skip")]
            for path in self.paths:
                if any(path.startswith(s + ".") for s in skipped):
                    continue  # never runs
                entry = Entry()
                if self.include_inputs:
                    entry.first_input = self._read(path, "input", call)
                if self.include_output:
                    entry.output = self._read(path, "output", call)
                self.entries.setdefault(path, []).append(entry)

    def _read(self, path: str, kind: str, call: int) -> Any:
        tracer = self.tracer
        full = tracer._full_getter(path, kind, call)
        if kind == "output" and is_attention(tracer.skeleton.module(path)):  # the output only: SDPA runs
            value = full[0]
            if self.invoke.narrow:
                value = value[self.invoke.start:self.invoke.stop]
            return TupleProxy([value.save(), None])
        value = tracer._narrow(full, self.invoke, f"{path}.{kind}") if self.invoke.narrow else full
        return value.save() if isinstance(value, (Proxy, TupleProxy)) else value

    def value(self, path: str, attr: str) -> Any:
        if path not in self.entries:
            raise KeyError(f"{ROOT}.{path}".rstrip(".") + " was not cached"
                           + (" (the root model's and model.model's outputs are not: read lm.output.logits or the "
                              "modules' outputs)" if path in UNCACHED else ""))
        values = [self._moved(_value(getattr(entry, attr) if attr == "output" else entry.first_input))
                  for entry in self.entries[path]]
        return values[0] if len(values) == 1 else values

    def _moved(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and (self.device is not None or self.dtype is not None):
            return value.to(device=self.device, dtype=self.dtype)
        if isinstance(value, tuple):
            return tuple(self._moved(v) for v in value)
        return value


def _value(traced: Any) -> Any:
    if isinstance(traced, (Proxy, TupleProxy)):
        return traced.value
    return traced


def declare(tracer: Any, modules: list | None, *, device: Any = torch.device("cpu"), dtype: torch.dtype | None = None,
            detach: bool = True, include_output: bool = True, include_inputs: bool = False,
            non_blocking: bool = False) -> "CacheView":
    """nnsight's ``tracer.cache(...)`` (see the module docstring). ``detach`` and ``non_blocking`` change nothing
    here: values come back detached, on the CPU."""
    if tracer._state != "tracing":
        raise TraceError(at_user_line("tracer.cache() can only be called inside its `with` block"))
    invoke = tracer._current
    if invoke is None:
        raise TraceError(at_user_line("tracer.cache() is used outside any invoke: in `lm.trace()` without inputs, "
                                      "declare it inside `with tracer.invoke(prompts):`"))
    if invoke.last is not None:
        raise ValueError("tracer.cache() must be declared before reading or modifying a model value")
    events = tracer._shape_info(0).events
    layers = tracer.skeleton.config.num_hidden_layers
    called = [path for path, kind in events if kind == "output" and path not in UNCACHED and _addressable(path, layers)]
    if modules is None:
        paths = called
    else:
        wanted = {_our_path(tracer, m) for m in modules}
        refused = sorted(wanted & set(UNCACHED))
        if refused:
            raise TraceError(at_user_line(f"tracer.cache(): the output of {ROOT + '.' + refused[-1] if refused[-1] else ROOT!r} "
                                          "is transformers' output object, which is not cached; cache its modules"))
        unknown = sorted(wanted - set(called))
        if unknown:
            raise TraceError(at_user_line(f"tracer.cache(): {unknown[0]!r} is not a module called in a forward"))
        paths = [p for p in called if p in wanted]
    cache = Cache(tracer, paths, device=device, dtype=dtype, include_output=include_output,
                  include_inputs=include_inputs)
    cache.everything = modules is None  # the gateway adds nnsight's root entries to a full cache (ndif_compat)
    tracer._finalizers.append(cache.finalize)
    return CacheView(cache, None)


def _addressable(path: str, num_layers: int) -> bool:
    """Whether a graph can read ``path`` (the rotary embedding runs on every node, outside any stage: it cannot)."""
    try:
        module_stage(path, num_layers)
    except UnknownModuleError:
        return False
    return True


def _our_path(tracer: Any, module: Any) -> str:
    """An envoy's path, or a path string in nnsight's form (``model.model.layers.0``) or ours (``model.layers.0``)."""
    path = getattr(module, "path", module)
    if not isinstance(path, str):
        raise TraceError(at_user_line(f"tracer.cache(modules=...) takes envoys or path strings; got "
                                      f"{type(module).__name__}"))
    if path == ROOT:
        return ""
    if path.startswith(ROOT + "."):
        rest = path[len(ROOT) + 1:]
        try:
            tracer.skeleton.module(rest)
            return rest
        except Exception:
            pass
    return path


class CacheView:
    """nnsight's view of a cache: ``cache["model.model.layers.0"].output`` or ``cache.model.model.layers[0].output``;
    ``.output`` / ``.input`` (a list with one value per step in ``lm.generate``), ``keys()``, ``len()``."""

    def __init__(self, cache: Cache, path: str | None) -> None:
        object.__setattr__(self, "_cache", cache)
        object.__setattr__(self, "_path", path)  # ours; None at the virtual root above the model

    def _envoy_paths(self) -> set[str]:
        return set(self._cache.tracer.skeleton.module_paths()) | {""}

    def _child(self, name: str) -> "CacheView":
        if self._path is None:
            if name != ROOT:
                raise AttributeError(f"the cache's root holds {ROOT!r} (the model); got {name!r}")
            return CacheView(self._cache, "")
        path = f"{self._path}.{name}" if self._path else name
        if path not in self._envoy_paths():
            raise AttributeError(f"{ROOT}.{path} is not a module")
        return CacheView(self._cache, path)

    def __getattr__(self, name: str) -> "CacheView":
        if name.startswith("_"):
            raise AttributeError(name)
        return self._child(name)

    def __getitem__(self, key: str | int) -> "CacheView":
        if isinstance(key, int):
            return self._child(str(key))
        if "." in key or self._path is None:
            view: CacheView = CacheView(self._cache, None)
            for part in key.split("."):
                view = view._child(part)
            return view
        return self._child(key)

    def _here(self) -> str:
        if self._path is None:
            raise KeyError("the cache root is not a module")
        return self._path

    @property
    def output(self) -> Any:
        return self._cache.value(self._here(), "output")

    @property
    def input(self) -> Any:
        return self._cache.value(self._here(), "input")

    @property
    def inputs(self) -> Any:
        raise DisallowedOpError("cache[...].inputs: the full (args, kwargs) of a module is not addressable in a "
                                "graph; use .input (its first argument)")

    def keys(self) -> list[str]:
        """nnsight's keys (``model.`` + the path) of the cached modules at or below this view."""
        prefix = self._path
        return [f"{ROOT}.{p}" for p in self._cache.entries
                if prefix is None or not prefix or p == prefix or p.startswith(prefix + ".")]

    def __contains__(self, key: str) -> bool:
        try:
            return self[key]._path in self._cache.entries
        except (AttributeError, KeyError):
            return False

    def __len__(self) -> int:
        return len(self._cache.entries[self._here()])

    def __repr__(self) -> str:
        return f"CacheView({self._path!r}, cached={len(self.keys())} modules)"
