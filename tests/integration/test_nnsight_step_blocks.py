"""nnsight's deprecated block forms inside ``lm.generate``: ``with tracer.all():`` and ``with tracer.iter[a:b]:`` run
their body once per selected step (a setter and a read per step), the block's variables hold the last step's values,
and the trace's block goes on after it; a selection of no step the generation makes skips the body. Values equal real
nnsight 0.8.1 run locally (greedy, fp32, max abs diff <= 1e-5) in the local and hybrid placements."""

from __future__ import annotations

import warnings

import nnsight
import pytest
import torch

import hybrid

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PROMPTS = ["The Eiffel Tower is located in the city of", "Big Ben is in"]
TOL = 1e-5


def _nnsight(lm) -> bool:
    return isinstance(lm, nnsight.LanguageModel)


def options(lm, placement, **kwargs):
    """``lm.generate`` keywords: greedy for nnsight, the placement for ours (nnsight reads the caller's ``with``)."""
    return {**kwargs, **({"do_sample": False} if _nnsight(lm) else {"placement": placement})}


def block_all(lm, placement=None):
    """Every step: add to layer 5's last position, read layer 6 and the top probability; the block's `last` is the
    last step's read; a saved list assigned after the block is bound."""
    save = nnsight.save if _nnsight(lm) else hybrid.save
    with lm.generate(PROMPTS, **options(lm, placement, max_new_tokens=3)) as tracer:
        top = save(list())
        with tracer.all():
            lm.model.layers[5].output[:, -1] += 0.5
            last = lm.model.layers[6].output[:, -1, :4].save()
            top.append(lm.lm_head.output[:, -1].softmax(-1).max(-1).values)
        after = save([len(top)])
    return top, last, after


def block_iter(lm, placement=None):
    """Steps 1 and 2 of 4 scaled at layer 5; step 0 read before; a block of steps never made is skipped."""
    save = nnsight.save if _nnsight(lm) else hybrid.save
    with lm.generate(PROMPTS, **options(lm, placement, max_new_tokens=4)) as tracer:
        seen = save(list())
        with tracer.iter[0]:
            seen.append(lm.model.layers[2].output[:, -1, :3])
        with tracer.iter[1:3]:
            lm.model.layers[5].output[:, -1] *= 1.5
            seen.append(lm.lm_head.output[:, -1].argmax(-1))
        ids = tracer.result.save()
    return seen, ids


def block_none(lm, placement=None):
    save = nnsight.save if _nnsight(lm) else hybrid.save
    with lm.generate(PROMPTS, **options(lm, placement, max_new_tokens=2)) as tracer:
        seen = save(list())
        with tracer.iter[0]:
            seen.append(lm.model.layers[2].output[:, -1, :3])
        with tracer.iter[7:9]:      # the generation makes steps 0 and 1 only: nnsight never runs this body's reads
            seen.append(lm.lm_head.output[:, -1].argmax(-1))
    return seen


def same(got, want, what):
    if isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), f"{what}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            same(g, w, f"{what}[{i}]")
        return
    if not isinstance(want, torch.Tensor):
        assert got == want, what
        return
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape} {got.dtype} != {want.shape}"
    assert (got.double() - want.double()).abs().max().item() <= TOL, what


_REFERENCE: dict = {}


@pytest.mark.parametrize("placement", ["local", "hybrid"])
@pytest.mark.parametrize("experiment", [block_all, block_iter, block_none], ids=lambda f: f.__name__)
def test_block_forms_equal_nnsight(experiment, placement, lm_for, ns):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if experiment not in _REFERENCE:
            _REFERENCE[experiment] = experiment(ns)
        want = _REFERENCE[experiment]
        got = experiment(lm_for(placement), placement)
    same(got, want, experiment.__name__)


def test_block_form_warns_and_runs_each_step_once(local_lm):
    calls = []
    with pytest.warns(DeprecationWarning, match="block form is deprecated"):
        with local_lm.generate(PROMPTS[0], max_new_tokens=3, placement="local") as tracer:
            with tracer.iter[1:]:
                calls.append(tracer.call)
    assert calls == [1, 2]
