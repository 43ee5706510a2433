"""``spikeguard report``: the offline HTML report of a run that used SpikeGuard."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spikeguard import paths

__all__ = ["add_parser", "run"]

# The file names come from spikeguard.paths, the one place that spells them.
_DESCRIPTION = f"""\
Write a self-contained HTML report (figures inline, no network) of a run that used
SpikeGuard. RUN_DIR is the run's log directory, which holds Lightning's {paths.METRICS}
(CSVLogger) and {paths.ARTIFACTS}/{paths.EVENTS}, optionally {paths.ARTIFACTS}/{paths.PROBES} and
{paths.HPARAMS}; a directory with exactly one such run below it (e.g. lightning_logs)
works too. Sections:

  1  loss and gradient norm over steps, spikes marked, predicted versus observed recovery
  2  per-operator gradient-message (and output) ratios over steps, a heatmap
  3  observed versus predicted amplification against depth, A^f and A^b (from probes)
  4  stability: relative bias m and sharpness ratio against 1 (when measured)
  5  the spike event table: origin, prediction, action, rerun verdict, outcome

Needs matplotlib: pip install 'spikeguard[report]'. Exit status 2 when the run
directory is missing, holds no SpikeGuard output, or a file cannot be read."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "report",
        help="write the offline HTML report of a run that used SpikeGuard",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run's log directory (or one with a single run below it)")
    parser.add_argument(
        "--out", type=Path, default=None, metavar="FILE",
        help=f"the HTML file to write (default: RUN_DIR/{paths.ARTIFACTS}/{paths.REPORT})",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Write the report; 0 on success, 2 (message on stderr) when the run cannot be used."""
    from spikeguard.report import build_report
    from spikeguard.report.errors import ReportError
    from spikeguard.rundir import find_run

    try:
        found = find_run(args.run_dir)
        if found != args.run_dir:
            print(f"spikeguard report: using {found} (the only run that used SpikeGuard below {args.run_dir})", file=sys.stderr)
        path = build_report(found, args.out)
    except ReportError as err:
        print(f"spikeguard report: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
