"""Measurement: per-step statistics, the amplification probe, sharpness, precision probe."""

from spikeguard.measure.precision import PRECISION_DTYPES, PrecisionResult, precision_probe
from spikeguard.measure.probe import CONFIGS, AmplificationProbe, Constants, Observed, ProbeResult
from spikeguard.measure.sharpness import (
    Sharpness,
    adam_preconditioner,
    hessian_top_eigenvalue,
    preconditioned_top_eigenvalue,
    stability,
)
from spikeguard.measure.stats import StepStatistics, StepStats

__all__ = [
    "AmplificationProbe",
    "ProbeResult",
    "Observed",
    "Constants",
    "CONFIGS",
    "precision_probe",
    "PrecisionResult",
    "PRECISION_DTYPES",
    "StepStatistics",
    "StepStats",
    "Sharpness",
    "hessian_top_eigenvalue",
    "preconditioned_top_eigenvalue",
    "adam_preconditioner",
    "stability",
]
