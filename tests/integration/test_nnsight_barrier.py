"""``tracer.barrier(n)`` as in nnsight 0.8.1's cross-prompt patterns: one invoke reads a value above the barrier, the
other writes it below its own (the embeddings of a prompt generated from a prompt of placeholders; a layer's last
position patched across prompts). Values (and per-invoke ``tracer.result`` rows) equal real nnsight run locally; a
barrier whose round not every invoke reaches is refused, as nnsight refuses it."""

from __future__ import annotations

import warnings

import nnsight
import pytest
import torch

from hybrid.errors import TraceError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

A, B = "The Eiffel Tower is located in the city of", "_ _ _ _ _ _ _ _ _ _"   # 10 tokens each
PATCH = "Big Ben is located in the city of the"


def _options(lm, placement, **kwargs):
    return {**kwargs, **({"do_sample": False} if isinstance(lm, nnsight.LanguageModel) else {"placement": placement})}


def embeddings_handed_over(lm, placement=None):
    """nnsight's barrier example: the placeholder prompt generates from the first prompt's embeddings."""
    with lm.generate(**_options(lm, placement, max_new_tokens=3)) as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(A):
            embeddings = lm.model.embed_tokens.output
            barrier()
            first = tracer.result.save()
        with tracer.invoke(B):
            barrier()
            lm.model.embed_tokens.output = embeddings
            second = tracer.result.save()
    return first, second


def patched_across_prompts(lm, placement=None):
    """Activation patching: layer 8's last position of one prompt replaces another's."""
    with lm.trace(**({} if isinstance(lm, nnsight.LanguageModel) else {"placement": placement})) as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(A):
            h = lm.model.layers[8].output[:, -1]
            barrier()
        with tracer.invoke(PATCH):
            barrier()
            lm.model.layers[8].output[:, -1] = h
            probs = lm.lm_head.output[:, -1].softmax(-1).save()
    return (probs,)


_REFERENCE: dict = {}


@pytest.mark.parametrize("placement", ["local", "hybrid"])
@pytest.mark.parametrize("experiment", [embeddings_handed_over, patched_across_prompts], ids=lambda f: f.__name__)
def test_barrier_equals_nnsight(experiment, placement, lm_for, ns):
    if experiment not in _REFERENCE:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _REFERENCE[experiment] = experiment(ns)
    got = experiment(lm_for(placement), placement)
    for g, w in zip(got, _REFERENCE[experiment]):
        g, w = g.detach(), w.detach()
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape)
        assert (g.double() - w.double()).abs().max().item() <= 1e-5, experiment.__name__


def test_a_round_not_every_invoke_reaches_is_refused(local_lm, ns):
    def run(lm, placement=None):
        with lm.trace(**({} if isinstance(lm, nnsight.LanguageModel) else {"placement": placement})) as tracer:
            barrier = tracer.barrier(3)
            with tracer.invoke(A):
                h = lm.model.layers[2].output
                barrier()
            with tracer.invoke(B):
                barrier()
                lm.model.layers[2].output = h
                out = lm.lm_head.output.save()
        return out

    with pytest.raises(ValueError, match="never reached by every block"):
        run(ns)
    with pytest.raises(TraceError, match="never reached by every invoke") as refused:
        run(local_lm, "local")
    assert "round 1 was reached by 2" in str(refused.value)
