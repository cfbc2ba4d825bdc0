"""ndif_compat.translate's source rewrite: nnsight's ``.save()`` on any object and the deprecated ``with tracer.all():``
become our tracer's spelling, and blocks whose nnsight semantics our tracer would not keep (statements after an open
step loop, which nnsight never runs) are refused before anything runs. The end-to-end equality with local nnsight
is in tests/integration/test_gateway.py."""

from __future__ import annotations

import ast
import textwrap

import pytest

from ndif_compat.translate import SAVE, NotTranslatable, rewrite


def _source(code) -> str:
    """The rewritten block, as source (decompiled from the AST the rewrite compiles)."""
    from ndif_compat.translate import _Rewrite
    return ast.unparse(ast.fix_missing_locations(_Rewrite().visit(ast.parse(textwrap.dedent(code)))))


def test_save_on_any_object_calls_the_hybrid_save():
    out = _source("""
        steps = list().save()
        h = lm.model.layers[3].output[:, -1].save()
        ids = tracer.result.save()
        keep = h.save(x)           # not nnsight's save(): left alone
    """)
    assert f"steps = {SAVE}(list())" in out
    assert f"h = {SAVE}(lm.model.layers[3].output[:, -1])" in out
    assert f"ids = {SAVE}(tracer.result)" in out
    assert "keep = h.save(x)" in out


def test_with_step_selections_become_the_loops_they_mean():
    out = _source("""
        with tracer.all():
            a.append(lm.lm_head.output)
        with tracer.iter[0:2] as step:
            b.append(step)
        with lm.trace("x"):
            pass
    """)
    assert "for _step in tracer.all():" in out
    assert "for step in tracer.iter[0:2]:" in out
    assert "with lm.trace('x'):" in out


def test_the_rewritten_block_runs_the_loop_body_per_step():
    class Tracer:
        def all(self):
            return iter(range(3))

    seen: list = []
    scope = {"tracer": Tracer(), "seen": seen, SAVE: lambda v: v}
    exec(rewrite("out = [].save()\nwith tracer.all():\n    seen.append(1)\n", "<t>"), scope)
    assert seen == [1, 1, 1] and scope["out"] == []


@pytest.mark.parametrize("code", [
    """
    with tracer.all():
        h = lm.model.layers[2].output.save()
    ids = tracer.result.save()
    """,
    """
    for step in tracer.iter[1:]:
        h = lm.model.layers[2].output.save()
    ids = tracer.result.save()
    """,
    """
    if True:
        for step in tracer.all():
            h = lm.model.layers[2].output.save()
    ids = tracer.result.save()
    """,
])
def test_statements_after_an_open_step_loop_are_refused(code):
    with pytest.raises(NotTranslatable, match="follows an open tracer.all"):
        rewrite(textwrap.dedent(code), "<t>")


@pytest.mark.parametrize("code", [
    """
    for step in tracer.iter[0:2]:          # bounded: nnsight runs what follows
        h = lm.model.layers[2].output.save()
    ids = tracer.result.save()
    """,
    """
    with tracer.all():                     # open, and last in its block
        h = lm.model.layers[2].output.save()
    """,
    """
    with lm.generate("a", max_new_tokens=2) as tracer:   # a session: the open loop ends its own trace only
        for step in tracer.all():
            h = lm.model.layers[2].output.save()
    with lm.trace("b"):
        out = lm.lm_head.output.save()
    """,
])
def test_blocks_nnsight_runs_whole_are_accepted(code):
    compiled = rewrite(textwrap.dedent(code), "<t>")
    assert compiled.co_filename == "<t>"
