"""Experiment 5: forward against backward perturbations of equal size, swept over depth."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from spikeguard.measure import AmplificationProbe
from spikeguard.perturb import Injector, Uniform
from spikeguard.reproduce._common import _convex, _figure, _save
from spikeguard.reproduce.problems import DTYPE, Data
from spikeguard.reproduce.settings import Settings

__all__ = ["forward_backward"]


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
