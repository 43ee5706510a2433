"""The five reproduction experiments: each runs, draws its figure and returns JSON-ready numbers.

Every prediction comes from :mod:`spikeguard.theory`; every perturbation goes through an
:class:`~spikeguard.perturb.Injector` on the chain of :mod:`spikeguard.reproduce.problems`;
observed gradient errors come from :class:`~spikeguard.measure.AmplificationProbe` and
sharpness from :func:`~spikeguard.measure.hessian_top_eigenvalue`. Experiment functions
take ``(data, settings, figure_path)`` and return a dict of plain floats and lists.

Shared protocol of experiments 3 and 4 (spikes). Full-batch steps (B = n), so that an
outcome is decided by the two conditions of THEORY §4 and not by a minibatch draw. A
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
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from spikeguard import theory
from spikeguard.measure import AmplificationProbe, hessian_top_eigenvalue
from spikeguard.perturb import Always, Burst, Decay, Gaussian, Injector, Scale, Uniform, Window
from spikeguard.reproduce.problems import DTYPE, Data, LogisticChain, Offset, require, train

__all__ = [
    "Settings",
    "EXPERIMENTS",
    "constant_perturbation",
    "decaying_perturbation",
    "spikes",
    "phase_diagram",
    "forward_backward",
    "SpikeBench",
    "spike_bench",
    "spike_run",
    "update_sharpness",
    "run_experiment",
    "settings_dict",
]


# -- settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Sizes of every experiment; :meth:`full` and :meth:`quick_preset` are the two presets."""

    seed: int = 0
    quick: bool = False
    lam: float = 0.1  # λ of both regularizers
    depth: int = 4  # N for experiments 1-4
    batch_size: int = 32  # B for experiments 1-2 (3-4 use the full data)
    kappa: float = 0.1  # recovery: within (1 + κ) of the floor
    # 1. constant perturbation
    constant_zetas: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)  # ζ (Prop. 1 bound) per run
    constant_steps: int = 2000
    constant_kinds: tuple[str, ...] = ("forward offset", "backward offset", "forward uniform")
    # 2. decaying perturbation
    decay_horizons: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096)
    decay_powers: tuple[float, ...] = (0.25, 0.125, 0.0)
    decay_scale: float = 80.0  # c of theory.order_preserving_scale (see decaying_perturbation)
    # 3-4. spikes
    floor_offset: float = 2e-5  # the persisting absolute bias that sets the floor
    spike_size: float = 1e-3  # σ of the one-step Gaussian spike on a gradient message
    spike_window: int = 100  # steps the excess must stay recovered
    spike_horizon: int = 400  # minimum horizon; recovering cells get 2·k_rec (certified μ)
    spike_max_horizon: int = 4000
    momentum: float = 0.9
    phase_biases: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
    phase_ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9, 1.1, 1.3, 1.6)
    phase_momentum: bool = True
    # 5. forward versus backward
    depths: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16)
    gains: tuple[float, ...] = (0.8, 1.0, 1.25)
    relative_size: float = 2.0**-8  # bf16's unit roundoff
    absolute_size: float = 1e-3
    probe_batch: int = 64

    @classmethod
    def full(cls, seed: int = 0) -> Settings:
        return cls(seed=seed)

    @classmethod
    def quick_preset(cls, seed: int = 0) -> Settings:
        return cls(
            seed=seed,
            quick=True,
            constant_zetas=(0.3, 10.0, 30.0),
            constant_steps=600,
            constant_kinds=("forward offset", "forward uniform"),
            decay_horizons=(128, 256, 512, 1024),
            decay_powers=(0.25, 0.125),
            phase_biases=(0.0, 0.5, 1.5),
            phase_ratios=(0.5, 0.9, 1.3),
            phase_momentum=False,
            depths=(1, 2, 4, 8),
            gains=(0.8, 1.25),
        )


def _convex(data: Data, s: Settings, depth: int | None = None, gain: float = 1.0) -> LogisticChain:
    return LogisticChain(data, "l2", s.lam, s.depth if depth is None else depth, gain)


def _slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx = torch.tensor([math.log(v) for v in x], dtype=DTYPE)
    ly = torch.tensor([math.log(v) for v in y], dtype=DTYPE)
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float((lx * ly).sum() / (lx * lx).sum())


def _figure(ncols: int, figsize: tuple[float, float], **kwargs):
    """A matplotlib Figure and its axes, without pyplot: no global state, Agg when saved."""
    fig = require("matplotlib.figure").Figure(figsize=figsize)
    return fig, fig.subplots(1, ncols, **kwargs)


def _cmap(name: str):
    return require("matplotlib").colormaps[name]


def _plain_log_ticks(ax, ticks: Sequence[float]) -> None:
    """Major ticks at ``ticks`` with plain labels and no minor labels, on a log x axis."""
    ticker = require("matplotlib.ticker")
    ax.set_xticks(list(ticks), [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def _save(fig, path: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> None:
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=100)


# -- 1. constant perturbation: the floor against ζ² -----------------------------------------


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


# -- 2. decaying perturbation: the O(1/√T) rate -----------------------------------------


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


# -- 3-4. spikes ----------------------------------------------------------------------


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


def phase_diagram(data: Data, s: Settings, figure: Path) -> dict[str, Any]:
    """Experiment 4: outcome over relative bias m × step size, observed next to predicted.

    Step sizes are set against the threshold at the floor's sharpness,
    ``γ·λ_max(w_b) = ratio · c`` with c = 2 (SGD) or 2 + 2β (heavy-ball momentum), so
    ratio 1 is the edge at m = 0. Each cell is one :func:`spike_run`; its predicted
    verdict uses the update-field sharpness, and the literal verdict is reported too
    (see the module docstring). Agreement is the fraction of cells where the predicted
    verdict is the observed outcome.
    """
    bench = spike_bench(data, s)
    panels = [("sgd", 0.0)] + ([("momentum", s.momentum)] if s.phase_momentum else [])
    out: dict[str, Any] = {"biases": list(s.phase_biases), "ratios": list(s.phase_ratios), "panels": {}}
    for optimizer, beta in panels:
        unit = theory.stability_threshold(1.0, optimizer, beta if beta else 0.9) / bench.sharpness
        cells = []
        for m in s.phase_biases:
            for ratio in s.phase_ratios:
                c = spike_run(bench, lr=ratio * unit, m=m, momentum=beta)
                c.pop("excess")
                c["ratio"] = ratio
                cells.append(c)
        n = len(cells)
        out["panels"][optimizer] = {
            "momentum": beta,
            "cells": cells,
            "agreement": sum(c["predicted"] == c["observed"] for c in cells) / n,
            "agreement_literal": sum(c["predicted_literal"] == c["observed"] for c in cells) / n,
        }
    all_cells = [c for p in out["panels"].values() for c in p["cells"]]
    out["agreement"] = sum(c["predicted"] == c["observed"] for c in all_cells) / len(all_cells)
    out["agreement_literal"] = sum(c["predicted_literal"] == c["observed"] for c in all_cells) / len(all_cells)
    _draw_phase(out, s, figure)
    return out


def _draw_phase(out: dict[str, Any], s: Settings, figure: Path) -> None:
    colors = require("matplotlib.colors")
    Rectangle, Line2D = require("matplotlib.patches").Rectangle, require("matplotlib.lines").Line2D
    panels = out["panels"]
    fig, axes = _figure(len(panels), (max(8.0, 5.8 * len(panels)), 5.2), squeeze=False)
    M, R = len(out["biases"]), len(out["ratios"])
    cmap = colors.ListedColormap(["#9be39b", "#f29c9c"])
    for ax, (name, panel) in zip(axes[0], panels.items()):
        rows = [panel["cells"][i * R:(i + 1) * R] for i in range(M)]  # row i: bias m_i, column j: ratio r_j
        obs = torch.tensor([[c["observed"] == "diverge" for c in row] for row in rows], dtype=DTYPE)
        pred = [[c["predicted"] == "diverge" for c in row] for row in rows]
        ax.pcolormesh([j - 0.5 for j in range(R + 1)], [i - 0.5 for i in range(M + 1)], obs.tolist(),
                      cmap=cmap, vmin=0, vmax=1, edgecolors="white", lw=0.5)
        for i in range(M):  # the predicted boundary: edges between cells with different predicted verdicts
            for j in range(R):
                if j + 1 < R and pred[i][j] != pred[i][j + 1]:
                    ax.plot([j + 0.5, j + 0.5], [i - 0.5, i + 0.5], "k-", lw=2.2)
                if i + 1 < M and pred[i][j] != pred[i + 1][j]:
                    ax.plot([j - 0.5, j + 0.5], [i + 0.5, i + 0.5], "k-", lw=2.2)
                if pred[i][j] != bool(obs[i][j]):
                    ax.plot([j], [i], "kx", ms=10, mew=2)
        # THEORY read literally: m = 1 and γλ_max(clean) = threshold.
        ms, rs = out["biases"], out["ratios"]
        x_edge = sum(r < 1 for r in rs) - 0.5
        y_edge = sum(m < 1 for m in ms) - 0.5
        ax.axvline(x_edge, color="navy", ls="--", lw=1.2)
        ax.axhline(y_edge, color="navy", ls="--", lw=1.2)
        ax.set_xticks(range(R), [f"{r:g}" for r in rs])
        ax.set_yticks(range(M), [f"{m:g}" for m in ms])
        edge = "2" if name == "sgd" else f"(2+2β) = {2 + 2 * panel['momentum']:g}"
        ax.set(xlabel=f"step size: γ·λ_max(w_b) / {edge}   (1 = threshold at the floor)",
               ylabel="relative bias m of the burst (gradient × (1-m))",
               title=f"{name.upper() if name == 'sgd' else 'Heavy-ball momentum'}: agreement {panel['agreement']:.0%}"
                     f" (literal rule {panel['agreement_literal']:.0%})")
        ax.set_xlim(-0.5, R - 0.5)
        ax.set_ylim(-0.5, M - 0.5)
    handles = [
        Rectangle((0, 0), 1, 1, color="#9be39b", label="observed: recovers"),
        Rectangle((0, 0), 1, 1, color="#f29c9c", label="observed: diverges"),
        Line2D([], [], color="k", lw=2.2, label="predicted boundary (update sharpness)"),
        Line2D([], [], color="navy", ls="--", label="m = 1, γλ_max = threshold (clean)"),
        Line2D([], [], color="k", marker="x", ls="", label="prediction ≠ observation"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    _save(fig, figure, rect=(0, 0.1, 1, 1))


# -- 5. forward versus backward --------------------------------------------------------


def forward_backward(data: Data, s: Settings, figure: Path) -> dict[str, Any]:
    """Experiment 5: forward against backward perturbations of equal size, swept over depth.

    For each depth N and gain c, the chain is probed at its own minimizer (the same
    point in z_N-space for every N and c, see :mod:`problems`) on a fixed batch by
    :class:`AmplificationProbe`, with L_h set to its exact supremum
    (:meth:`LogisticChain.loss_curvature`) so that Proposition 1's bound is a bound. Two
    perturbations, each applied forward-only and backward-only:

    - relative: :class:`Uniform` of size u at every operator's output or gradient
      message (``|δ_i| ≤ u|z_i|``, ``|ε_i| ≤ u|g_i|`` exactly), a low-precision format;
    - absolute: :class:`Uniform` of size a at operator 1 only, where the ratio of the
      bounds is exactly THEORY's A^f_1/A^b_1 (the probe's, from ``theory.amplification``).
    """
    gen = torch.Generator().manual_seed(s.seed)
    idx = torch.randperm(data.num_samples, generator=gen)[: s.probe_batch]
    batch = (data.X[idx], data.y[idx])
    relative = Uniform(s.relative_size, relative=True)
    absolute = Uniform(s.absolute_size)
    rows = []
    for gain in s.gains:
        for depth in s.depths:
            problem = _convex(data, s, depth=depth, gain=gain)
            w_star, _ = problem.solve()
            problem.set_weight(w_star)
            row: dict[str, Any] = {"gain": gain, "depth": depth}
            for kind, spec in (("relative", {"*": relative}), ("absolute", {"0": absolute})):
                injector = Injector(problem.chain, forward=spec, backward=spec, seed=s.seed)
                probe = AmplificationProbe(
                    problem.model, problem.chain, problem.loss_fn, injector,
                    configs=("forward", "backward"), first_power_iterations=100, tol=1e-10,
                    loss_curvature=problem.loss_curvature(s.probe_batch), seed=s.seed,
                )
                r = probe.run(batch)
                fwd, bwd = r.observed["forward"], r.observed["backward"]
                row[kind] = {
                    "observed_forward": fwd.total,
                    "observed_backward": bwd.total,
                    "bound_forward": fwd.bound.total,
                    "bound_backward": bwd.bound.total,
                    "linear_forward": None if fwd.linear is None else fwd.linear.total,
                    "m_forward": fwd.m,
                    "m_backward": bwd.m,
                    "observed_ratio": fwd.total / bwd.total,
                    "bound_ratio": fwd.bound.total / bwd.bound.total,
                    "bound_holds": fwd.total <= fwd.bound.total and bwd.total <= bwd.bound.total,
                }
            row["A_f"] = r.amplification.forward.tolist()
            row["A_b"] = r.amplification.backward.tolist()
            row["A_ratio_first_op"] = float(r.amplification.ratio[0])
            row["loss_curvature_sup"] = problem.loss_curvature(s.probe_batch)
            row["M1_measured"] = float(r.constants.param_gains[0])
            row["M1_exact"] = problem.exact_constants(batch[0])["param_gains"][0]
            row["gains_measured"] = r.constants.gains[1:].tolist()
            rows.append(row)
    slopes = {}
    for gain in s.gains:
        sel = [r for r in rows if r["gain"] == gain and r["depth"] >= 2]
        ds = [r["depth"] for r in sel]
        slopes[f"{gain:g}"] = {
            "log_gain": math.log(gain),
            **{f"relative_{key}": _depth_slope(ds, [r["relative"][key] for r in sel])
               for key in ("observed_forward", "bound_forward", "observed_backward", "bound_backward")},
            "absolute_observed_ratio": _depth_slope(ds, [r["absolute"]["observed_ratio"] for r in sel]),
            "A_ratio_first_op": _depth_slope(ds, [r["A_ratio_first_op"] for r in sel]),
        }

    fig, axes = _figure(2, (12, 6))
    palette = dict(zip(s.gains, ("tab:blue", "tab:green", "tab:red", "tab:purple")))
    for gain in s.gains:
        sel = [r for r in rows if r["gain"] == gain]
        ds = [r["depth"] for r in sel]
        c = palette[gain]
        rel = [r["relative"] for r in sel]
        axes[0].plot(ds, [x["observed_forward"] for x in rel], "o-", color=c, label=f"c={gain:g}: forward, observed")
        axes[0].plot(ds, [x["observed_backward"] for x in rel], "s-", color=c, mfc="white",
                     label=f"c={gain:g}: backward, observed")
        axes[0].plot(ds, [x["bound_forward"] for x in rel], "--", color=c, alpha=0.6, lw=1)
        axes[0].plot(ds, [x["bound_backward"] for x in rel], ":", color=c, alpha=0.8, lw=1.2)
        axes[1].plot(ds, [x["observed_ratio"] for x in rel], "o-", color=c, mfc="white",
                     label=f"c={gain:g}: relative, every operator (observed)")
        axes[1].plot(ds, [r["absolute"]["observed_ratio"] for r in sel], "D-", color=c,
                     label=f"c={gain:g}: absolute, operator 1 (observed)")
        axes[1].plot(ds, [r["A_ratio_first_op"] for r in sel], "--", color=c, lw=1.5,
                     label=f"c={gain:g}: A^f_1 / A^b_1 (theory)")
    axes[0].plot([], [], "k--", lw=1, label="Prop. 1 bound, forward")
    axes[0].plot([], [], "k:", lw=1.2, label="Prop. 1 bound, backward")
    axes[0].set(yscale="log", xlabel="depth N (operators)", ylabel="|Ĝ - G|",
                title="Relative perturbation u = 2^-8 at every operator")
    axes[1].set(yscale="log", xlabel="depth N (operators)",
                ylabel="forward / backward gradient error",
                title="Asymmetry: observed ratios next to A^f/A^b")
    for ax in axes:
        ax.set_xticks(list(s.depths))
    axes[0].legend(fontsize=6.8, ncol=2, loc="upper left")
    handles, labels = axes[1].get_legend_handles_labels()  # below both panels: the ratios overlap near 1
    fig.legend(handles, labels, fontsize=7.5, ncol=len(s.gains), loc="lower center", frameon=False)
    _save(fig, figure, rect=(0, 0.12, 1, 1))
    probes = [r[k] for r in rows for k in ("relative", "absolute")]
    return {
        "relative_size": s.relative_size,
        "absolute_size": s.absolute_size,
        "probe_batch": s.probe_batch,
        "rows": rows,
        "bound_holds_on_every_probe": all(p["bound_holds"] for p in probes),
        "num_probes": 2 * len(probes),
        "log_slope_per_operator": slopes,
        "max_relative_error_M1": max(abs(r["M1_measured"] - r["M1_exact"]) / r["M1_exact"] for r in rows),
        "max_relative_error_gains": max(
            (abs(g - r["gain"]) / r["gain"] for r in rows for g in r["gains_measured"]), default=0.0),
    }


def _depth_slope(depths: Sequence[int], values: Sequence[float]) -> float:
    """Slope of log(value) against N: the per-operator log-growth (log L for a uniform chain)."""
    d = torch.tensor(depths, dtype=DTYPE)
    v = torch.tensor([math.log(x) for x in values], dtype=DTYPE)
    d, v = d - d.mean(), v - v.mean()
    return float((d * v).sum() / (d * d).sum())


#: number -> (short name, function, figure file name)
EXPERIMENTS = {
    1: ("constant perturbation", constant_perturbation, "1_constant_floor.png"),
    2: ("decaying perturbation", decaying_perturbation, "2_decay_rate.png"),
    3: ("spikes", spikes, "3_spikes.png"),
    4: ("phase diagram", phase_diagram, "4_phase_diagram.png"),
    5: ("forward versus backward", forward_backward, "5_forward_backward.png"),
}


def run_experiment(number: int, data: Data, s: Settings, out_dir: Path) -> tuple[dict[str, Any], float]:
    """Run experiment ``number`` into ``out_dir``; returns (results, seconds)."""
    _, fn, name = EXPERIMENTS[number]
    start = time.perf_counter()
    result = fn(data, s, out_dir / name)
    result["figure"] = name
    return result, time.perf_counter() - start


def settings_dict(s: Settings) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()}
