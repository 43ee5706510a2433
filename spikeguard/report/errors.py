"""The report's errors: a run it cannot read (:class:`ReportError`) or matplotlib missing."""

from __future__ import annotations

from spikeguard.rundir import RunError

__all__ = ["ReportError", "MissingDependency"]

#: A run directory the report cannot use (the reader's :class:`~spikeguard.rundir.RunError`).
ReportError = RunError


class MissingDependency(RunError, ImportError):
    """matplotlib is not installed: a ReportError for the CLI, an ImportError for callers that
    treat the report as optional (``except ImportError``)."""
