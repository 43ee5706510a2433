"""Spike detection, attribution, prediction and recovery tracking (no Lightning).

The detector keeps robust statistics of log values on the device and flags, per
optimizer step, a spike when a signal leaves its band; the host reads what happened
only when asked (:meth:`SpikeDetector.poll`), in one transfer. Signals, per step:

- the loss and the global gradient norm (spikes of kind ``loss`` / ``grad_norm``);
- per operator: output amax and RMS (activations) and the gradient-message norm and
  parameter-gradient norm (gradients), from :class:`spikeguard.measure.StepStats`
  (anomalies of kind ``operator`` when the loss and the global norm stay in band).

Robust statistics of log values, per signal, over the last ``window`` accepted values:
the baseline is the median of the ``recent`` newest ones (it follows the trend of a
training curve), the noise scale σ = 1.4826 · MAD of the values around their local
level (the median of their own chunk of ``recent`` values, so that a slow trend does not
inflate it), and ``z = (x - baseline) / σ``. A value is a spike when ``z > threshold``
*and* it exceeds both the baseline and the last accepted value by ``min_factor`` (so
that a very quiet signal does not flag tiny wiggles, and a signal that rises steadily,
as some do early in training, is not a spike). Flagged values never enter the window, nor do the elevated values
of a spike's tail (for ``merge_gap`` steps, those above half the threshold), so a spike
does not widen the band for the next one; non-finite values are a spike of their own kind
and never enter it either. Why these defaults: z > 6 is OLMo-core's 6σ rule made
robust (median/MAD instead of mean/std, which a spike inflates); min_factor 3 is the
factor of Lightning's SpikeDetection, above the 2-2.5x jumps a small-batch run's gradient
norm makes on its own; an operator's own statistics flag only at z > 10 and 8x (silent
corruption and absorbed outliers are far larger; a natural batch can move one block's
gradient message 10x for a step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from spikeguard import theory
from spikeguard.events import SpikeEvent

__all__ = ["DetectorConfig", "SpikeDetector", "Prediction", "predict_spike", "attribute"]

_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution is 0.6745 σ
_TINY = 1e-30

#: Per-operator statistics in the order they are packed, and their direction.
OPERATOR_STATS = (("out_amax", "forward"), ("out_rms", "forward"), ("msg_norm", "backward"), ("param_grad_norm", "backward"))


@dataclass(frozen=True)
class DetectorConfig:
    """Settings of :class:`SpikeDetector` (validated; each error names the key).

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
        for key in ("window", "recent", "warmup", "merge_gap", "regime_steps", "recover_within", "history"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DetectorConfig.{key} must be an int >= 1, got {value!r}")
        if self.warmup > self.window:
            raise ValueError(f"DetectorConfig.warmup must be <= window={self.window}, got {self.warmup}")
        for key in ("threshold", "operator_threshold", "attribution_threshold", "kappa", "recover_z"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"DetectorConfig.{key} must be a number > 0, got {value!r}")
        for key in ("min_factor", "operator_min_factor", "attribution_min_factor"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 1:
                raise ValueError(f"DetectorConfig.{key} must be a number >= 1, got {value!r}")
        if not isinstance(self.attribution_share, (int, float)) or not 0 < self.attribution_share <= 1:
            raise ValueError(f"DetectorConfig.attribution_share must be in (0, 1], got {self.attribution_share!r}")
        if self.loss_floor is not None and (
            not isinstance(self.loss_floor, (int, float)) or isinstance(self.loss_floor, bool)
            or not math.isfinite(self.loss_floor)
        ):
            raise ValueError(f"DetectorConfig.loss_floor must be None or a finite number, got {self.loss_floor!r}")


class SpikeDetector:
    """Online spike detector over the loss, the gradient norm and per-operator statistics.

    Call :meth:`update` once per optimizer step with device tensors (no host sync);
    call :meth:`poll` when the host may read (a logging step, or every step when an
    action needs the decision): it returns the events that started since the last poll
    and those whose outcome became known. :attr:`flag` is the device-side decision of
    the latest step (for clip/skip), :attr:`upper_band` the gradient norm's band.
    """

    def __init__(self, names: Sequence[str], config: DetectorConfig | None = None, device: torch.device | str = "cpu"):
        self.names = tuple(names)
        self.config = config or DetectorConfig()
        if not isinstance(self.config, DetectorConfig):
            raise TypeError(f"SpikeDetector.config must be a DetectorConfig, got {type(self.config).__name__}")
        self.device = torch.device(device)
        n = len(self.names)
        self.num_signals = 2 + len(OPERATOR_STATS) * n
        self._reset_state()
        # Parameter gradients are watched and reported but never flag on their own: a tied
        # or sparse one (embeddings) jumps with the batch's tokens.
        op_thresholds = [
            math.inf if key == "param_grad_norm" else self.config.operator_threshold
            for key, _ in OPERATOR_STATS for _ in range(n)
        ]
        self._thresholds = torch.tensor(
            [self.config.threshold] * 2 + op_thresholds, dtype=torch.float64, device=self.device,
        )
        self._log_factors = torch.tensor(
            [math.log(self.config.min_factor)] * 2 + [math.log(self.config.operator_min_factor)] * (self.num_signals - 2),
            dtype=torch.float64, device=self.device,
        )
        self._arange = torch.arange(self.config.window, device=self.device)
        self.events: list[SpikeEvent] = []  # every event, in order
        self._pending: list[SpikeEvent] = []
        self._last_polled = -1
        self._steps_seen: list[int] = []  # host-side: the steps written since the last poll
        self.latest: dict[str, Any] | None = None  # the newest polled row (host tensors)

    # -- state -------------------------------------------------------------------------

    def _reset_state(self) -> None:
        k, w = self.num_signals, self.config.window
        dev = self.device
        self.window = torch.full((w, k), math.nan, dtype=torch.float64, device=dev)
        self.position = torch.zeros(k, dtype=torch.int64, device=dev)
        self.accepted = torch.zeros(k, dtype=torch.int64, device=dev)
        self.cooldown = torch.zeros(k, dtype=torch.int64, device=dev)
        self.streak = torch.zeros(k, dtype=torch.int64, device=dev)
        # Row layout of the history: [x (K) | median (K) | scale (K) | flags (K) | nonfinite, step]
        self.history = torch.full((self.config.history, 4 * k + 2), math.nan, dtype=torch.float64, device=dev)
        self.flag = torch.zeros((), dtype=torch.bool, device=dev)
        self.upper_band = torch.full((), math.inf, dtype=torch.float64, device=dev)

    def state_dict(self) -> dict[str, Any]:
        """Device statistics, the not-yet-polled history, and every event so far.

        Tensors are host copies: on CPU ``.cpu()`` would return the live tensors, which
        :meth:`update` mutates in place, so a state dict kept in memory would drift.
        """
        def copy(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", copy=True)

        return {
            "window": copy(self.window), "position": copy(self.position), "accepted": copy(self.accepted),
            "history": copy(self.history), "flag": copy(self.flag), "upper_band": copy(self.upper_band),
            "cooldown": copy(self.cooldown), "streak": copy(self.streak),
            "events": [e.to_dict() for e in self.events],
            "pending_ids": [e.id for e in self._pending],
            "last_polled": self._last_polled, "steps_seen": list(self._steps_seen),
            "names": list(self.names),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != list(self.names):
            raise ValueError(
                f"SpikeDetector.load_state_dict: the checkpoint was taken with operators "
                f"{state['names']}, this detector watches {list(self.names)}"
            )
        if tuple(state["window"].shape) != tuple(self.window.shape):
            raise ValueError(
                f"SpikeDetector.load_state_dict: window shape {tuple(state['window'].shape)} in the "
                f"checkpoint, {tuple(self.window.shape)} configured (DetectorConfig.window changed?)"
            )
        for key in ("window", "position", "accepted", "cooldown", "streak", "flag", "upper_band"):
            getattr(self, key).copy_(state[key].to(self.device))
        history = state["history"].to(self.device)
        self._steps_seen = list(state["steps_seen"])
        if history.shape == self.history.shape:
            self.history = history.clone()
        else:  # DetectorConfig.history changed: move the unread rows to their new slots
            self.history.fill_(math.nan)
            for s in self._steps_seen:
                self.history[s % self.config.history] = history[s % history.shape[0]]
        self.events = [SpikeEvent(**_restore(e)) for e in state["events"]]
        by_id = {e.id: e for e in self.events}
        self._pending = [by_id[i] for i in state["pending_ids"] if i in by_id]
        self._last_polled = state["last_polled"]

    # -- per step (device only) --------------------------------------------------------

    def _signals(self, loss: torch.Tensor, stats: Any | None, overflow_ok: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw signal vector (K,) in float64 and whether anything was non-finite."""
        n = len(self.names)
        parts = [loss.detach().reshape(1).to(self.device, torch.float64)]
        if stats is None:
            parts.append(torch.full((1,), math.nan, dtype=torch.float64, device=self.device))
            parts.append(torch.full((len(OPERATOR_STATS) * n,), math.nan, dtype=torch.float64, device=self.device))
            nonfinite = ~torch.isfinite(parts[0]).all()
        else:
            parts.append(stats.grad_norm.detach().reshape(1).to(self.device, torch.float64))
            for key, _ in OPERATOR_STATS:
                parts.append(getattr(stats, key).detach().to(self.device, torch.float64))
            counts = stats.out_nonfinite.sum() + stats.msg_nonfinite.sum() + stats.grad_nonfinite
            nonfinite = (counts > 0) | ~torch.isfinite(parts[0]).all()
            if not overflow_ok:
                nonfinite = nonfinite | ~torch.isfinite(parts[1]).all()
        return torch.cat(parts), nonfinite

    def _baseline(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per signal: the baseline (median of the ``recent`` newest accepted values), the
        noise scale σ (1.4826 · MAD of the window's values around their local level) and
        the newest accepted value.

        Training curves trend (a loss falls, a gradient norm decays early on). A window-
        wide median lags a trend and the window's spread overstates the noise, so the
        window is cut, oldest to newest, into chunks of ``recent`` values and each value is
        measured from its own chunk's median: σ keeps the noise's real spread (its heavy
        tails, its correlation from step to step) without the trend's.
        """
        w = self.config.window
        r = max(1, min(self.config.recent, w))
        # Oldest to newest, per signal (each signal has its own write position).
        order = (self.position.unsqueeze(0) + self._arange.unsqueeze(1)) % w  # (W, K)
        ordered = self.window.gather(0, order)
        median = torch.nanmedian(ordered[-r:], dim=0).values
        usable = (w // r) * r
        chunks = ordered[w - usable :].view(usable // r, r, -1)  # (C, r, K), newest chunk last
        local = torch.nanmedian(chunks, dim=1, keepdim=True).values
        mad = torch.nanmedian((chunks - local).abs().view(usable, -1), dim=0).values
        return median, _MAD_TO_SIGMA * mad, ordered[-1]

    @torch.no_grad()
    def update(self, step: int, loss: torch.Tensor, stats: Any | None = None, overflow_ok: bool = False) -> torch.Tensor:
        """Feed one optimizer step; returns the device flag (True: loss/grad/non-finite spike).

        ``stats`` is a :class:`spikeguard.measure.StepStats` of the same operators, or
        None (then only the loss is watched). ``overflow_ok``: a non-finite gradient norm
        with a finite loss is a loss scaler's overflow (16-mixed), which the scaler
        handles: it is kept out of the statistics but is not a spike. No host sync.
        """
        raw, nonfinite = self._signals(loss, stats, overflow_ok)
        x = torch.log(raw.clamp_min(_TINY))  # log 0 would be -inf: a zero is just very small
        finite = torch.isfinite(x) & torch.isfinite(raw)
        median, scale, last = self._baseline()
        excess = x - median
        ready = self.accepted >= self.config.warmup
        # A spike is sudden: it also jumps by the factor from the last accepted value,
        # which a signal that merely trends (early training) does not.
        over = (excess > self._thresholds * scale) & (excess > self._log_factors) & (x - last > self._log_factors)
        flags = ready & finite & torch.nan_to_num(over.to(torch.float64), nan=0.0).bool()
        step_flag = nonfinite | flags[:2].any()
        # Spike values never enter the window; at a loss/grad spike no signal does. For
        # merge_gap steps after a flag, a signal also stays out while it is above half its
        # threshold: the tail of a spike must not widen the band for the next one.
        tail = (self.cooldown > 0) & (excess > 0.5 * self._thresholds * scale)
        accept = finite & ~flags & ~step_flag & ~torch.nan_to_num(tail.to(torch.float64), nan=0.0).bool()
        # A level that stays out of band for regime_steps steps is the new normal (a
        # changed data mix, a learning-rate change): let it in, or the band never adapts.
        self.streak = torch.where(flags, self.streak + 1, torch.zeros_like(self.streak))
        accept = accept | (finite & (self.streak > self.config.regime_steps))
        self.cooldown = torch.where(flags | step_flag, torch.full_like(self.cooldown, self.config.merge_gap), (self.cooldown - 1).clamp_min(0))
        slot = self.position % self.config.window
        current = self.window.gather(0, slot.unsqueeze(0)).squeeze(0)
        self.window.scatter_(0, slot.unsqueeze(0), torch.where(accept, x, current).unsqueeze(0))
        self.position += accept.to(torch.int64)
        self.accepted += accept.to(torch.int64)
        row = torch.cat([
            torch.where(torch.isfinite(raw), x, raw), median, scale, flags.to(torch.float64),
            nonfinite.reshape(1).to(torch.float64), torch.full((1,), float(step), dtype=torch.float64, device=self.device),
        ])
        self.history[step % self.config.history] = row
        self._steps_seen.append(step)
        self.flag = step_flag
        # The gradient norm's band (for clip): exp(median + threshold·scale), at least min_factor above.
        band = median[1] + torch.maximum(self._thresholds[1] * scale[1], self._log_factors[1])
        self.upper_band = torch.where(ready[1] & torch.isfinite(band), band.exp(), torch.full_like(band, math.inf))
        return step_flag

    # -- host side ---------------------------------------------------------------------

    def poll(self, predictor: Any | None = None) -> tuple[list[SpikeEvent], list[SpikeEvent]]:
        """Read the steps since the last poll (one transfer) into events.

        Returns ``(new, resolved)``: the spikes that started, and the earlier spikes whose
        outcome is now known. ``predictor(event, context) -> dict`` fills
        ``event.predicted`` (see :func:`predict_spike`); ``context`` carries the window's
        losses and gradient norms for the μ estimate.
        """
        if not self._steps_seen:
            return [], []
        steps = sorted(set(self._steps_seen))
        dropped = [s for s in steps if s <= steps[-1] - self.config.history]
        if dropped:
            import warnings

            warnings.warn(
                f"SpikeDetector.poll: {len(dropped)} steps were overwritten before being read "
                f"(poll at least every DetectorConfig.history={self.config.history} steps)",
                stacklevel=2,
            )
            steps = [s for s in steps if s not in set(dropped)]
        slots = torch.tensor([s % self.config.history for s in steps], device=self.device)
        rows = self.history.index_select(0, slots).cpu()  # the one transfer: only the new rows
        self._steps_seen = []
        k = self.num_signals
        new: list[SpikeEvent] = []
        resolved: list[SpikeEvent] = []
        window_cache = None
        for step, row in zip(steps, rows):
            if int(row[-1]) != step:
                continue
            self.latest = {"step": step, "x": row[:k], "median": row[k : 2 * k], "scale": row[2 * k : 3 * k]}
            x, median, scale, flags = row[:k], row[k : 2 * k], row[2 * k : 3 * k], row[3 * k : 4 * k].bool()
            nonfinite = bool(row[-2])
            # A spiking step never counts as recovered; a non-finite loss is divergence.
            if not (nonfinite or flags.any()) or not math.isfinite(float(x[0])):
                resolved += self._track(step, x, median)
            kind = None
            if nonfinite:
                kind = "nonfinite"
            elif flags[1]:
                kind = "grad_norm"
            elif flags[0]:
                kind = "loss"
            elif flags[2:].any():
                kind = "operator"
            if kind is None:
                continue
            last = self.events[-1] if self.events else None
            # A diverged event keeps absorbing its non-finite steps (one event, not one a step).
            if (
                last is not None and step - (last.step + last.duration - 1) <= self.config.merge_gap
                and last.outcome in ("pending", "diverged")
            ):
                last.duration = step - last.step + 1
                continue
            z = _robust_z(x, median, scale)
            trigger = {"grad_norm": z[1], "loss": z[0], "operator": z[2:].nan_to_num(nan=0.0).max()}
            origin, direction, ratios = attribute(self.names, x, median, scale, self.config)
            if window_cache is None:
                window_cache = self._window_values()
            base = _exp(median[0])
            floor = self.config.loss_floor
            if floor is None:
                floor = min(window_cache[0]) if window_cache[0] else 0.0
            band = _exp(median[0] + self.config.recover_z * scale[0])
            event = SpikeEvent(
                id=step, step=step, kind=kind,
                z=float(trigger[kind]) if kind in trigger else math.inf,
                loss=_exp(x[0]), grad_norm=_exp(x[1]),
                factor=_ratio(x[1], median[1]), loss_factor=_ratio(x[0], median[0]),
                baseline_loss=base, baseline_grad_norm=_exp(median[1]),
                loss_floor=floor, recovery_threshold=max(floor + (1 + self.config.kappa) * (base - floor), band),
                origin=origin, direction=direction, operator_ratios=ratios,
            )
            if predictor is not None:
                event.predicted = predictor(event, {"losses": window_cache[0], "grad_norms": window_cache[1]})
            self.events.append(event)
            self._pending.append(event)
            new.append(event)
        self._last_polled = steps[-1] if steps else self._last_polled
        return new, resolved

    def latest_values(self) -> dict[str, Any]:
        """The newest polled step as host numbers: loss, grad norm, their z-scores and the
        gradient norm's upper band, and per operator its raw statistics and their ratios
        to baseline (``{stat: {operator: value}}``). Empty before the first poll."""
        if self.latest is None:
            return {}
        x, med, scale = self.latest["x"], self.latest["median"], self.latest["scale"]
        z = _robust_z(x, med, scale)
        n = len(self.names)
        out: dict[str, Any] = {
            "step": self.latest["step"], "loss": _exp(x[0]), "grad_norm": _exp(x[1]),
            "loss_z": float(z[0]), "grad_norm_z": float(z[1]),
            "grad_norm_band": _exp(med[1] + max(self.config.threshold * float(scale[1]), math.log(self.config.min_factor))),
            "operators": {}, "ratios": {},
        }
        for s, (key, _) in enumerate(OPERATOR_STATS):
            sl = slice(2 + s * n, 2 + (s + 1) * n)
            out["operators"][key] = {name: _exp(v) for name, v in zip(self.names, x[sl])}
            out["ratios"][key] = {name: _ratio(v, m) for name, v, m in zip(self.names, x[sl], med[sl])}
        return out

    def _window_values(self) -> tuple[list[float], list[float]]:
        w = self.window[:, :2].cpu()
        keep = torch.isfinite(w).all(dim=1)
        return torch.exp(w[keep, 0]).tolist(), torch.exp(w[keep, 1]).tolist()

    def _track(self, step: int, x: torch.Tensor, median: torch.Tensor) -> list[SpikeEvent]:
        """Recovery of pending events from the loss at ``step`` (THEORY §4's (1+κ) rule)."""
        done = []
        loss = _exp(x[0])
        for event in list(self._pending):
            if step <= event.step + event.duration - 1:
                continue
            if not math.isfinite(loss):
                event.outcome = "diverged"
            elif loss <= event.recovery_threshold:
                event.outcome = "recovered"
                event.recovery_steps = step - event.step
            elif step - event.step >= self.config.recover_within:
                event.outcome = "not_recovered"
            if event.outcome != "pending":
                self._pending.remove(event)
                done.append(event)
        return done


def _restore(data: Any) -> Any:
    """Undo the JSON-safe strings of non-finite floats, nested dicts and lists included."""
    if isinstance(data, str) and data in ("inf", "-inf", "nan"):
        return float(data)
    if isinstance(data, dict):
        return {key: _restore(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_restore(value) for value in data]
    return data


def _robust_z(x: torch.Tensor, median: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x - median) / scale.clamp_min(1e-12)


def _exp(x: torch.Tensor) -> float:
    """exp of a log value; non-finite values (kept raw in the history) pass through."""
    value = float(x)
    return math.exp(value) if math.isfinite(value) else value


def _ratio(x: torch.Tensor, median: torch.Tensor) -> float:
    """x over its baseline (log values in); nan while the baseline is unknown."""
    diff = float(x) - float(median)
    if math.isnan(diff):
        return math.inf if math.isinf(float(x)) and not math.isnan(float(median)) else math.nan
    return math.exp(diff) if diff < 700 else math.inf


def attribute(
    names: Sequence[str], x: torch.Tensor, median: torch.Tensor, scale: torch.Tensor, config: DetectorConfig
) -> tuple[str | None, str | None, dict[str, dict[str, float]]]:
    """Where a spike starts, from each operator's statistics against its own baseline.

    Each operator gets an anomaly score per direction: the larger robust z of its output
    amax and RMS (forward), the robust z of its gradient message (backward). A score
    counts when it exceeds ``attribution_threshold``, its factor over the median exceeds
    ``attribution_min_factor``, and it reaches ``attribution_share`` of the largest score
    of that direction (so that step-to-step noise of a quiet operator is not mistaken for
    the start of a large spike); a non-finite statistic always counts. The first such
    operator in forward order is a forward origin; otherwise the top-most with a
    gradient-message anomaly is a backward origin (a gradient perturbation only travels
    down). Parameter gradients are reported but not used: a tied weight (GPT-2's
    ``lm_head`` is the embedding) is anomalous wherever its twin is.

    Returns ``(origin, direction, ratios)``, ratios per operator and statistic.
    """
    n = len(names)
    ratios: dict[str, dict[str, float]] = {name: {} for name in names}
    scores: dict[str, list[float]] = {}
    log_min = math.log(config.attribution_min_factor)
    for s, (key, _) in enumerate(OPERATOR_STATS):
        sl = slice(2 + s * n, 2 + (s + 1) * n)
        row = []
        for name, value, med, sc in zip(names, x[sl].tolist(), median[sl].tolist(), scale[sl].tolist()):
            ratios[name][key] = _ratio(torch.tensor(value), torch.tensor(med))
            if not math.isfinite(value):
                row.append(math.inf)  # inf, or NaN kept raw: always anomalous
            elif not math.isfinite(med) or value - med <= log_min:
                row.append(0.0)
            else:
                row.append((value - med) / max(sc, 1e-12))
        scores[key] = row
    forward = [max(a, r) for a, r in zip(scores["out_amax"], scores["out_rms"])]
    backward = scores["msg_norm"]

    def anomalous(row: list[float]) -> list[bool]:
        top = max(row, default=0.0)
        cut = config.attribution_share * top if math.isfinite(top) else math.inf
        return [v == math.inf or (v > config.attribution_threshold and v >= cut) for v in row]

    # The direction with the stronger evidence: a forward perturbation moves the
    # activations at and above its operator (and, through the loss, gradients everywhere);
    # a backward one moves gradient messages at and below it and leaves this step's
    # activations exactly as they were.
    if max(forward, default=0.0) >= max(backward, default=0.0):
        for name, flag in zip(names, anomalous(forward)):
            if flag:
                return name, "forward", ratios
    for name, flag in reversed(list(zip(names, anomalous(backward)))):
        if flag:
            return name, "backward", ratios
    return None, None, ratios


# -- prediction --------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """What the latest probe and the optimizer say about spikes (THEORY §1, §3, §4).

    Attributes:
        names: operators, forward order.
        amp_forward, amp_backward: A^f_k, A^b_k from the latest probe.
        output_norms, grad_msg_norms: |z_k| and |g_k| on the probe batch.
        grad_norm: |G| on the probe batch.
        tightness: observed / bound |Ĝ - G| at the latest probe (calibrates the bound).
        steady_m: the relative bias m of the configured steady perturbation (0 if none).
        lr: the step size γ (for Adam-family, the effective per-coordinate step).
        optimizer: ``"sgd"``, ``"momentum"`` or ``"adam"``; beta its momentum / β1.
        sharpness: the latest (preconditioned for Adam) sharpness, or None.
    """

    names: tuple[str, ...]
    amp_forward: tuple[float, ...]
    amp_backward: tuple[float, ...]
    output_norms: tuple[float, ...]
    grad_msg_norms: tuple[float, ...]
    grad_norm: float
    tightness: float = 1.0
    steady_m: float = 0.0
    lr: float = 1e-3
    optimizer: str = "sgd"
    beta: float = 0.9
    sharpness: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def predict_spike(event: SpikeEvent, context: dict[str, Any], prediction: Prediction | None, *, lr: float | None = None) -> dict[str, Any]:
    """The theory's prediction for a spike, from the latest probe's constants.

    - local size u at the origin: the relative change of the origin's statistic (output
      RMS forward, gradient message backward), ``u = |ratio - 1|``, a lower bound on
      |δ_k|/|z_k| (|ε_k|/|g_k|) by the triangle inequality;
    - predicted relative bias ``m_spike = A_k · |z_k| · u / |G|`` (Proposition 1 with the
      probe's constants, an upper bound) and the calibrated value ``tightness · m_spike``;
      the predicted spike factor is ``1 + m`` (``|Ĝ| ≤ |G| (1 + m)``);
    - outcome (THEORY §4): :func:`theory.spike_outcome` with the steady relative bias m
      of the probe's perturbation (the burst's own m if the spike persists for more than
      one step) and the sharpness against :func:`theory.stability_threshold`;
    - k_rec: :func:`theory.recovery_steps` with ``q = theory.pl_rate(γ, μ̂, m)`` and μ̂
      from :func:`theory.estimate_pl_constant` over the detector's window.
    Everything is labelled an estimate where it is one.
    """
    out: dict[str, Any] = {"source": "none"}
    if prediction is None:
        out["note"] = "no probe yet: attach AmplificationProbe for predicted spike factors"
    if prediction is not None and event.origin is not None and event.origin in prediction.names:
        k = prediction.names.index(event.origin)
        key = "out_rms" if event.direction == "forward" else "msg_norm"
        ratio = event.operator_ratios.get(event.origin, {}).get(key, math.nan)
        u = abs(ratio - 1) if math.isfinite(ratio) else math.inf
        if event.direction == "forward":
            amp, size = prediction.amp_forward[k], prediction.output_norms[k]
        else:
            amp, size = prediction.amp_backward[k], prediction.grad_msg_norms[k]
        m_bound = amp * size * u / prediction.grad_norm if prediction.grad_norm > 0 else math.inf
        m_cal = prediction.tightness * m_bound
        out.update(
            source="probe", local_relative_size=u, m_bound=m_bound, m=m_cal,
            factor_bound=1 + m_bound, factor=1 + m_cal,
        )
    m_outcome = prediction.steady_m if prediction is not None else 0.0
    if event.duration > 1 and "m" in out:
        m_outcome = max(m_outcome, out["m"])  # the perturbation persisted: its own m counts
    step_size = lr if lr is not None else (prediction.lr if prediction is not None else None)
    threshold = None
    sharpness = prediction.sharpness if prediction is not None else None
    if sharpness is not None and step_size:
        threshold = theory.stability_threshold(step_size, prediction.optimizer, prediction.beta)
    verdict = theory.spike_outcome(m_outcome, sharpness if threshold else None, threshold)
    out.update(outcome=verdict.verdict, reason=verdict.reason, m_persistent=m_outcome)
    losses, grads = context.get("losses", []), context.get("grad_norms", [])
    floor, base = event.loss_floor, event.baseline_loss
    k_rec = math.nan
    if verdict.recovers and step_size and len(losses) >= 2 and math.isfinite(base) and base > floor:
        try:
            # THEORY §4: μ from |∇loss|² / (2(loss - loss_min)) over the window.
            mu = theory.estimate_pl_constant([g * g for g in grads], losses, min(losses))
            q = theory.pl_rate(step_size, mu, min(m_outcome, 0.999))
            if q < 0:  # γμ(1-m)/2 > 1: the estimate contracts past the floor in one step
                out["q_note"] = f"q={q:.3g} < 0 clipped to 0 (γμ̂ beyond the PL step condition)"
                q = 0.0
            # The spike's loss excess: the loss seen at the spike, or the one-step rise
            # of THEORY §4 from the predicted bias (first order when no sharpness is known).
            g = event.baseline_grad_norm
            rise = 0.0
            if "m" in out and math.isfinite(g) and math.isfinite(out["m"]):
                rise = theory.spike_height(step_size, g, out["m"] * g, sharpness or 0.0)
            observed = event.loss if math.isfinite(event.loss) else math.inf
            spike_excess = max(observed, base + max(rise, 0.0)) - floor
            # The same κ as the observed recovery uses (see SpikeEvent.recovery_threshold).
            kappa = (event.recovery_threshold - floor) / (base - floor) - 1
            k_rec = theory.recovery_steps(spike_excess, base - floor, q, kappa)
            out.update(mu_estimate=mu, q=q, predicted_rise=rise, kappa=kappa)
        except ValueError as err:
            out["k_rec_note"] = str(err)
    out["k_rec"] = k_rec
    return out
