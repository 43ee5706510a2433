"""Weights & Biases specifics: metric definitions, the spike-event table and alerts.

W&B is imported lazily and only touched through a Lightning ``WandbLogger`` the user
configured; every call is guarded by the callbacks, so a missing, offline or failing
W&B never stops training.
"""

from __future__ import annotations

import math
from typing import Any

from spikeguard import keys
from spikeguard.events import SpikeEvent

__all__ = ["WandbSink", "sinks_for", "define_metrics", "EVENT_COLUMNS", "EVENT_TABLE_KEY"]

EVENT_TABLE_KEY = keys.metric("events")
#: Columns of the spike-event table, in order.
EVENT_COLUMNS = (
    "id", "step", "kind", "z", "factor", "origin", "direction", "predicted_factor",
    "predicted_outcome", "predicted_k_rec", "action", "rerun", "outcome", "recovery_steps",
)


def _is_wandb_logger(logger: Any) -> bool:
    return type(logger).__name__ == "WandbLogger" and hasattr(logger, "experiment")


def define_metrics(run: Any) -> None:
    """Plot every ``spikeguard/`` key against ``trainer/global_step`` with its summary rule."""
    run.define_metric(keys.STEP)
    run.define_metric(f"{keys.PREFIX}/*", step_metric=keys.STEP)
    for key in keys.STATIC_KEYS:
        run.define_metric(key.name, step_metric=keys.STEP, summary=key.summary)


def _row(event: SpikeEvent) -> list[Any]:
    pred = event.predicted or {}

    def num(value: Any) -> Any:
        return value if isinstance(value, (int, float)) and math.isfinite(value) else None

    return [
        event.id, event.step, event.kind, num(event.z), num(event.factor), event.origin, event.direction,
        num(pred.get("factor")), pred.get("outcome"), num(pred.get("k_rec")), event.action, event.rerun,
        event.outcome, event.recovery_steps,
    ]


class WandbSink:
    """Feeds one WandbLogger: the event table (re-logged whole as rows change) and alerts."""

    def __init__(self, logger: Any, alert: bool = True):
        self.logger = logger
        self.alert = alert
        self.events: dict[int, SpikeEvent] = {}
        self._defined = False

    def _run(self) -> Any:
        run = self.logger.experiment
        if not self._defined:
            define_metrics(run)
            self._defined = True
        return run

    def _log_table(self, trainer: Any) -> None:
        rows = [_row(e) for e in sorted(self.events.values(), key=lambda e: e.step)]
        self._run()
        self.logger.log_table(key=EVENT_TABLE_KEY, columns=list(EVENT_COLUMNS), data=rows, step=trainer.global_step)

    def spike(self, trainer: Any, event: SpikeEvent) -> None:
        self.events[event.id] = event
        self._log_table(trainer)
        run = self._run()
        offline = getattr(getattr(run, "settings", None), "mode", "") in ("offline", "disabled")
        if self.alert and not offline:
            run.alert(title=f"spikeguard: spike at step {event.step}", text=event.summary(), level="WARN")

    def outcome(self, trainer: Any, event: SpikeEvent) -> None:
        self.events[event.id] = event
        self._log_table(trainer)


def sinks_for(trainer: Any, alert: bool = True) -> list[WandbSink]:
    """A sink for each WandbLogger of the trainer (none when W&B is not in use)."""
    return [WandbSink(logger, alert) for logger in trainer.loggers if _is_wandb_logger(logger)]
