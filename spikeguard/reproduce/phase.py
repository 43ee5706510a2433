"""Experiment 4: the phase diagram of spike outcomes over relative bias m × step size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from spikeguard import theory
from spikeguard.reproduce._common import _figure, _save
from spikeguard.reproduce.problems import DTYPE, Data, require
from spikeguard.reproduce.settings import Settings
from spikeguard.reproduce.spikes import spike_bench, spike_run

__all__ = ["phase_diagram"]


def phase_diagram(data: Data, s: Settings, figure: Path) -> dict[str, Any]:
    """Experiment 4: outcome over relative bias m × step size, observed next to predicted.

    Step sizes are set against the threshold at the floor's sharpness,
    ``γ·λ_max(w_b) = ratio · c`` with c = 2 (SGD) or 2 + 2β (heavy-ball momentum), so
    ratio 1 is the edge at m = 0. Each cell is one :func:`spike_run`; its predicted
    verdict uses the update-field sharpness, and the literal verdict is reported too
    (see :mod:`spikeguard.reproduce.spikes`). Agreement is the fraction of cells where the predicted
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
