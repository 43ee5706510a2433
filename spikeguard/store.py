"""The probe store: step-stamped probe records that survive a resume.

:class:`~spikeguard.callbacks.AmplificationProbe` adds a record per probe;
:class:`~spikeguard.callbacks.SpikeGuard` asks for "the latest probe measured before
this spike's step" (:meth:`ProbeStore.latest`), whatever the order of the callbacks and
however late it reads. The store checkpoints its records and the probe batch, so a
resumed run predicts its next spike from the probe it had.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from typing import Any

import torch

from spikeguard.records import ProbeRecord

__all__ = ["ProbeStore"]


def _to_cpu(batch: Any) -> Any:
    """A host copy of a batch (tensors in dicts, lists and tuples), for a checkpoint."""
    if isinstance(batch, torch.Tensor):
        return batch.detach().to("cpu", copy=True)
    if isinstance(batch, Mapping):
        return {k: _to_cpu(v) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(_to_cpu(v) for v in batch)
    if isinstance(batch, list):
        return [_to_cpu(v) for v in batch]
    return batch


class ProbeStore:
    """Probe records by step (newest ``capacity`` kept) and the batch they were measured on.

    Args:
        capacity: records kept; older ones are dropped. A spike is read at most
            ``DetectorConfig.history`` steps after it happened, so a few probes suffice.
    """

    def __init__(self, capacity: int = 8):
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"ProbeStore.capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self._records: list[ProbeRecord] = []
        self.batch: Any = None

    def __len__(self) -> int:
        return len(self._records)

    @property
    def records(self) -> tuple[ProbeRecord, ...]:
        """Every kept record, oldest first."""
        return tuple(self._records)

    def add(self, record: ProbeRecord) -> None:
        """Keep ``record`` (a record of the same step is replaced)."""
        if not isinstance(record, ProbeRecord):
            raise TypeError(f"ProbeStore.add takes a ProbeRecord, got {type(record).__name__}")
        steps = [r.step for r in self._records]
        i = bisect.bisect_left(steps, record.step)
        if i < len(steps) and steps[i] == record.step:
            self._records[i] = record
        else:
            self._records.insert(i, record)
        del self._records[: max(0, len(self._records) - self.capacity)]

    def latest(self, at_or_before: int | None = None) -> ProbeRecord | None:
        """The newest record measured at step ``at_or_before`` or earlier (None: the newest)."""
        if at_or_before is None:
            return self._records[-1] if self._records else None
        steps = [r.step for r in self._records]
        i = bisect.bisect_right(steps, at_or_before)
        return self._records[i - 1] if i > 0 else None

    def state_dict(self) -> dict[str, Any]:
        return {"records": [r.to_dict() for r in self._records], "batch": _to_cpu(self.batch), "capacity": self.capacity}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._records = sorted((ProbeRecord.from_dict(r) for r in state.get("records", [])), key=lambda r: r.step)
        del self._records[: max(0, len(self._records) - self.capacity)]
        self.batch = state.get("batch")
