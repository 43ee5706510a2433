"""Recovery tracking: when a spike's loss is back under its threshold, or never comes back."""

from __future__ import annotations

import math

from spikeguard.detect.config import DetectorConfig
from spikeguard.records import SpikeEvent

__all__ = ["track_recovery"]


def track_recovery(pending: list[SpikeEvent], step: int, loss: float, config: DetectorConfig) -> list[SpikeEvent]:
    """Move the outcome of ``pending`` events on with the loss at ``step`` (THEORY §4's (1+κ) rule).

    An event recovers at the first step after it whose loss is at or under its
    ``recovery_threshold``; a non-finite loss is a divergence; ``recover_within`` steps
    without recovery is ``not_recovered``. Resolved events leave ``pending`` (in place)
    and are returned.
    """
    done = []
    for event in list(pending):
        if step <= event.step + event.duration - 1:
            continue
        if not math.isfinite(loss):
            event.outcome = "diverged"
        elif loss <= event.recovery_threshold:
            event.outcome = "recovered"
            event.recovery_steps = step - event.step
        elif step - event.step >= config.recover_within:
            event.outcome = "not_recovered"
        if event.outcome != "pending":
            pending.remove(event)
            done.append(event)
    return done
