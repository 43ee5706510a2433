"""AmplificationProbe: every K steps, observed versus predicted propagation on a fixed batch."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from spikeguard import keys, passes
from spikeguard._tensor import RngState
from spikeguard.callbacks._base import CallbackBase, adopt_renamed_state, log_dir, resolve_chain, resolve_model
from spikeguard.measure import optim
from spikeguard.measure.decoupled import math_attention
from spikeguard.measure.probe import AmplificationProbe as ProbeCore
from spikeguard.measure.results import CONFIGS, ProbeResult
from spikeguard.measure.sharpness import optimizer_sharpness
from spikeguard.operators import OperatorChain
from spikeguard.paths import RunPaths
from spikeguard.perturb import Gaussian, Injector, Perturbation
from spikeguard.perturb.injector import SpecLike
from spikeguard.records import ProbeRecord
from spikeguard.sinks import LoggerSink, ProbeLogSink, Sinks, check_sinks
from spikeguard.store import ProbeStore

__all__ = ["AmplificationProbe", "probe_metrics"]


class AmplificationProbe(CallbackBase):
    """Every ``every_n_steps`` optimizer steps, probe a fixed batch (rank 0 only).

    Runs :class:`spikeguard.measure.AmplificationProbe` on the probe batch with the
    configured perturbations, before that step's forward (so a probe at step t describes
    the weights step t trains on), and logs, per operator, the observed errors next to
    Proposition 1's bound and the first-order prediction, the gains, A^f and A^b, the
    relative bias m and, optionally, the sharpness against the optimizer's threshold.
    Each probe becomes a :class:`~spikeguard.records.ProbeRecord` in :attr:`store`, the
    step-stamped, checkpointed probe store that SpikeGuard reads its predictions from
    (neither callback needs the other), and a line of ``<log dir>/spikeguard/probes.jsonl``.

    Args:
        every_n_steps: probe period in optimizer steps (step 0 included).
        forward, backward, perturbations: the probe's perturbations, as for
            :class:`~spikeguard.callbacks.Perturb`; default a relative Gaussian of size
            1e-3 on every operator's output and gradient.
        probe_batch: the batch to probe; default ``datamodule.probe_batch()`` when the
            datamodule has it, else the first training batch (kept for the whole run,
            and in checkpoints).
        loss_fn: ``loss_fn(model, batch) -> loss``; default the LightningModule's
            ``probe_loss(model, batch)`` when defined, else ``model(**batch).loss``.
        steady: the probe's perturbations are present in training all the time (e.g.
            fp8 rounding): their measured m is THEORY §4's persistent relative bias.
        sharpness: also measure the (preconditioned, for Adam) sharpness.
        sharpness_iterations: power-iteration steps for it.
        power_iterations, linearize, configs: passed to the probe core.
        chain, model_attr: the operators, as for SpikeGuard.
        seed: the probe Injector's seed.
        sinks: more sinks for the probe records and metrics (:mod:`spikeguard.sinks`).
        name: tells two AmplificationProbe callbacks apart in a checkpoint.

    Logged (per probe, against ``trainer/global_step``): ``spikeguard/probe/<config>/...``
    totals and per-operator fields (:data:`spikeguard.keys.PROBE_FIELDS`,
    :data:`spikeguard.keys.PROBE_OPERATOR_FIELDS`), ``spikeguard/probe/op/<op>/...``
    constants (:data:`spikeguard.keys.PROBE_CONSTANTS`), and the sharpness keys (the
    ratio logged is the one THEORY §4's outcome uses).
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        forward: Mapping[str, SpecLike] | None = None,
        backward: Mapping[str, SpecLike] | None = None,
        perturbations: Sequence[Perturbation] | None = None,
        probe_batch: Any = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        steady: bool = False,
        sharpness: bool = False,
        sharpness_iterations: int = 20,
        power_iterations: int = 1,
        linearize: bool = True,
        configs: Sequence[str] = CONFIGS,
        chain: OperatorChain | list[str] | None = None,
        model_attr: str | None = None,
        seed: int = 0,
        sinks: Sequence[Any] | None = None,
        name: str | None = None,
    ):
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ValueError(f"AmplificationProbe.every_n_steps must be an int >= 1, got {every_n_steps!r}")
        if not isinstance(sharpness_iterations, int) or sharpness_iterations < 1:
            raise ValueError(f"AmplificationProbe.sharpness_iterations must be an int >= 1, got {sharpness_iterations!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"AmplificationProbe.loss_fn must be callable (model, batch) -> loss, got {loss_fn!r}")
        bad = [c for c in configs if c not in CONFIGS]
        if bad or not configs:
            raise ValueError(f"AmplificationProbe.configs must be a non-empty subset of {list(CONFIGS)}, got {list(configs)}")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"AmplificationProbe.name must be None or a non-empty string, got {name!r}")
        if not forward and not backward and not perturbations:
            forward = {"*": Gaussian(1e-3, relative=True)}
            backward = {"*": Gaussian(1e-3, relative=True)}
        self.every_n_steps = every_n_steps
        self.forward = dict(forward or {})
        self.backward = dict(backward or {})
        self.perturbations = list(perturbations or [])
        self.probe_batch = probe_batch
        self.loss_fn = loss_fn
        self.steady = steady
        self.sharpness = sharpness
        self.sharpness_iterations = sharpness_iterations
        self.power_iterations = power_iterations
        self.linearize = linearize
        self.configs = tuple(configs)
        self.chain = chain
        self.model_attr = model_attr
        self.seed = seed
        self.name = name
        self._user_sinks = check_sinks("AmplificationProbe", sinks)
        #: The probe records, step-stamped and checkpointed (SpikeGuard reads it).
        self.store = ProbeStore()
        self.core: ProbeCore | None = None
        self.num_probes = 0
        self._last_step = -1
        self._sharpness_vector = None
        self._sinks = Sinks("AmplificationProbe")
        self._paths: RunPaths | None = None

    @property
    def state_key(self) -> str:
        return f"AmplificationProbe[{self.name}]" if self.name else "AmplificationProbe"

    @property
    def latest(self) -> ProbeResult | None:
        """The newest probe's result (None before the first probe)."""
        record = self.store.latest()
        return None if record is None else record.result

    # -- setup: after the strategy has wrapped the model ---------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._paths = RunPaths.at(log_dir(trainer))  # a collective: every rank calls it

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.core is None:
            model = resolve_model(pl_module, self.model_attr)
            chain = resolve_chain("AmplificationProbe", model, self.chain)
            injector = Injector(
                chain, forward=self.forward, backward=self.backward, perturbations=self.perturbations, seed=self.seed
            )
            self.core = ProbeCore(
                model, chain, self._resolve_loss_fn(pl_module), injector,
                power_iterations=self.power_iterations, configs=self.configs, linearize=self.linearize, seed=self.seed,
            )
        sinks: list[Any] = []
        if trainer.is_global_zero:
            sinks = [ProbeLogSink(self._paths.probes), LoggerSink(trainer, "AmplificationProbe")]
        self._sinks = Sinks("AmplificationProbe", sinks + self._user_sinks)

    def _resolve_loss_fn(self, pl_module: Any) -> Callable[[Any, Any], torch.Tensor]:
        if self.loss_fn is not None:
            return self.loss_fn
        if callable(getattr(pl_module, "probe_loss", None)):
            return pl_module.probe_loss

        def hf_loss(model: Any, batch: Any) -> torch.Tensor:
            out = model(**batch) if isinstance(batch, Mapping) else model(batch)
            loss = getattr(out, "loss", None)
            if loss is None:
                raise ValueError(
                    "AmplificationProbe needs a loss: the model's output has no .loss. Pass "
                    "loss_fn=(model, batch) -> loss, or define probe_loss(model, batch) on "
                    f"{type(pl_module).__name__}"
                )
            return loss

        return hf_loss

    # -- the probe: before the step's forward, on the weights it trains on -------------

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.probe_batch is None:
            self.probe_batch = self.store.batch
        if self.probe_batch is None:
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is not None and callable(getattr(datamodule, "probe_batch", None)):
                self.probe_batch = datamodule.probe_batch()
            else:
                self.probe_batch = batch  # the first training batch, kept for the whole run
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps or not trainer.is_global_zero:
            return
        self._last_step = step
        self.run_probe(trainer, pl_module, step)

    def run_probe(self, trainer: Any, pl_module: Any, step: int) -> ProbeRecord:
        """Probe now and keep, log and write the record (public so a user can call it on demand)."""
        batch = trainer.strategy.batch_to_device(self.probe_batch)
        self.store.batch = self.probe_batch
        result = self.core.run(batch, step=step)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        facts = optim.facts(optimizer) if optimizer is not None else None
        stability = self._stability(batch, optimizer, facts) if self.sharpness and optimizer is not None else None
        record = ProbeRecord(step=step, result=result, optimizer=facts, stability=stability, steady=self.steady)
        self.store.add(record)
        self.num_probes += 1
        self._sinks.probe(record)
        self._sinks.metrics(probe_metrics(record), step)
        return record

    def _stability(self, batch: Any, optimizer: Any, facts: optim.OptimizerFacts) -> optim.Stability | None:
        """THEORY §4's test at this step: the (preconditioned) sharpness of the probe loss."""
        model, loss_fn = self.core.model, self.core.passes.loss_fn
        params = [p for p in model.parameters() if p.requires_grad]

        def closure() -> torch.Tensor:
            # Hessian-vector products need double backward, which fused attention kernels lack.
            with math_attention():
                return loss_fn(model, batch)

        rng = RngState.capture([p.device for p in params[:1]])
        with rng.forked(), passes.measure():
            value = optimizer_sharpness(
                closure, params, optimizer, iterations=self.sharpness_iterations, init=self._sharpness_vector
            )
        if value is None:  # Adam has no state before its first step: nothing to report yet
            return None
        self._sharpness_vector = value.vector
        return optim.stability_of(facts, value.value, value.preconditioned)

    # -- lifecycle ---------------------------------------------------------------------

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._sinks.close()

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        adopt_renamed_state(self, trainer, checkpoint)

    def state_dict(self) -> dict[str, Any]:
        return {"num_probes": self.num_probes, "last_step": self._last_step, "store": self.store.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_probes = int(state_dict["num_probes"])
        self._last_step = int(state_dict["last_step"])
        if "store" in state_dict:
            self.store.load_state_dict(state_dict["store"])


def probe_metrics(record: ProbeRecord) -> dict[str, float]:
    """The metric keys of one probe record (:mod:`spikeguard.keys`), finite values only."""
    result = record.result
    out: dict[str, float] = {keys.metric("probe", "seconds"): result.seconds}
    amp = result.amplification
    for i, name in enumerate(result.names):
        out[keys.probe_constant_metric(name, "A_f")] = float(amp.forward[i])
        out[keys.probe_constant_metric(name, "A_b")] = float(amp.backward[i])
        out[keys.probe_constant_metric(name, "A_ratio")] = float(amp.ratio[i])
        out[keys.probe_constant_metric(name, "gain")] = float(result.constants.gains[i])
        out[keys.probe_constant_metric(name, "param_gain")] = float(result.constants.param_gains[i])
    for config, obs in result.observed.items():
        out[keys.probe_metric(config, "total_observed")] = obs.total
        out[keys.probe_metric(config, "total_bound")] = obs.bound.total
        out[keys.probe_metric(config, "m")] = obs.m
        if obs.linear is not None:
            out[keys.probe_metric(config, "total_linear")] = obs.linear.total
        tight = obs.tightness
        for i, name in enumerate(result.names):
            fields = {
                "e_observed": obs.e[i], "e_bound": obs.bound.e[i],
                "d_observed": obs.d[i], "d_bound": obs.bound.d[i], "tightness": tight[i],
            }
            if obs.linear is not None:
                fields["d_linear"] = obs.linear.d[i]
            for field, value in fields.items():
                out[keys.probe_operator_metric(config, name, field)] = float(value)
    if record.stability is not None:
        out[keys.metric("probe", "sharpness")] = record.stability.sharpness
        out[keys.metric("probe", "stability_threshold")] = record.stability.threshold
        out[keys.metric("probe", "sharpness_ratio")] = record.stability.ratio
    return {k: v for k, v in out.items() if math.isfinite(v)}
