"""Robust statistics of log values: z-scores, ratios to a baseline, and the detector's exp."""

from __future__ import annotations

import math

import torch

__all__ = ["MAD_TO_SIGMA", "robust_z", "exp_of", "ratio_of"]

#: MAD of a normal distribution is 0.6745 σ.
MAD_TO_SIGMA = 1.4826


def robust_z(x: torch.Tensor, median: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(x - median) / σ`` per signal, with σ kept away from 0."""
    return (x - median) / scale.clamp_min(1e-12)


def exp_of(x: float | torch.Tensor) -> float:
    """exp of a log value; non-finite values (kept raw in the history) pass through."""
    value = float(x)
    return math.exp(value) if math.isfinite(value) else value


def ratio_of(x: float | torch.Tensor, median: float | torch.Tensor) -> float:
    """x over its baseline (log values in); nan while the baseline is unknown."""
    x, median = float(x), float(median)
    diff = x - median
    if math.isnan(diff):
        return math.inf if math.isinf(x) and not math.isnan(median) else math.nan
    return math.exp(diff) if diff < 700 else math.inf
