"""Helpers shared by the reproduction experiments: the convex problem, log-log slopes, figure plumbing."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from spikeguard.reproduce.problems import DTYPE, Data, LogisticChain, require
from spikeguard.reproduce.settings import Settings


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
