"""The gateway's guardrails and bookkeeping, without sockets: source checks, restricted unpickling, the audit hook,
the parameter seal, layer-cut analysis, model keys and API keys / rate limits."""

from __future__ import annotations

import importlib
import io
import os
import pickle
import sys
from pathlib import Path

import cloudpickle
import pytest
import torch

from ndif_compat.auth import KeyRing
from ndif_compat.errors import (BadRequestError, ModelNotServedError, RateLimitedError, UnauthorizedError,
                                UnsafeRequestError)
from ndif_compat.guardrails import AuditGuard, ParameterSeal, RestrictedUnpickler, check_source
from ndif_compat.protocol import check_model
from ndif_compat.swarm_layers import SwarmStack, touched_layers


@pytest.mark.parametrize("source, fragment", [
    ("open('/etc/passwd').read()", "'open' is not allowed"),
    ("import os", "import of 'os'"),
    ("from subprocess import run", "import of 'subprocess'"),
    ("import socket as s", "import of 'socket'"),
    ("from . import x", "import of '.'"),
    ("x = ().__class__.__bases__[0].__subclasses__()", "'__subclasses__'"),
    ("f = lm._module", "'_module'"),
    ("eval('1+1')", "'eval'"),
    ("g = getattr(torch, 'load')", "'getattr'"),
    ("torch.load('weights.pt')", "'load'"),
    ("w = lm.model.layers[0].mlp.down_proj.weight.data", "'data'"),
    ("torch.set_num_threads(64)", "'set_num_threads'"),
    ("__builtins__['open']", "'__builtins__'"),
    ("def f():\n    global lm\n", "global/nonlocal"),
])
def test_check_source_refuses_escapes(source, fragment):
    with pytest.raises(UnsafeRequestError, match="not allowed") as info:
        check_source(source, "the block")
    assert fragment in str(info.value)


@pytest.mark.parametrize("source, fragment", [
    ("torch.nn.functional.softmax = f", "assigning the attribute 'softmax'"),
    ("import torch.nn.functional as F\nF.softmax = f", "assigning the attribute 'softmax'"),
    ("from torch.nn import functional\nfunctional.relu = f", "assigning the attribute 'relu'"),
    ("F = torch.nn.functional\nF.softmax = f", "assigning the attribute 'softmax'"),
    ("torch.nn.Linear.forward = f", "assigning the attribute 'forward'"),
    ("torch.nn.functional.softmax += f", "assigning the attribute 'softmax'"),
    ("del torch.nn.functional.softmax", "deleting the attribute 'softmax'"),
    ("del lm.model.layers[0].output", "deleting the attribute 'output'"),
    ("torch.output = f", "attribute of the module 'torch'"),
    ("import torch.nn as tnn\ntnn.output = f", "attribute of the module 'tnn'"),
    ("from torch.nn import functional as G\nG.input = f", "attribute of the module 'G'"),
])
def test_check_source_refuses_writing_shared_module_state(source, fragment):
    """Module views (and their submodules, functions, classes) are shared by every request of a worker: a request
    that assigned ``torch.nn.functional.softmax`` would change what later requests of any user run."""
    with pytest.raises(UnsafeRequestError, match="not allowed") as info:
        check_source(source, "the block")
    assert fragment in str(info.value)
    assert "shared by every request" in str(info.value)


def test_check_source_accepts_ordinary_interventions():
    check_source("lm.model.layers[20].output = lm.model.layers[20].output * 0.5\n"
                 "lm.model.layers[3].mlp.input = h\nlm.model.layers[3].inputs = ((h,), {})\n")
    check_source("import torch\nh = lm.model.layers[5].output\nh[:, -1] = 0\n"
                 "p = torch.softmax(lm.lm_head.output[:, -1], -1).save()\nprint(p.shape)\n")
    with pytest.raises(BadRequestError, match="does not parse"):
        check_source("with lm.trace(:\n")


def _load(payload: bytes):
    return RestrictedUnpickler(io.BytesIO(payload), {"Module:model": torch.nn.Linear(2, 2)}).load()


@pytest.mark.parametrize("obj", [os.system, eval, print, cloudpickle.dumps, torch.load])
def test_unpickler_refuses_globals_outside_the_list(obj):
    with pytest.raises(UnsafeRequestError, match="does not load|refused"):
        _load(pickle.dumps(obj, protocol=4))


def test_unpickler_refuses_modules_and_bytecode():
    with pytest.raises(UnsafeRequestError, match="module 'os'"):
        _load(cloudpickle.dumps(os))
    captured = 3
    # a function without source: cloudpickle ships bytecode (its function builder or a code object is refused)
    with pytest.raises(UnsafeRequestError, match=r"_make_function, which the gateway does not load|compiled code"):
        _load(cloudpickle.dumps(lambda: captured))


def test_shipped_functions_run_with_the_restricted_builtins():
    """nnsight rebuilds a shipped function with the real builtins; the gateway's must replace them, or the
    function's ``import torch`` would be the real torch (``save``, ``load``...), not the protected view."""
    from ndif_compat.guardrails import SAFE_BUILTINS, _checked_load_function

    f = _checked_load_function("def helper():\n    import torch\n    return torch\n", "helper", None, None, None,
                               "/home/user/experiment.py", 1)
    assert f.__globals__["__builtins__"] is SAFE_BUILTINS
    view = f()
    assert view is not torch and view is SAFE_BUILTINS["__import__"]("torch") and "load" not in vars(view)
    with pytest.raises(UnsafeRequestError, match="'open' is not allowed"):
        _checked_load_function("def g():\n    return open\n", "g", None, None, None, "/x.py", 1)


def test_unpickler_loads_tensors_and_plain_data_and_unknown_ids_fail():
    data = {"t": torch.arange(6.0).reshape(2, 3), "n": [1, 2.5, "x", None], "dtype": torch.float16}
    loaded = _load(pickle.dumps(data, protocol=4))
    assert torch.equal(loaded["t"], data["t"]) and loaded["n"] == data["n"] and loaded["dtype"] is torch.float16

    class Tagged:
        def __init__(self):
            self._persistent_id = "Module:elsewhere"

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return getattr(obj, "_persistent_id", None)

    buffer = io.BytesIO()
    Pickler(buffer, protocol=4).dump([Tagged()])
    with pytest.raises(BadRequestError, match="Module:elsewhere"):
        _load(buffer.getvalue())


def test_audit_guard_refuses_files_and_processes_only_while_armed(tmp_path):
    guard = AuditGuard.install()
    target = tmp_path / "x.txt"
    with guard:
        with pytest.raises(UnsafeRequestError, match="file, network and process access"):
            open(target, "w")
        with pytest.raises(UnsafeRequestError):
            os.system("true")
        with pytest.raises(UnsafeRequestError):
            __import__("sqlite3")  # not loaded yet: refused
        # a lazy import inside an allowed package reads module code only: allowed, whatever was imported before
        sys.modules.pop("torch._subclasses.schema_check_mode", None)
        importlib.import_module("torch._subclasses.schema_check_mode")
        for data in (Path(torch.__file__).parent / "version.py.txt", Path(torch.__file__).with_suffix(".pyi")):
            with pytest.raises(UnsafeRequestError):
                open(data)
        with pytest.raises(UnsafeRequestError):
            open(Path(torch.__file__), "a")  # module code, but written
    assert not target.exists()
    open(target, "w").close()  # disarmed: the gateway itself works normally
    assert target.exists()


def test_requests_see_modules_without_file_and_global_state_functions():
    from ndif_compat.guardrails import SAFE_BUILTINS
    view = SAFE_BUILTINS["__import__"]("torch")
    assert view.stack is torch.stack and view.Tensor is torch.Tensor
    for name in ("save", "load", "from_file", "hub", "compile", "set_num_threads", "utils"):
        assert name not in vars(view), name
    assert _load(cloudpickle.dumps(torch)) is view


def test_parameter_seal_names_written_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    seal = ParameterSeal(model)
    with torch.no_grad():
        model(torch.ones(1, 3))
    assert seal.changed() == []
    with torch.no_grad():
        model[0].weight.detach().mul_(0)
    assert seal.changed() == ["0.weight"]
    model[1].bias = torch.nn.Parameter(torch.ones(3))
    assert seal.changed() == ["0.weight", "1.bias"]


@pytest.mark.parametrize("source, cuts", [
    ("h = lm.model.layers[8].output\nlm.model.layers[20].output = h", {9, 21}),
    ("x = lm.model.layers[3].input.save()", {3}),
    ("y = lm.model.layers[-1].output.save()", {30}),
    ("z = lm.model.layers[4].mlp.output.save()", {4, 5}),
    ("p = lm.lm_head.output.save()", set()),
    ("for layer in lm.model.layers:\n    layer.output.save()", None),
    ("i = 3\nlm.model.layers[i].output.save()", None),
    ("lm.model.layers[2:4]", None),
])
def test_touched_layers_bounds_where_hidden_states_must_cross(source, cuts):
    assert touched_layers([source], 30) == cuts


def test_stack_segments_follow_the_cuts():
    stack = SwarmStack(calls=None, num_layers=30)
    stack.cut_at({9, 21})
    assert stack.starts == {0: 9, 9: 21, 21: 30}
    stack.cut_at(None)
    assert stack.starts == {i: i + 1 for i in range(30)}


def test_model_keys_name_a_served_model():
    key = 'nnsight.modeling.transformers.TransformersModel:{"repo_id": "smollm2-135m", "revision": null}'
    assert check_model(key, ("smollm2-135m",)) == "smollm2-135m"
    with pytest.raises(ModelNotServedError, match="TransformersModel\\('smollm2-135m'"):
        check_model(key.replace("smollm2-135m", "gpt2"), ("smollm2-135m",))
    with pytest.raises(BadRequestError):
        check_model("os.system:{}", ("smollm2-135m",))


def test_api_keys_and_rate_limits():
    ring = KeyRing(frozenset({"k1"}), rate_per_minute=60.0, burst=2)
    with pytest.raises(UnauthorizedError, match="needs an API key"):
        ring.identify(None, "1.2.3.4")
    with pytest.raises(UnauthorizedError, match="unknown API key"):
        ring.identify("nope", "1.2.3.4")
    who = ring.identify("k1", "1.2.3.4")
    ring.charge(who)
    ring.charge(who)
    with pytest.raises(RateLimitedError, match="retry in"):
        ring.charge(who)
    open_ring = KeyRing(frozenset(), rate_per_minute=60.0, burst=1)
    open_ring.charge(open_ring.identify(None, "a"))
    open_ring.charge(open_ring.identify(None, "b"))  # buckets are per client without keys


def test_api_keys_from_the_environment_and_flags_are_stored_stripped(monkeypatch, tmp_path):
    import swarm.checkpoint

    from ndif_compat.cli import _parser, build_config

    monkeypatch.setattr(swarm.checkpoint, "resolve_checkpoint", lambda model, cache_dir: tmp_path)
    args = _parser().parse_args(["serve", "--local", "smollm2-135m", "--api-key", " k3\n"])
    config = build_config(args, " k1 , k2\n,, ")
    assert config.api_keys == frozenset({"k1", "k2", "k3"})
    KeyRing(config.api_keys, rate_per_minute=60.0, burst=1).identify("k2", "1.2.3.4")


class _ShippedEdit:
    """Pickles as nnsight's ``Mediator`` with ``state`` (what an ``lm.edit()``ed model carries in a request)."""

    def __init__(self, state):
        self.state = state

    def __reduce_ex__(self, protocol):
        import copyreg

        from nnsight.intervention.interleaver import Mediator
        return copyreg._reconstructor, (Mediator, object, None), self.state


def test_edit_blocks_are_source_checked_and_run_with_the_restricted_builtins():
    from ndif_compat.guardrails import SAFE_BUILTINS, SHIPPED_EDITS, SHIPPED_SOURCES

    edits, sources = [], []
    SHIPPED_EDITS.set(edits), SHIPPED_SOURCES.set(sources)
    source = "edited.model.layers[2].output[:] = 0\n"
    edit = _load(pickle.dumps(_ShippedEdit({"reduced": (source, {}, {"edited": 1}), "copy": True,
                                            "presaved": set()}), protocol=4))
    assert edit.source == source and edits == [source] and sources == [source]
    assert edit.glbls["__builtins__"] is SAFE_BUILTINS and dict.__getitem__(edit.lcls, "__builtins__") is SAFE_BUILTINS
    with pytest.raises(UnsafeRequestError, match="'open' is not allowed"):
        _load(pickle.dumps(_ShippedEdit({"reduced": ("secret = open('/etc/passwd')\n", {}, {}), "copy": True,
                                         "presaved": set()}), protocol=4))
    for state in ({"reduced": "x = 1"}, {"reduced": ("x = 1\n", {}, {}), "code": b"\x00"}, ["not", "a", "dict"]):
        with pytest.raises(UnsafeRequestError, match="not an nnsight 0.8 stored block"):
            _load(pickle.dumps(_ShippedEdit(state), protocol=4))
