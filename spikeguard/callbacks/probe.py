"""AmplificationProbe: every K steps, observed versus predicted propagation on a fixed batch."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from spikeguard import keys, theory
from spikeguard._tensor import measurement
from spikeguard.callbacks._base import CallbackBase, SafeLogger, resolve_chain, resolve_model, shared
from spikeguard.detect import Prediction
from spikeguard.measure import sharpness as sharp
from spikeguard.measure.probe import CONFIGS
from spikeguard.measure.probe import AmplificationProbe as ProbeCore
from spikeguard.operators import OperatorChain
from spikeguard.perturb import Gaussian, Injector, Perturbation
from spikeguard.perturb.injector import SpecLike

__all__ = ["AmplificationProbe", "optimizer_kind"]


def optimizer_kind(optimizer: torch.optim.Optimizer) -> tuple[str, float]:
    """THEORY §4's optimizer family and its momentum: ("adam", β1), ("momentum", β) or ("sgd", 0)."""
    group = optimizer.param_groups[0]
    if "betas" in group:
        return "adam", float(group["betas"][0])
    momentum = float(group.get("momentum", 0.0) or 0.0)
    return ("momentum", momentum) if momentum > 0 else ("sgd", 0.0)


def effective_lr(optimizer: torch.optim.Optimizer) -> float:
    """γ for THEORY §3-4. SGD: the learning rate. Adam-family: the step size along the
    current direction, ``lr · Σ m_i² / (sqrt(v̂_i) + ε) / Σ m_i²`` with the optimizer's
    first and second moments (m as the gradient's proxy), so that γ|∇|² is Adam's
    first-order loss decrease; the raw lr before the first step."""
    group = optimizer.param_groups[0]
    lr = float(group["lr"])
    if "betas" not in group:
        return lr
    num = torch.zeros((), dtype=torch.float64)
    den = torch.zeros((), dtype=torch.float64)
    for g in optimizer.param_groups:
        beta2, eps = g["betas"][1], g["eps"]
        for p in g["params"]:
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" not in state:
                continue
            v_hat = state["exp_avg_sq"].double() / (1 - beta2 ** float(state["step"]))
            m2 = state["exp_avg"].double() ** 2
            num += (m2 / (v_hat.sqrt() + eps)).sum().cpu()
            den += m2.sum().cpu()
    return lr * float(num / den) if den > 0 else lr


class AmplificationProbe(CallbackBase):
    """Every ``every_n_steps`` optimizer steps, probe a fixed batch (rank 0 only).

    Runs :class:`spikeguard.measure.AmplificationProbe` on the probe batch with the
    configured perturbations and logs, per operator, the observed errors next to
    Proposition 1's bound and the first-order prediction, the gains, A^f and A^b, the
    relative bias m and, optionally, the sharpness against the optimizer's threshold.
    Its latest constants are published on the trainer for SpikeGuard's predictions
    (neither callback needs the other). Each probe is also appended, whole, to
    ``<log dir>/spikeguard/probes.jsonl``.

    Args:
        every_n_steps: probe period in optimizer steps (step 0 included).
        forward, backward, perturbations: the probe's perturbations, as for
            :class:`~spikeguard.callbacks.Perturb`; default a relative Gaussian of size
            1e-3 on every operator's output and gradient.
        probe_batch: the batch to probe; default ``datamodule.probe_batch()`` when the
            datamodule has it, else the first training batch (kept for the whole run).
        loss_fn: ``loss_fn(model, batch) -> loss``; default the LightningModule's
            ``probe_loss(model, batch)`` when defined, else ``model(**batch).loss``.
        steady: the probe's perturbations are present in training all the time (e.g.
            fp8 rounding): their measured m is THEORY §4's persistent relative bias.
        sharpness: also measure the (preconditioned, for Adam) sharpness.
        sharpness_iterations: power-iteration steps for it.
        power_iterations, linearize, configs: passed to the probe core.
        chain, model_attr: the operators, as for SpikeGuard.
        seed: the probe Injector's seed.

    Logged (per probe, against ``trainer/global_step``): ``spikeguard/probe/<config>/...``
    totals and per-operator fields (:data:`spikeguard.keys.PROBE_FIELDS`,
    :data:`spikeguard.keys.PROBE_OPERATOR_FIELDS`), ``spikeguard/probe/op/<op>/...``
    constants (:data:`spikeguard.keys.PROBE_CONSTANTS`), and the sharpness keys.
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
        self.core: ProbeCore | None = None
        self.latest = None
        self.num_probes = 0
        self._last_step = -1
        self._sharpness_vector = None
        self._logger = SafeLogger("AmplificationProbe")
        self._path: str | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, seed=self.seed)

    # -- setup -------------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective: every rank calls it
        self._path = os.path.join(log_dir, "spikeguard", "probes.jsonl")
        if self.core is not None:
            return
        model = resolve_model(pl_module, self.model_attr)
        chain = resolve_chain("AmplificationProbe", model, self.chain)
        injector = Injector(
            chain, forward=self.forward, backward=self.backward, perturbations=self.perturbations, seed=self.seed
        )
        self.core = ProbeCore(
            model, chain, self._resolve_loss_fn(pl_module, model), injector,
            power_iterations=self.power_iterations, configs=self.configs, linearize=self.linearize, seed=self.seed,
        )

    def _resolve_loss_fn(self, pl_module: Any, model: Any) -> Callable[[Any, Any], torch.Tensor]:
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

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.probe_batch is None:
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is not None and callable(getattr(datamodule, "probe_batch", None)):
                self.probe_batch = datamodule.probe_batch()
            else:
                self.probe_batch = batch  # the first training batch, kept for the whole run

    # -- the probe ---------------------------------------------------------------------

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step - 1  # the optimizer step that just completed
        if step < 0 or step == self._last_step or step % self.every_n_steps or not trainer.is_global_zero:
            return
        self._last_step = step
        self.run_probe(trainer, pl_module, step)

    def run_probe(self, trainer: Any, pl_module: Any, step: int) -> Any:
        """Probe now and publish/log the result (public so a user can call it on demand)."""
        device_batch = trainer.strategy.batch_to_device(self.probe_batch)
        result = self.core.run(device_batch, step=step)
        self.latest = result
        self.num_probes += 1
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        metrics = self._metrics(result)
        sharpness_value = None
        if self.sharpness and optimizer is not None:
            sharpness_value = self._sharpness(device_batch, optimizer, metrics)
        self._publish(trainer, result, optimizer, sharpness_value)
        self._logger.log(trainer, metrics, trainer.global_step)
        self._write(result, metrics)
        return result

    def _sharpness(self, batch: Any, optimizer: Any, metrics: dict[str, float]) -> float | None:
        model, loss_fn = self.core.model, self.core._wrapper.loss_fn
        params = [p for p in model.parameters() if p.requires_grad]

        def closure() -> torch.Tensor:
            # Hessian-vector products need double backward, which fused attention kernels
            # lack: build this graph with the math attention backend.
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.MATH]), measurement(closure):
                return loss_fn(model, batch)

        kind, beta = optimizer_kind(optimizer)
        try:
            if kind == "adam":
                value = sharp.preconditioned_top_eigenvalue(
                    closure, params, optimizer, iterations=self.sharpness_iterations, init=self._sharpness_vector
                )
            else:
                value = sharp.hessian_top_eigenvalue(closure, params, iterations=self.sharpness_iterations, init=self._sharpness_vector)
        except ValueError:  # Adam has no state before its first step: nothing to report yet
            return None
        self._sharpness_vector = value.vector
        lr = float(optimizer.param_groups[0]["lr"])
        threshold = theory.stability_threshold(lr, kind, beta)
        metrics[keys.metric("probe", "sharpness")] = value.value
        metrics[keys.metric("probe", "stability_threshold")] = threshold
        metrics[keys.metric("probe", "sharpness_ratio")] = value.value / threshold
        return value.value

    def _publish(self, trainer: Any, result: Any, optimizer: Any, sharpness_value: float | None) -> None:
        config = "both" if "both" in result.observed else next(iter(result.observed))
        obs = result.observed[config]
        kind, beta = optimizer_kind(optimizer) if optimizer is not None else ("sgd", 0.0)
        tightness = obs.total_tightness
        shared(trainer).probe_result = result
        shared(trainer).prediction = Prediction(
            names=result.names,
            amp_forward=tuple(result.amplification.forward.tolist()),
            amp_backward=tuple(result.amplification.backward.tolist()),
            output_norms=tuple(result.constants.output_norms.tolist()),
            grad_msg_norms=tuple(result.constants.grad_msg_norms.tolist()),
            grad_norm=obs.grad_norm,
            tightness=tightness if math.isfinite(tightness) else 1.0,
            steady_m=obs.m if self.steady else 0.0,
            lr=effective_lr(optimizer) if optimizer is not None else 1e-3,
            optimizer=kind,
            beta=beta,
            sharpness=sharpness_value,
            extra={"probe_step": result.step, "raw_lr": float(optimizer.param_groups[0]["lr"]) if optimizer else None},
        )

    def _metrics(self, result: Any) -> dict[str, float]:
        out: dict[str, float] = {keys.metric("probe", "seconds"): result.seconds}
        amp = result.amplification
        for i, name in enumerate(result.names):
            out[keys.probe_constant_metric(name, "A_f")] = float(amp.forward[i])
            out[keys.probe_constant_metric(name, "A_b")] = float(amp.backward[i])
            ratio = float(amp.ratio[i])
            if math.isfinite(ratio):
                out[keys.probe_constant_metric(name, "A_ratio")] = ratio
            gain = float(result.constants.gains[i])
            if math.isfinite(gain):
                out[keys.probe_constant_metric(name, "gain")] = gain
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
                    if math.isfinite(float(value)):
                        out[keys.probe_operator_metric(config, name, field)] = float(value)
        return out

    def _write(self, result: Any, metrics: dict[str, float]) -> None:
        if self._path is None:
            return
        os.makedirs(os.path.dirname(self._path), exist_ok=True)
        record = result.to_dict()
        record["sharpness"] = {
            field: metrics[keys.metric("probe", field)]
            for field in ("sharpness", "stability_threshold", "sharpness_ratio")
            if keys.metric("probe", field) in metrics
        }
        line = json.dumps(record, allow_nan=True) + "\n"
        with open(self._path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()

    # -- lifecycle ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"num_probes": self.num_probes, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_probes = int(state_dict["num_probes"])
        self._last_step = int(state_dict["last_step"])
