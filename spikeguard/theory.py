"""THEORY.md as functions: Propositions 1-3 and the spike-outcome rule of §4.

Pure functions on floats and 1-D tensors (no Lightning, no model). Symbols follow
THEORY.md; operators are numbered i = 1..N there and indexed 0..N-1 here, so
``gains[k]`` is L_{k+1}. Every function states the proposition it computes.

Reference setting: Kong, Zhang and Yuan, "On the Convergence of Stochastic Gradient
Descent with Perturbed Forward-Backward Passes" (arXiv 2602.20646, 2026); the
propositions are THEORY.md's derivation in that setting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch

__all__ = [
    "PropagationBound",
    "Amplification",
    "SpikeOutcome",
    "propagate",
    "amplification",
    "bias_constants",
    "max_step_size",
    "nonconvex_bound",
    "pl_rate",
    "pl_bound",
    "order_preserving_scale",
    "spike_height",
    "stability_threshold",
    "spike_outcome",
    "recovery_steps",
    "cross_entropy_curvature",
    "estimate_pl_constant",
]

Vector = Union[Sequence[float], torch.Tensor]


def _vec(name: str, value: Vector | float | None, n: int | None, default: float = 0.0) -> torch.Tensor:
    """``value`` as a float64 1-D tensor of length n (a scalar broadcasts)."""
    if value is None:
        value = default
    t = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    if t.ndim == 0:
        if n is None:
            raise ValueError(f"{name} must be a 1-D sequence, got the scalar {float(t)!r}")
        t = t.expand(n).clone()
    if t.ndim != 1 or (n is not None and t.numel() != n):
        raise ValueError(f"{name} must have length N={n}, got shape {tuple(t.shape)}")
    if torch.isnan(t).any() or (t < 0).any():
        raise ValueError(f"{name} must be finite-or-inf and >= 0 (norms and gains), got {t.tolist()}")
    return t


def _scalar(name: str, value: float, *, positive: bool = False) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if not positive and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def _check_m(m: float, where: str) -> float:
    m = _scalar("m", m)
    if m >= 1:
        raise ValueError(
            f"{where} needs m < 1 (the perturbed gradient must stay a descent direction), "
            f"got m={m!r}; at m >= 1 THEORY §4 predicts divergence instead of a bound"
        )
    return m


def _smoothness(
    n: int, jac_smoothness: Vector | float, param_jac_smoothness: Vector | float, grad_msg_norms: Vector | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """H_i, H'_i and |g_i| as vectors; |g_i| is needed only when an H term is non-zero."""
    H = _vec("jac_smoothness", jac_smoothness, n)
    Hp = _vec("param_jac_smoothness", param_jac_smoothness, n)
    if grad_msg_norms is None:
        if (H > 0).any() or (Hp > 0).any():
            raise ValueError(
                "grad_msg_norms (|g_i|) is required when jac_smoothness or "
                "param_jac_smoothness is non-zero"
            )
        return H, Hp, torch.zeros(n, dtype=torch.float64)
    return H, Hp, _vec("grad_msg_norms", grad_msg_norms, n)


def _segment_product(gains: torch.Tensor, a: int, b: int) -> float:
    """P(a, b) = Π_{j=a..b} L_j over 0-based inclusive indices; empty product 1."""
    if b < a:
        return 1.0
    return float(gains[a : b + 1].prod())


# -- Proposition 1 ----------------------------------------------------------------------


@dataclass(frozen=True)
class PropagationBound:
    """The bounds of Proposition 1 for one perturbed forward-backward pass.

    Attributes (0-based over operators, float64 tensors):
        e: ``e_i``, forward output error of operator i.
        b: ``b_i``, error of the gradient message with respect to operator i's output.
        d: ``d_i``, error of operator i's parameter gradient.
        total: ``|Ĝ - G| ≤ (Σ d_i²)^½``.
    """

    e: torch.Tensor
    b: torch.Tensor
    d: torch.Tensor
    total: float


def propagate(
    gains: Vector,
    param_gains: Vector,
    loss_curvature: float,
    forward: Vector | float = 0.0,
    backward: Vector | float = 0.0,
    jac_smoothness: Vector | float = 0.0,
    param_jac_smoothness: Vector | float = 0.0,
    grad_msg_norms: Vector | None = None,
) -> PropagationBound:
    """Proposition 1: how perturbations cascade through one forward-backward pass.

    ::

        e_0 = 0,           e_i ≤ L_i e_{i-1} + |δ_i|
        b_N ≤ L_h e_N + |ε_N|,   b_{i-1} ≤ L_i b_i + H_i e_{i-1} |g_i| + |ε_{i-1}|
        d_i ≤ M_i b_i + H'_i e_{i-1} |g_i|,        |Ĝ - G| ≤ (Σ d_i²)^½

    Args:
        gains: L_i = |J_i|, per operator.
        param_gains: M_i = |K_i|, per operator.
        loss_curvature: L_h, the curvature of the loss h in z_N.
        forward: |δ_i| per operator (a scalar applies to all).
        backward: |ε_i| per operator.
        jac_smoothness: H_i (0 for operators linear in their input).
        param_jac_smoothness: H'_i (1 for ``f(z) = W z``).
        grad_msg_norms: |g_i|, needed when any H_i or H'_i is non-zero.
    """
    L = _vec("gains", gains, None)
    n = L.numel()
    M = _vec("param_gains", param_gains, n)
    L_h = _scalar("loss_curvature", loss_curvature)
    delta = _vec("forward", forward, n)
    eps = _vec("backward", backward, n)
    H, Hp, g = _smoothness(n, jac_smoothness, param_jac_smoothness, grad_msg_norms)

    # Forward: e_i ≤ L_i e_{i-1} + |δ_i|, with e_0 = 0 (the input is exact).
    e = torch.zeros(n, dtype=torch.float64)
    e_prev = 0.0
    for i in range(n):
        e[i] = L[i] * e_prev + delta[i]
        e_prev = e[i]
    e_in = torch.cat([torch.zeros(1, dtype=torch.float64), e[:-1]])  # e_{i-1}

    # Backward: b_N ≤ L_h e_N + |ε_N|; b_{i-1} ≤ L_i b_i + H_i e_{i-1} |g_i| + |ε_{i-1}|.
    b = torch.zeros(n, dtype=torch.float64)
    b[n - 1] = L_h * e[n - 1] + eps[n - 1]
    for i in range(n - 1, 0, -1):
        b[i - 1] = L[i] * b[i] + H[i] * e_in[i] * g[i] + eps[i - 1]

    # Parameters: d_i ≤ M_i b_i + H'_i e_{i-1} |g_i|.
    d = M * b + Hp * e_in * g
    return PropagationBound(e=e, b=b, d=d, total=float(torch.linalg.vector_norm(d)))


@dataclass(frozen=True)
class Amplification:
    """Marginal amplification of a unit perturbation at each operator (Proposition 1).

    ``forward[k]`` = A^f_k, ``backward[k]`` = A^b_k: the sum over operators of the
    parameter-gradient errors d_i that a perturbation of norm 1 at operator k's output
    (forward) or at its gradient message (backward) produces. ``ratio`` = A^f / A^b.
    """

    forward: torch.Tensor
    backward: torch.Tensor

    @property
    def ratio(self) -> torch.Tensor:
        return self.forward / self.backward


def amplification(
    gains: Vector,
    param_gains: Vector,
    loss_curvature: float,
    jac_smoothness: Vector | float = 0.0,
    param_jac_smoothness: Vector | float = 0.0,
    grad_msg_norms: Vector | None = None,
) -> Amplification:
    """A^f_k and A^b_k of Proposition 1, with P(a,b) = Π_{j=a..b} L_j::

        A^b_k = Σ_{i≤k} M_i P(i+1,k)
        A^f_k = L_h P(k+1,N) Σ_i M_i P(i+1,N)
              + Σ_{i>k} H'_i |g_i| P(k+1,i-1)
              + Σ_{i>k} H_i  |g_i| P(k+1,i-1) A^b_{i-1}

    The last line is THEORY's "(+ H_i terms)" in closed form: a forward error reaching
    operator i's input moves its Jacobian, which injects ``H_i e_{i-1} |g_i|`` into the
    gradient message b_{i-1}; that travels down like a backward perturbation at i-1.
    """
    L = _vec("gains", gains, None)
    n = L.numel()
    M = _vec("param_gains", param_gains, n)
    L_h = _scalar("loss_curvature", loss_curvature)
    H, Hp, g = _smoothness(n, jac_smoothness, param_jac_smoothness, grad_msg_norms)

    # A^b_k = Σ_{i≤k} M_i P(i+1,k): the recursion A^b_k = L_k A^b_{k-1} + M_k.
    A_b = torch.zeros(n, dtype=torch.float64)
    acc = torch.zeros((), dtype=torch.float64)
    for k in range(n):
        acc = L[k] * acc + M[k]
        A_b[k] = acc

    # Σ_i M_i P(i+1,N) = A^b_N: everything the loss-side error b_N reaches on the way down.
    down_from_top = A_b[n - 1]
    A_f = torch.zeros(n, dtype=torch.float64)
    for k in range(n):
        total = L_h * _segment_product(L, k + 1, n - 1) * down_from_top
        for i in range(k + 1, n):
            reach = _segment_product(L, k + 1, i - 1)  # P(k+1, i-1): e_{i-1} from unit δ_k
            total = total + Hp[i] * g[i] * reach + H[i] * g[i] * reach * A_b[i - 1]
        A_f[k] = total
    return Amplification(forward=A_f, backward=A_b)


def bias_constants(
    amp: Amplification,
    forward_abs: Vector | float = 0.0,
    backward_abs: Vector | float = 0.0,
    relative_bias: float = 0.0,
) -> tuple[float, float]:
    """THEORY §3: the bias bound ``|β_t| ≤ m |∇loss| + ζ`` from Proposition 1.

    ``ζ = Σ_k A^f_k a^f_k + A^b_k a^b_k`` for absolute perturbation sizes a^f_k, a^b_k;
    m is the relative part, passed through (it is measured, not derived). Returns
    ``(m, ζ)``.
    """
    n = amp.forward.numel()
    a_f = _vec("forward_abs", forward_abs, n)
    a_b = _vec("backward_abs", backward_abs, n)
    zeta = float((amp.forward * a_f).sum() + (amp.backward * a_b).sum())
    return _scalar("relative_bias", relative_bias), zeta


# -- Propositions 2 and 3 ---------------------------------------------------------------


def max_step_size(m: float, smoothness: float) -> float:
    """Propositions 2-3 step condition: ``γ ≤ (1-m) / (4L(1+m)²)``."""
    m = _check_m(m, "max_step_size")
    L = _scalar("smoothness", smoothness, positive=True)
    return (1 - m) / (4 * L * (1 + m) ** 2)


def _check_step(lr: float, m: float, smoothness: float, where: str) -> float:
    lr = _scalar("lr", lr, positive=True)
    limit = max_step_size(m, smoothness)
    if lr > limit * (1 + 1e-12):
        raise ValueError(
            f"{where}: lr={lr!r} exceeds the step condition γ ≤ (1-m)/(4L(1+m)²) = {limit!r} "
            f"(m={m!r}, L={smoothness!r}); the bound does not apply"
        )
    return lr


def nonconvex_bound(
    delta0: float, T: int, lr: float, smoothness: float, sigma2: float, m: float = 0.0, zeta: float = 0.0
) -> float:
    """Proposition 2 (non-convex): the bound on ``(1/T) Σ_t E|∇loss(w_t)|²``::

        4Δ_0/(γ(1-m)T) + 2Lγσ²/(1-m) + (2/(1-m)² + 4Lγ/(1-m)) ζ²

    valid for m < 1 and ``γ ≤ (1-m)/(4L(1+m)²)``. At m = ζ = 0 it is the classic SGD
    bound ``4Δ_0/(γT) + 2Lγσ²`` of this derivation's constants.
    """
    m = _check_m(m, "nonconvex_bound")
    gamma = _check_step(lr, m, smoothness, "nonconvex_bound")
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be an int >= 1, got {T!r}")
    L, d0, s2, z = smoothness, _scalar("delta0", delta0), _scalar("sigma2", sigma2), _scalar("zeta", zeta)
    return (
        4 * d0 / (gamma * (1 - m) * T)
        + 2 * L * gamma * s2 / (1 - m)
        + (2 / (1 - m) ** 2 + 4 * L * gamma / (1 - m)) * z**2
    )


def pl_rate(lr: float, mu: float, m: float = 0.0) -> float:
    """Proposition 3's contraction factor ``q = 1 - γμ(1-m)/2``."""
    m = _check_m(m, "pl_rate")
    return 1 - _scalar("lr", lr, positive=True) * _scalar("mu", mu, positive=True) * (1 - m) / 2


def pl_bound(
    delta0: float, T: int, lr: float, smoothness: float, mu: float, sigma2: float,
    m: float = 0.0, zeta: float = 0.0,
) -> float:
    """Proposition 3 (Polyak–Łojasiewicz): the bound on ``E[loss(w_T) - loss*]``::

        q^T Δ_0 + (2Lγσ² + (2/(1-m) + 4Lγ) ζ²) / (μ(1-m)),   q = 1 - γμ(1-m)/2

    valid for m < 1 and ``γ ≤ (1-m)/(4L(1+m)²)``: linear convergence to a
    neighbourhood whose radius grows with ζ².
    """
    m = _check_m(m, "pl_bound")
    gamma = _check_step(lr, m, smoothness, "pl_bound")
    if not isinstance(T, int) or T < 0:
        raise ValueError(f"T must be an int >= 0, got {T!r}")
    q = pl_rate(gamma, mu, m)
    L, d0, s2, z = smoothness, _scalar("delta0", delta0), _scalar("sigma2", sigma2), _scalar("zeta", zeta)
    return q**T * d0 + (2 * L * gamma * s2 + (2 / (1 - m) + 4 * L * gamma) * z**2) / (mu * (1 - m))


def order_preserving_scale(T: int, amplification: Vector | float, c: float = 1.0) -> torch.Tensor | float:
    """THEORY §3: the absolute perturbation size at operator k that keeps ζ² = O(1/√T).

    ``a_k = c · T^(-1/4) / A_k``: deeper operators, with larger A_k, tolerate less.
    """
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be an int >= 1, got {T!r}")
    if isinstance(amplification, (int, float)):
        return c * T ** -0.25 / _scalar("amplification", amplification, positive=True)
    A = _vec("amplification", amplification, None)
    return c * T ** -0.25 / A


# -- §4 spikes --------------------------------------------------------------------------


def spike_height(lr: float, grad_norm: float, bias_norm: float, smoothness: float) -> float:
    """THEORY §4: the largest one-step loss change a bias β can cause::

        Δloss ≤ -γ|∇loss|² + γ|∇loss||β| + (Lγ²/2)(|∇loss| + |β|)²
    """
    g = _scalar("grad_norm", grad_norm)
    beta = _scalar("bias_norm", bias_norm)
    gamma = _scalar("lr", lr, positive=True)
    L = _scalar("smoothness", smoothness)
    return -gamma * g**2 + gamma * g * beta + L * gamma**2 / 2 * (g + beta) ** 2


_OPTIMIZERS = ("sgd", "momentum", "adam")


def stability_threshold(lr: float, optimizer: str = "sgd", beta: float = 0.9) -> float:
    """THEORY §4: the sharpness above which a step of size γ is unstable.

    - ``"sgd"``: ``2/γ``;
    - ``"momentum"`` (heavy ball, coefficient β): ``(2+2β)/γ``;
    - ``"adam"`` (preconditioned sharpness ``λ_max(P^{-1}∇²loss)``, β = β1):
      ``(2+2β1)/((1-β1)γ)``, 38/γ at β1 = 0.9 (Cohen et al., "Adaptive gradient methods
      at the edge of stability", 2022).
    """
    gamma = _scalar("lr", lr, positive=True)
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(_OPTIMIZERS)}, got {optimizer!r}")
    if optimizer == "sgd":
        return 2 / gamma
    if not isinstance(beta, (int, float)) or not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    if optimizer == "momentum":
        return (2 + 2 * beta) / gamma
    return (2 + 2 * beta) / ((1 - beta) * gamma)


@dataclass(frozen=True)
class SpikeOutcome:
    """The §4 verdict: ``"recover"`` or ``"diverge"``, and why."""

    verdict: str
    reason: str
    m: float
    sharpness_ratio: float | None

    @property
    def recovers(self) -> bool:
        return self.verdict == "recover"


def spike_outcome(m: float, sharpness: float | None = None, threshold: float | None = None) -> SpikeOutcome:
    """THEORY §4: will training recover from a spike?

    Diverges when the relative bias m ≥ 1 (no longer a descent direction) or when the
    sharpness after the spike is at or above the optimizer's stability threshold
    (:func:`stability_threshold`); recovers when both hold. Without a sharpness
    measurement only the m condition is checked, and the reason says so.
    """
    m = _scalar("m", m) if not math.isinf(m) else math.inf
    ratio = None
    if (sharpness is None) != (threshold is None):
        raise ValueError("spike_outcome needs both sharpness and threshold, or neither")
    if sharpness is not None:
        ratio = _scalar("sharpness", sharpness) / _scalar("threshold", threshold, positive=True)
    if m >= 1:
        return SpikeOutcome("diverge", f"m={m:.3g} >= 1: the perturbed step is not a descent direction", m, ratio)
    if ratio is not None and ratio >= 1:
        return SpikeOutcome(
            "diverge", f"sharpness is {ratio:.3g}x the stability threshold (>= 1)", m, ratio
        )
    if ratio is None:
        return SpikeOutcome("recover", f"m={m:.3g} < 1 (sharpness not measured)", m, None)
    return SpikeOutcome("recover", f"m={m:.3g} < 1 and sharpness {ratio:.3g}x threshold < 1", m, ratio)


def recovery_steps(spike_excess: float, floor_excess: float, q: float, kappa: float = 0.1) -> float:
    """THEORY §4: steps for the excess loss to return within (1+κ) of its floor::

        k_rec = log((Δ_spike - Δ_floor) / (κ Δ_floor)) / log(1/q)

    0 when the spike is already within ``(1+κ) Δ_floor``; inf when q ≥ 1 (no
    contraction).
    """
    d_s = _scalar("spike_excess", spike_excess)
    d_f = _scalar("floor_excess", floor_excess, positive=True)
    k = _scalar("kappa", kappa, positive=True)
    q = _scalar("q", q)
    if d_s - d_f <= k * d_f:
        return 0.0
    if q >= 1:
        return math.inf
    if q == 0:
        return 1.0
    return math.log((d_s - d_f) / (k * d_f)) / math.log(1 / q)


# -- constants of the loss --------------------------------------------------------------


def cross_entropy_curvature(num_tokens: int = 1, reduction: str = "mean") -> float:
    """L_h for softmax cross-entropy in the logits (THEORY §1).

    The Hessian of one token's cross-entropy in its logits is ``diag(p) - p pᵀ``, whose
    spectral norm is at most 1/2; a mean over n tokens scales it by 1/n.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be an int >= 1, got {num_tokens!r}")
    return 0.5 / num_tokens if reduction == "mean" else 0.5


def estimate_pl_constant(grad_sq_norms: Vector, losses: Vector, loss_min: float) -> float:
    """THEORY §4: μ estimated from a run, ``|∇loss|² / (2(loss - loss_min))``.

    Over a window, the smallest ratio (PL is a lower bound, so the window's worst case
    is the honest estimate). Points with ``loss <= loss_min`` are skipped. This is an
    estimate from the trajectory, not a certified constant.
    """
    g2 = torch.as_tensor(grad_sq_norms, dtype=torch.float64).flatten()
    f = torch.as_tensor(losses, dtype=torch.float64).flatten()
    if g2.shape != f.shape or g2.numel() == 0:
        raise ValueError(
            f"grad_sq_norms and losses must be non-empty and of equal length, got "
            f"{g2.numel()} and {f.numel()}"
        )
    gap = f - float(loss_min)
    keep = gap > 0
    if not keep.any():
        raise ValueError(f"no loss in the window is above loss_min={loss_min!r}")
    return float((g2[keep] / (2 * gap[keep])).min())
