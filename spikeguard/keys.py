"""Metric keys: the one place that names what spikeguard logs.

Every key starts with ``spikeguard/`` and is plotted against ``trainer/global_step``.
The callbacks log through these functions, and the W&B dashboard, the offline report
and the tests read the same functions, so a key cannot drift between them.
"""

from __future__ import annotations

from dataclasses import dataclass

from spikeguard import signals

__all__ = [
    "PREFIX",
    "STEP",
    "Key",
    "metric",
    "operator_metric",
    "signal_metric",
    "probe_metric",
    "probe_operator_metric",
    "probe_constant_metric",
    "PROBE_CONSTANTS",
    "perturb_metric",
    "STATIC_KEYS",
    "OPERATOR_STATS",
    "PROBE_OPERATOR_FIELDS",
    "PROBE_FIELDS",
    "summary_of",
]

PREFIX = "spikeguard"
#: The x-axis of every spikeguard metric (Lightning's WandbLogger defines it).
STEP = "trainer/global_step"


@dataclass(frozen=True)
class Key:
    """A logged metric: its name, what it means, and its W&B run-summary rule."""

    name: str
    description: str
    summary: str = "last"  # "last", "max", "min" or "mean"


def metric(*parts: str) -> str:
    """``spikeguard/<part>/<part>...``."""
    if not parts or any(not isinstance(p, str) or not p for p in parts):
        raise ValueError(f"metric key parts must be non-empty strings, got {parts!r}")
    return "/".join((PREFIX, *parts))


#: Per-operator statistics logged by SpikeGuard, and what each is (from the signal registry).
OPERATOR_STATS = {s.name: s.description for s in signals.OPERATOR}


def operator_metric(operator: str, stat: str) -> str:
    """``spikeguard/op/<operator>/<stat>`` for a per-operator statistic."""
    if stat not in OPERATOR_STATS and not stat.endswith("_ratio"):
        raise ValueError(f"stat must be one of {sorted(OPERATOR_STATS)} (or '<stat>_ratio'), got {stat!r}")
    return metric("op", operator, stat)


def signal_metric(signal: signals.Signal, operator: str | None = None) -> str:
    """The key of a registry signal: ``spikeguard/<name>``, or per operator ``spikeguard/op/<operator>/<name>``."""
    if signal.scope == "global":
        return metric(signal.name)
    if operator is None:
        raise ValueError(f"signal {signal.name!r} is per operator: its key needs the operator's name")
    return operator_metric(operator, signal.name)


#: Per-operator fields of a probe, logged per configuration (forward, backward, both).
PROBE_OPERATOR_FIELDS = {
    "e_observed": "observed forward output error e_i",
    "e_bound": "Proposition 1's bound on e_i",
    "d_observed": "observed parameter-gradient error d_i",
    "d_bound": "Proposition 1's bound on d_i",
    "d_linear": "first-order prediction of d_i",
    "tightness": "d_i observed / bound",
}

#: Scalar fields of a probe, per configuration.
PROBE_FIELDS = {
    "total_observed": "observed |Ĝ - G|",
    "total_bound": "Proposition 1's bound on |Ĝ - G|",
    "total_linear": "first-order prediction of |Ĝ - G|",
    "m": "relative bias m = |Ĝ - G| / |G|",
}


def probe_metric(config: str, field: str) -> str:
    """``spikeguard/probe/<config>/<field>`` for a field of :data:`PROBE_FIELDS`."""
    if field not in PROBE_FIELDS:
        raise ValueError(f"field must be one of {sorted(PROBE_FIELDS)}, got {field!r}")
    return metric("probe", config, field)


def probe_operator_metric(config: str, operator: str, field: str) -> str:
    """``spikeguard/probe/<config>/op/<operator>/<field>`` for a field of :data:`PROBE_OPERATOR_FIELDS`."""
    if field not in PROBE_OPERATOR_FIELDS:
        raise ValueError(f"field must be one of {sorted(PROBE_OPERATOR_FIELDS)}, got {field!r}")
    return metric("probe", config, "op", operator, field)


#: Per-operator constants and amplification of a probe (configuration-independent).
PROBE_CONSTANTS = {
    "gain": "L_i, the spectral norm of the operator's input Jacobian",
    "param_gain": "M_i, the spectral norm of its parameter Jacobian",
    "A_f": "A^f_i, amplification of a unit forward perturbation",
    "A_b": "A^b_i, amplification of a unit backward perturbation",
    "A_ratio": "A^f_i / A^b_i",
}


def probe_constant_metric(operator: str, field: str) -> str:
    """``spikeguard/probe/op/<operator>/<field>`` for a constant of :data:`PROBE_CONSTANTS`."""
    if field not in PROBE_CONSTANTS:
        raise ValueError(f"field must be one of {sorted(PROBE_CONSTANTS)}, got {field!r}")
    return metric("probe", "op", operator, field)


def perturb_metric(direction: str, operator: str) -> str:
    """``spikeguard/perturb/<direction>/<operator>``: the applied |δ_i| or |ε_i|."""
    if direction not in ("forward", "backward"):
        raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
    return metric("perturb", direction, operator)


#: Keys that do not depend on operator names.
STATIC_KEYS: tuple[Key, ...] = (
    *(Key(signal_metric(s), s.description, s.summary) for s in signals.GLOBAL),
    Key(metric("loss_z"), "robust z-score of the log loss", "max"),
    Key(metric("grad_norm_z"), "robust z-score of the log gradient norm", "max"),
    Key(metric("grad_norm_band"), "upper band of the gradient norm (clip level)"),
    Key(metric("spikes"), "spike events so far (counter)"),
    Key(metric("skipped_steps"), "optimizer steps skipped so far (counter)"),
    Key(metric("clipped_steps"), "optimizer steps clipped so far (counter)"),
    Key(metric("spike", "factor"), "observed spike factor s = |Ĝ| / baseline at a spike", "max"),
    Key(metric("spike", "z"), "robust z-score at a spike", "max"),
    Key(metric("spike", "predicted_factor"), "predicted spike factor (calibrated Proposition 1)", "max"),
    Key(metric("spike", "predicted_k_rec"), "predicted recovery steps k_rec (THEORY §4)"),
    Key(metric("spike", "recovery_steps"), "observed recovery steps of the latest resolved spike"),
    Key(metric("probe", "sharpness"), "top Hessian eigenvalue (preconditioned for Adam) of the probe loss"),
    Key(metric("probe", "stability_threshold"), "the optimizer's stability threshold on sharpness"),
    Key(metric("probe", "sharpness_ratio"), "sharpness / threshold (< 1: stable)", "max"),
    Key(metric("probe", "seconds"), "wall time of the latest probe"),
)


def summary_of(key: str) -> str:
    """The W&B summary rule of any key (per-operator keys: ``last``; spike and z keys: ``max``)."""
    for k in STATIC_KEYS:
        if k.name == key:
            return k.summary
    return "max" if key.endswith("_z") or "/spike/" in key else "last"
