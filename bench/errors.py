"""Errors of the benchmark harness, named by who must act.

- :class:`SchemaError`: a result record does not follow ``swarm-bench/1``; the code that wrote it must change
  (or the file is not a result file). The message names the field, the offending value and the rule.
- :class:`ResultsNotFoundError`: a run directory holds no ``*.jsonl`` result files; check the path.
"""

from __future__ import annotations


class BenchError(Exception):
    """Root of every error raised by :mod:`bench`."""

    code = "bench_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class SchemaError(BenchError, ValueError):
    """A result record breaks the record schema.

    Attributes:
        field: the offending field (dotted for nested ones, e.g. ``"link.bandwidth_Bps"``), or ``None`` when
            the record as a whole is wrong (not a JSON object, not valid JSON).
        where: ``"path:line"`` of the record when it was read from a file, else ``None``.
    """

    code = "schema_error"

    def __init__(self, message: str, field: str | None = None, where: str | None = None):
        super().__init__(f"{where}: {message}" if where else message)
        self.field = field
        self.where = where


class ResultsNotFoundError(BenchError, FileNotFoundError):
    """The run directory does not exist or holds no ``*.jsonl`` files."""

    code = "results_not_found"


class BenchConfigError(BenchError, ValueError):
    """Bad input to the harness: a link spec, workload, placement or option it cannot use. Fix the command line."""

    code = "bench_config_error"


class DeploymentError(BenchError, RuntimeError):
    """A deployment's child process failed to start, was not ready in time, or died; the message carries the tail
    of its log."""

    code = "deployment_error"


class PetalsUnavailableError(BenchError):
    """The real-Petals baseline cannot run here (its venv is missing or broken); the message says how to fix it."""

    code = "petals_unavailable"
