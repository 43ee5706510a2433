"""Experiment 2: an absolute bias decaying like t^(-1/4) keeps Proposition 2's O(1/√T) rate."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from spikeguard import theory
from spikeguard.perturb import Decay, Injector
from spikeguard.reproduce._common import _cmap, _figure, _plain_log_ticks, _save, _slope
from spikeguard.reproduce.problems import DTYPE, Data, LogisticChain, Offset, train
from spikeguard.reproduce.settings import Settings

__all__ = ["decaying_perturbation"]


def decaying_perturbation(data: Data, s: Settings, figure: Path) -> dict[str, Any]:
    """Experiment 2: an absolute bias decaying like t^(-1/4) keeps Proposition 2's O(1/√T) rate.

    Non-convex problem (``λ Σ w²/(1+w²)``), minibatches of B, ``γ_T = γ_max √(T_min/T)``
    (γ_max from ``theory.max_step_size``, so the step condition holds for every T). An
    :class:`Offset` on operator 2's output with magnitude ``(t+1)^(-p)`` (``Decay``); its
    size at t = 0 is ``theory.order_preserving_scale(1, A^f, c)``. Observed:
    ``(1/T) Σ_t |∇loss(w_t)|²`` on the full data. Predicted: ``theory.nonconvex_bound``
    with ζ² the run's mean of ζ_t² (the proof sums ζ_t²), Δ_0 = loss(0) - 0 (the loss is
    ≥ 0) and σ² the larger of its values at w = 0 and at the minimizer (an estimate).
    """
    problem = LogisticChain(data, "nonconvex", s.lam, s.depth, 1.0)
    w_min, _ = problem.solve()
    B = s.batch_size
    L = problem.smoothness()
    lr_max = theory.max_step_size(0.0, L)
    T_min = min(s.decay_horizons)
    zero = torch.zeros(data.num_features, dtype=DTYPE)
    sigma2 = max(problem.gradient_variance(zero, B), problem.gradient_variance(w_min, B))
    delta0 = float(problem.objective(zero))
    amp = problem.amplification(B)
    A = float(amp.forward[1])
    numel = B + data.num_features
    a0 = theory.order_preserving_scale(1, A, s.decay_scale)  # |δ| at t = 0
    value = a0 / math.sqrt(numel)

    series: dict[str, list[dict[str, float]]] = {}
    for p in (None, *s.decay_powers):
        label = "no perturbation" if p is None else ("constant" if p == 0 else f"decay t^-{p:g}")
        rows = []
        for T in s.decay_horizons:
            lr = lr_max * math.sqrt(T_min / T)
            injectors = () if p is None else (
                Injector(problem.chain, forward={"1": (Offset(value), Decay(1.0, p))}, seed=s.seed),
            )
            run = train(problem, T, lr, injectors=injectors, batch_size=B, seed=s.seed, record_grad=True)
            zeta_sq = 0.0 if p is None else A**2 * a0**2 * sum((t + 1) ** (-2 * p) for t in range(T)) / T
            rows.append(
                {
                    "T": T,
                    "lr": lr,
                    "mean_grad_sq_observed": float(run.grad_sq.mean()),
                    "zeta_sq_mean": zeta_sq,
                    "bound": theory.nonconvex_bound(delta0, T, lr, L, sigma2, m=0.0, zeta=math.sqrt(zeta_sq)),
                }
            )
        series[label] = rows
    slopes = {k: _slope([r["T"] for r in v], [r["mean_grad_sq_observed"] for r in v]) for k, v in series.items()}
    bound_slopes = {k: _slope([r["T"] for r in v], [r["bound"] for r in v]) for k, v in series.items()}
    below = all(r["mean_grad_sq_observed"] <= r["bound"] for v in series.values() for r in v)

    fig, axes = _figure(2, (11, 4.4))
    cmap = _cmap("viridis")
    for j, (label, rows) in enumerate(series.items()):
        colour = "black" if label == "no perturbation" else cmap(0.15 + 0.7 * (j - 1) / max(1, len(series) - 2))
        Ts = [r["T"] for r in rows]
        axes[0].plot(Ts, [r["mean_grad_sq_observed"] for r in rows], "o-", color=colour,
                     label=f"{label} (slope {slopes[label]:+.2f})")
        axes[1].plot(Ts, [r["bound"] for r in rows], "s--", color=colour,
                     label=f"{label} (slope {bound_slopes[label]:+.2f})")
    for ax, title in ((axes[0], "Observed: (1/T) Σ|∇loss(w_t)|²"), (axes[1], "Proposition 2 bound")):
        Ts = list(s.decay_horizons)
        ref = ax.get_lines()[0].get_ydata()[0]
        ax.plot(Ts, [ref * (T / Ts[0]) ** -0.5 for T in Ts], ":", color="grey", label="reference slope -1/2")
        ax.set(xscale="log", yscale="log", xlabel="horizon T (γ ∝ 1/√T)", ylabel="(1/T) Σ_t |∇loss(w_t)|²",
               title=title)
        _plain_log_ticks(ax, Ts)
        ax.legend(fontsize=7.5)
    fig.suptitle("Decaying absolute bias (non-convex regularizer): t^-1/4 keeps the 1/√T rate", fontsize=10)
    _save(fig, figure)
    return {
        "problem": {"regularizer": "nonconvex", "lam": s.lam, "depth": problem.depth, "batch_size": B},
        "smoothness_L": L,
        "lr_max": lr_max,
        "sigma2_estimate": sigma2,
        "delta0": delta0,
        "amplification_forward_op2": A,
        "offset_norm_at_t0": a0,
        "series": series,
        "log_slope_observed": slopes,
        "log_slope_bound": bound_slopes,
        "observed_below_bound": below,
    }
