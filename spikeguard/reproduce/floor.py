"""Experiment 1: under a constant perturbation SGD settles at a loss floor ∝ ζ² (Proposition 3)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from spikeguard import theory
from spikeguard.perturb import Always, Injector, Uniform
from spikeguard.reproduce._common import _convex, _figure, _save, _slope
from spikeguard.reproduce.problems import DTYPE, Data, LogisticChain, Offset, train
from spikeguard.reproduce.settings import Settings

__all__ = ["constant_perturbation"]


def _constant_injector(problem: LogisticChain, kind: str, size: float, seed: int) -> Injector:
    side, model = kind.split()
    noise = Offset(size) if model == "offset" else Uniform(size)
    return Injector(problem.chain, **{side: {"1": (noise, Always())}}, seed=seed)


def constant_perturbation(data: Data, s: Settings, figure: Path) -> dict[str, Any]:
    """Experiment 1: SGD under a constant absolute perturbation settles at a floor ∝ ζ².

    Convex ℓ2 problem, N operators, minibatches of B, the step of Propositions 2-3
    (``γ = theory.max_step_size(0, L)``), started at w*. The perturbation is on operator
    2's output (forward) or gradient message (backward), every step: a constant
    :class:`Offset` (a bias) or fresh :class:`Uniform` noise (zero mean), of the element
    size that makes Proposition 1's ζ equal each value of ``constant_zetas`` (so forward
    and backward runs line up on the ζ axis). Observed floor:
    the mean excess loss over the second half of the run. Predicted:
    ``theory.pl_bound(Δ_0 = 0, ...)`` with μ = λ (certified), σ² measured at w*, and ζ
    two ways: from Proposition 1 (``theory.bias_constants`` with the worst-case
    amplification of :meth:`LogisticChain.amplification` and the exact ``|δ|`` bound) and
    the largest ``|Ĝ - G|`` measured during the run.
    """
    problem = _convex(data, s)
    w_star, _ = problem.solve()
    B = s.batch_size
    L = problem.smoothness()
    mu = problem.strong_convexity()
    lr = theory.max_step_size(0.0, L)
    sigma2 = problem.gradient_variance(w_star, B)
    amp = problem.amplification(B)
    numel = B + data.num_features  # size of every z_i and g_i
    T = s.constant_steps
    burn = T // 2

    def predicted(zeta: float) -> float:
        return theory.pl_bound(0.0, T, lr, L, mu, sigma2, m=0.0, zeta=zeta)

    clean = train(problem, T, lr, w0=w_star, batch_size=B, seed=s.seed)
    clean_floor = float(clean.excess[burn:].mean())
    series: dict[str, list[dict[str, float]]] = {}
    for kind in s.constant_kinds:
        rows = []
        side = kind.split()[0]
        A = float((amp.forward if side == "forward" else amp.backward)[1])
        for target in s.constant_zetas:
            size = target / (A * math.sqrt(numel))  # |δ| ≤ size·numel^½ for both noise models
            inj = _constant_injector(problem, kind, size, s.seed)
            run = train(problem, T, lr, injectors=(inj,), w0=w_star, batch_size=B, seed=s.seed, bias_every=10)
            a = [0.0] * problem.depth
            a[1] = size * math.sqrt(numel)
            _, zeta = theory.bias_constants(amp, **{f"{side}_abs": a})
            zeta_obs = max(b for _, b in run.bias)
            rows.append(
                {
                    "size": size,
                    "zeta": zeta,
                    "zeta_sq": zeta**2,
                    "zeta_observed": zeta_obs,
                    "floor_observed": float(run.excess[burn:].mean()),
                    "floor_predicted": predicted(zeta),
                    "floor_predicted_observed_zeta": predicted(zeta_obs),
                }
            )
        series[kind] = rows

    # Log-slope of the excess floor (above the clean one) against ζ², on the sizes where it dominates.
    slopes = {}
    for kind, rows in series.items():
        pts = [(r["zeta_sq"], r["floor_observed"] - clean_floor) for r in rows if r["floor_observed"] > 2 * clean_floor]
        slopes[kind] = _slope(*zip(*pts)) if len(pts) >= 2 else None
    below = all(r["floor_observed"] <= r["floor_predicted"] for rows in series.values() for r in rows)
    below_obs = all(r["floor_observed"] <= r["floor_predicted_observed_zeta"] for rows in series.values() for r in rows)

    fig, axes = _figure(2, (11, 4.4))
    colours = {"forward offset": "tab:blue", "backward offset": "tab:orange", "forward uniform": "tab:green"}
    zmin = min(r["zeta_sq"] for rows in series.values() for r in rows)
    zmax = max(r["zeta_sq"] for rows in series.values() for r in rows)
    grid = torch.logspace(math.log10(zmin) - 0.3, math.log10(zmax) + 0.3, 60, dtype=DTYPE).tolist()
    ax = axes[0]
    ax.plot(grid, [predicted(math.sqrt(z)) for z in grid], "k--", label="Prop. 3 neighbourhood (ζ from Prop. 1)")
    for kind, rows in series.items():
        ax.plot([r["zeta_sq"] for r in rows], [r["floor_observed"] for r in rows], "o-", color=colours[kind],
                label=f"observed, {kind}")
    ax.axhline(clean_floor, color="grey", lw=1, ls=":", label="observed, no perturbation")
    ax.set(xscale="log", yscale="log", xlabel="ζ² (ζ: Proposition 1's bound on |β|)",
           ylabel="loss floor (excess over loss*)",
           title="Constant perturbation: loss floor against ζ²")
    ax.legend(fontsize=7.5)
    ax = axes[1]
    for kind, rows in series.items():
        zo = [r["zeta_observed"] ** 2 for r in rows]
        ax.plot(zo, [r["floor_observed"] for r in rows], "o-", color=colours[kind], label=f"observed, {kind}")
        ax.plot(zo, [r["floor_predicted_observed_zeta"] for r in rows], "--", color=colours[kind], alpha=0.7,
                label=f"Prop. 3 with measured ζ, {kind}")
    ax.axhline(clean_floor, color="grey", lw=1, ls=":")
    ax.set(xscale="log", yscale="log", xlabel="measured ζ² = max_t |Ĝ_t - G_t|²",
           ylabel="loss floor (excess over loss*)",
           title="Same runs against the measured bias")
    ax.legend(fontsize=7.5)
    _save(fig, figure)
    return {
        "problem": {"regularizer": "l2", "lam": s.lam, "depth": problem.depth, "batch_size": B},
        "lr": lr,
        "steps": T,
        "smoothness_L": L,
        "mu_certified": mu,
        "sigma2_at_w_star": sigma2,
        "amplification_forward": amp.forward.tolist(),
        "amplification_backward": amp.backward.tolist(),
        "clean_floor_observed": clean_floor,
        "clean_floor_predicted": predicted(0.0),
        "series": series,
        "log_slope_floor_vs_zeta_sq": slopes,
        "observed_below_prediction": below,
        "observed_below_prediction_measured_zeta": below_obs,
    }
