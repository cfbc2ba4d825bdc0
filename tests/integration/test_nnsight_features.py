"""docs/nnsight_features.md stays true: every row's example runs as its cells say (``✓`` runs; ``✗ Error`` raises that
error). The examples are in tests/integration/nnsight_feature_examples.py; their values are compared with real
nnsight, placement by placement, by the parity tests the document names.

Which cells run (for the test-time budget): every ``✗`` cell (a refusal is cheap and each placement refuses on its
own code path), and the ``✓`` cells of the two execution paths a graph can take over a swarm: ``hybrid`` (pushed
to the nodes) and ``swarm`` (Petals-style, on the client). ``local`` and ``centralized`` run the same merged graph
as ``hybrid`` (in this process, or on one node); their ``✓`` cells are backed by the parity tests."""

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


def _table(columns: dict[str, str]) -> dict[str, dict[str, str]]:
    """``{example: {key: cell}}`` from the document's table, for ``columns`` = ``{column header: key}``."""
    rows: dict[str, dict[str, str]] = {}
    header: list[str] | None = None
    for line in DOC.read_text().splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            header = cells
            continue
        rows[cells[header.index("example")].strip("`")] = {k: cells[header.index(c)] for c, k in columns.items()}
    return rows


def table() -> dict[str, dict[str, str]]:
    """``{example: {placement: cell}}`` from the document's table."""
    return _table({p: p for p in PLACEMENTS})


ROWS = table()


GATEWAYS = {"gateway local": "local", "gateway swarm": "swarm"}


def gateway_cells() -> dict[str, dict[str, str]]:
    """``{example: {"local" | "swarm": cell}}`` of the gateway columns."""
    return _table(GATEWAYS)


def test_gateway_cells_say_what_their_tests_check():
    """A gateway cell names the test backing it (or says ``untested``); a ``[p]`` cell reads as
    tests/integration/test_gateway_parity.py requires that row's experiment to run on that backend (pushed, on the
    gateway, on the client, refused)."""
    from tests.integration import test_gateway_parity as parity

    for example, cells in gateway_cells().items():
        for backend, cell in cells.items():
            assert cell == "untested" or re.search(r"\[(g|p|gr|d)\]$", cell), (example, backend, cell)
            if cell.endswith("[p]"):
                experiment = parity.ROWS.get(example)
                assert experiment is not None, f"{example}: a [p] cell without an experiment in test_gateway_parity"
                said = cell.removesuffix("[p]").strip()
                assert said in parity.expected_cell(experiment, backend), (example, backend, cell)


def test_every_example_has_a_row_and_back():
    assert set(ROWS) == set(EXAMPLES)


def _error(name: str) -> type[BaseException]:
    found = getattr(hybrid.errors, name, None) or getattr(builtins, name, None)
    assert isinstance(found, type) and issubclass(found, BaseException), f"unknown error {name!r} in the table"
    return found


RUN_WHEN_SUPPORTED = ("hybrid", "swarm")
CELLS = [(example, placement) for example, cells in ROWS.items() for placement in PLACEMENTS
         if cells[placement] != "✓" or placement in RUN_WHEN_SUPPORTED]


def test_every_row_runs_somewhere():
    """A row whose only ``✓`` cells are ones this file does not run would be unbacked here."""
    for example, cells in ROWS.items():
        supported = [p for p in PLACEMENTS if cells[p] == "✓"]
        assert not supported or set(supported) & set(RUN_WHEN_SUPPORTED), example


@pytest.mark.parametrize("example,placement", CELLS)
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
