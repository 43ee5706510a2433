"""What the amplification probe measures, as data: Constants, Observed, ProbeResult.

Plain frozen dataclasses of float64 CPU tensors (no autograd, no model), each with
``to_dict`` (JSON-ready lists and floats) and ``from_dict``, so that the probe log, the
checkpointed probe store, the precision probe and the report share one serialisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from spikeguard import theory
from spikeguard._tensor import nan_ratio
from spikeguard.jsonl import decode_float

__all__ = ["CONFIGS", "Constants", "Observed", "ProbeResult", "bound_to_dict", "bound_from_dict"]

#: The perturbation configurations a probe can observe.
CONFIGS = ("forward", "backward", "both")


def _t(values: Any) -> torch.Tensor:
    """A float64 CPU tensor from a list that may hold the strings of non-finite floats."""
    return torch.tensor([float(decode_float(v)) for v in values], dtype=torch.float64)


def _f(value: Any) -> float:
    return float(decode_float(value))


def bound_to_dict(bound: theory.PropagationBound) -> dict[str, Any]:
    """A :class:`theory.PropagationBound` as lists and a float."""
    return {"e": bound.e.tolist(), "b": bound.b.tolist(), "d": bound.d.tolist(), "total": bound.total}


def bound_from_dict(data: dict[str, Any]) -> theory.PropagationBound:
    return theory.PropagationBound(e=_t(data["e"]), b=_t(data["b"]), d=_t(data["d"]), total=_f(data["total"]))


@dataclass(frozen=True)
class Constants:
    """THEORY §1's per-operator constants, measured at the clean point (first-order estimates).

    Besides the symbols of THEORY §1 (L_i, M_i, H_i, H'_i, |g_i|, L_h), ``output_norms``
    holds |z_i|, so that a relative perturbation size u (|δ_i| = u |z_i|) converts to
    the absolute size Proposition 1 takes.

    ``gains[0]`` is nan: the first operator's input is the data, whose error e_0 is 0, so
    L_1 never enters Proposition 1.
    """

    gains: torch.Tensor
    param_gains: torch.Tensor
    jac_smoothness: torch.Tensor
    param_jac_smoothness: torch.Tensor
    grad_msg_norms: torch.Tensor
    output_norms: torch.Tensor
    loss_curvature: float
    power_iterations: int
    converged: bool

    _VECTORS = ("gains", "param_gains", "jac_smoothness", "param_jac_smoothness", "grad_msg_norms", "output_norms")

    def theory_kwargs(self) -> dict[str, Any]:
        """The constants as keyword arguments of :func:`theory.propagate` / :func:`theory.amplification`."""
        return dict(
            gains=torch.nan_to_num(self.gains, nan=0.0),
            param_gains=self.param_gains,
            loss_curvature=self.loss_curvature,
            jac_smoothness=self.jac_smoothness,
            param_jac_smoothness=self.param_jac_smoothness,
            grad_msg_norms=self.grad_msg_norms,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {key: getattr(self, key).tolist() for key in self._VECTORS}
        out.update(loss_curvature=self.loss_curvature, power_iterations=self.power_iterations, converged=self.converged)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Constants:
        n = len(data["gains"])
        vectors = {key: _t(data[key]) if key in data else torch.full((n,), math.nan, dtype=torch.float64) for key in cls._VECTORS}
        return cls(
            **vectors, loss_curvature=_f(data["loss_curvature"]),
            power_iterations=int(data["power_iterations"]), converged=bool(data["converged"]),
        )


@dataclass(frozen=True)
class Observed:
    """One configuration's observation next to its predictions (float64 CPU tensors).

    Attributes:
        e, b, d: observed forward output error, gradient-message error and
            parameter-gradient error per operator (THEORY §1).
        total: observed |Ĝ - G| over all parameters.
        grad_norm: |G|, the clean gradient norm.
        m: the relative bias |Ĝ - G| / |G| (THEORY §3).
        delta, eps: the applied |δ_i| and |ε_i|.
        bound: Proposition 1's bound from the measured constants.
        linear: the first-order prediction (forward-mode AD through the clean pass), or
            None when it could not be computed (see ``ProbeResult.notes``).
    """

    e: torch.Tensor
    b: torch.Tensor
    d: torch.Tensor
    total: float
    grad_norm: float
    m: float
    delta: torch.Tensor
    eps: torch.Tensor
    bound: theory.PropagationBound
    linear: theory.PropagationBound | None

    @property
    def tightness(self) -> torch.Tensor:
        """Observed d_i over the bound's d_i per operator (nan where the bound is 0)."""
        return nan_ratio(self.d, self.bound.d)

    @property
    def total_tightness(self) -> float:
        """Observed |Ĝ - G| over the bound's."""
        return self.total / self.bound.total if self.bound.total > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "e": self.e.tolist(), "b": self.b.tolist(), "d": self.d.tolist(),
            "total": self.total, "grad_norm": self.grad_norm, "m": self.m,
            "delta": self.delta.tolist(), "eps": self.eps.tolist(),
            "bound": bound_to_dict(self.bound),
            "linear": None if self.linear is None else bound_to_dict(self.linear),
            "tightness": self.tightness.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Observed:
        return cls(
            e=_t(data["e"]), b=_t(data["b"]), d=_t(data["d"]), total=_f(data["total"]),
            grad_norm=_f(data["grad_norm"]), m=_f(data["m"]), delta=_t(data["delta"]), eps=_t(data["eps"]),
            bound=bound_from_dict(data["bound"]),
            linear=None if data.get("linear") is None else bound_from_dict(data["linear"]),
        )


@dataclass(frozen=True)
class ProbeResult:
    """Everything one probe measured; ``observed[config]`` for each configuration run."""

    step: int
    names: tuple[str, ...]
    observed: dict[str, Observed]
    constants: Constants
    amplification: theory.Amplification
    notes: tuple[str, ...] = ()
    seconds: float = 0.0

    def table(self, config: str = "both") -> str:
        """Observed versus predicted per operator, as a fixed-width text table."""
        obs = self.observed[config]
        lin = obs.linear
        head = (
            f"{'operator':<24}{'L_i':>8}{'M_i':>9}{'e obs':>10}{'e bound':>10}{'e lin':>10}"
            f"{'d obs':>10}{'d bound':>10}{'d lin':>10}{'A^f':>9}{'A^b':>9}"
        )
        rows = [head]
        c = self.constants
        for i, name in enumerate(self.names):
            rows.append(
                f"{name:<24}{fmt(c.gains[i], 8)}{fmt(c.param_gains[i], 9)}"
                f"{fmt(obs.e[i], 10)}{fmt(obs.bound.e[i], 10)}{fmt(lin.e[i] if lin else math.nan, 10)}"
                f"{fmt(obs.d[i], 10)}{fmt(obs.bound.d[i], 10)}{fmt(lin.d[i] if lin else math.nan, 10)}"
                f"{fmt(self.amplification.forward[i], 9)}{fmt(self.amplification.backward[i], 9)}"
            )
        lin_total = f"{lin.total:.4g}" if lin else "n/a"
        rows.append(
            f"|G-Ĝ| observed {obs.total:.4g}, bound {obs.bound.total:.4g}, linear {lin_total}; "
            f"m = {obs.m:.4g}"
        )
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plain Python (floats and lists)."""
        return {
            "step": self.step,
            "names": list(self.names),
            "notes": list(self.notes),
            "seconds": self.seconds,
            "constants": self.constants.to_dict(),
            "amplification": {
                "forward": self.amplification.forward.tolist(),
                "backward": self.amplification.backward.tolist(),
            },
            "observed": {config: obs.to_dict() for config, obs in self.observed.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeResult:
        amp = data["amplification"]
        return cls(
            step=int(data["step"]), names=tuple(data["names"]),
            observed={config: Observed.from_dict(obs) for config, obs in data["observed"].items()},
            constants=Constants.from_dict(data["constants"]),
            amplification=theory.Amplification(forward=_t(amp["forward"]), backward=_t(amp["backward"])),
            notes=tuple(data.get("notes") or ()), seconds=_f(data.get("seconds", 0.0)),
        )


def fmt(x: Any, width: int) -> str:
    """A number right-aligned in ``width`` characters, 3 significant digits."""
    return f"{float(x):>{width}.3g}"
