"""Offline HTML report of a run that used SpikeGuard: ``build_report(run_dir)`` or ``spikeguard report RUN_DIR``."""

from spikeguard.report.html import SECTIONS, build_report, render
from spikeguard.report.run import MissingDependency, ReportError, Run, find_run, load_run

__all__ = ["SECTIONS", "MissingDependency", "ReportError", "Run", "build_report", "find_run", "load_run", "render"]
