"""Sessions as in nnsight 0.8.1: a later trace of one ``lm.session()`` operates on an earlier trace's values (``h[:]``,
``h * 2``, a reduction, a patch mixing it with the later trace's own value), not only assigns them. Values equal real
nnsight run locally (fp32, max abs diff <= 1e-5) in every pushed and local placement; in ``hybrid`` the earlier
values stay on the node that computed them (``session.kept``) instead of crossing the client's link."""

from __future__ import annotations

import warnings

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

A, B = "The Eiffel Tower is located in the city of", "Big Ben is located in the city of"
TOL = 1e-5


def session_ops(lm, **placement):
    """Layer 3's and 8's outputs of prompt A used in a trace of prompt B: copied, doubled, normed, mixed in."""
    with lm.session() as session:
        with lm.trace(A, **placement):
            v = lm.model.layers[3].output[:, -1]
            h = lm.model.layers[8].output
        with lm.trace(B, **placement):
            copy = h[:].save()
            doubled = (h * 2)[:, -1, :5].save()
            lm.model.layers[8].output[:, -1] = h[:, -1] * 0.5 + lm.model.layers[8].output[:, -1] * 0.5
            lm.model.layers[10].output[:, -1] += v.norm() * 0.01
            out = lm.lm_head.output[:, -1].softmax(-1).save()
    return (copy, doubled, out), session


_REFERENCE: list = []


@pytest.mark.parametrize("placement", ["local", "hybrid", "centralized"])
def test_later_trace_operates_on_earlier_values(placement, lm_for, ns):
    if not _REFERENCE:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _REFERENCE.append(session_ops(ns)[0])
    got, session = session_ops(lm_for(placement), placement=placement)
    for g, w, what in zip(got, _REFERENCE[0], ("h[:]", "(h * 2)[:, -1, :5]", "softmax after the patch")):
        g, w = g.detach(), w.detach()
        assert g.shape == w.shape, f"{what}: {tuple(g.shape)} != {tuple(w.shape)}"
        assert (g - w).abs().max().item() <= TOL, what
    if placement == "hybrid":  # layers 3 and 8 are computed on the node that uses them later: neither came back
        assert len(session.kept) == 2 and {trace for trace, _ in session.kept} == {0}, session.kept
        assert session.traces[0].stats["client_bytes_received"] < 64 * 1024, session.traces[0].stats
