"""Perturb: inject forward and backward perturbations on a schedule keyed on the optimizer step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from spikeguard import keys
from spikeguard.callbacks._base import CallbackBase, SafeLogger, resolve_chain, resolve_model, shared
from spikeguard.operators import OperatorChain
from spikeguard.perturb.injector import BACKWARD, FORWARD, Injector, Perturbation, SpecLike

__all__ = ["Perturb"]


class Perturb(CallbackBase):
    """Wrap an :class:`~spikeguard.perturb.Injector` around training.

    Schedules see ``trainer.global_step`` (the optimizer step), so with gradient
    accumulation every micro-batch of a step is perturbed alike and a resumed run replays
    the same schedule. Perturbations apply to training batches only (not validation).

    Args:
        forward: ``{operator or glob: noise or (noise, schedule)}`` for δ_i.
        backward: the same for ε_i (the gradient w.r.t. the operator's output).
        perturbations: the same as a list of :class:`~spikeguard.perturb.Perturbation`
            (the YAML-friendly form); combined with ``forward``/``backward``.
        seed: the Injector's seed.
        transient: the faults model hardware: they do not recur when SpikeGuard re-runs
            a spiking step (so its verdict is "transient").
        chain: the operators (None: discovered from the model), or name patterns.
        model_attr: the attribute of the LightningModule that holds the model
            (default ``model`` when present, else the LightningModule).
        log_every_n_steps: how often the applied |δ_i|, |ε_i| are logged (reading them
            syncs); None follows ``Trainer(log_every_n_steps=...)``.

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
        self.forward = dict(forward or {})
        self.backward = dict(backward or {})
        self.perturbations = list(perturbations or [])
        self.seed = seed
        self.transient = transient
        self.chain = chain
        self.model_attr = model_attr
        self.log_every_n_steps = log_every_n_steps
        self.injector: Injector | None = None
        self._logger = SafeLogger("Perturb")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(seed=self.seed, forward=sorted(self.forward), backward=sorted(self.backward))

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit" or self.injector is not None:
            return
        chain = resolve_chain("Perturb", resolve_model(pl_module, self.model_attr), self.chain)
        self.injector = Injector(
            chain, forward=self.forward, backward=self.backward, perturbations=self.perturbations, seed=self.seed
        )
        if self.transient:
            state = shared(trainer)
            self.injector.gate = lambda: not state.rerun_active

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.injector.attach()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.injector.step != trainer.global_step:
            self.injector.set_step(trainer.global_step)
        self.injector.attach()  # idempotent; re-attaches after validation

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        every = self.log_every_n_steps or getattr(trainer, "log_every_n_steps", 50) or 50
        if trainer.global_step % every:
            return
        metrics = {}
        for direction in (FORWARD, BACKWARD):
            for name, value in self.injector.applied_norms(direction).items():
                metrics[keys.perturb_metric(direction, name)] = float(value)
        if trainer.is_global_zero:
            self._logger.log(trainer, metrics, trainer.global_step)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self.injector is not None:
            self.injector.detach()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.injector is not None:
            self.injector.detach()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.injector is not None:
            self.injector.detach()

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
