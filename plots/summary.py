"""``summary.md``: the run's context, the headline ratios, the concurrency table, every measurement's median with
its 95 % CI, and which figures were drawn or skipped (and why)."""

from __future__ import annotations

import logging
from pathlib import Path

from bench.schema import SCHEMA, WORKLOADS
from bench.stats import Summary, client_bytes, summarize

from .data import FigureResult, links_seen
from .headline import Ratio, concurrency_rows, headline_ratios
from .style import ORDER, human_bytes, human_count

logger = logging.getLogger(__name__)

STATS_NOTE = ("Medians over the repetitions of each group after dropping warm-ups and failed repetitions; "
              "[brackets] are the distribution-free 95 % CI of the median (order statistics, binomial); "
              "ratios are ratios of medians. † marks fewer than 6 repetitions: the interval is then [min, max] and "
              "covers less than 95 %.")


def _value(x: float, unit: str) -> str:
    return human_bytes(x) if unit == "B" else f"{x:.4g} s"


def _with_ci(s: Summary | None, unit: str) -> str:
    if s is None:
        return "—"
    short = "†" if s.ci_coverage < 0.95 else ""
    return f"{_value(s.median, unit)} [{_value(s.ci_low, unit)}, {_value(s.ci_high, unit)}]{short} (n={s.n})"


def format_ratio(ratio: Ratio) -> str:
    """``"3.42×"``, or ``"n/a"`` when the ratio has no data."""
    return "n/a" if ratio.value is None else f"{ratio.value:.2f}×"


def _context(records: list[dict]) -> list[str]:
    first = records[0]
    commits = sorted({r["git_commit"] for r in records})
    versions = ", ".join(f"{k} {v}" for k, v in first["versions"].items())
    machine = first["machine"]
    failed = sum(not r["ok"] for r in records)
    warmups = sum(r["warmup"] for r in records)
    return [
        f"- run: {', '.join(sorted({r['run_id'] for r in records}))} ({len(records)} records, schema {SCHEMA}; "
        f"{warmups} warm-up and {failed} failed repetitions dropped from the statistics)",
        f"- git commit: {', '.join(commits)}",
        f"- client links: {'; '.join(links_seen(records))}",
        f"- versions: {versions}",
        f"- machine: {machine['platform']}, {machine['cpus']} CPUs, {human_bytes(machine['ram_bytes'])} RAM",
    ]


def _headline(ratios: list[Ratio]) -> list[str]:
    lines = ["| comparison | ratio | numerator: median [95% CI] | denominator: median [95% CI] |",
             "|---|---|---|---|"]
    for ratio in ratios:
        shown = format_ratio(ratio) if ratio.value is not None else f"n/a ({ratio.missing})"
        lines.append(f"| {ratio.name} | {shown} | {_with_ci(ratio.numerator, ratio.unit)} | "
                     f"{_with_ci(ratio.denominator, ratio.unit)} |")
    return lines


def _concurrency(records: list[dict], notes: list[str]) -> list[str]:
    rows = concurrency_rows(records, notes)
    if not rows:
        return ["No concurrency rows in this run."]
    lines = ["| placement | users | response median (s) | quartiles (s) | throughput (req/s) [95% CI] |",
             "|---|---|---|---|---|"]
    for row in rows:
        tp = row.throughput
        shown = "—" if tp is None else f"{tp.median:.3g} [{tp.ci_low:.3g}, {tp.ci_high:.3g}]"
        lines.append(f"| {row.placement} | {row.users} | {row.response.median:.4g} | "
                     f"{row.response.q1:.4g} – {row.response.q3:.4g} | {shown} |")
    return lines


def _all_measurements(records: list[dict]) -> list[str]:
    by = ("workload", "placement", "model", "params", "batch", "users")
    times = summarize(records, by=by)
    sizes = summarize(records, by=by, value=client_bytes)
    trips = summarize(records, by=by, value="round_trips")
    rank = {w: i for i, w in enumerate(WORKLOADS)} | {p: i for i, p in enumerate(ORDER)}
    keys = sorted(times, key=lambda k: (rank.get(k[0], 99), rank.get(k[1], 99), k[3], str(k[2]), k[4] or 0, k[5]))
    lines = ["| workload | placement | model | params | batch | users | time: median [95% CI] | client bytes | "
             "round trips |", "|---|---|---|---|---|---|---|---|---|"]
    for key in keys:
        size = human_bytes(sizes[key].median) if key in sizes else "—"
        trip = f"{trips[key].median:.3g}" if key in trips else "—"
        shown = [human_count(v) if i == 3 else "—" if v is None else str(v) for i, v in enumerate(key)]
        lines.append(f"| {' | '.join(shown)} | {_with_ci(times[key], 's')} | "
                     f"{size} | {trip} |")
    return lines


def write_summary(records: list[dict], out_dir: Path, figures: list[FigureResult],
                  command: str | None = None) -> Path:
    """Write ``<out_dir>/summary.md`` for one run.

    Args:
        records: the run's validated records (non-empty).
        out_dir: the figures directory.
        figures: outcomes of the figure functions (listed with their notes).
        command: the command line that produced it, recorded for reproduction.

    Returns:
        The path written.
    """
    notes: list[str] = []
    ratios = headline_ratios(records, notes)
    lines = ["# swarm-bench summary", ""] + _context(records)
    if command:
        lines.append(f"- made with: `{command}`")
    lines += ["", STATS_NOTE, "", "## Headline ratios", ""] + _headline(ratios)
    lines += ["", "## Concurrency", ""] + _concurrency(records, notes)
    lines += ["", "## All measurements", ""] + _all_measurements(records)
    lines += ["", "## Figures", ""]
    for fig in figures:
        shown = ", ".join(f"[{p.name}]({p.name})" for p in fig.paths) if fig.paths else "skipped"
        lines.append(f"- {fig.name}: {shown}" + "".join(f"\n  - {n}" for n in fig.notes))
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in dict.fromkeys(notes)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    logger.info("wrote %s", path)
    return path
