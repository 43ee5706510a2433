"""The spike-event log (``<run dir>/spikeguard/events.jsonl``): written as events happen, merged on read.

Records are ``{"type": "spike", ...SpikeEvent}`` when a spike is detected, and
``{"type": "outcome", "id": ..., "step": ..., "outcome": ..., "recovery_steps": ...}``
when its outcome is known. Writing goes through :class:`spikeguard.jsonl.JsonlWriter`
(one write, flush and fsync a record; faults kept in memory and retried, never raised);
:func:`read_events` merges each spike with its outcome into a
:class:`~spikeguard.records.SpikeEvent`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from spikeguard.jsonl import JsonlWriter, read_jsonl
from spikeguard.records import KINDS, OUTCOMES, SpikeEvent

__all__ = ["SpikeEvent", "EventLog", "read_events", "read_jsonl", "KINDS", "OUTCOMES", "RECORD_TYPES"]

#: The record types of an event log.
RECORD_TYPES = ("spike", "outcome")


class EventLog:
    """Append-only event log: a spike record per event, an outcome record when it resolves."""

    def __init__(self, path: str | os.PathLike, owner: str = "SpikeGuard"):
        self.writer = JsonlWriter(path, owner=owner)

    @property
    def path(self) -> Path:
        return self.writer.path

    def append(self, record: dict[str, Any]) -> bool:
        return self.writer.append(record)

    def spike(self, event: SpikeEvent) -> bool:
        return self.append({"type": "spike", **event.to_dict()})

    def outcome(self, event: SpikeEvent) -> bool:
        return self.append(
            {"type": "outcome", "id": event.id, "step": event.step, "outcome": event.outcome,
             "recovery_steps": event.recovery_steps}
        )


def read_events(path: str | os.PathLike) -> list[SpikeEvent]:
    """The events of a log, spike records merged with their outcome records by id, in step order.

    A truncated last line (a crash mid-write) is ignored; any other malformed line is
    an error that names the line.
    """
    events: dict[Any, SpikeEvent] = {}
    for number, record in read_jsonl(path):
        kind = record.pop("type", None)
        if kind == "spike":
            try:
                events[record["id"]] = SpikeEvent.from_dict(record)
            except (KeyError, TypeError) as err:
                raise ValueError(f"{path}:{number}: not a spike record ({type(err).__name__}: {err})") from None
        elif kind == "outcome":
            event = events.get(record.get("id"))
            if event is not None:
                event.outcome = record["outcome"]
                event.recovery_steps = record.get("recovery_steps")
        else:
            raise ValueError(f"{path}:{number}: unknown record type {kind!r} (expected one of {list(RECORD_TYPES)})")
    return sorted(events.values(), key=lambda e: e.step)
