"""The result record, version ``swarm-bench/1``: one JSON object per line of ``results/<run-id>/*.jsonl``, one per
repetition (warm-ups included, flagged), each carrying the resolved config and the context of its run.

Fields (all required; ``null`` only where said):

===================== ==========================================================================================
``schema``            ``"swarm-bench/1"``
``run_id``            non-empty str, the name of the run directory
``workload``          one of :data:`WORKLOADS`
``placement``         one of :data:`PLACEMENTS`
``model``             non-empty str (checkpoint name or synthetic config name)
``params``            int > 0, parameter count of the model
``batch``             int ≥ 1, or null where the workload has no input batch (e.g. ``setup_time``)
``seq_len``           int ≥ 1, or null likewise
``link``              client link, ``{"bandwidth_Bps": number > 0, "latency_s": number ≥ 0}``, or null (unshaped)
``node_link``         node↔node links, same form
``users``             int ≥ 1, concurrent users (1 outside ``concurrency``)
``rep``               int ≥ 0, repetition index (for ``concurrency``: the round; every user of a round shares it)
``warmup``            bool, a warm-up repetition (statistics drop it)
``wall_s``            number ≥ 0, the client-side time of the measured operation; null only when ``ok`` is false
``load_s``            number ≥ 0 or null, time spent loading weights (``hpc``; ``setup_time``)
``client_bytes_sent`` int ≥ 0 or null (unknown, e.g. ``hpc`` / ``petals``); likewise
``client_bytes_received``, ``node_bytes``, ``round_trips``  (from ``tracer.stats``)
``compute_s``         ``{node: seconds}`` or null
``extra``             dict, workload-specific values (e.g. ``top_k``, ``round_wall_s``, ``new_tokens``)
``ok``                bool; failed repetitions are kept and dropped by the statistics
``error``             null when ``ok``, else a non-empty message
``config``            dict, the resolved config of the run
``versions``          dict with str-or-null ``python``, ``torch``, ``transformers``, ``hivemind``, ``nnsight``
``machine``           ``{"cpus": int ≥ 1, "platform": str, "ram_bytes": int ≥ 0}``
``git_commit``        non-empty str
``time``              number ≥ 0, unix time the repetition finished
===================== ==========================================================================================

Unknown top-level fields are refused (put them in ``extra``), so a typo cannot silently lose a value.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import platform
import subprocess
import time
from pathlib import Path

from .errors import ResultsNotFoundError, SchemaError

logger = logging.getLogger(__name__)

SCHEMA = "swarm-bench/1"
WORKLOADS = ("setup_time", "patching_vs_size", "remote_inference", "patching", "ioi_patching", "logit_lens",
             "steering_generation", "concurrency", "attribution_patching")
"""Workload names: (a) setup_time, (b) patching_vs_size, (c) remote_inference and patching, (d) ioi_patching,
(e) logit_lens, (f) steering_generation, (g) concurrency, (h) attribution_patching (gradients)."""
PLACEMENTS = ("hpc", "centralized", "petals", "swarm", "hybrid")
VERSION_KEYS = ("python", "torch", "transformers", "hivemind", "nnsight")
COUNTER_FIELDS = ("client_bytes_sent", "client_bytes_received", "node_bytes", "round_trips")
CONTEXT_FIELDS = ("config", "versions", "machine", "git_commit", "time")
FIELDS = ("schema", "run_id", "workload", "placement", "model", "params", "batch", "seq_len", "link", "node_link",
          "users", "rep", "warmup", "wall_s", "load_s", *COUNTER_FIELDS, "compute_s", "extra", "ok", "error",
          *CONTEXT_FIELDS)
"""Every field of a record, in the order writers should emit them."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _fail(field: str, value, rule: str):
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise SchemaError(f"field {field!r} is {shown}; it must be {rule}", field=field)


def _int(field, value, minimum, nullable=False):
    if value is None and nullable:
        return
    if not _is_int(value) or value < minimum:
        _fail(field, value, f"an int >= {minimum}" + (" or null" if nullable else ""))


def _number(field, value, minimum, nullable=False):
    if value is None and nullable:
        return
    if not _is_number(value) or value < minimum:
        _fail(field, value, f"a finite number >= {minimum}" + (" or null" if nullable else ""))


def _text(field, value, nullable=False):
    if value is None and nullable:
        return
    if not isinstance(value, str) or not value:
        _fail(field, value, "a non-empty string" + (" or null" if nullable else ""))


def _choice(field, value, choices):
    if value not in choices:
        _fail(field, value, f"one of {', '.join(choices)}")


def _dict(field, value, nullable=False):
    if value is None and nullable:
        return
    if not isinstance(value, dict):
        _fail(field, value, "a JSON object" + (" or null" if nullable else ""))


def _link(field, value):
    if value is None:
        return
    _dict(field, value)
    if set(value) != {"bandwidth_Bps", "latency_s"}:
        _fail(field, value, 'null or an object with exactly "bandwidth_Bps" and "latency_s"')
    bandwidth = value["bandwidth_Bps"]
    if not _is_number(bandwidth) or bandwidth <= 0:
        _fail(f"{field}.bandwidth_Bps", bandwidth, "a finite number > 0 (bytes per second)")
    _number(f"{field}.latency_s", value["latency_s"], 0)


def validate_record(record) -> None:
    """Check one result record against ``swarm-bench/1``.

    Args:
        record: a decoded JSON object.

    Raises:
        SchemaError: the first broken rule; ``.field`` names the field (dotted when nested) and the message gives
            the offending value and what it must be.
    """
    if not isinstance(record, dict):
        raise SchemaError(f"a record must be a JSON object, got {type(record).__name__}")
    missing = [f for f in FIELDS if f not in record]
    if missing:
        raise SchemaError(f"field {missing[0]!r} is missing (all missing: {', '.join(missing)})", field=missing[0])
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise SchemaError(f"field {unknown[0]!r} is not part of {SCHEMA} (unknown: {', '.join(unknown)}); "
                          f"put workload-specific values in 'extra'", field=unknown[0])
    if record["schema"] != SCHEMA:
        _fail("schema", record["schema"], repr(SCHEMA))
    _text("run_id", record["run_id"])
    _choice("workload", record["workload"], WORKLOADS)
    _choice("placement", record["placement"], PLACEMENTS)
    _text("model", record["model"])
    _int("params", record["params"], 1)
    _int("batch", record["batch"], 1, nullable=True)
    _int("seq_len", record["seq_len"], 1, nullable=True)
    _link("link", record["link"])
    _link("node_link", record["node_link"])
    _int("users", record["users"], 1)
    _int("rep", record["rep"], 0)
    for flag in ("warmup", "ok"):
        if not isinstance(record[flag], bool):
            _fail(flag, record[flag], "true or false")
    _number("wall_s", record["wall_s"], 0, nullable=not record["ok"])
    _number("load_s", record["load_s"], 0, nullable=True)
    for counter in COUNTER_FIELDS:
        _int(counter, record[counter], 0, nullable=True)
    _dict("compute_s", record["compute_s"], nullable=True)
    for node, seconds in (record["compute_s"] or {}).items():
        _number(f"compute_s.{node}", seconds, 0)
    _dict("extra", record["extra"])
    if record["ok"] and record["error"] is not None:
        _fail("error", record["error"], "null when ok is true")
    if not record["ok"]:
        _text("error", record["error"])
    _dict("config", record["config"])
    _dict("versions", record["versions"])
    for key in VERSION_KEYS:
        if key not in record["versions"]:
            raise SchemaError(f"field 'versions.{key}' is missing; versions needs {', '.join(VERSION_KEYS)}",
                              field=f"versions.{key}")
        _text(f"versions.{key}", record["versions"][key], nullable=True)
    machine = record["machine"]
    _dict("machine", machine)
    for key in ("cpus", "platform", "ram_bytes"):
        if key not in machine:
            raise SchemaError(f"field 'machine.{key}' is missing; machine needs cpus, platform, ram_bytes",
                              field=f"machine.{key}")
    _int("machine.cpus", machine["cpus"], 1)
    _text("machine.platform", machine["platform"])
    _int("machine.ram_bytes", machine["ram_bytes"], 0)
    _text("git_commit", record["git_commit"])
    _number("time", record["time"], 0)


def record_context(config: dict, repo: str | Path = Path(__file__).resolve().parents[1]) -> dict:
    """The context fields of a record (``config``, ``versions``, ``machine``, ``git_commit``, ``time``) for a run.

    Versions come from the installed distributions' metadata (nothing is imported; null if not installed); the
    commit from ``git rev-parse HEAD`` in ``repo`` (``"unknown"`` outside a git checkout, with ``-dirty`` appended
    when tracked files differ from it). Refresh ``time`` per repetition.

    Args:
        config: the resolved config of the run (JSON-serializable).
        repo: the checkout whose commit is recorded.
    """
    versions = {"python": platform.python_version()}
    for key in VERSION_KEYS[1:]:
        try:
            versions[key] = importlib.metadata.version(key)
        except importlib.metadata.PackageNotFoundError:
            versions[key] = None

    def git(*args) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=repo, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD") or "unknown"
    if commit != "unknown" and git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {"config": config, "versions": versions,
            "machine": {"cpus": os.cpu_count() or 1, "platform": platform.platform(), "ram_bytes": int(ram)},
            "git_commit": commit, "time": time.time()}


def dump_record(record: dict) -> str:
    """Validate ``record`` and return it as one JSON line (with the trailing newline), fields in :data:`FIELDS` order.

    Raises:
        SchemaError: the record is invalid (nothing is returned, so nothing invalid gets written).
    """
    validate_record(record)
    return json.dumps({f: record[f] for f in FIELDS}, allow_nan=False) + "\n"


def read_results(run_dir: str | Path) -> list[dict]:
    """Load and validate every record of every ``*.jsonl`` file under ``run_dir`` (recursively, sorted by path).

    Args:
        run_dir: a run directory (``results/<run-id>/``), or a directory holding several.

    Raises:
        ResultsNotFoundError: ``run_dir`` does not exist or holds no ``*.jsonl`` file.
        SchemaError: a line is not JSON or a record is invalid; ``.where`` is ``"path:line"``.

    Returns:
        The records in file order; blank lines are skipped.
    """
    root = Path(run_dir)
    files = sorted(root.rglob("*.jsonl")) if root.is_dir() else []
    if not files:
        raise ResultsNotFoundError(f"no *.jsonl result files under {root} (is it a results/<run-id>/ directory?)")
    records = []
    for path in files:
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SchemaError(f"not a JSON line ({e.msg})", where=where) from None
                try:
                    validate_record(record)
                except SchemaError as e:
                    raise SchemaError(e.message, field=e.field, where=where) from None
                records.append(record)
    logger.debug("read %d records from %d files under %s", len(records), len(files), root)
    return records
