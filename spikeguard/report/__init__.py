"""Offline HTML report of a run that used SpikeGuard: ``build_report(run_dir)`` or ``spikeguard report RUN_DIR``.

The run is read by :mod:`spikeguard.rundir`, the one reader of a run directory; ``Run``,
``load_run`` and ``find_run`` are re-exported here for the report's callers.
"""

from spikeguard.report.errors import MissingDependency, ReportError
from spikeguard.report.html import SECTIONS, build_report, render
from spikeguard.rundir import Run, find_run, load_run

__all__ = ["SECTIONS", "MissingDependency", "ReportError", "Run", "build_report", "find_run", "load_run", "render"]
