"""SpikeGuard: detect, attribute, predict and act on gradient spikes in a Lightning run."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from spikeguard import keys, passes, signals
from spikeguard._tensor import RngState
from spikeguard.callbacks._base import (
    CallbackBase,
    adopt_renamed_state,
    all_reduce_max,
    all_reduce_mean,
    log_dir,
    resolve_chain,
    resolve_model,
    world,
)
from spikeguard.config import ConfigError, check_choice, from_mapping
from spikeguard.detect import DetectorConfig, SpikeDetector, predict_spike
from spikeguard.detect.actions import clip_factor, relative_difference
from spikeguard.measure.stats import StepStatistics
from spikeguard.operators import OperatorChain
from spikeguard.paths import RunPaths
from spikeguard.records import SpikeEvent
from spikeguard.sinks import EventLogSink, LoggerSink, Sinks, check_sinks
from spikeguard.store import ProbeStore

__all__ = ["SpikeGuard", "ACTIONS"]

#: What SpikeGuard may do at a spike.
ACTIONS = ("none", "clip", "skip")


class SpikeGuard(CallbackBase):
    """One callback for spike diagnostics: ``Trainer(callbacks=[SpikeGuard()])``.

    Every optimizer step it collects per-operator statistics on the device and feeds a
    robust online detector (:class:`spikeguard.detect.SpikeDetector`); the host reads
    the detector only on logging steps, so in ``action="none"`` there is no host sync
    per step. At a spike it attributes the origin (operator and direction), predicts
    the spike factor, the outcome and k_rec from the latest probe measured before the
    spike (an AmplificationProbe's store), tracks the observed recovery, and hands the
    event to its sinks: ``<log dir>/spikeguard/events.jsonl``, every Lightning logger,
    W&B's event table and alerts, and yours.

    Args:
        action: ``"none"`` (diagnose only), ``"clip"`` (scale the gradient down to the
            detector's upper band, on the device, no sync) or ``"skip"`` (a true skip:
            no parameter change, the optimizer's state and step counters untouched; one
            host sync per step to decide). Decisions are identical on every rank.
        detector: the detector's settings, a :class:`~spikeguard.detect.DetectorConfig`
            or a dict of its fields (YAML: ``detector: {threshold: 5.0, window: 64}``).
        max_consecutive_skips: with ``action="skip"``, the most steps skipped in a row;
            a spike that outlasts them comes from the weights, not a transient fault, and
            steps go through again (with a warning).
        rerun: re-run a spiking step's forward and backward on the same batch, weights
            and RNG (no optimizer update): equal gradient ⇒ ``"reproducible"`` (data or
            optimisation), different ⇒ ``"transient"`` (numerics, hardware). Needs one
            sync per step and ``accumulate_grad_batches=1``.
        rerun_tolerance: relative gradient difference under which a re-run is equal.
        log_every_n_steps: how often the host reads the detector and logs (None:
            ``Trainer(log_every_n_steps=...)``). Events are written at these reads.
        operator_metrics: also log the per-operator statistics and their ratios.
        events_dir: where ``events.jsonl`` goes (default ``<log dir>/spikeguard``).
        chain: the operators (None: discovered from the model), or name patterns.
        model_attr: the attribute of the LightningModule that holds the model.
        alert: send a W&B alert at each spike when a WandbLogger runs online.
        probes: the probe store predictions come from; None finds the
            AmplificationProbe among the trainer's callbacks (no prediction of the spike
            factor without one).
        sinks: more sinks for spikes, outcomes and metrics (:mod:`spikeguard.sinks`).
        name: tells two SpikeGuard callbacks apart in a checkpoint (its ``state_key``
            is ``SpikeGuard`` or ``SpikeGuard[name]``; settings stay out of it, so a run
            resumed with another action or threshold keeps its detector, events and
            counters).

    Logged (against ``trainer/global_step``; see :mod:`spikeguard.keys`):

    ===============================================  ==========================================
    key                                              value
    ===============================================  ==========================================
    ``spikeguard/loss``, ``spikeguard/grad_norm``     what the detector saw at the logging step
    ``spikeguard/loss_z``, ``spikeguard/grad_norm_z`` robust z-scores of their log values
    ``spikeguard/grad_norm_band``                    the gradient norm's upper band
    ``spikeguard/spikes``                            events so far (also in the progress bar)
    ``spikeguard/skipped_steps``, ``clipped_steps``  actions so far
    ``spikeguard/spike/factor``, ``z``               at each spike's step
    ``spikeguard/spike/predicted_factor``            the calibrated prediction at the spike
    ``spikeguard/spike/predicted_k_rec``             THEORY §4's recovery steps at the spike
    ``spikeguard/spike/recovery_steps``              observed, when the spike resolves
    ``spikeguard/op/<operator>/<stat>[_ratio]``      per-operator statistics (and / baseline)
    ===============================================  ==========================================
    """

    def __init__(
        self,
        action: str = "none",
        detector: DetectorConfig | None = None,
        max_consecutive_skips: int = 4,
        rerun: bool = False,
        rerun_tolerance: float = 1e-3,
        log_every_n_steps: int | None = None,
        operator_metrics: bool = True,
        events_dir: str | None = None,
        chain: OperatorChain | list[str] | None = None,
        model_attr: str | None = None,
        alert: bool = True,
        probes: ProbeStore | None = None,
        sinks: Sequence[Any] | None = None,
        name: str | None = None,
    ):
        check_choice("SpikeGuard", "action", action, ACTIONS)
        if not isinstance(max_consecutive_skips, int) or isinstance(max_consecutive_skips, bool) or max_consecutive_skips < 1:
            raise ConfigError("SpikeGuard", "max_consecutive_skips", max_consecutive_skips, "an int >= 1")
        if not isinstance(rerun_tolerance, (int, float)) or not rerun_tolerance > 0:
            raise ConfigError("SpikeGuard", "rerun_tolerance", rerun_tolerance, "> 0")
        if log_every_n_steps is not None and (
            not isinstance(log_every_n_steps, int) or isinstance(log_every_n_steps, bool) or log_every_n_steps < 1
        ):
            raise ConfigError("SpikeGuard", "log_every_n_steps", log_every_n_steps, "None or an int >= 1")
        if probes is not None and not isinstance(probes, ProbeStore):
            raise TypeError(f"SpikeGuard.probes must be None or a ProbeStore (AmplificationProbe.store), got {type(probes).__name__}")
        if name is not None and (not isinstance(name, str) or not name):
            raise ConfigError("SpikeGuard", "name", name, "None or a non-empty string")
        self.config = from_mapping(DetectorConfig, detector, "SpikeGuard.detector")
        self.action = action
        self.max_consecutive_skips = max_consecutive_skips
        self.rerun = rerun
        self.rerun_tolerance = float(rerun_tolerance)
        self.log_every_n_steps = log_every_n_steps
        self.operator_metrics = operator_metrics
        self.events_dir = events_dir
        self.chain = chain
        self.model_attr = model_attr
        self.alert = alert
        self.probes = probes
        self.name = name
        self._user_sinks = check_sinks("SpikeGuard", sinks)

        self.stats: StepStatistics | None = None
        self.detector: SpikeDetector | None = None
        self.num_skipped = 0
        self.num_clipped = 0
        self._consecutive = 0
        self._chain: OperatorChain | None = None
        self._paths: RunPaths | None = None
        self._loss: torch.Tensor | None = None
        self._skip = False
        self._patched: list[tuple[Any, Any]] = []
        self._pending_state: dict[str, Any] | None = None
        self._saved: tuple[Any, int, RngState] | None = None
        self._rerun_verdicts: dict[int, str] = {}
        self._clip_count: torch.Tensor | None = None  # on the device: no sync to count
        self._last_step = -1
        self._poll_due = False
        self._sinks = Sinks("SpikeGuard")

    @property
    def state_key(self) -> str:
        return f"SpikeGuard[{self.name}]" if self.name else "SpikeGuard"

    @property
    def events(self) -> list[SpikeEvent]:
        """Every spike event so far (rank 0's view)."""
        return self.detector.events if self.detector is not None else []

    def _settings(self) -> dict[str, Any]:
        """The settings a checkpoint records, to say what changed on resume."""
        return {"action": self.action, "detector": dataclasses.asdict(self.config)}

    # -- setup and teardown ------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        root = log_dir(trainer)  # a collective: every rank calls it
        self._paths = RunPaths.at(root, self.events_dir)
        if self.rerun and getattr(trainer, "accumulate_grad_batches", 1) != 1:
            raise ValueError(
                "SpikeGuard(rerun=True) compares a re-run micro-batch with the step's gradient, so it needs "
                f"Trainer(accumulate_grad_batches=1), got {trainer.accumulate_grad_batches}"
            )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Build on the model the strategy has wrapped (after ``configure_model`` and strategy setup)."""
        model = resolve_model(pl_module, self.model_attr)
        if self._chain is None:
            self._chain = resolve_chain("SpikeGuard", model, self.chain)
            self.stats = StepStatistics(self._chain, model)
        if self.detector is None or self.detector.device != pl_module.device:
            self.detector = SpikeDetector(self._chain.names, self.config, device=pl_module.device)
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None
        if self.probes is None:
            self.probes = _find_probe_store(trainer)
        sinks: list[Any] = []
        if trainer.is_global_zero:
            from spikeguard import wandb as sg_wandb

            sinks = [EventLogSink(self._paths.events), LoggerSink(trainer, "SpikeGuard"), *sg_wandb.sinks_for(trainer, alert=self.alert)]
        self._sinks = Sinks("SpikeGuard", sinks + self._user_sinks)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.action == "skip":
            for optimizer in trainer.optimizers:
                self._patch(optimizer)
        self._clip_count = torch.full((), float(self.num_clipped), device=pl_module.device)
        self.stats.attach()
        self.stats.reset()

    def _patch(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer.step`` skippable: the closure (forward, backward, our decision)
        still runs, the update does not. Works for every torch optimizer that calls its
        closure once (not LBFGS)."""
        original = optimizer.step

        def step(closure: Any = None, **kwargs: Any) -> Any:
            if closure is None:
                return None if self._skip else original(**kwargs)
            loss = closure()  # runs training_step, backward and on_before_optimizer_step
            if self._skip:
                return loss
            return original(closure=lambda: loss, **kwargs)

        optimizer.step = step
        self._patched.append((optimizer, original))

    def _unpatch(self) -> None:
        for optimizer, original in self._patched:
            optimizer.step = original
        self._patched.clear()

    def _detach(self) -> None:
        if self.stats is not None:
            self.stats.detach()
        self._unpatch()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self.stats is not None:
            self.stats.detach()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._poll(trainer, pl_module)
        self._sinks.close()
        self._detach()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._detach()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._detach()

    # -- per step ----------------------------------------------------------------------

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.stats.attach()  # idempotent; re-attaches after validation
        if self.rerun:
            self._saved = (batch, batch_idx, RngState.capture([pl_module.device]))

    @staticmethod
    def _scaler(trainer: Any) -> Any:
        """The GradScaler of 16-mixed training, once it has a (device) scale; else None."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and getattr(scaler, "_scale", None) is not None else None

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        loss = loss.detach()
        scaler = self._scaler(trainer)
        if scaler is not None:
            loss = loss / scaler._scale  # 16-mixed scales the loss before backward: undo, on device
        # Lightning divides by accumulate_grad_batches: the sum over micro-batches is the mean.
        self._loss = loss if self._loss is None else self._loss + loss

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        step = trainer.global_step
        if self.detector is None or step == self._last_step:
            return  # several optimizers: one decision per optimizer step
        self._last_step = step
        stats = self.stats.collect()
        self.stats.reset()
        loss = self._loss if self._loss is not None else torch.tensor(math.nan, device=pl_module.device)
        self._loss = None
        loss = all_reduce_mean(loss.reshape(1).float(), trainer).reshape(())
        scaler = self._scaler(trainer)
        if scaler is not None:
            # Gradient messages were seen scaled by the loss scale: undo it (the scale grows
            # and shrinks over training). An inf gradient with a finite loss is the scaler's
            # overflow, which it skips and handles itself: not a spike.
            stats = dataclasses.replace(
                stats, msg_norm=stats.msg_norm / scaler._scale.to(stats.msg_norm.dtype),
                msg_nonfinite=torch.zeros_like(stats.msg_nonfinite),
                grad_nonfinite=torch.zeros_like(stats.grad_nonfinite),
            )
        flag = self.detector.update(step, loss, stats, overflow_ok=scaler is not None)
        if world(trainer) > 1:
            flag = all_reduce_max(flag.to(torch.int32), trainer).bool()
        if self.action == "clip":
            self._clip(pl_module, flag, stats.grad_norm)
        needs_host = self.action == "skip" or self.rerun
        spike_now = bool(flag) if needs_host else False  # the one sync per step, only when asked
        if self.action == "skip":
            # Skipping helps against a transient fault; against a spike the weights themselves
            # cause, it freezes training where it is. After max_consecutive_skips, let steps through.
            self._consecutive = self._consecutive + 1 if spike_now else 0
            self._skip = spike_now and self._consecutive <= self.max_consecutive_skips
            if spike_now and not self._skip and self._consecutive == self.max_consecutive_skips + 1:
                warnings.warn(
                    f"SpikeGuard: {self.max_consecutive_skips} steps in a row were skipped and the spike "
                    f"persists at step {step}; letting steps through (skipping cannot fix a spike the "
                    "weights cause)",
                    stacklevel=2,
                )
            self.num_skipped += int(self._skip)
        if self.rerun and spike_now:
            self._rerun_verdicts[step] = self._rerun_step(trainer, pl_module)
        self._poll_due = spike_now or step % self._every(trainer) == 0

    def _every(self, trainer: Any) -> int:
        return self.log_every_n_steps or getattr(trainer, "log_every_n_steps", 50) or 50

    @torch.no_grad()
    def _clip(self, pl_module: Any, flag: torch.Tensor, grad_norm: torch.Tensor) -> None:
        factor = clip_factor(flag, grad_norm, self.detector.upper_band)
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor.to(grads[0].dtype))
        self._clip_count += (factor < 1).to(self._clip_count.dtype)

    def _rerun_step(self, trainer: Any, pl_module: Any) -> str:
        """Recompute the gradient of this step with the same batch, weights and RNG.

        The passes run as a re-run (:mod:`spikeguard.passes`): statistics sit it out and
        transient perturbations stay off; persistent ones apply.
        """
        batch, batch_idx, rng = self._saved
        params = [p for p in pl_module.parameters() if p.requires_grad]
        with rng.forked(), passes.rerun(), torch.enable_grad(), trainer.precision_plugin.forward_context():
            out = pl_module.training_step(batch, batch_idx)
            loss = out["loss"] if isinstance(out, dict) else out
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        kept = [(g, p.grad) for p, g in zip(params, grads) if p.grad is not None]
        rerun = [None if g is None else all_reduce_mean(g.clone(), trainer) for g, _ in kept]
        relative = float(relative_difference(rerun, [grad for _, grad in kept]))
        return "reproducible" if relative <= self.rerun_tolerance else "transient"

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._poll_due:
            self._poll_due = False
            self._poll(trainer, pl_module)
            # In the progress bar (which keeps the latest value between polls).
            pl_module.log("spikes", float(len(self.events)), prog_bar=True, logger=False, on_step=True, on_epoch=False)

    # -- reading the detector ----------------------------------------------------------

    def _poll(self, trainer: Any, pl_module: Any) -> None:
        if self.detector is None:
            return
        store = self.probes
        # The latest probe measured at or before the spike's step, whatever ran since.
        new, resolved = self.detector.poll(
            lambda e, c: predict_spike(e, c, store.latest(at_or_before=e.step) if store is not None else None)
        )
        for event in new:
            event.action = self.action
            event.rerun = self._rerun_verdicts.pop(event.step, None)
        if not trainer.is_global_zero:
            return
        for event in new:
            self._sinks.spike(event)
            self._sinks.metrics(_event_metrics(event), event.step)
        for event in resolved:
            self._sinks.outcome(event)
            if event.recovery_steps is not None:
                self._sinks.metrics({keys.metric("spike", "recovery_steps"): float(event.recovery_steps)}, event.step + event.recovery_steps)
        latest = self.detector.latest
        self._sinks.metrics(self._step_metrics(), latest["step"] if latest else trainer.global_step)

    def _step_metrics(self) -> dict[str, float]:
        latest = self.detector.latest_values()
        if not latest:
            return {}
        if self._clip_count is not None:
            self.num_clipped = int(self._clip_count)  # a logging step: reading is allowed
        out: dict[str, Any] = {}
        for sig in signals.GLOBAL:
            out[keys.signal_metric(sig)] = latest[sig.name]
            out[keys.metric(f"{sig.name}_z")] = latest[f"{sig.name}_z"]
        out.update({
            keys.metric("grad_norm_band"): latest["grad_norm_band"],
            keys.metric("spikes"): float(len(self.events)),
            keys.metric("skipped_steps"): float(self.num_skipped),
            keys.metric("clipped_steps"): float(self.num_clipped),
        })
        if self.operator_metrics:
            for stat, values in latest["operators"].items():
                for name, value in values.items():
                    out[keys.operator_metric(name, stat)] = value
                    out[keys.operator_metric(name, f"{stat}_ratio")] = latest["ratios"][stat][name]
        return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}

    # -- checkpointing -----------------------------------------------------------------

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        old = adopt_renamed_state(self, trainer, checkpoint)
        if old is not None:
            warnings.warn(f"SpikeGuard: restored its state from the checkpoint's {old!r} (an older key)", stacklevel=2)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"num_skipped": self.num_skipped, "num_clipped": self.num_clipped, "settings": self._settings()}
        if self.detector is not None:
            state["detector"] = self.detector.state_dict()
        elif self._pending_state is not None and "detector" in self._pending_state:
            state["detector"] = self._pending_state["detector"]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "detector" not in state_dict:
            self.num_skipped = int(state_dict.get("num_skipped", 0))
            self.num_clipped = int(state_dict.get("num_clipped", 0))
            warnings.warn("SpikeGuard.load_state_dict: no detector state in the checkpoint; starting fresh", stacklevel=2)
            return
        if self.detector is not None:
            self._restore(state_dict)
        else:  # restored before the model is built (on_fit_start): applied there
            self.num_skipped = int(state_dict.get("num_skipped", 0))
            self.num_clipped = int(state_dict.get("num_clipped", 0))
            self._pending_state = state_dict

    def _restore(self, state: dict[str, Any]) -> None:
        self.num_skipped = int(state.get("num_skipped", 0))
        self.num_clipped = int(state.get("num_clipped", 0))
        self.detector.load_state_dict(state["detector"])
        changed = _changes(state.get("settings"), self._settings())
        if changed:
            warnings.warn(
                f"SpikeGuard: resumed with changed settings ({', '.join(changed)}); the detector's "
                "statistics, the events and the counters carry over",
                stacklevel=3,
            )


def _changes(old: Mapping[str, Any] | None, new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for each setting that differs (nested dicts by dotted key)."""
    if not old:
        return []
    out = []
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            out += _changes(before, value, f"{prefix}{key}.")
        elif key in old and before != value:
            out.append(f"{prefix}{key}: {before!r} -> {value!r}")
    return out


def _event_metrics(event: SpikeEvent) -> dict[str, float]:
    out = {keys.metric("spike", "factor"): event.factor, keys.metric("spike", "z"): event.z}
    pred = event.predicted
    if pred is not None:
        out[keys.metric("spike", "predicted_factor")] = pred.factor
        out[keys.metric("spike", "predicted_k_rec")] = pred.k_rec
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def _find_probe_store(trainer: Any) -> ProbeStore | None:
    """The store of the trainer's AmplificationProbe (the first, if several), or None."""
    from spikeguard.callbacks.probe import AmplificationProbe

    probes = [c for c in getattr(trainer, "callbacks", []) if isinstance(c, AmplificationProbe)]
    if len(probes) > 1:
        warnings.warn(
            f"SpikeGuard: {len(probes)} AmplificationProbe callbacks; predictions use the first "
            f"({probes[0].state_key}); pass SpikeGuard(probes=<probe>.store) to choose",
            stacklevel=3,
        )
    return probes[0].store if probes else None
