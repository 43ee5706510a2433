"""The online spike detector: robust statistics on the device, events read on the host.

The detector keeps robust statistics of log values on the device and flags, per
optimizer step, a spike when a signal leaves its band; the host reads what happened
only when asked (:meth:`SpikeDetector.poll`), in one transfer. The signals are those of
the registry (:mod:`spikeguard.signals`): the loss and the global gradient norm (spikes
of kind ``loss`` / ``grad_norm``) and, per operator, output amax and RMS, the
gradient-message norm and the parameter-gradient norm (anomalies of kind ``operator``
when the loss and the global norm stay in band).

Robust statistics of log values, per signal, over the last ``window`` accepted values:
the baseline is the median of the ``recent`` newest ones (it follows the trend of a
training curve), the noise scale σ = 1.4826 · MAD of the values around their local
level (the median of their own chunk of ``recent`` values, so that a slow trend does not
inflate it), and ``z = (x - baseline) / σ``. A value is a spike when ``z > threshold``
*and* it exceeds both the baseline and the last accepted value by ``min_factor`` (so
that a very quiet signal does not flag tiny wiggles, and a signal that rises steadily,
as some do early in training, is not a spike). Flagged values never enter the window,
nor do the elevated values of a spike's tail (for ``merge_gap`` steps, those above half
the threshold), so a spike does not widen the band for the next one; non-finite values
are a spike of their own kind and never enter it either. A level that persists for
``regime_steps`` becomes the new normal. Why these defaults: z > 6 is OLMo-core's 6σ
rule made robust (median/MAD instead of mean/std, which a spike inflates); min_factor 3
is the factor of Lightning's SpikeDetection, above the 2-2.5x jumps a small-batch run's
gradient norm makes on its own; an operator's own statistics flag only at z > 10 and 8x
(silent corruption and absorbed outliers are far larger; a natural batch can move one
block's gradient message 10x for a step).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from spikeguard import signals
from spikeguard.detect.attribution import attribute
from spikeguard.detect.config import DetectorConfig
from spikeguard.detect.recovery import track_recovery
from spikeguard.detect.robust import MAD_TO_SIGMA, exp_of, ratio_of, robust_z
from spikeguard.records import SpikeEvent, SpikePrediction

__all__ = ["SpikeDetector", "Predictor"]

_TINY = 1e-30

#: ``predictor(event, context) -> SpikePrediction``; context holds the window's
#: ``losses`` and ``grad_norms`` (host floats) for the μ estimate.
Predictor = Callable[[SpikeEvent, dict[str, Any]], SpikePrediction]


class SpikeDetector:
    """Online spike detector over the registry's signals.

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
        self.layout = signals.Layout(self.names)
        self.num_signals = self.layout.size
        self._reset_state()
        # A signal that may not flag on its own (parameter gradients) has an infinite threshold.
        self._thresholds = torch.tensor(
            [getattr(self.config, s.threshold) if s.flags else math.inf for s in self.layout.signals],
            dtype=torch.float64, device=self.device,
        )
        self._log_factors = torch.tensor(
            [math.log(getattr(self.config, s.min_factor)) for s in self.layout.signals],
            dtype=torch.float64, device=self.device,
        )
        self._arange = torch.arange(self.config.window, device=self.device)
        self._loss = self.layout.index("loss")
        self._grad = self.layout.index("grad_norm")
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
            "names": list(self.names), "signals": [s.name for s in signals.SIGNALS],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != list(self.names):
            raise ValueError(
                f"SpikeDetector.load_state_dict: the checkpoint was taken with operators "
                f"{state['names']}, this detector watches {list(self.names)}"
            )
        saved_signals = state.get("signals", [s.name for s in signals.SIGNALS])
        if list(saved_signals) != [s.name for s in signals.SIGNALS]:
            raise ValueError(
                f"SpikeDetector.load_state_dict: the checkpoint was taken with signals {list(saved_signals)}, "
                f"this version watches {[s.name for s in signals.SIGNALS]}"
            )
        for key in ("accepted", "cooldown", "streak", "flag", "upper_band"):
            getattr(self, key).copy_(state[key].to(self.device))
        window, position = state["window"].to(self.device), state["position"].to(self.device)
        if window.shape == self.window.shape:
            self.window.copy_(window)
            self.position.copy_(position)
        else:  # DetectorConfig.window changed: keep each signal's newest accepted values
            self._resize_window(window, position)
        history = state["history"].to(self.device)
        self._steps_seen = list(state["steps_seen"])
        if history.shape == self.history.shape:
            self.history = history.clone()
        else:  # DetectorConfig.history changed: move the unread rows to their new slots
            self.history.fill_(math.nan)
            for s in self._steps_seen:
                self.history[s % self.config.history] = history[s % history.shape[0]]
        self.events = [SpikeEvent.from_dict(e) for e in state["events"]]
        by_id = {e.id: e for e in self.events}
        self._pending = [by_id[i] for i in state["pending_ids"] if i in by_id]
        self._last_polled = state["last_polled"]

    def _resize_window(self, old: torch.Tensor, position: torch.Tensor) -> None:
        """Fill the configured window with the newest values of a window of another length."""
        w_old, w = old.shape[0], self.config.window
        order = (position.unsqueeze(0) + torch.arange(w_old, device=self.device).unsqueeze(1)) % w_old
        ordered = old.gather(0, order)  # oldest to newest, per signal
        keep = min(w, w_old)
        self.window.fill_(math.nan)
        self.window[:keep] = ordered[w_old - keep :]
        # Unwritten (NaN) slots come first in the kept span, so for every signal the next
        # write goes right after the newest value: slot keep (slot 0 when the window is full).
        self.position.fill_(keep % w)

    # -- per step (device only) --------------------------------------------------------

    def _signals(self, loss: torch.Tensor, stats: Any | None, overflow_ok: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw signal vector (K,) in float64, in the layout's order, and whether anything was non-finite."""
        n = len(self.names)
        loss64 = loss.detach().reshape(1).to(self.device, torch.float64)
        parts = []
        for sig in signals.GLOBAL:
            if sig.name == "loss":
                parts.append(loss64)
            elif stats is None:
                parts.append(torch.full((1,), math.nan, dtype=torch.float64, device=self.device))
            else:
                parts.append(getattr(stats, sig.name).detach().reshape(1).to(self.device, torch.float64))
        for sig in signals.OPERATOR:
            if stats is None:
                parts.append(torch.full((n,), math.nan, dtype=torch.float64, device=self.device))
            else:
                parts.append(getattr(stats, sig.name).detach().to(self.device, torch.float64))
        nonfinite = ~torch.isfinite(loss64).all()
        if stats is not None:
            counts = stats.out_nonfinite.sum() + stats.msg_nonfinite.sum() + stats.grad_nonfinite
            nonfinite = nonfinite | (counts > 0)
            if not overflow_ok:
                nonfinite = nonfinite | ~torch.isfinite(parts[self._grad]).all()
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
        return median, MAD_TO_SIGMA * mad, ordered[-1]

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
        step_flag = nonfinite | flags[: self.layout.num_global].any()
        # Spike values never enter the window; at a loss/grad spike no signal does. For
        # merge_gap steps after a flag, a signal also stays out while it is above half its
        # threshold: the tail of a spike must not widen the band for the next one.
        tail = (self.cooldown > 0) & (excess > 0.5 * self._thresholds * scale)
        accept = finite & ~flags & ~step_flag & ~torch.nan_to_num(tail.to(torch.float64), nan=0.0).bool()
        # A level that stays out of band for regime_steps steps is the new normal.
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
        g = self._grad
        band = median[g] + torch.maximum(self._thresholds[g] * scale[g], self._log_factors[g])
        self.upper_band = torch.where(ready[g] & torch.isfinite(band), band.exp(), torch.full_like(band, math.inf))
        return step_flag

    # -- host side ---------------------------------------------------------------------

    def poll(self, predictor: Predictor | None = None) -> tuple[list[SpikeEvent], list[SpikeEvent]]:
        """Read the steps since the last poll (one transfer) into events.

        Returns ``(new, resolved)``: the spikes that started, and the earlier spikes whose
        outcome is now known. ``predictor(event, context)`` gives ``event.predicted``.
        """
        if not self._steps_seen:
            return [], []
        steps = sorted(set(self._steps_seen))
        dropped = [s for s in steps if s <= steps[-1] - self.config.history]
        if dropped:
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
            x, median, scale, flags = row[:k], row[k : 2 * k], row[2 * k : 3 * k], row[3 * k : 4 * k].bool()
            self.latest = {"step": step, "x": x, "median": median, "scale": scale}
            nonfinite = bool(row[-2])
            # A spiking step never counts as recovered; a non-finite loss is divergence.
            if not (nonfinite or flags.any()) or not math.isfinite(float(x[self._loss])):
                resolved += track_recovery(self._pending, step, exp_of(x[self._loss]), self.config)
            kind = self._kind(nonfinite, flags)
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
            if window_cache is None:
                window_cache = self._window_values()
            event = self._event(step, kind, x, median, scale, window_cache)
            if predictor is not None:
                event.predicted = predictor(event, {"losses": window_cache[0], "grad_norms": window_cache[1]})
            self.events.append(event)
            self._pending.append(event)
            new.append(event)
        self._last_polled = steps[-1] if steps else self._last_polled
        return new, resolved

    def _kind(self, nonfinite: bool, flags: torch.Tensor) -> str | None:
        if nonfinite:
            return "nonfinite"
        for name in signals.EVENT_PRECEDENCE:
            if flags[self.layout.index(name)]:
                return name
        if flags[self.layout.num_global :].any():
            return "operator"
        return None

    def _event(self, step: int, kind: str, x, median, scale, window: tuple[list[float], list[float]]) -> SpikeEvent:
        lo, gr = self._loss, self._grad
        z = robust_z(x, median, scale)
        if kind in signals.EVENT_PRECEDENCE:
            trigger = float(z[self.layout.index(kind)])
        elif kind == "operator":
            trigger = float(z[self.layout.num_global :].nan_to_num(nan=0.0).max())
        else:
            trigger = math.inf
        origin, direction, ratios = attribute(self.names, x, median, scale, self.config)
        base = exp_of(median[lo])
        floor = self.config.loss_floor
        if floor is None:
            floor = min(window[0]) if window[0] else 0.0
        band = exp_of(median[lo] + self.config.recover_z * scale[lo])
        return SpikeEvent(
            id=step, step=step, kind=kind, z=trigger,
            loss=exp_of(x[lo]), grad_norm=exp_of(x[gr]),
            factor=ratio_of(x[gr], median[gr]), loss_factor=ratio_of(x[lo], median[lo]),
            baseline_loss=base, baseline_grad_norm=exp_of(median[gr]),
            loss_floor=floor, recovery_threshold=max(floor + (1 + self.config.kappa) * (base - floor), band),
            origin=origin, direction=direction, operator_ratios=ratios,
        )

    def latest_values(self) -> dict[str, Any]:
        """The newest polled step as host numbers: every global signal, its z-score
        (``<name>_z``) and the gradient norm's upper band, and per operator its raw
        statistics and their ratios to baseline (``{signal: {operator: value}}``). Empty
        before the first poll."""
        if self.latest is None:
            return {}
        x, med, scale = self.latest["x"], self.latest["median"], self.latest["scale"]
        z = robust_z(x, med, scale)
        g = self._grad
        out: dict[str, Any] = {"step": self.latest["step"], "operators": {}, "ratios": {}}
        for sig in signals.GLOBAL:
            i = self.layout.index(sig.name)
            out[sig.name] = exp_of(x[i])
            out[f"{sig.name}_z"] = float(z[i])
        out["grad_norm_band"] = exp_of(med[g] + max(self.config.threshold * float(scale[g]), math.log(self.config.min_factor)))
        for sig in signals.OPERATOR:
            sl = self.layout.slice(sig.name)
            out["operators"][sig.name] = {name: exp_of(v) for name, v in zip(self.names, x[sl])}
            out["ratios"][sig.name] = {name: ratio_of(v, m) for name, v, m in zip(self.names, x[sl], med[sl])}
        return out

    def _window_values(self) -> tuple[list[float], list[float]]:
        w = self.window[:, [self._loss, self._grad]].cpu()
        keep = torch.isfinite(w).all(dim=1)
        return torch.exp(w[keep, 0]).tolist(), torch.exp(w[keep, 1]).tolist()
