"""Weights & Biases specifics: metric definitions, the spike-event table and alerts.

W&B is imported lazily and only touched through a Lightning ``WandbLogger`` the user
configured; every call is guarded, so a missing, offline or failing W&B never stops
training (a warning says what failed).

Nothing here passes ``step=`` to ``wandb.log``: Lightning's ``WandbLogger.log_metrics``
(and ``log_table``, which goes through it) puts the step in the logged dict as
``trainer/global_step``, the x-axis that :func:`define_metrics` declares, so W&B's own
monotonic ``_step`` is never set by hand and never rejects a row. The dashboard built
from these keys lives in :mod:`spikeguard.dashboard`.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any

from spikeguard import keys
from spikeguard.records import SpikeEvent
from spikeguard.sinks import BaseSink

__all__ = [
    "WandbSink", "sinks_for", "define_metrics", "is_online", "EVENT_COLUMNS", "EVENT_TABLE_KEY", "OFFLINE_MODES",
]

EVENT_TABLE_KEY = keys.metric("events")
#: Columns of the spike-event table, in order.
EVENT_COLUMNS = (
    "id", "step", "kind", "z", "factor", "origin", "direction", "predicted_factor",
    "predicted_outcome", "predicted_k_rec", "action", "rerun", "outcome", "recovery_steps",
)
#: W&B modes that never reach a server (``WandbLogger(offline=True)`` sets ``dryrun``).
OFFLINE_MODES = ("offline", "dryrun", "disabled")

# Runs whose metrics are defined. Weak: a finished run is forgotten with its object.
_DEFINED: weakref.WeakSet = weakref.WeakSet()


def _is_wandb_logger(logger: Any) -> bool:
    return type(logger).__name__ == "WandbLogger" and hasattr(logger, "experiment")


def define_metrics(run: Any) -> bool:
    """Plot every ``spikeguard/`` key against ``trainer/global_step`` with its summary rule.

    The glob covers every key, per-operator ones included (whose names are only known at
    run time); the keys of :data:`spikeguard.keys.STATIC_KEYS` also get their summary
    (``max`` for spike factors and z-scores, ``last`` for counters, see
    :func:`spikeguard.keys.summary_of`). Once per run: returns False when ``run`` was
    already defined.
    """
    if run in _DEFINED:
        return False
    run.define_metric(keys.STEP)
    run.define_metric(f"{keys.PREFIX}/*", step_metric=keys.STEP)
    for key in keys.STATIC_KEYS:
        run.define_metric(key.name, step_metric=keys.STEP, summary=keys.summary_of(key.name))
    _DEFINED.add(run)
    return True


def is_online(run: Any) -> bool:
    """True when ``run`` talks to a W&B server: not offline, dry-run or disabled."""
    mode = getattr(getattr(run, "settings", None), "mode", None)
    if isinstance(mode, str):
        return mode not in OFFLINE_MODES
    # Lightning's stand-in on ranks > 0 answers every attribute with a function: not online.
    return getattr(run, "offline", None) is False and getattr(run, "disabled", None) is False


def _row(event: SpikeEvent) -> list[Any]:
    pred = event.predicted

    def num(value: Any) -> Any:
        return value if isinstance(value, (int, float)) and math.isfinite(value) else None

    return [
        event.id, event.step, event.kind, num(event.z), num(event.factor), event.origin, event.direction,
        num(pred.factor) if pred else None, pred.outcome if pred else None, num(pred.k_rec) if pred else None,
        event.action, event.rerun, event.outcome, event.recovery_steps,
    ]


class WandbSink(BaseSink):
    """A sink (:mod:`spikeguard.sinks`) for one WandbLogger: metric definitions, the event
    table (re-logged whole as rows change) and alerts (online runs only). Metrics reach W&B
    through the logger itself (:class:`spikeguard.sinks.LoggerSink`)."""

    def __init__(self, logger: Any, trainer: Any, alert: bool = True):
        self.logger = logger
        self.trainer = trainer
        self.alert = alert
        self.events: dict[int, SpikeEvent] = {}
        self._tried_define = False

    def define(self) -> None:
        """Define the run's metrics (:func:`define_metrics`); a failure warns, never raises.

        Tried once: a W&B that refuses now refuses again, and the table and alerts do not
        depend on it (the metrics are still logged, on W&B's default axis and summaries).
        """
        if self._tried_define:
            return
        self._tried_define = True
        try:
            define_metrics(self.logger.experiment)
        except Exception as err:  # W&B must never stop training
            warnings.warn(
                f"spikeguard: W&B define_metric failed ({type(err).__name__}: {err}); spikeguard metrics are "
                "still logged, without their x-axis and summaries; training goes on",
                stacklevel=2,
            )

    def _log_table(self) -> None:
        rows = [_row(e) for e in sorted(self.events.values(), key=lambda e: e.step)]
        # WandbLogger.log_table -> log_metrics: the step goes in as trainer/global_step, not step=.
        self.logger.log_table(key=EVENT_TABLE_KEY, columns=list(EVENT_COLUMNS), data=rows, step=self.trainer.global_step)

    def spike(self, event: SpikeEvent) -> None:
        self.define()
        self.events[event.id] = event
        self._log_table()
        run = self.logger.experiment
        if self.alert and is_online(run):
            run.alert(title=f"spikeguard: {event.kind} spike at step {event.step}", text=event.summary(), level="WARN")

    def outcome(self, event: SpikeEvent) -> None:
        self.define()
        self.events[event.id] = event
        self._log_table()


def sinks_for(trainer: Any, alert: bool = True) -> list[WandbSink]:
    """A sink for each WandbLogger of the trainer (none when W&B is not in use).

    On rank 0 each sink defines its run's metrics now, before anything is logged (Lightning
    has already created the run when callbacks set up); failures only warn.
    """
    sinks = [WandbSink(logger, trainer, alert) for logger in trainer.loggers if _is_wandb_logger(logger)]
    if getattr(trainer, "is_global_zero", True):
        for sink in sinks:
            sink.define()
    return sinks
