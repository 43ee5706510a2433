"""Sizes of the five reproduction experiments: :class:`Settings`, its two presets and its JSON form."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Settings", "settings_dict"]


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


def settings_dict(s: Settings) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()}
