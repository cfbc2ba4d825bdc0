"""Which statement follows a loop over every remaining generation step (nnsight 0.8.1 never runs it, so the tracer
refuses it): the block that ends with the loop is the innermost ``with ....trace/generate/invoke(...)`` or function."""

from __future__ import annotations

import ast
import textwrap

import pytest

from hybrid.steps import _first_statement_after


def after(source: str) -> int | None:
    source = textwrap.dedent(source)
    line = next(i for i, text in enumerate(source.splitlines(), 1) if "tracer.all()" in text)
    return _first_statement_after(ast.parse(source), line)


@pytest.mark.parametrize("source,want", [
    ("""
     with lm.generate(p) as tracer:
         for step in tracer.all():
             x = 1
         ids = tracer.result.save()
     print(ids)
     """, 5),
    ("""
     with lm.generate(p) as tracer:
         for step in tracer.all():
             x = 1
     print(x)
     """, None),
    ("""
     with lm.generate() as tracer:
         with tracer.invoke(p):
             if True:
                 for step in tracer.all():
                     x = 1
             y = 2
         with tracer.invoke():
             ids = tracer.result.save()
     """, 7),
    ("""
     with lm.generate() as tracer:
         with tracer.invoke(p):
             for step in tracer.all():
                 x = 1
         with tracer.invoke():
             ids = tracer.result.save()
     """, None),
    ("""
     def steps(lm, tracer):
         for step in tracer.all():
             x = 1
         return x
     """, 5),
])
def test_the_first_statement_after_the_loop_in_its_block(source, want):
    assert after(source) == want
