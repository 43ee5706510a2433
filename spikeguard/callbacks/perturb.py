"""Perturb: inject forward and backward perturbations on a schedule keyed on the optimizer step."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from spikeguard import keys
from spikeguard.callbacks._base import CallbackBase, adopt_renamed_state, resolve_chain, resolve_model
from spikeguard.operators import OperatorChain
from spikeguard.perturb.injector import BACKWARD, FORWARD, Injector, Perturbation, SpecLike
from spikeguard.sinks import LoggerSink, Sinks, check_sinks

__all__ = ["Perturb"]


class Perturb(CallbackBase):
    """Wrap an :class:`~spikeguard.perturb.Injector` around training.

    Schedules see ``trainer.global_step`` (the optimizer step), so with gradient
    accumulation every micro-batch of a step is perturbed alike and a resumed run replays
    the same schedule. Perturbations apply to training batches only (not validation),
    never to a measurement's passes, and, when ``transient``, not to SpikeGuard's re-run
    of a spiking step (:mod:`spikeguard.passes`).

    Args:
        forward: ``{operator or glob: noise or (noise, schedule)}`` for δ_i.
        backward: the same for ε_i (the gradient w.r.t. the operator's output).
        perturbations: the same as a list of :class:`~spikeguard.perturb.Perturbation`
            (the YAML-friendly form); combined with ``forward``/``backward``.
        seed: the Injector's seed.
        transient: the faults model hardware: they do not recur when SpikeGuard re-runs
            a spiking step (so its verdict is "transient"); a Perturbation's own
            ``transient`` overrides it.
        chain: the operators (None: discovered from the model), or name patterns.
        model_attr: the attribute of the LightningModule that holds the model
            (default ``model`` when present, else the LightningModule).
        log_every_n_steps: how often the applied |δ_i|, |ε_i| are logged (reading them
            syncs); None follows ``Trainer(log_every_n_steps=...)``.
        sinks: more sinks for the logged metrics (:mod:`spikeguard.sinks`).
        name: tells two Perturb callbacks with the same perturbations apart in a
            checkpoint (the default key is derived from the perturbations).

    Logged (against ``trainer/global_step``):

    =========================================  =================================
    key                                        value
    =========================================  =================================
    ``spikeguard/perturb/forward/<operator>``  |δ_i| applied at the latest step
    ``spikeguard/perturb/backward/<operator>`` |ε_i| applied at the latest step
    =========================================  =================================
    """

    def __init__(
        self,
        forward: Mapping[str, SpecLike] | None = None,
        backward: Mapping[str, SpecLike] | None = None,
        perturbations: Sequence[Perturbation] | None = None,
        seed: int = 0,
        transient: bool = True,
        chain: OperatorChain | list[str] | None = None,
        model_attr: str | None = None,
        log_every_n_steps: int | None = None,
        sinks: Sequence[Any] | None = None,
        name: str | None = None,
    ):
        if not forward and not backward and not perturbations:
            raise ValueError("Perturb needs at least one of forward=, backward= or perturbations=, got none")
        if perturbations is not None and (
            isinstance(perturbations, (str, Perturbation)) or not all(isinstance(p, Perturbation) for p in perturbations)
        ):
            raise TypeError(f"Perturb.perturbations must be a list of Perturbation, got {perturbations!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"Perturb.seed must be an int, got {seed!r}")
        if log_every_n_steps is not None and (not isinstance(log_every_n_steps, int) or log_every_n_steps < 1):
            raise ValueError(f"Perturb.log_every_n_steps must be None or an int >= 1, got {log_every_n_steps!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"Perturb.name must be None or a non-empty string, got {name!r}")
        self.forward = dict(forward or {})
        self.backward = dict(backward or {})
        self.perturbations = list(perturbations or [])
        self.seed = seed
        self.transient = transient
        self.chain = chain
        self.model_attr = model_attr
        self.log_every_n_steps = log_every_n_steps
        self.name = name
        self._user_sinks = check_sinks("Perturb", sinks)
        self.injector: Injector | None = None
        self._sinks = Sinks("Perturb")

    @property
    def state_key(self) -> str:
        """``Perturb[<name>]``, or ``Perturb[<digest of the perturbations>]``: two Perturb
        callbacks with different perturbations never collide; settings that do not say
        what is injected (logging) stay out of it."""
        return f"Perturb[{self.name or self._digest()}]"

    def _digest(self) -> str:
        spec = repr((
            sorted((k, repr(v)) for k, v in self.forward.items()),
            sorted((k, repr(v)) for k, v in self.backward.items()),
            [repr(p) for p in self.perturbations],
        ))
        return hashlib.sha1(spec.encode()).hexdigest()[:10]

    # -- building: after the strategy has wrapped the model ------------------------------

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.injector is None:
            chain = resolve_chain("Perturb", resolve_model(pl_module, self.model_attr), self.chain)
            self.injector = Injector(
                chain, forward=self.forward, backward=self.backward, perturbations=self.perturbations,
                seed=self.seed, transient=self.transient,
            )
        self._sinks = Sinks("Perturb", ([LoggerSink(trainer, "Perturb")] if trainer.is_global_zero else []) + self._user_sinks)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.injector.attach()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.injector.step != trainer.global_step:
            self.injector.set_step(trainer.global_step)
        self.injector.attach()  # idempotent; re-attaches after validation

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        every = self.log_every_n_steps or getattr(trainer, "log_every_n_steps", 50) or 50
        if trainer.global_step % every or not trainer.is_global_zero:
            return
        metrics = {}
        for direction in (FORWARD, BACKWARD):
            for name, value in self.injector.applied_norms(direction).items():
                metrics[keys.perturb_metric(direction, name)] = float(value)
        self._sinks.metrics(metrics, trainer.global_step)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self.injector is not None:
            self.injector.detach()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._sinks.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.injector is not None:
            self.injector.detach()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.injector is not None:
            self.injector.detach()

    # -- checkpointing -----------------------------------------------------------------

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        adopt_renamed_state(self, trainer, checkpoint)
        states = checkpoint.get("callbacks") or {}
        if self.state_key not in states:
            others = [k for k in states if isinstance(k, str) and k.startswith("Perturb")]
            if others:
                warnings.warn(
                    f"Perturb: the checkpoint holds Perturb state for other perturbations ({others}); this "
                    f"callback ({self.state_key}) injects different ones and starts from its own schedule",
                    stacklevel=2,
                )

    def state_dict(self) -> dict[str, Any]:
        # Schedules are pure functions of the step; the seed is the only state. It is
        # checked on load so that a resumed run cannot silently inject other noise.
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed") != self.seed:
            raise ValueError(
                f"Perturb.load_state_dict: the checkpoint was written with seed={state_dict.get('seed')!r}, "
                f"this callback has seed={self.seed!r}; the resumed run would inject different noise"
            )
