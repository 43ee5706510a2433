"""Spike events and the append-only event log (``<run dir>/spikeguard/events.jsonl``)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SpikeEvent", "EventLog", "read_events", "read_jsonl", "KINDS", "OUTCOMES"]

#: What an event is about. ``loss`` / ``grad_norm``: the loss or the global gradient norm
#: left its band; ``nonfinite``: an inf or NaN in the loss, the gradients or an operator's
#: output; ``operator``: an operator's activations or gradient message left their band
#: while the loss and the global norm did not (silent corruption, absorbed outliers).
KINDS = ("loss", "grad_norm", "nonfinite", "operator")

#: Observed outcomes, filled in after the spike.
OUTCOMES = ("pending", "recovered", "diverged", "not_recovered")


def _clean(value: Any) -> Any:
    """JSON has no inf/nan: write them as strings so that the log stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


@dataclass
class SpikeEvent:
    """One spike: what was seen, where it started, what the theory predicts, what happened.

    Attributes:
        id: unique within a run (the first step of the spike).
        step: the optimizer step (``trainer.global_step``) where it was detected.
        kind: one of :data:`KINDS`.
        z: robust z-score of the triggering signal.
        loss, grad_norm: values at the spike step.
        baseline_loss, baseline_grad_norm: their robust baselines (window medians).
        loss_floor: loss* used for recovery (THEORY §4): configured, or the window's
            minimum loss at the spike.
        recovery_threshold: the loss under which the spike counts as recovered:
            ``loss* + (1+κ)(baseline - loss*)``, raised to the loss's own noise band
            ``exp(median + 2σ)`` where that is wider.
        factor: the observed spike factor ``s = |Ĝ| / baseline`` of the gradient norm.
        loss_factor: the loss over its baseline.
        origin: the operator where the spike starts (forward order), or None.
        direction: ``"forward"`` (activations) or ``"backward"`` (gradient messages).
        operator_ratios: each operator's statistic over its own baseline at the spike.
        duration: consecutive flagged steps merged into this event.
        predicted: the theory's prediction at the spike (spike factor, m, outcome, k_rec...).
        action: ``"none"``, ``"clip"`` or ``"skip"``.
        rerun: ``"reproducible"``, ``"transient"`` or None when not re-run.
        outcome: one of :data:`OUTCOMES`.
        recovery_steps: steps until the loss was back within (1+κ) of its floor.
    """

    id: int
    step: int
    kind: str
    z: float
    loss: float
    grad_norm: float
    factor: float
    loss_factor: float
    baseline_loss: float = math.nan
    baseline_grad_norm: float = math.nan
    loss_floor: float = math.nan
    recovery_threshold: float = math.nan
    origin: str | None = None
    direction: str | None = None
    operator_ratios: dict[str, dict[str, float]] = field(default_factory=dict)
    duration: int = 1
    predicted: dict[str, Any] = field(default_factory=dict)
    action: str = "none"
    rerun: str | None = None
    outcome: str = "pending"
    recovery_steps: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))

    def summary(self) -> str:
        """One line for logs and the terminal."""
        where = f" in {self.origin} ({self.direction})" if self.origin else ""
        pred = self.predicted
        verdict = f", predicted {pred['outcome']}" if pred.get("outcome") else ""
        k_rec = pred.get("k_rec")
        if isinstance(k_rec, (int, float)) and math.isfinite(k_rec):
            verdict += f" in ~{k_rec:.0f} steps"
        return (
            f"spike #{self.id} at step {self.step}: {self.kind}, z={self.z:.1f}, "
            f"gradient x{self.factor:.2f}{where}{verdict}"
        )


class EventLog:
    """Append-only JSON-lines log: one object per line, written whole and flushed.

    Records are ``{"type": "spike", ...SpikeEvent}`` when a spike is detected, and
    ``{"type": "outcome", "id": ..., "outcome": ..., "recovery_steps": ...}`` when its
    outcome is known. Each line goes out in a single write followed by flush and fsync,
    so a crash leaves at most a truncated last line, which :func:`read_events` skips.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(_clean(record), sort_keys=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def spike(self, event: SpikeEvent) -> None:
        self.append({"type": "spike", **event.to_dict()})

    def outcome(self, event: SpikeEvent) -> None:
        self.append(
            {"type": "outcome", "id": event.id, "step": event.step, "outcome": event.outcome,
             "recovery_steps": event.recovery_steps}
        )


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each record of an append-only JSON-lines file.

    Every record ends with a newline, so only the piece after the last newline can have
    been cut off mid-write (a crash), whatever character it stops at: it is skipped. Any
    other line that is not a JSON object is a ``ValueError`` naming ``file:line``.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                return
            raise ValueError(f"{path}:{number}: not a JSON object ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: not a JSON object (got {type(record).__name__})")
        yield number, record


def read_events(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The events of a log, spike records merged with their outcome records, by id.

    A truncated last line (a crash mid-write) is ignored; any other malformed line is
    an error that names the line.
    """
    events: dict[int, dict[str, Any]] = {}
    for number, record in read_jsonl(path):
        kind = record.pop("type", None)
        if kind == "spike":
            events[record["id"]] = record
        elif kind == "outcome":
            if record["id"] in events:
                events[record["id"]].update(outcome=record["outcome"], recovery_steps=record["recovery_steps"])
        else:
            raise ValueError(f"{path}:{number}: unknown record type {kind!r} (expected 'spike' or 'outcome')")
    return sorted(events.values(), key=lambda e: e["step"])
