"""docs/nnsight_features.md stays true: every row's example runs in each placement as its cell says (``✓`` runs;
``✗ Error`` raises that error). The examples are in tests/integration/nnsight_feature_examples.py; their values are
compared with real nnsight by the parity tests the document names."""

from __future__ import annotations

import builtins
import re
import warnings
from pathlib import Path

import pytest

import hybrid.errors
from tests.integration.nnsight_feature_examples import EXAMPLES

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

DOC = Path(__file__).resolve().parents[2] / "docs" / "nnsight_features.md"
PLACEMENTS = ("local", "hybrid", "centralized", "swarm")


def table() -> dict[str, dict[str, str]]:
    """``{example: {placement: cell}}`` from the document's table."""
    rows: dict[str, dict[str, str]] = {}
    header: list[str] | None = None
    for line in DOC.read_text().splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            header = cells
            continue
        example = cells[header.index("example")].strip("`")
        rows[example] = {p: cells[header.index(p)] for p in PLACEMENTS}
    return rows


ROWS = table()


def test_every_example_has_a_row_and_back():
    assert set(ROWS) == set(EXAMPLES)


def _error(name: str) -> type[BaseException]:
    found = getattr(hybrid.errors, name, None) or getattr(builtins, name, None)
    assert isinstance(found, type) and issubclass(found, BaseException), f"unknown error {name!r} in the table"
    return found


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("example", list(ROWS))
def test_row(example, placement, lm_for):
    cell = ROWS[example][placement]
    run = EXAMPLES[example]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cell == "✓":
            run(lm_for(placement), placement)
            return
        match = re.fullmatch(r"✗ (\w+)", cell)
        assert match, f"cell {cell!r} of row {example} is neither ✓ nor ✗ Error"
        with pytest.raises(_error(match.group(1))):
            run(lm_for(placement), placement)
