"""Vectors over lists of tensors and the one power iteration every measurement uses.

A "vector" is a list of tensors (one per parameter, or per input of an operator). The
gains L_i and M_i of the probe (the top eigenvalues of J_iᵀJ_i and K_iᵀK_i, for every
operator at once), the loss curvature L_h and the sharpness all run
:func:`power_iteration` with its one stopping rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from spikeguard._tensor import accum_dtype

__all__ = ["Vectors", "dot", "vnorm", "scaled", "unit", "PowerResult", "power_iteration"]

Vectors = list[torch.Tensor]


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """⟨a, b⟩ over all tensors, accumulated in at least float32."""
    return float(sum((x.to(accum_dtype(x.dtype)) * y.to(accum_dtype(y.dtype))).sum() for x, y in zip(a, b)))


def vnorm(a: Sequence[torch.Tensor]) -> float:
    """|a| over all tensors."""
    return math.sqrt(max(dot(a, a), 0.0))


def scaled(a: Sequence[torch.Tensor], c: float) -> Vectors:
    return [x * c for x in a]


def unit(a: Sequence[torch.Tensor]) -> tuple[Vectors, float]:
    """``(a / |a|, |a|)``; a zero vector is returned as it is."""
    n = vnorm(a)
    return (scaled(a, 1 / n) if n > 0 else list(a)), n


@dataclass(frozen=True)
class PowerResult:
    """What :func:`power_iteration` found, per operator (group).

    Attributes:
        values: the Rayleigh quotients ``vᵀAv`` at the last unit iterates v.
        norms: ``|Av|`` at those iterates (``norms² - values² = |Av - λv|²``: equal
            values and norms mean v is an eigenvector with a positive eigenvalue; for a
            positive semi-definite A, ``values ≤ norms ≤ λ_max``).
        vectors: the next iterates ``Av / |Av|`` (pass them back to warm-start).
        iterations: products ``A v`` used.
        converged: every group's Rayleigh quotient changed by less than ``tol`` of
            itself at the last step.
    """

    values: torch.Tensor
    norms: torch.Tensor
    vectors: list[Vectors]
    iterations: int
    converged: bool


def power_iteration(
    apply: Callable[[list[Vectors]], list[Vectors]],
    vectors: list[Vectors],
    iterations: int,
    tol: float,
) -> PowerResult:
    """Power iteration on G symmetric operators at once: one call of ``apply`` per step.

    ``apply`` maps a unit vector per group to ``A_g v_g`` per group. Stops after
    ``iterations`` steps, or as soon as every group's Rayleigh quotient changed by less
    than ``tol`` of itself (relative). A group whose product is zero keeps its vector
    and reports 0.
    """
    vs = [unit(v)[0] for v in vectors]
    g = len(vs)
    values = torch.zeros(g, dtype=torch.float64)
    norms = torch.zeros(g, dtype=torch.float64)
    prev: torch.Tensor | None = None
    converged, done = False, 0
    for step in range(1, iterations + 1):
        avs = apply(vs)
        done = step
        for i, (v, av) in enumerate(zip(vs, avs)):
            values[i] = dot(v, av)
            rho = vnorm(av)
            norms[i] = rho
            if rho > 0:
                vs[i] = scaled(av, 1 / rho)
        if prev is not None and bool(((values - prev).abs() <= tol * values.abs()).all()):
            converged = True
            break
        prev = values.clone()
    return PowerResult(values=values, norms=norms, vectors=vs, iterations=done, converged=converged)
