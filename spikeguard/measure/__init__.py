"""Measurement: per-step statistics, the amplification probe, sharpness, precision probe.

Submodules load on first use: the data modules (``results``, ``optim``) that records and
reports need do not pull in the probe's autograd machinery.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "AmplificationProbe": "probe",
    "ProbeResult": "results",
    "Observed": "results",
    "Constants": "results",
    "CONFIGS": "results",
    "precision_probe": "precision",
    "PrecisionResult": "precision_result",
    "PRECISION_DTYPES": "precision_result",
    "StepStatistics": "stats",
    "StepStats": "stats",
    "Sharpness": "sharpness",
    "hessian_top_eigenvalue": "sharpness",
    "preconditioned_top_eigenvalue": "sharpness",
    "optimizer_sharpness": "sharpness",
    "adam_preconditioner": "sharpness",
    "stability": "sharpness",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'spikeguard.measure' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"spikeguard.measure.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
