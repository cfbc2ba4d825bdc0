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
    return _first_statement_after(ast.parse(source), line)[0]


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


def test_a_loop_ending_a_function_leaves_the_callers_next_use_to_check():
    source = "def steps(tracer):\n    for step in tracer.all():\n        pass\n"
    assert _first_statement_after(ast.parse(source), 2) == (None, False)
    source = "with lm.generate(p) as tracer:\n    for step in tracer.all():\n        pass\n"
    assert _first_statement_after(ast.parse(source), 2) == (None, True)


def test_without_source_the_next_use_after_an_open_loop_is_refused():
    """Code without readable source (``exec`` of a string): what follows the loop is refused when it uses the trace."""
    import torch
    import transformers

    import hybrid.tracing
    from hybrid.errors import TraceError
    from hybrid.tracing import ModelSkeleton, Tracer

    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=32)
    skeleton = ModelSkeleton(config)
    tokenize = lambda rows: (torch.tensor(rows), torch.ones(len(rows), len(rows[0]), dtype=torch.long))
    tracer = Tracer(skeleton, tokenize, lambda *a: {}, [[1, 2, 3]], steps=2, generation=True)
    root = hybrid.tracing.root_envoy(skeleton)
    code = ("with tracer:\n"
            "    for step in tracer.all():\n"
            "        root.model.layers[0].output\n"
            "    root.model.layers[1].output\n")
    with pytest.raises(TraceError, match=r"model.layers.1.output follows a loop over every remaining"):
        exec(compile(code, "<no source>", "exec"), {"tracer": tracer, "root": root})
