"""Sinks: where spikeguard's records go (event log, probe log, Lightning loggers, W&B, your own).

A sink is any object with some of these methods (:class:`Sink` spells the protocol;
:class:`BaseSink` gives no-op defaults to subclass)::

    spike(event)              a SpikeEvent, when it is detected
    outcome(event)            the same SpikeEvent, when its outcome is known
    probe(record)             a ProbeRecord, after each amplification probe
    metrics(metrics, step)    a dict of spikeguard/ metric keys at an optimizer step
    close()                   the run ends (flush what is buffered)

Pass your own with ``SpikeGuard(sinks=[...])`` and ``AmplificationProbe(sinks=[...])``
(the same object may go to both), e.g. to post spikes to Slack, a webhook or a
database. Callbacks call sinks on global rank 0 only, through :class:`Sinks`: a sink
that raises is reported once, with what it raised, and training goes on.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from spikeguard.events import EventLog
from spikeguard.jsonl import JsonlWriter
from spikeguard.records import ProbeRecord, SpikeEvent

__all__ = ["Sink", "BaseSink", "Sinks", "EventLogSink", "ProbeLogSink", "LoggerSink", "METHODS"]

#: The methods a sink may have.
METHODS = ("spike", "outcome", "probe", "metrics", "close")


@runtime_checkable
class Sink(Protocol):
    """The full sink protocol (a sink may implement any subset of it)."""

    def spike(self, event: SpikeEvent) -> None: ...

    def outcome(self, event: SpikeEvent) -> None: ...

    def probe(self, record: ProbeRecord) -> None: ...

    def metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class BaseSink:
    """A sink that ignores everything; override the methods you need."""

    def spike(self, event: SpikeEvent) -> None:
        pass

    def outcome(self, event: SpikeEvent) -> None:
        pass

    def probe(self, record: ProbeRecord) -> None:
        pass

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def check_sinks(owner: str, sinks: Iterable[Any] | None) -> list[Any]:
    """``sinks`` as a list, each with at least one sink method (else a TypeError naming it)."""
    if sinks is None:
        return []
    if isinstance(sinks, (str, bytes)) or not isinstance(sinks, Iterable):
        raise TypeError(f"{owner}.sinks must be a list of sinks, got {sinks!r}")
    out = list(sinks)
    for i, sink in enumerate(out):
        if not any(callable(getattr(sink, m, None)) for m in METHODS):
            raise TypeError(
                f"{owner}.sinks[{i}] must have at least one of the methods {list(METHODS)}, "
                f"got {type(sink).__name__}"
            )
    return out


class Sinks:
    """Fan-out to several sinks; a sink that raises is reported once and skipped, never fatal."""

    def __init__(self, owner: str, sinks: Iterable[Any] = ()):
        self.owner = owner
        self.sinks: list[Any] = list(sinks)
        self._failed: set[int] = set()

    def add(self, sink: Any) -> None:
        self.sinks.append(sink)

    def __len__(self) -> int:
        return len(self.sinks)

    def _call(self, method: str, *args: Any) -> None:
        for sink in self.sinks:
            fn = getattr(sink, method, None)
            if not callable(fn):
                continue
            try:
                fn(*args)
            except Exception as err:  # a sink must never stop training
                if id(sink) not in self._failed:
                    self._failed.add(id(sink))
                    warnings.warn(
                        f"{self.owner}: sink {type(sink).__name__}.{method} failed ({type(err).__name__}: {err}); "
                        "training goes on, later failures of this sink are silent",
                        stacklevel=3,
                    )

    def spike(self, event: SpikeEvent) -> None:
        self._call("spike", event)

    def outcome(self, event: SpikeEvent) -> None:
        self._call("outcome", event)

    def probe(self, record: ProbeRecord) -> None:
        self._call("probe", record)

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        if metrics:
            self._call("metrics", metrics, step)

    def close(self) -> None:
        self._call("close")


class EventLogSink(BaseSink):
    """Spike and outcome records into ``events.jsonl`` (:class:`spikeguard.events.EventLog`)."""

    def __init__(self, path: str | os.PathLike, owner: str = "SpikeGuard"):
        self.log = EventLog(path, owner=owner)

    def spike(self, event: SpikeEvent) -> None:
        self.log.spike(event)

    def outcome(self, event: SpikeEvent) -> None:
        self.log.outcome(event)

    def close(self) -> None:
        self.log.writer.flush()


class ProbeLogSink(BaseSink):
    """Probe records into ``probes.jsonl``, one :class:`~spikeguard.records.ProbeRecord` a line."""

    def __init__(self, path: str | os.PathLike, owner: str = "AmplificationProbe"):
        self.writer = JsonlWriter(path, owner=owner)

    def probe(self, record: ProbeRecord) -> None:
        self.writer.append({"type": "probe", **record.to_dict()})

    def close(self) -> None:
        self.writer.flush()


class LoggerSink(BaseSink):
    """Metrics into every logger of a Lightning Trainer; a logger that raises is reported once."""

    def __init__(self, trainer: Any, owner: str):
        self.trainer = trainer
        self.owner = owner
        self._failed: set[int] = set()

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.trainer.loggers:
            try:
                logger.log_metrics(metrics, step=step)
            except Exception as err:  # a failing logger must never stop training
                if id(logger) not in self._failed:
                    self._failed.add(id(logger))
                    warnings.warn(
                        f"{self.owner}: {type(logger).__name__}.log_metrics failed ({type(err).__name__}: "
                        f"{err}); training goes on, later failures of this logger are silent",
                        stacklevel=3,
                    )
