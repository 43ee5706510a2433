"""Experiment 3, spikes, and the protocol it shares with experiment 4: the floor bench and one burst run.

The shared protocol. Full-batch steps (B = n), so that an outcome is decided by the two
conditions of THEORY §4 and not by a minibatch draw. A
small persisting absolute bias (a constant offset on the last operator's gradient
message) gives the run a floor Δ_floor > 0, Proposition 3's neighbourhood with σ² = 0;
each run starts at that floor's fixed point w_b. At step 0 a burst hits:

- the spike: absolute Gaussian noise on operator 2's gradient message, one step;
- the part that persists: operator 3's gradient message scaled by (1 - m) from step 0 on
  (``Scale(1 - m)``), a relative bias of exactly size m that opposes the gradient, the
  worst direction a relative bias can take (m ≥ 1 turns descent into ascent).

Predicted: ``theory.spike_outcome(m, sharpness, theory.stability_threshold(γ, ...))``
with m measured by the probe and ``theory.recovery_steps`` with
``q = theory.pl_rate(γ, μ, m)``. Which sharpness: THEORY §4 says "after the spike". The
headline prediction uses the sharpness of the field the perturbed steps follow, at the
fixed point they return to (w_b: neither a one-step spike nor a (1 - m) scaling moves it;
:func:`update_sharpness`); THEORY read literally, the clean loss's sharpness at the point
right after the spike, is reported next to it (``predicted_literal``). The two differ
when a relative bias persists (the steps follow (1 - m)∇loss, whose sharpness is
(1 - m)λ_max) and when the spike lands in a sharper region the run leaves again (the
logistic loss is sharpest at w = 0 and flattens away from its decision boundary).

Observed: the run recovers when its clean excess loss stays within (1 + κ)·Δ_floor for
``spike_window`` consecutive steps; otherwise (blow-up, or no recovery within the
horizon) it diverged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spikeguard import theory
from spikeguard.measure import AmplificationProbe, hessian_top_eigenvalue
from spikeguard.perturb import Always, Burst, Gaussian, Injector, Scale, Window
from spikeguard.reproduce._common import _cmap, _convex, _figure, _save
from spikeguard.reproduce.problems import DTYPE, Data, LogisticChain, Offset, train
from spikeguard.reproduce.settings import Settings

__all__ = [
    "FLOOR_OP",
    "SPIKE_OP",
    "BIAS_OP",
    "BLOWUP",
    "SpikeBench",
    "spike_bench",
    "update_sharpness",
    "spike_run",
    "spike_cases",
    "spikes",
]


FLOOR_OP, SPIKE_OP, BIAS_OP = "3", "1", "2"  # the operators the three perturbations hit
BLOWUP = 1e3  # a run whose excess grows this many times past its first step's has blown up


@dataclass
class SpikeBench:
    """The floor state every spike run starts from, and the constants its predictions use."""

    problem: LogisticChain
    w_floor: torch.Tensor  # w_b: the fixed point of the run with the floor bias
    floor: float  # Δ_floor = loss(w_b) - loss*
    floor_bias: float  # |β| of the floor offset (constant in w)
    sharpness: float  # λ_max(∇²loss(w_b)), hessian_top_eigenvalue
    smoothness: float  # L
    mu: float  # λ, certified
    settings: Settings = field(repr=False)
    cache_m: dict[float, float] = field(default_factory=dict, repr=False)
    cache_sharpness: dict[float, float] = field(default_factory=dict, repr=False)


def spike_bench(data: Data, s: Settings) -> SpikeBench:
    """Solve for the floor: the offset's bias β is constant in w, so w_b solves ∇loss(w) + β = 0."""
    problem = _convex(data, s)
    w_star, _ = problem.solve()
    offset = Injector(problem.chain, backward={FLOOR_OP: (Offset(s.floor_offset), Always())}, seed=s.seed)
    beta = _perturbed_gradient(problem, offset, w_star, 0) - problem.gradient(w_star)
    w_floor = problem.newton(lambda v: problem.gradient(v) + beta, w_star)
    return SpikeBench(
        problem=problem,
        w_floor=w_floor,
        floor=problem.excess(w_floor),
        floor_bias=float(beta.norm()),
        sharpness=_sharpness(problem, w_floor, s.seed),
        smoothness=problem.smoothness(),
        mu=problem.strong_convexity(),
        settings=s,
    )


def _perturbed_gradient(problem: LogisticChain, injector: Injector, w: torch.Tensor, step: int) -> torch.Tensor:
    """Ĝ(w) on the full data with ``injector``'s perturbations at ``step``."""
    problem.set_weight(w)
    injector.set_step(step)
    with injector:
        (g,) = torch.autograd.grad(problem.loss_fn(problem.model, (problem.data.X, problem.data.y)), [problem.weight])
    return g.detach()


def _sharpness(problem: LogisticChain, w: torch.Tensor, seed: int) -> float:
    """λ_max(∇²loss(w)) by the library's Hessian power iteration."""
    problem.set_weight(w)
    result = hessian_top_eigenvalue(
        lambda: problem.objective(problem.weight), [problem.weight],
        iterations=100, tol=1e-8, generator=torch.Generator().manual_seed(seed),
    )
    return result.value


def update_sharpness(
    problem: LogisticChain, injector: Injector, w: torch.Tensor, step: int, *,
    iterations: int = 100, tol: float = 1e-8, seed: int = 0,
) -> float:
    """Top eigenvalue of the Jacobian of the *perturbed* gradient field Ĝ(w), by power iteration.

    THEORY §4's stability condition is about the map the optimizer iterates. With a
    persisting perturbation that map is ``w - γĜ(w)``, not ``w - γ∇loss(w)`` (for Adam
    THEORY already uses the preconditioned field's sharpness for the same reason). The
    Injector's backward hooks do not support double backward, so the Jacobian-vector
    product is a central difference of two perturbed gradients,
    ``(Ĝ(w + εv) - Ĝ(w - εv)) / 2ε``. The eigenvalue of largest magnitude is returned
    (negative when the field points uphill, as for m > 1).
    """
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(w.shape, generator=gen, dtype=DTYPE)
    v = v / v.norm()
    eps = 1e-6 * max(1.0, float(w.norm()))
    lam_prev = None
    lam = 0.0
    for _ in range(iterations):
        jv = (_perturbed_gradient(problem, injector, w + eps * v, step)
              - _perturbed_gradient(problem, injector, w - eps * v, step)) / (2 * eps)
        lam = float(v @ jv)
        size = float(jv.norm())
        if size == 0:
            return 0.0
        v = jv / size
        if lam_prev is not None and abs(lam - lam_prev) <= tol * abs(lam):
            break
        lam_prev = lam
    return lam


def _basin_sharpness(bench: SpikeBench, injector: Injector, m: float) -> float:
    """Sharpness of the perturbed update field at w_b after the spike (step 1), cached per m."""
    if m not in bench.cache_sharpness:
        bench.cache_sharpness[m] = (
            bench.sharpness if m == 0
            else update_sharpness(bench.problem, injector, bench.w_floor, 1, seed=bench.settings.seed)
        )
    return bench.cache_sharpness[m]


def _measured_m(bench: SpikeBench, m: float) -> float:
    """The relative bias of ``Scale(1 - m)`` on a gradient message, measured by the probe at w_b."""
    if m == 0:
        return 0.0
    if m in bench.cache_m:
        return bench.cache_m[m]
    problem = bench.problem
    problem.set_weight(bench.w_floor)
    probe = AmplificationProbe(
        problem.model, problem.chain, problem.loss_fn,
        Injector(problem.chain, backward={BIAS_OP: Scale(1 - m)}, seed=bench.settings.seed),
        configs=("backward",), linearize=False, first_power_iterations=1,
        loss_curvature=problem.loss_curvature(problem.data.num_samples),
    )
    bench.cache_m[m] = probe.run((problem.data.X, problem.data.y)).observed["backward"].m
    return bench.cache_m[m]


def _recovery_monitor(limit: float, window: int, blowup: float):
    """Stops a run once it has stayed within ``limit`` for ``window`` steps, or once its excess
    exceeds ``blowup`` times the larger of the first step's excess and ``limit``."""
    state = {"inside": 0, "first": None}

    def monitor(t: int, excess: float) -> str | None:
        if state["first"] is None:
            state["first"] = max(excess, limit)
        if not math.isfinite(excess) or excess > blowup * state["first"]:
            return "blew up"
        state["inside"] = state["inside"] + 1 if excess <= limit else 0
        return "recovered" if state["inside"] >= window else None

    return monitor


def spike_run(
    bench: SpikeBench, *, lr: float, m: float, momentum: float = 0.0, spike: bool = True,
    w0: torch.Tensor | None = None, horizon: int | None = None,
) -> dict[str, Any]:
    """One burst from the floor state: predicted verdict and k_rec, observed outcome and recovery.

    ``w0`` replaces the start (default w_b); ``spike=False`` drops the one-step spike.
    ``horizon`` defaults to ``max(spike_horizon, 2·k_rec)`` with k_rec from the
    certified μ (the theory's own worst case), capped at ``spike_max_horizon``.
    """
    s = bench.settings
    problem = bench.problem
    optimizer = "momentum" if momentum else "sgd"
    backward: dict[str, Any] = {FLOOR_OP: (Offset(s.floor_offset), Always())}
    if spike:
        backward[SPIKE_OP] = (Gaussian(s.spike_size), Burst((0,)))
    if m:
        backward[BIAS_OP] = (Scale(1 - m), Window(0))
    injector = Injector(problem.chain, backward=backward, seed=s.seed)
    start = bench.w_floor if w0 is None else w0

    # At the spike: the bias of step 0 and §4's bound on the loss change it can cause.
    g_clean = problem.gradient(start)
    beta0 = float((_perturbed_gradient(problem, injector, start, 0) - g_clean).norm())
    height_bound = theory.spike_height(lr, float(g_clean.norm()), beta0, bench.smoothness)
    m_measured = _measured_m(bench, m)

    threshold = theory.stability_threshold(lr, optimizer, momentum if momentum else 0.9)
    k_certified = None
    if m_measured < 1:
        excess_bound = problem.excess(start) + max(height_bound, 0.0)
        k_certified = theory.recovery_steps(excess_bound, bench.floor, theory.pl_rate(lr, bench.mu, m_measured), s.kappa)
    if horizon is None:
        horizon = s.spike_horizon
        if k_certified is not None and math.isfinite(k_certified):
            horizon = max(horizon, math.ceil(2 * k_certified) + s.spike_window)
        horizon = min(horizon, s.spike_max_horizon)

    limit = (1 + s.kappa) * bench.floor
    run = train(
        problem, horizon, lr, injectors=(injector,), w0=start, momentum=momentum,
        record_grad=True, monitor=_recovery_monitor(limit, s.spike_window, BLOWUP),
    )
    ex = run.excess
    # Predicted verdicts. Headline: the sharpness of the field the perturbed steps follow,
    # at the fixed point they return to (w_b: neither the one-step spike nor a (1 - m)
    # scaling moves it). Literal: the clean loss's sharpness at the point right after the spike.
    sharp_basin = _basin_sharpness(bench, injector, m)
    post = run.first_weights if spike else start
    sharp_post = _sharpness(problem, post, s.seed)
    verdict = theory.spike_outcome(m_measured, max(sharp_basin, 0.0), threshold)
    verdict_literal = theory.spike_outcome(m_measured, sharp_post, threshold)

    peak = int(torch.argmax(ex[: min(20, len(ex))]))
    observed = "recover" if run.stopped == "recovered" else "diverge"
    k_obs = len(ex) - s.spike_window - peak if observed == "recover" else None
    spike_excess = float(ex[peak])
    out: dict[str, Any] = {
        "lr": lr,
        "optimizer": optimizer,
        "momentum": momentum,
        "m_set": m,
        "m_measured": m_measured,
        "threshold": threshold,
        "sharpness_basin_update_field": sharp_basin,
        "sharpness_post_spike_clean": sharp_post,
        "lr_times_sharpness": lr * sharp_basin,
        "predicted": verdict.verdict,
        "predicted_reason": verdict.reason,
        "predicted_literal": verdict_literal.verdict,
        "predicted_literal_reason": verdict_literal.reason,
        "observed": observed,
        "stopped": run.stopped,
        "steps_run": len(ex),
        "floor": bench.floor,
        "spike_excess": spike_excess,
        "spike_height_observed": float(ex[0]) - problem.excess(start),
        "spike_height_bound": height_bound,
        "bias_norm_step0": beta0,
        "peak_step": peak,
        "recovery_steps_observed": k_obs,
        "excess": ex.tolist(),
    }
    if optimizer == "sgd" and verdict.recovers and spike_excess > bench.floor:
        tail_g, tail_e = run.grad_sq[peak:], ex[peak:]
        mu_est = theory.estimate_pl_constant(tail_g, tail_e, 0.0)
        out["mu_estimated"] = mu_est
        out["mu_certified"] = bench.mu
        out["k_rec_predicted"] = theory.recovery_steps(
            spike_excess, bench.floor, theory.pl_rate(lr, mu_est, m_measured), s.kappa)
        out["k_rec_predicted_certified_mu"] = theory.recovery_steps(
            spike_excess, bench.floor, theory.pl_rate(lr, bench.mu, m_measured), s.kappa)
    return out


def spike_cases(bench: SpikeBench) -> dict[str, dict[str, Any]]:
    """Experiment 3's runs: (name -> keyword arguments of :func:`spike_run`).

    Step sizes are set against the floor's sharpness λ_b = λ_max(w_b): SGD at γλ_b = 1
    (half the threshold 2) and 2.4; heavy-ball momentum β at half and 1.2 times its
    threshold 2+2β. The last run is the extreme spike, every weight wiped (w = 0, where
    the logistic loss is sharpest, λ_max = L).
    """
    lam_b, beta, L = bench.sharpness, bench.settings.momentum, bench.smoothness
    edge = 2 + 2 * beta
    zero = torch.zeros_like(bench.w_floor)
    return {
        "SGD, m=0, γλ_b=1": dict(lr=1 / lam_b, m=0.0),
        "SGD, m=0.5, γλ_b=1": dict(lr=1 / lam_b, m=0.5),
        "SGD, m=1.5, γλ_b=1": dict(lr=1 / lam_b, m=1.5),
        "SGD, m=0, γλ_b=2.4": dict(lr=2.4 / lam_b, m=0.0),
        f"momentum {beta:g}, m=0, γλ_b={0.5 * edge:.2g} (edge {edge:.2g})":
            dict(lr=0.5 * edge / lam_b, m=0.0, momentum=beta),
        f"momentum {beta:g}, m=0, γλ_b={1.2 * edge:.2g} (edge {edge:.2g})":
            dict(lr=1.2 * edge / lam_b, m=0.0, momentum=beta),
        f"SGD, weights wiped to 0, γλ_b=1 (γL={L / lam_b:.2g})": dict(lr=1 / lam_b, m=0.0, spike=False, w0=zero),
    }


def spikes(data: Data, s: Settings, figure: Path) -> dict[str, Any]:
    """Experiment 3: bursts that keep m < 1 and γλ_max under threshold recover in ≈ k_rec steps;
    bursts that break either condition diverge (protocol in the module docstring).

    k_rec uses ``q = theory.pl_rate(γ, μ, m)`` with μ estimated by
    ``theory.estimate_pl_constant`` over the run after the spike peak (loss_min = loss*,
    known exactly here), the estimate THEORY §4 prescribes; the certified μ = λ is
    reported next to it. Proposition 3 is stated for plain SGD, so momentum runs get a
    predicted outcome but no k_rec.
    """
    bench = spike_bench(data, s)
    cases = {name: spike_run(bench, **kwargs) for name, kwargs in spike_cases(bench).items()}
    recover_cases = [c for c in cases.values() if c.get("k_rec_predicted") is not None and c["recovery_steps_observed"]]
    ratios = [c["recovery_steps_observed"] / c["k_rec_predicted"] for c in recover_cases]
    agree = sum(c["predicted"] == c["observed"] for c in cases.values())

    fig, axes = _figure(2, (12, 6.2), gridspec_kw={"width_ratios": [1, 1.3]})
    cmap = _cmap("tab10")
    zoom = max([c["peak_step"] + c["k_rec_predicted"] for c in recover_cases] + [20]) * 1.15
    for j, (name, c) in enumerate(cases.items()):
        colour = cmap(j)
        ex = torch.tensor(c["excess"], dtype=DTYPE).clamp_min(1e-12).tolist()
        label = f"{name}: predicted {c['predicted']}, observed {c['observed']}"
        axes[1].plot(range(len(ex)), ex, color=colour, lw=1.2, label=label)
        if c["observed"] != "recover":
            continue
        axes[0].plot(range(len(ex)), ex, color=colour, lw=1.5)
        t = c["peak_step"] + c["recovery_steps_observed"]
        axes[0].plot([t], [ex[t]], "o", color=colour, ms=7)
        if c.get("k_rec_predicted") is not None and math.isfinite(c["k_rec_predicted"]):
            axes[0].axvline(c["peak_step"] + c["k_rec_predicted"], color=colour, ls="--", lw=1.2)
    for ax in axes:
        ax.axhline(bench.floor, color="black", lw=1)
        ax.axhline((1 + s.kappa) * bench.floor, color="black", lw=0.8, ls=":")
        ax.set(yscale="log", xlabel="steps after the burst", ylabel="excess loss over loss* (clean, full data)")
    axes[0].set_xlim(0, zoom)
    axes[0].set_title("Recovering runs: dot = observed recovery,\ndashed = predicted k_rec (μ estimated)", fontsize=10)
    axes[1].set_xlim(0, min(1500, max(len(c["excess"]) for c in cases.values())))
    axes[1].set_title("All runs (solid black: floor Δ_floor, dotted: (1+κ)Δ_floor)", fontsize=10)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7.5, frameon=False)
    _save(fig, figure, rect=(0, 0.14, 1, 1))
    for c in cases.values():
        c["excess"] = c["excess"][:: max(1, len(c["excess"]) // 400)]  # thinned for the JSON
    return {
        "floor": bench.floor,
        "floor_bias_norm": bench.floor_bias,
        "sharpness_at_floor": bench.sharpness,
        "smoothness_L": bench.smoothness,
        "mu_certified": bench.mu,
        "kappa": s.kappa,
        "cases": cases,
        "outcome_agreement": agree / len(cases),
        "recovery_ratio_observed_over_predicted": ratios,
    }
