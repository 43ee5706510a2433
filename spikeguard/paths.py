"""Where a run's spikeguard artifacts live: the one place that spells their paths.

A run directory is a Lightning log directory (``trainer.log_dir``): Lightning's
``metrics.csv`` and ``hparams.yaml`` (CSVLogger) next to a ``spikeguard/`` folder that
holds spikeguard's own files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ARTIFACTS", "EVENTS", "PROBES", "REPORT", "METRICS", "HPARAMS", "RunPaths"]

#: The folder of spikeguard's files inside a run directory.
ARTIFACTS = "spikeguard"
EVENTS = "events.jsonl"
PROBES = "probes.jsonl"
REPORT = "report.html"
METRICS = "metrics.csv"
HPARAMS = "hparams.yaml"


@dataclass(frozen=True)
class RunPaths:
    """The files of one run directory.

    Attributes:
        root: the run directory.
        artifacts: the folder of spikeguard's files (``root/spikeguard`` unless set).
    """

    root: Path
    artifacts: Path

    @classmethod
    def at(cls, root: str | os.PathLike, artifacts: str | os.PathLike | None = None) -> RunPaths:
        root = Path(root)
        return cls(root=root, artifacts=Path(artifacts) if artifacts is not None else root / ARTIFACTS)

    @property
    def events(self) -> Path:
        """The spike events, one JSON object a line (:mod:`spikeguard.events`)."""
        return self.artifacts / EVENTS

    @property
    def probes(self) -> Path:
        """The amplification probes, one :class:`~spikeguard.records.ProbeRecord` a line."""
        return self.artifacts / PROBES

    @property
    def report(self) -> Path:
        """The offline HTML report (:mod:`spikeguard.report`)."""
        return self.artifacts / REPORT

    @property
    def metrics(self) -> Path:
        """Lightning CSVLogger's metrics."""
        return self.root / METRICS

    @property
    def hparams(self) -> Path:
        return self.root / HPARAMS

    def relative(self, path: Path) -> str:
        """``path`` relative to the run directory, for messages (``spikeguard/events.jsonl``)."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)
