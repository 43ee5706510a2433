"""The detector's settings: :class:`DetectorConfig`, validated, every field documented."""

from __future__ import annotations

import math
from dataclasses import dataclass

from spikeguard.config import ConfigError, check_int, check_number

__all__ = ["DetectorConfig"]


@dataclass(frozen=True)
class DetectorConfig:
    """Settings of :class:`~spikeguard.detect.SpikeDetector` (each error names the dotted key).

    Reach them from Python with ``SpikeGuard(detector=DetectorConfig(window=64))`` (or a
    dict of the fields) and from a LightningCLI recipe with ``detector: {window: 64}``.

    Attributes:
        window: accepted values per signal kept for the noise scale.
        recent: the newest accepted values whose median is the baseline (a short window
            follows the trend of a training curve; at most ``window``).
        warmup: accepted values a signal needs before it can flag.
        threshold: robust z above which the loss or the gradient norm spikes.
        min_factor: ...and the factor above the median it must also exceed.
        operator_threshold: robust z for an operator's own statistics.
        operator_min_factor: factor above its median for an operator anomaly.
        attribution_threshold: robust z above which an operator counts as anomalous
            when attributing a spike (lower than detection: the spike is known).
        attribution_min_factor: factor above its median for attribution.
        attribution_share: fraction of the largest anomaly score (of the same
            direction) an operator's score must reach to be an origin.
        merge_gap: flagged steps at most this far apart are one event, as long as the
            earlier one has not recovered in between (a diverged event keeps merging).
        regime_steps: a signal that stays out of its band for more than this many steps
            in a row has moved to a new level (a changed data mix, a learning-rate
            change): its values enter the window again, so the band follows the new
            normal instead of flagging forever.
        recover_within: steps after which a spike that has not recovered is
            ``not_recovered``.
        kappa: κ of THEORY §4: recovered when the loss excess over loss* is within
            (1+κ) of its pre-spike value, or back inside the loss's noise band
            (``recover_z`` robust σ above its median), whichever is looser.
        recover_z: the noise band for recovery, in robust σ of the log loss.
        loss_floor: loss* of THEORY §4; None (default) takes the window's minimum loss
            at the spike, the ``loss_min`` of THEORY §4's μ estimate.
        history: steps of per-step records kept on the device between two polls
            (poll at least this often or older records are dropped, with a warning).
    """

    window: int = 128
    recent: int = 16
    warmup: int = 16
    threshold: float = 6.0
    min_factor: float = 3.0
    operator_threshold: float = 10.0
    operator_min_factor: float = 8.0
    attribution_threshold: float = 4.0
    attribution_min_factor: float = 1.5
    attribution_share: float = 0.2
    merge_gap: int = 3
    regime_steps: int = 16
    recover_within: int = 500
    kappa: float = 0.1
    recover_z: float = 2.0
    loss_floor: float | None = None
    history: int = 1024

    def __post_init__(self) -> None:
        owner = "DetectorConfig"
        for key in ("window", "recent", "warmup", "merge_gap", "regime_steps", "recover_within", "history"):
            check_int(owner, key, getattr(self, key))
        if self.warmup > self.window:
            raise ConfigError(owner, "warmup", self.warmup, f"<= window={self.window}")
        for key in ("threshold", "operator_threshold", "attribution_threshold", "kappa", "recover_z"):
            check_number(owner, key, getattr(self, key), above=0)
        for key in ("min_factor", "operator_min_factor", "attribution_min_factor"):
            check_number(owner, key, getattr(self, key), at_least=1)
        share = self.attribution_share
        if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 < share <= 1:
            raise ConfigError(owner, "attribution_share", share, "in (0, 1]")
        floor = self.loss_floor
        if floor is not None and (not isinstance(floor, (int, float)) or isinstance(floor, bool) or not math.isfinite(floor)):
            raise ConfigError(owner, "loss_floor", floor, "None or a finite number")
