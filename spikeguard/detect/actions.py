"""The arithmetic of SpikeGuard's actions: the clip factor and the re-run's gradient difference."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["clip_factor", "relative_difference"]


def clip_factor(flag: torch.Tensor, grad_norm: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    """The factor that scales a flagged gradient down to the detector's band: ``band / |G|``.

    1 where the step is not flagged, its norm is not finite (a skip's business, not a
    clip's) or already within the band. On the device, no host sync.
    """
    band = band.to(grad_norm.dtype)
    clip = flag & torch.isfinite(grad_norm) & (grad_norm > band)
    return torch.where(clip, band / grad_norm, torch.ones_like(grad_norm))


def relative_difference(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """``|a - b| / |b|`` over all tensors in float64 (a missing ``a_i`` counts as zero)."""
    diff = torch.zeros((), dtype=torch.float64, device=b[0].device if b else "cpu")
    ref = torch.zeros_like(diff)
    for x, y in zip(a, b):
        x = torch.zeros_like(y) if x is None else x
        diff += (x.double() - y.double()).pow(2).sum()
        ref += y.double().pow(2).sum()
    return diff.sqrt() / ref.sqrt().clamp_min(1e-300)
