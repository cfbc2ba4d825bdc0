"""A typo in a module path is refused before a gateway request runs, with the path, line and what is valid
(ndif_compat.module_paths), on nnsight's own envoys; and the hybrid tracer's refusals of such paths are recognised by
the translation, which then reports them instead of falling back to nnsight's opaque error."""

from __future__ import annotations

import nnsight
import pytest
import torch
from transformers import AutoModelForCausalLM

from hybrid import LanguageModel
from ndif_compat.errors import UnknownModuleError
from ndif_compat.module_paths import check_module_paths
from ndif_compat.translate import _MISSING_MODULE
from tests.tiny_checkpoints import tiny_config


@pytest.fixture(scope="module")
def lm():
    """nnsight's envoys over a tiny 4-layer Llama (what a request's ``lm`` is on the gateway)."""
    return nnsight.NNsight(AutoModelForCausalLM.from_config(tiny_config("llama")))


VALID = """
h = lm.model.layers[3].output.save()
x = lm.model.layers[-4].mlp.down_proj.output[:, -1]
w = lm.model.layers[0].self_attn.o_proj.weight
y = lm.lm_head.output.softmax(-1)
for i in range(9):
    lm.model.layers[i].output                  # a computed index: left to the execution
layers = lm.model.layers
layers[9].output                               # a name the block binds itself: left to the execution
c = lm.config.hidden_size
"""


def test_valid_paths_pass(lm):
    check_module_paths([VALID], {"lm": lm, "torch": torch})


@pytest.mark.parametrize("code, message", [
    ("h = lm.model.layers[4].output.save()", "line 1: lm.model.layers[4] does not exist: lm.model.layers has 4 "
                                             "entries (indices 0 to 3, or -4 to -1)"),
    ("\n\nlm.model.layers[-5]", "line 3: lm.model.layers[-5] does not exist"),
    ("lm.model.layerz[0].output", "lm.model.layerz does not exist: lm.model (LlamaModel) has no submodule or "
                                  "attribute 'layerz'; its submodules: embed_tokens, layers, norm, rotary_emb"),
    ("lm.model.layers[1].mlpp.output", "lm.model.layers[1].mlpp does not exist"),
])
def test_typos_are_refused_with_the_path_and_what_is_valid(lm, code, message):
    with pytest.raises(UnknownModuleError) as e:
        check_module_paths(["x = 1", code], {"lm": lm})
    assert message in str(e.value)


def test_a_sub_envoy_bound_by_the_client_is_a_root_too(lm):
    with pytest.raises(UnknownModuleError, match=r"layers\[7\] does not exist"):
        check_module_paths(["layers[7].output"], {"layers": lm.model.layers})


def test_the_translation_recognises_the_hybrid_tracers_refusals(tiny_checkpoint_factory):
    hybrid_lm = LanguageModel(str(tiny_checkpoint_factory("llama")))
    for reach in (lambda: hybrid_lm.model.layers[4], lambda: hybrid_lm.model.layerz, lambda: hybrid_lm.foo):
        with pytest.raises((AttributeError, IndexError)) as e:
            reach()
        assert _MISSING_MODULE.match(str(e.value)), str(e.value)


def test_a_stand_in_layer_is_checked_against_the_layer_it_stands_for():
    """The swarm backend's decoder layers hold no submodules; their ``module_tree`` (the real layer on the meta
    device) says which exist."""
    from ndif_compat.swarm_layers import SwarmLayer

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    model.model.layers = torch.nn.ModuleList([SwarmLayer(i, None, model.model.layers[i]) for i in range(4)])
    lm = nnsight.NNsight(model)
    check_module_paths(["lm.model.layers[2].mlp.down_proj.output"], {"lm": lm})
    with pytest.raises(UnknownModuleError, match=r"lm.model.layers\[2\].mlpp does not exist.*self_attn, mlp"):
        check_module_paths(["lm.model.layers[2].mlpp.output"], {"lm": lm})
