"""The model's module tree while tracing: a weightless skeleton, the order and fake values of its module calls, and
the :class:`Envoy` tree a user addresses modules by.

:class:`ModelSkeleton` builds the causal LM from its config on the ``meta`` device (no weights, no I/O) and runs it
once per input shape with hooks on every submodule, giving a :class:`ShapeInfo`: the forward order of module
*events* (``(path, "input")`` when a module is entered, ``(path, "output")`` when it returns) and a meta value of the
same structure as each module's first input / output. Tracing uses the order to reject out-of-order access and the
fake values to check shapes before anything is sent.

Meta forward workaround (transformers 5.23): building the causal mask from a 2-D ``attention_mask`` (or from none,
via the packed-sequence check on ``position_ids``) calls ``.item()`` / ``.all()`` on tensors, which meta tensors
refuse. :meth:`ModelSkeleton.shapes` therefore always passes an already expanded 4-D boolean mask
``(B, 1, T, T)``: ``masking_utils`` returns a 4-D mask as it is, before any data-dependent check, and sdpa/eager
attention accept it. The mask's values never matter on meta; only shapes do. Nothing global is patched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import transformers

from .errors import DisallowedOpError, TraceError, UnknownModuleError
from .proxy import Proxy, at_user_line, describe
from .source import split_op_path
from .source_view import SourceView, recording, source_order

KINDS = ("input", "output")


@dataclass
class ShapeInfo:
    """What one forward of the skeleton showed: event order and fake values (of each module's first call)."""

    events: list[tuple[str, str]]
    """``(path, "input" | "output")`` in forward order; a module's input event comes when it is entered."""
    values: dict[tuple[str, str], Any] = field(default_factory=dict)
    """Meta value per event: the first positional argument (else the first keyword argument, as nnsight's
    ``.input``) for ``"input"``, the return value for ``"output"`` (a tensor, a tuple, or a ``ModelOutput``)."""

    def __post_init__(self) -> None:
        self._order = source_order(self.events)

    def index(self, path: str, kind: str) -> int:
        """Position of the event in forward order.

        Raises:
            TraceError: the module never runs (so it has no such event) in a forward of this model.
        """
        try:
            return self._order[(path, kind)]
        except KeyError:
            raise TraceError(f"module {path!r} has no {kind} event: it is not called in a forward of this model, "
                             "so its .input/.output cannot be used") from None

    def fake(self, path: str, kind: str) -> Any:
        """The meta value of ``path``'s first input or output (see :attr:`values`). Raises TraceError like
        :meth:`index`."""
        self.index(path, kind)
        return self.values[(path, kind)]


class ModelSkeleton:
    """A causal LM built from its config on the meta device: the module tree and shapes, never weights.

    Args:
        config: a transformers config of a causal LM.
        dtype: floating dtype of the fake values (the dtype the executing model runs in); default float32, which is
            what ``from_config`` builds.
    """

    def __init__(self, config: transformers.PretrainedConfig, *, dtype: torch.dtype | None = None) -> None:
        self.config = config
        with torch.device("meta"):
            kwargs = {} if dtype is None else {"dtype": dtype}
            # eager attention: an attention module's fake output carries its weights (B, H, T, T), which a request
            # that reads them gets (the nodes then run that call eagerly, see hybrid.attention_weights)
            self.model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config),
                                                                       attn_implementation="eager", **kwargs).eval()
        self._cache: dict[tuple, ShapeInfo] = {}
        self.sourced: set[str] = set()
        """Paths of the modules whose operations a trace used (``module.source``): their forward runs instrumented
        here, so the operations have events and fake values (:mod:`hybrid.source`)."""

    def module_paths(self) -> list[str]:
        """HF names of every submodule, root excluded (``model.embed_tokens``, ``model.layers.7.mlp``, ``lm_head``)."""
        return [name for name, _ in self.model.named_modules() if name]

    def module(self, path: str) -> torch.nn.Module:
        """The meta submodule at ``path`` (``""`` is the root); None for an operation inside a forward
        (``<module>.source.<op>``). Raises UnknownModuleError."""
        if split_op_path(path):
            return None
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            raise UnknownModuleError(f"the model has no module {path!r}; see ModelSkeleton.module_paths()") from None

    def shapes(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               logits_to_keep: int = 0, past: int = 0) -> ShapeInfo:
        """Run the meta model once on inputs of this shape and report every module event (cached per shape, mask
        presence, ``logits_to_keep`` and ``past``).

        Args:
            input_ids: ``(B, T)`` token ids (any device; only the shape is used).
            attention_mask: ``(B, T)`` or None; only its presence keys the cache (see the module docstring).
            logits_to_keep: ``lm_head`` sees the last this many positions (0: all). Generation keeps 1, as
                transformers' ``generate`` (and so nnsight) does: ``lm_head.output`` is ``(B, 1, V)`` at every step.
            past: tokens already in the KV cache (a generation step after the first: ``T + step - 1``). The meta
                forward then runs on a meta cache of that length, so values whose size is the key length (attention
                weights ``(B, H, 1, past + 1)``) have the step's real shape.
        """
        if input_ids.ndim != 2:
            raise TraceError(f"input_ids must be (batch, tokens); got shape {tuple(input_ids.shape)}")
        key = (tuple(input_ids.shape), attention_mask is not None, logits_to_keep, past, frozenset(self.sourced))
        if key not in self._cache:
            self._cache[key] = self._run(*input_ids.shape, logits_to_keep, past)
        return self._cache[key]

    def _run(self, batch: int, tokens: int, logits_to_keep: int, past: int = 0) -> ShapeInfo:
        events: list[tuple[str, str]] = []
        values: dict[tuple[str, str], Any] = {}

        def on_enter(path: str) -> Callable:
            def hook(module, args, kwargs):
                if (path, "input") not in values:
                    events.append((path, "input"))
                    values[(path, "input")] = first_input(args, kwargs)
            return hook

        def on_return(path: str) -> Callable:
            def hook(module, args, kwargs, output):
                if (path, "output") not in values:
                    events.append((path, "output"))
                    values[(path, "output")] = output
            return hook

        handles = []
        try:
            for path, module in self.model.named_modules():
                if path:
                    handles.append(module.register_forward_pre_hook(on_enter(path), with_kwargs=True))
                    handles.append(module.register_forward_hook(on_return(path), with_kwargs=True))
            ids = torch.zeros((batch, tokens), dtype=torch.long, device="meta")
            mask = torch.ones((batch, 1, tokens, past + tokens), dtype=torch.bool, device="meta")
            cache = self._meta_cache(batch, past) if past else None
            with torch.no_grad(), recording(self.model, self.sourced, events, values, first_input):
                self.model(input_ids=ids, attention_mask=mask, use_cache=cache is not None, past_key_values=cache,
                           logits_to_keep=logits_to_keep)
        finally:
            for handle in handles:
                handle.remove()
        return ShapeInfo(events=events, values=values)

    def _meta_cache(self, batch: int, past: int) -> transformers.DynamicCache:
        """A KV cache of ``past`` positions on the meta device (every layer's keys and values ``(B, kv_heads, past,
        head_dim)``), so a meta forward sees a later generation step's key length."""
        config = self.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dtype = next(self.model.parameters()).dtype
        cache = transformers.DynamicCache(config=config)
        for layer in range(config.num_hidden_layers):
            kv = torch.empty((batch, heads, past, head_dim), dtype=dtype, device="meta")
            cache.update(kv, kv, layer)
        return cache


def first_input(args: tuple, kwargs: dict) -> Any:
    """nnsight 0.8's ``.input``: the first positional argument, else the first keyword argument, else None."""
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)


class Envoy:
    """A module of the traced model: children as attributes (``lm.model.layers``), ``layers[i]`` indexing and
    iteration over containers, and ``.output`` / ``.input`` to read or (by assignment) replace the module's value.

    Envoys record nothing themselves: they ask the active tracer (``tracer_getter()``), which must provide
    ``read_module(path, kind)`` and ``write_module(path, kind, value)``.
    """

    def __init__(self, path: str, module: torch.nn.Module, tracer_getter: Callable[[], Any]) -> None:
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_tracer_getter", tracer_getter)
        object.__setattr__(self, "_children", {
            name: Envoy(f"{path}.{name}" if path else name, child, tracer_getter)
            for name, child in module.named_children()})

    @property
    def path(self) -> str:
        """HF module path (``model.layers.7.mlp``); the root is ``""``."""
        return self._path

    @property
    def output(self) -> Any:
        """The module's output in this invoke (a Proxy, or a TupleProxy of per-invoke rows of a tuple). For the root
        model: its output's ``.logits`` / ``["logits"]`` (the head's output)."""
        if not self._path:
            return RootOutput(self._tracer_getter)
        return self._tracer("output").read_module(self._path, "output")

    @output.setter
    def output(self, value: Any) -> None:
        self._tracer("output").write_module(self._path, "output", value)

    @property
    def input(self) -> Any:
        """The module's first positional argument (else first keyword argument), like nnsight 0.8 ``.input``."""
        return self._tracer("input").read_module(self._path, "input")

    @input.setter
    def input(self, value: Any) -> None:
        self._tracer("input").write_module(self._path, "input", value)

    def skip(self, replacement: Any) -> None:
        """nnsight's ``module.skip(value)``: the module does not run; its output is ``replacement`` (e.g. its own
        ``.input``), which must have the module output's exact shape and exist before the module would run. Its
        submodules do not run either, so using them in this forward call is an error (before the skip or after).
        Inside an invoke of some rows only, the module still runs for the other invokes' rows."""
        tracer = self._tracer("skip")
        call = tracer.call
        inner = [n for n in tracer.graph.nodes if n.op in ("getter", "setter") and n.call == call and (
            n.module.startswith(self._path + ".") or (n.module == self._path and n.kind == "output"))]
        if inner:
            used = f"{inner[0].module}.{inner[0].kind}"
            raise TraceError(at_user_line(f"{self._path}.skip(...): this trace already uses {used}, which a skipped "
                                          f"module never computes; skip {self._path} before using anything inside it, "
                                          f"or do not skip it"))
        want = tracer._shape_info(call).fake(self._path, "output")
        got = replacement.fake if isinstance(replacement, Proxy) else replacement
        narrow = tracer._current is not None and tracer._current.narrow  # the rows' shape is checked when widened
        if not narrow and isinstance(want, torch.Tensor) and not (isinstance(got, torch.Tensor) and got.shape == want.shape
                                                   and got.dtype == want.dtype):
            raise TraceError(at_user_line(f"{self._path}.skip(value): a skipped module's output is the value itself, "
                                          f"so it must be a {describe(want)} like the module's output; got "
                                          f"{describe(got)}"))
        tracer.write_module(self._path, "output", replacement, skip=True)

    @property
    def source(self) -> SourceView:
        """nnsight's ``module.source``: the operations of this module's forward (``.source.self_o_proj_0.output``);
        they run on the node that owns the module (see :mod:`hybrid.source`)."""
        return SourceView(self._path, self._module, self._tracer_getter)

    @property
    def inputs(self) -> Any:
        """For the root model (``lm.inputs``): its ``(args, kwargs)`` as nnsight gives them, see
        :mod:`hybrid.root_inputs`. Other modules' full arguments are not addressable (use ``.input``)."""
        if not self._path:
            tracer = self._tracer_getter()
            if tracer is None:
                raise TraceError("lm.inputs can only be used inside `with lm.trace(...)`")
            return tracer.root_inputs()
        raise DisallowedOpError(f"{self._name('inputs')}: the full (args, kwargs) of a module is not addressable "
                                "in a graph; use .input (its first argument)")

    def _tracer(self, kind: str) -> Any:
        tracer = self._tracer_getter()
        if tracer is None:
            raise TraceError(f"{self._name(kind)} can only be used inside `with lm.trace(...)`")
        if not self._path:
            raise TraceError("the root model's input/output is not addressable; use lm.lm_head.output for logits")
        return tracer

    def _name(self, attr: str) -> str:
        return f"{self._path or '<root>'}.{attr}"

    def __getattr__(self, name: str) -> Any:
        children = self.__dict__["_children"]
        if name in children:
            return children[name]
        if name.startswith("_"):
            raise AttributeError(name)
        module = self.__dict__["_module"]
        if name in module._parameters or name in module._buffers:
            raise DisallowedOpError(f"{self._name(name)}: weights and buffers live on the serving nodes and are not "
                                    "addressable in a graph")
        value = getattr(module, name, None)
        if isinstance(value, (bool, int, float, str, type(None))) and hasattr(module, name):
            return value
        raise AttributeError(f"module {self._path or '<root>'!r} ({type(module).__name__}) has no submodule {name!r}; "
                             f"submodules: {', '.join(children) or 'none'}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("output", "input"):
            object.__setattr__(self, name, value)  # dispatches to the property setter
            return
        raise TraceError(f"cannot set {self._name(name)}: only .output and .input of a module can be assigned")

    def __getitem__(self, key: int | str | slice) -> "Envoy | list[Envoy]":
        items = list(self._children.values())
        if isinstance(key, str):
            if key not in self._children:
                raise KeyError(f"module {self._path!r} has no child {key!r}")
            return self._children[key]
        if isinstance(key, slice):
            return items[key]
        if not isinstance(self._module, (torch.nn.ModuleList, torch.nn.Sequential)):
            raise TypeError(f"module {self._path!r} ({type(self._module).__name__}) is not a list of modules")
        if not -len(items) <= key < len(items):
            raise IndexError(f"module {self._path!r} has {len(items)} entries; index {key} is out of range")
        return items[key]

    def __iter__(self) -> Iterator["Envoy"]:
        return iter(self._children.values())

    def __len__(self) -> int:
        return len(self._children)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Apply this module to traced values, e.g. the logit lens ``lm.lm_head(lm.model.norm(h))``."""
        return self._tracer("call").call_module(self._path, args, kwargs)

    def __repr__(self) -> str:
        return f"Envoy({self._path or '<root>'!r}: {type(self._module).__name__})"


class RootOutput:
    """``lm.output`` of a causal LM: its ``logits`` are the head's output (``lm.output.logits`` is
    ``lm.lm_head.output``, also by assignment); the other fields of transformers' output are not addressable."""

    def __init__(self, tracer_getter: Callable[[], Any]) -> None:
        object.__setattr__(self, "_tracer_getter", tracer_getter)

    def _tracer(self) -> Any:
        tracer = self._tracer_getter()
        if tracer is None:
            raise TraceError("lm.output can only be used inside `with lm.trace(...)`")
        return tracer

    @property
    def logits(self) -> Any:
        return self._tracer().read_module("lm_head", "output")

    @logits.setter
    def logits(self, value: Any) -> None:
        self._tracer().write_module("lm_head", "output", value)

    def __getitem__(self, key: Any) -> Any:
        if key in ("logits", 0):
            return self.logits
        raise TraceError(f"lm.output[{key!r}]: only the logits of the model's output are addressable (the KV cache "
                         "and hidden states live on the nodes; read module outputs instead)")

    def __setitem__(self, key: Any, value: Any) -> None:
        if key != "logits":
            raise TraceError(f"lm.output[{key!r}] cannot be set; only lm.output['logits']")
        self.logits = value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        raise TraceError(f"lm.output.{name}: only lm.output.logits is addressable (hidden states: read "
                         "lm.model.layers[i].output; the KV cache stays on the nodes)")

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "logits":
            raise TraceError(f"lm.output.{name} cannot be set; only lm.output.logits")
        object.__setattr__(self, name, value)


def root_envoy(skeleton: ModelSkeleton, tracer_getter: Callable[[], Any] | None = None) -> Envoy:
    """The envoy of the skeleton's root module (the causal LM): ``root.model``, ``root.lm_head``...

    Args:
        skeleton: the model skeleton.
        tracer_getter: returns the tracer recording now, or None outside a trace. Default: the innermost active
            :class:`hybrid.tracing.Tracer` of this skeleton on this thread.
    """
    if tracer_getter is None:
        from .tracing import current_tracer

        def tracer_getter() -> Any:
            return current_tracer(skeleton)
    return Envoy("", skeleton.model, tracer_getter)
