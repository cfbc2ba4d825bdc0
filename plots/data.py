"""What a figure needs from a run: its records (read from result files only), filtered to one workload and one
link per placement, and the outcome of drawing (paths written, or why not)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import BenchConfigError
from bench.schema import read_results

from .style import ORDER, link_text


@dataclass
class FigureResult:
    """Outcome of one figure function."""

    name: str
    """File stem, e.g. ``"fig6c_petals_vs_ours"``."""
    paths: list[Path] = field(default_factory=list)
    """PNG and PDF written; empty when the figure was skipped."""
    notes: list[str] = field(default_factory=list)
    """Why the figure was skipped or what it leaves out (absent series, pooled data); go into summary.md."""
    text: list[str] = field(default_factory=list)
    """Every text drawn on the figure (titles, legend, "n/a" slots, caption): what a reader of the PNG sees."""

    @property
    def skipped(self) -> bool:
        return not self.paths


def load(source) -> list[dict]:
    """Records of one run, from its directory (validated by :func:`bench.schema.read_results`) or already read.

    A figure draws one run: pooling several (``swarm-bench plot results/``) would mix links, models and
    machines in one median, so that is refused with the run directories to choose from.

    Raises:
        bench.errors.ResultsNotFoundError, bench.errors.SchemaError: from ``read_results``.
        bench.errors.BenchConfigError: the records come from more than one run.
    """
    if isinstance(source, (str, Path)):
        root = Path(source)
        folders = sorted({p.parent for p in root.rglob("*.jsonl")}) if root.is_dir() else []
        if len(folders) > 1:
            raise BenchConfigError(f"{root} holds result files in {len(folders)} directories "
                                   f"({_listing([f'{f}/' for f in folders])}); a figure draws one run: "
                                   f"swarm-bench plot {folders[-1]}/")
        records = read_results(root)
    else:
        records = list(source)
    runs = sorted({r["run_id"] for r in records})
    if len(runs) > 1:
        raise BenchConfigError(f"the records come from {len(runs)} runs ({_listing(runs)}); a figure draws one "
                               "run: plot one results/<run-id>/ directory")
    return records


def _listing(names: list[str], most: int = 6) -> str:
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def _link_key(record: dict) -> str:
    return json.dumps(record["link"], sort_keys=True)


def select(records: list[dict], workloads: str | tuple[str, ...], notes: list[str] | None = None) -> list[dict]:
    """Records of ``workloads`` with, per (workload, placement), only the client link most of them used.

    A run normally has one link per placement (``hpc`` none, the remote ones the shaped link); when a placement
    was measured under several, pooling them would mix different experiments, so the others are dropped and a
    line saying so is appended to ``notes``.
    """
    workloads = (workloads,) if isinstance(workloads, str) else workloads
    chosen = [r for r in records if r["workload"] in workloads]
    counts: dict[tuple, Counter] = {}
    for r in chosen:
        counts.setdefault((r["workload"], r["placement"]), Counter())[_link_key(r)] += 1
    keep = {}
    for key, counter in counts.items():
        keep[key] = counter.most_common(1)[0][0]
        if len(counter) > 1 and notes is not None:
            dropped = [link_text(json.loads(k)) for k in counter if k != keep[key]]
            notes.append(f"{key[0]}/{key[1]}: kept link {link_text(json.loads(keep[key]))}, "
                         f"left out {', '.join(dropped)}")
    return [r for r in chosen if _link_key(r) == keep[(r["workload"], r["placement"])]]


def placements_in(records: list[dict]) -> list[str]:
    """Placements present in ``records``, in the house order (unknown ones last)."""
    present = {r["placement"] for r in records}
    return [p for p in ORDER if p in present] + sorted(present - set(ORDER))


def missing_note(records: list[dict], wanted: tuple[str, ...], what: str) -> list[str]:
    """A note per placement of ``wanted`` absent from ``records`` (``"no petals rows for plain inference"``)."""
    present = {r["placement"] for r in records if r["ok"] and not r["warmup"]}
    return [f"no {p} rows for {what}" for p in wanted if p not in present]


def links_seen(records: list[dict]) -> list[str]:
    """Every client link of the run, as text, most used first."""
    counter = Counter(_link_key(r) for r in records)
    return [link_text(json.loads(k)) for k, _ in counter.most_common()]


def shaped_link(records: list[dict]) -> str | None:
    """The most used shaped client link of ``records``, as text (for a figure's title); None when none is shaped
    (unshaped rows, ``link`` null, are left out so that ``hpc`` or loopback rows never name the link)."""
    links = links_seen([r for r in records if r["link"] is not None])
    return links[0] if links else None
