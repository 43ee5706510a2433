"""The one reader of a run directory: metrics.csv, spikeguard/events.jsonl, spikeguard/probes.jsonl.

The report, the dashboard and the demo all read a run through :func:`load_run`, so they
see the same events (typed :class:`~spikeguard.records.SpikeEvent`), the same probes
(:class:`~spikeguard.records.ProbeRecord`) and the same operator order.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spikeguard import keys, paths
from spikeguard.events import read_events
from spikeguard.jsonl import read_jsonl
from spikeguard.records import ProbeRecord, SpikeEvent

__all__ = ["RunError", "Run", "find_run", "load_run", "num", "METRICS", "EVENTS", "PROBES", "HPARAMS"]

# Paths relative to the run directory, for discovery and messages.
METRICS = paths.METRICS
EVENTS = Path(paths.ARTIFACTS) / paths.EVENTS
PROBES = Path(paths.ARTIFACTS) / paths.PROBES
HPARAMS = paths.HPARAMS

# The key of an operator's gradient-message ratio, split around the operator's name.
_OP_RATIO = keys.operator_metric("\0", "msg_norm_ratio").split("\0")


class RunError(ValueError):
    """A run directory that cannot be read: the message says which file and why."""


def num(value: Any) -> float:
    """A logged number as a float: the event log writes inf/nan as strings, None is missing."""
    if isinstance(value, bool) or value is None:
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class Run:
    """Everything the report reads from one run directory.

    Attributes:
        dir: the run directory (where metrics.csv and spikeguard/ are).
        requested: the directory the user named (``dir`` or one above it).
        metrics: ``{key: (steps, values)}`` from metrics.csv, cells that were logged only.
        events: spike events merged with their outcomes (:func:`spikeguard.events.read_events`).
        probes: the probe records, in step order.
        hparams: the text of hparams.yaml, or None.
        files: which of metrics.csv, events.jsonl, probes.jsonl the run has.
    """

    dir: Path
    requested: Path
    metrics: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    events: list[SpikeEvent] = field(default_factory=list)
    probes: list[ProbeRecord] = field(default_factory=list)
    hparams: str | None = None
    files: dict[str, bool] = field(default_factory=dict)

    def series(self, *candidates: str) -> tuple[str, list[int], list[float]] | None:
        """The first of ``candidates`` that was logged: (key, steps, values)."""
        for key in candidates:
            if key in self.metrics and self.metrics[key][0]:
                return (key, *self.metrics[key])
        return None

    @property
    def steps(self) -> tuple[int, int] | None:
        """First and last step seen in the metrics, events and probes."""
        seen = [s for steps, _ in self.metrics.values() for s in (steps[0], steps[-1]) if steps]
        seen += [e.step for e in self.events] + [p.step for p in self.probes]
        return (min(seen), max(seen)) if seen else None

    @property
    def operators(self) -> tuple[list[str], bool]:
        """The operator names and whether they are in forward order.

        Only a probe records the forward order (the event log and metrics.csv sort their
        keys): the newest probe's names come first, in its order; names without a probe
        follow in natural order (``h.2`` before ``h.10``).
        """
        head, tail = _OP_RATIO
        names = {k[len(head):-len(tail)] for k in self.metrics if k.startswith(head) and k.endswith(tail)}
        for event in self.events:
            names.update(event.operator_ratios or {})
        if self.probes:
            ordered = list(self.probes[-1].names)
            return ordered + _natural(names - set(ordered)), not (names - set(ordered))
        return _natural(names), False


def _natural(names: set[str]) -> list[str]:
    return sorted(names, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)])


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise RunError(f"cannot read {path}: {err}") from None


def _used_spikeguard(directory: Path) -> bool:
    if (directory / EVENTS).is_file() or (directory / PROBES).is_file():
        return True
    metrics = directory / METRICS
    return metrics.is_file() and any(c.startswith(keys.PREFIX + "/") for c in _csv_header(metrics))


def find_run(path: str | Path) -> Path:
    """The run directory at ``path``, or the only one below it.

    A run directory holds ``spikeguard/events.jsonl`` (or ``probes.jsonl``) or a
    ``metrics.csv`` with ``spikeguard/`` columns. Raises :class:`RunError` when there
    is none, or several below ``path`` (listing them).
    """
    path = Path(path)
    if not path.exists():
        raise RunError(f"run directory not found: {path}")
    if not path.is_dir():
        raise RunError(f"not a directory: {path} (expected a Lightning log directory with {METRICS} and {EVENTS})")
    if _used_spikeguard(path):
        return path
    try:
        below = {p.parent for p in path.rglob(METRICS)} | {p.parent.parent for p in path.rglob(EVENTS.name)}
    except OSError as err:
        raise RunError(f"cannot search {path}: {err}") from None
    runs = sorted(d for d in below if d != path and _used_spikeguard(d))
    if len(runs) == 1:
        return runs[0]
    if runs:
        listing = "\n".join(f"  {r}" for r in runs)
        raise RunError(f"{len(runs)} runs that used SpikeGuard below {path}; name one of them:\n{listing}")
    raise RunError(f"not a run that used SpikeGuard: no {EVENTS.as_posix()} or {keys.PREFIX} metrics in {path}")


def _read_metrics(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Lightning's CSVLogger layout: a ``step`` column, one column per key, empty cells where not logged."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "step" not in reader.fieldnames:
                raise RunError(
                    f"cannot read {path}: no 'step' column (expected Lightning's CSVLogger layout), "
                    f"columns are {list(reader.fieldnames or [])[:8]}"
                )
            for row in reader:
                step = num(row.get("step"))
                if not math.isfinite(step):
                    continue
                for key, cell in row.items():
                    if key in ("step", None) or not cell:
                        continue
                    value = num(cell)
                    if not math.isnan(value):
                        steps, values = out.setdefault(key, ([], []))
                        steps.append(int(step))
                        values.append(value)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise RunError(f"cannot read {path}: {err}") from None
    for steps, values in out.values():  # a resumed run can log a step twice: keep step order, stably
        order = sorted(range(len(steps)), key=steps.__getitem__)
        steps[:], values[:] = [steps[i] for i in order], [values[i] for i in order]
    return out


def _read_probes(path: Path) -> list[ProbeRecord]:
    """probes.jsonl: one probe record a line; a cut-off last line is skipped."""
    probes = []
    try:
        for number, record in read_jsonl(path):
            if "names" not in record or "step" not in record:
                raise RunError(f"cannot read {path}:{number}: not a probe record (no 'names'/'step')")
            try:
                probes.append(ProbeRecord.from_dict(record))
            except (KeyError, TypeError, ValueError) as err:
                raise RunError(f"cannot read {path}:{number}: not a probe record ({type(err).__name__}: {err})") from None
    except RunError:
        raise
    except (OSError, UnicodeDecodeError) as err:
        raise RunError(f"cannot read {path}: {err}") from None
    except ValueError as err:  # read_jsonl names the file and line
        raise RunError(f"cannot read {err}") from None
    return sorted(probes, key=lambda p: p.step)


def load_run(path: str | Path) -> Run:
    """Find the run at or below ``path`` (:func:`find_run`) and read its files."""
    requested = Path(path)
    directory = find_run(requested)
    run = Run(dir=directory, requested=requested)
    metrics, events, probes = directory / METRICS, directory / EVENTS, directory / PROBES
    run.files = {METRICS: metrics.is_file(), EVENTS.as_posix(): events.is_file(), PROBES.as_posix(): probes.is_file()}
    if metrics.is_file():
        run.metrics = _read_metrics(metrics)
    if events.is_file():
        try:
            run.events = read_events(events)
        except (OSError, UnicodeDecodeError) as err:
            raise RunError(f"cannot read {events}: {err}") from None
        except ValueError as err:  # read_events names the file and the line
            raise RunError(f"cannot read {err}") from None
        except KeyError as err:
            raise RunError(f"cannot read {events}: a record has no {err} field") from None
    if probes.is_file():
        run.probes = _read_probes(probes)
    if (directory / HPARAMS).is_file():
        try:
            run.hparams = (directory / HPARAMS).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise RunError(f"cannot read {directory / HPARAMS}: {err}") from None
    return run
