"""The records spikeguard writes and reads: one schema for events, predictions and probes.

Every record is a dataclass with ``to_dict`` (JSON-ready: plain Python, non-finite floats
as the strings ``"inf"``, ``"-inf"``, ``"nan"``) and ``from_dict`` (the inverse; keys a
newer version added are ignored, keys an older version lacked take their defaults).

- :class:`SpikeEvent`: one spike, what was seen, where it started, what happened;
- :class:`SpikePrediction`: what the theory predicted for it (``SpikeEvent.predicted``);
- :class:`ProbeRecord`: one amplification probe, with the optimizer's facts and the
  stability test at that step (one line of ``probes.jsonl``);
- :class:`OptimizerFacts`, :class:`Stability`: parts of a probe record (defined with the
  functions that compute them in :mod:`spikeguard.measure.optim`).

The JSON-lines files themselves are written and read by :mod:`spikeguard.jsonl`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

from spikeguard.jsonl import decode_float, encode
from spikeguard.measure.optim import OptimizerFacts, Stability
from spikeguard.measure.results import ProbeResult

__all__ = [
    "KINDS",
    "OUTCOMES",
    "SpikeEvent",
    "SpikePrediction",
    "ProbeRecord",
    "OptimizerFacts",
    "Stability",
]

#: What an event is about. ``loss`` / ``grad_norm``: the loss or the global gradient norm
#: left its band; ``nonfinite``: an inf or NaN in the loss, the gradients or an operator's
#: output; ``operator``: an operator's activations or gradient message left their band
#: while the loss and the global norm did not (silent corruption, absorbed outliers).
KINDS = ("loss", "grad_norm", "nonfinite", "operator")

#: Observed outcomes, filled in after the spike.
OUTCOMES = ("pending", "recovered", "diverged", "not_recovered")

T = TypeVar("T")


def _decode_deep(value: Any) -> Any:
    if isinstance(value, str):
        return decode_float(value)
    if isinstance(value, dict):
        return {k: _decode_deep(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_deep(v) for v in value]
    return value


def _known(cls: type[T], data: dict[str, Any], **converted: Any) -> T:
    """``cls(**data)`` over the fields ``cls`` has; floats decoded, ``converted`` taking precedence."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        f = names.get(key)
        if f is None or key in converted:
            continue
        kwargs[key] = _decode_deep(value) if "float" in str(f.type) or "Any" in str(f.type) else value
    kwargs.update(converted)
    return cls(**kwargs)


# -- predictions -------------------------------------------------------------------------


@dataclass(frozen=True)
class SpikePrediction:
    """What the theory predicted for one spike (THEORY §1, §3, §4), at the time it was seen.

    Attributes:
        source: ``"probe"`` (from the constants of a probe measured before the spike) or
            ``"none"`` (no probe yet: outcome and k_rec only).
        probe_step: the step of the probe it used (its weights were those of that step).
        local_relative_size: u, the relative size of the perturbation at the origin read
            from the origin's statistics (``|ratio - 1|``).
        m_bound: the relative bias Proposition 1's bound gives for it.
        m: the calibrated relative bias (``m_bound`` times the probe's tightness).
        factor_bound: Proposition 1's worst case for the spike factor, ``1 + m_bound``.
        factor: the predicted spike factor ``|Ĝ| / |G|``.
        outcome: ``"recover"`` or ``"diverge"`` (THEORY §4); ``reason`` says why.
        m_persistent: the relative bias the outcome rule used.
        sharpness_ratio: sharpness over the optimizer's threshold, when measured.
        mu_estimate, q: μ̂ and Proposition 3's rate q used for k_rec.
        predicted_rise: THEORY §4's one-step loss rise from the predicted bias.
        kappa: κ of the recovery rule.
        k_rec: predicted recovery steps (nan when not predicted).
        notes: what was estimated, clipped or missing.
    """

    source: str = "none"
    probe_step: int | None = None
    local_relative_size: float = math.nan
    m_bound: float = math.nan
    m: float = math.nan
    factor_bound: float = math.nan
    factor: float = math.nan
    outcome: str | None = None
    reason: str | None = None
    m_persistent: float = 0.0
    sharpness_ratio: float | None = None
    mu_estimate: float = math.nan
    q: float = math.nan
    predicted_rise: float = math.nan
    kappa: float = math.nan
    k_rec: float = math.nan
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return encode(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpikePrediction:
        return _known(cls, data, notes=tuple(data.get("notes") or ()))


# -- events ------------------------------------------------------------------------------


@dataclass
class SpikeEvent:
    """One spike: what was seen, where it started, what the theory predicts, what happened.

    Attributes:
        id: unique within a run (the first step of the spike).
        step: the optimizer step (``trainer.global_step``) where it was detected.
        kind: one of :data:`KINDS`.
        z: robust z-score of the triggering signal.
        loss, grad_norm: values at the spike step.
        baseline_loss, baseline_grad_norm: their robust baselines (window medians).
        loss_floor: loss* used for recovery (THEORY §4): configured, or the window's
            minimum loss at the spike.
        recovery_threshold: the loss under which the spike counts as recovered:
            ``loss* + (1+κ)(baseline - loss*)``, raised to the loss's own noise band
            ``exp(median + 2σ)`` where that is wider.
        factor: the observed spike factor ``s = |Ĝ| / baseline`` of the gradient norm.
        loss_factor: the loss over its baseline.
        origin: the operator where the spike starts (forward order), or None.
        direction: ``"forward"`` (activations) or ``"backward"`` (gradient messages).
        operator_ratios: each operator's statistic over its own baseline at the spike.
        duration: consecutive flagged steps merged into this event.
        predicted: the theory's prediction at the spike, or None before it is made.
        action: ``"none"``, ``"clip"`` or ``"skip"``.
        rerun: ``"reproducible"``, ``"transient"`` or None when not re-run.
        outcome: one of :data:`OUTCOMES`.
        recovery_steps: steps until the loss was back within (1+κ) of its floor.
    """

    id: int
    step: int
    kind: str
    z: float
    loss: float
    grad_norm: float
    factor: float
    loss_factor: float
    baseline_loss: float = math.nan
    baseline_grad_norm: float = math.nan
    loss_floor: float = math.nan
    recovery_threshold: float = math.nan
    origin: str | None = None
    direction: str | None = None
    operator_ratios: dict[str, dict[str, float]] = field(default_factory=dict)
    duration: int = 1
    predicted: SpikePrediction | None = None
    action: str = "none"
    rerun: str | None = None
    outcome: str = "pending"
    recovery_steps: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["predicted"] = None if self.predicted is None else self.predicted.to_dict()
        return encode(out)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpikeEvent:
        predicted = data.get("predicted")
        return _known(
            cls, data,
            predicted=SpikePrediction.from_dict(predicted) if predicted else None,
            operator_ratios=_decode_deep(data.get("operator_ratios") or {}),
        )

    def summary(self) -> str:
        """One line for logs and the terminal."""
        where = f" in {self.origin} ({self.direction})" if self.origin else ""
        pred = self.predicted
        verdict = f", predicted {pred.outcome}" if pred is not None and pred.outcome else ""
        if pred is not None and math.isfinite(pred.k_rec):
            verdict += f" in ~{pred.k_rec:.0f} steps"
        return (
            f"spike #{self.id} at step {self.step}: {self.kind}, z={self.z:.1f}, "
            f"gradient x{self.factor:.2f}{where}{verdict}"
        )


# -- probes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeRecord:
    """One amplification probe, as the probe store keeps it and ``probes.jsonl`` holds it.

    Attributes:
        step: the optimizer step whose weights were probed: the probe ran before that
            step's update, so it describes the model any spike at ``step`` or later met.
        result: what the probe measured (:class:`spikeguard.measure.ProbeResult`).
        optimizer: the optimizer's facts at the probe (None without an optimizer).
        stability: the stability test, when the sharpness was measured.
        steady: the probe's perturbations are present in training all the time (their
            m is THEORY §4's persistent relative bias).
    """

    step: int
    result: ProbeResult
    optimizer: OptimizerFacts | None = None
    stability: Stability | None = None
    steady: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return self.result.names

    @property
    def config(self) -> str:
        """The configuration predictions use: ``"both"`` when observed, else the first."""
        return "both" if "both" in self.result.observed else next(iter(self.result.observed))

    def to_dict(self) -> dict[str, Any]:
        out = self.result.to_dict()
        out.update(
            step=self.step,
            optimizer=None if self.optimizer is None else self.optimizer.to_dict(),
            stability=None if self.stability is None else self.stability.to_dict(),
            steady=self.steady,
        )
        return encode(out)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeRecord:
        data = dict(data)
        data.pop("type", None)
        optimizer, stability = data.pop("optimizer", None), data.pop("stability", None)
        legacy = data.pop("sharpness", None)  # logs before ProbeRecord: {"sharpness", "stability_threshold", ...}
        if stability is None and isinstance(legacy, dict) and {"sharpness", "stability_threshold"} <= set(legacy):
            stability = {"sharpness": legacy["sharpness"], "threshold": legacy["stability_threshold"]}
        steady = bool(data.pop("steady", False))
        step = int(data["step"])
        return cls(
            step=step, result=ProbeResult.from_dict(_decode_deep(data)),
            optimizer=OptimizerFacts.from_dict(optimizer) if optimizer else None,
            stability=Stability.from_dict(stability) if stability else None,
            steady=steady,
        )
