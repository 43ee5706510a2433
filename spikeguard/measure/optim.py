"""What THEORY §3-4 need from the optimizer: its family, step sizes, Adam's v̂ and the stability test.

One module for the optimizer's facts, used by the probe, the sharpness measurement and
the spike predictions alike, so that the stability ratio a user sees logged is the one
that decides an outcome.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from spikeguard import theory
from spikeguard.jsonl import decode_float

__all__ = ["OptimizerFacts", "Stability", "optimizer_kind", "adam_denominator", "effective_lr", "facts", "stability_of"]


@dataclass(frozen=True)
class OptimizerFacts:
    """The optimizer at one step.

    Attributes:
        kind: ``"sgd"``, ``"momentum"`` or ``"adam"`` (THEORY §4's families).
        beta: the momentum coefficient (β1 for Adam; 0 for plain SGD).
        lr: the learning rate γ of the first parameter group, the γ of the stability
            threshold (for Adam with the *preconditioned* sharpness, Cohen et al. 2022).
        effective_lr: the step size along the current direction (:func:`effective_lr`),
            the γ of Proposition 3's rate q; equal to ``lr`` for SGD.
    """

    kind: str
    beta: float
    lr: float
    effective_lr: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimizerFacts:
        return cls(kind=str(data["kind"]), beta=float(data["beta"]), lr=float(decode_float(data["lr"])),
                   effective_lr=float(decode_float(data["effective_lr"])))


@dataclass(frozen=True)
class Stability:
    """THEORY §4's stability test: the sharpness against the optimizer's threshold.

    Attributes:
        sharpness: λ_max of the loss Hessian, or of P⁻¹∇²loss for Adam (``preconditioned``).
        threshold: :func:`spikeguard.theory.stability_threshold` at the optimizer's γ.
        preconditioned: whether ``sharpness`` is Adam's preconditioned sharpness.
    """

    sharpness: float
    threshold: float
    preconditioned: bool = False

    @property
    def ratio(self) -> float:
        """sharpness / threshold: the number that is logged and that decides (< 1: stable)."""
        return self.sharpness / self.threshold if self.threshold > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ratio": self.ratio}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stability:
        return cls(sharpness=float(decode_float(data["sharpness"])), threshold=float(decode_float(data["threshold"])),
                   preconditioned=bool(data.get("preconditioned", False)))


def optimizer_kind(optimizer: torch.optim.Optimizer) -> tuple[str, float]:
    """THEORY §4's optimizer family and its momentum: ("adam", β1), ("momentum", β) or ("sgd", 0)."""
    group = optimizer.param_groups[0]
    if "betas" in group:
        return "adam", float(group["betas"][0])
    momentum = float(group.get("momentum", 0.0) or 0.0)
    return ("momentum", momentum) if momentum > 0 else ("sgd", 0.0)


def adam_denominator(optimizer: torch.optim.Optimizer, param: torch.Tensor, group: dict[str, Any]) -> torch.Tensor | None:
    """Adam's ``sqrt(v̂) + ε`` for ``param``, ``v̂ = v / (1 - β2^t)``, as torch's Adam computes it.

    Reads ``exp_avg_sq`` (``max_exp_avg_sq`` with amsgrad) and ``step`` from the optimizer
    state without creating entries; None before the parameter's first step.
    """
    state = optimizer.state.get(param, {})
    key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
    if key not in state or "step" not in state:
        return None
    beta2 = float(group["betas"][1])
    t = float(state["step"])
    return (state[key].detach().sqrt() / math.sqrt(1 - beta2**t)).add_(float(group["eps"]))


def effective_lr(optimizer: torch.optim.Optimizer) -> float:
    """γ for Proposition 3's rate. SGD: the learning rate. Adam-family: the step size along the
    current direction, ``lr · Σ m_i² / (sqrt(v̂_i) + ε) / Σ m_i²`` with the optimizer's first
    moment m as the gradient's proxy, so that γ|∇|² is Adam's first-order loss decrease;
    the raw lr before the first step."""
    group = optimizer.param_groups[0]
    lr = float(group["lr"])
    if "betas" not in group:
        return lr
    num = torch.zeros((), dtype=torch.float64)
    den = torch.zeros((), dtype=torch.float64)
    for g in optimizer.param_groups:
        for p in g["params"]:
            denom = adam_denominator(optimizer, p, g)
            if denom is None or "exp_avg" not in optimizer.state[p]:
                continue
            m2 = optimizer.state[p]["exp_avg"].double() ** 2
            num += (m2 / denom.double()).sum().cpu()
            den += m2.sum().cpu()
    return lr * float(num / den) if den > 0 else lr


def facts(optimizer: torch.optim.Optimizer) -> OptimizerFacts:
    """The optimizer's :class:`OptimizerFacts` now."""
    kind, beta = optimizer_kind(optimizer)
    return OptimizerFacts(kind=kind, beta=beta, lr=float(optimizer.param_groups[0]["lr"]), effective_lr=effective_lr(optimizer))


def stability_of(optimizer: OptimizerFacts, sharpness: float, preconditioned: bool) -> Stability:
    """THEORY §4's test for a measured sharpness: against ``stability_threshold(γ, kind, β)``.

    Adam's threshold ``(2+2β1)/((1-β1)γ)`` applies to the preconditioned sharpness, with
    γ the configured learning rate (the preconditioner already holds Adam's per-coordinate
    scaling); SGD's ``2/γ`` and momentum's ``(2+2β)/γ`` to the plain sharpness.
    """
    if (optimizer.kind == "adam") != preconditioned:
        need = "the preconditioned" if optimizer.kind == "adam" else "the plain"
        raise ValueError(f"optimizer kind {optimizer.kind!r} is tested on {need} sharpness, got preconditioned={preconditioned}")
    threshold = theory.stability_threshold(optimizer.lr, optimizer.kind, optimizer.beta if optimizer.kind != "sgd" else 0.9)
    return Stability(sharpness=float(sharpness), threshold=threshold, preconditioned=preconditioned)
