"""Noise models: what a perturbation does to one tensor (an operator output or a gradient).

Every model maps a tensor ``x`` to its perturbed value ``q`` and the perturbation
``δ = q - x`` (THEORY §1's δ_i on outputs, ε_i on gradient messages). Randomness comes
only from the ``torch.Generator`` passed in, so the same generator state gives bitwise
the same perturbation and the global RNG is never touched.

A schedule's magnitude ``m`` (see :mod:`spikeguard.perturb.schedules`) scales δ:
``q = x + m·δ``. At ``m = 1`` the fault models (:class:`Rounding`, :class:`BitFlip`,
:class:`Scale`) return their exact faulted value (a bf16 rounding is exactly torch's
own cast, a flipped bit exactly that bit pattern).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from spikeguard._tensor import norm

__all__ = [
    "NoiseModel",
    "Gaussian",
    "Uniform",
    "Rounding",
    "BitFlip",
    "Scale",
    "FORMATS",
]


class NoiseModel:
    """Base class. Subclasses implement :meth:`sample` (additive) or :meth:`replace`."""

    #: True when the model computes a replacement value q(x) (a fault) rather than δ.
    replaces: ClassVar[bool] = False

    def __call__(
        self, x: torch.Tensor, generator: torch.Generator, magnitude: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(q, δ)`` for ``x`` at schedule magnitude ``magnitude``."""
        if magnitude == 0 or self.is_identity:
            # Exactly x (not x + 0, which turns -0.0 into +0.0): a zero perturbation
            # must leave the run bitwise unchanged.
            return x, torch.zeros_like(x)
        if self.replaces:
            q = self.replace(x, generator)
            delta = q - x
            if magnitude != 1.0:
                delta = delta * magnitude
                q = x + delta
            return q, delta
        delta = self.sample(x, generator)
        if magnitude != 1.0:
            delta = delta * magnitude
        return x + delta, delta

    @property
    def is_identity(self) -> bool:
        """True when the model cannot change any value (zero scale, zero rate, factor 1)."""
        return False

    def sample(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def replace(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


def _check_nonneg(owner: str, key: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"{owner}.{key} must be a number >= 0, got {value!r}")


def _rms(x: torch.Tensor) -> torch.Tensor:
    return norm(x) / max(x.numel(), 1) ** 0.5


@dataclass(frozen=True)
class Gaussian(NoiseModel):
    """Gaussian noise ``δ = σ·n``, ``n ~ N(0, I)``.

    Args:
        scale: σ when absolute; when ``relative``, σ = scale · RMS(x), so that
            ``|δ| ≈ scale · |x|`` in norm (THEORY §1's relative perturbation with u = scale).
        relative: scale relative to the tensor's RMS instead of absolute.
    """

    scale: float
    relative: bool = False

    def __post_init__(self) -> None:
        _check_nonneg("Gaussian", "scale", self.scale)

    @property
    def is_identity(self) -> bool:
        return self.scale == 0

    def sample(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        sigma = self.scale * _rms(x).to(x.dtype) if self.relative else self.scale
        return n * sigma


@dataclass(frozen=True)
class Uniform(NoiseModel):
    """Uniform noise.

    Absolute: ``δ_j ~ U(-scale, scale)``. Relative: ``δ_j = scale · x_j · r_j`` with
    ``r_j ~ U(-1, 1)``, elementwise like a rounding error, so ``|δ| ≤ scale · |x|`` holds
    exactly (the relative model of THEORY §1 with u = scale).
    """

    scale: float
    relative: bool = False

    def __post_init__(self) -> None:
        _check_nonneg("Uniform", "scale", self.scale)

    @property
    def is_identity(self) -> bool:
        return self.scale == 0

    def sample(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        r = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        return r * x * self.scale if self.relative else r * self.scale


#: format -> (torch dtype or None for int8, largest finite value, unit roundoff u).
#: Unit roundoffs 2^-(mantissa bits + 1): bf16 2^-8, fp16 2^-11, e4m3 2^-4, e5m2 2^-3
#: (IEEE 754 / OCP 8-bit floating point specification v1.0). int8 has no relative
#: roundoff: its error is at most amax/254 per element, absolute.
FORMATS: dict[str, tuple[torch.dtype | None, float, float | None]] = {
    "bf16": (torch.bfloat16, float(torch.finfo(torch.bfloat16).max), 2.0**-8),
    "fp16": (torch.float16, float(torch.finfo(torch.float16).max), 2.0**-11),
    "e4m3": (torch.float8_e4m3fn, float(torch.finfo(torch.float8_e4m3fn).max), 2.0**-4),
    "e5m2": (torch.float8_e5m2, float(torch.finfo(torch.float8_e5m2).max), 2.0**-3),
    "int8": (None, 127.0, None),
}


@dataclass(frozen=True)
class Rounding(NoiseModel):
    """Round to a low-precision format and back: ``q = dequant(quant(x))``, ``δ = q - x``.

    - ``bf16``, ``fp16``: a plain cast, exactly ``x.to(dtype).to(x.dtype)`` (fp16
      overflows to inf beyond 65504, as a real fp16 cast does).
    - ``e4m3``, ``e5m2``: per-tensor amax scaling to the format's largest value, then a
      saturating cast, as fp8 training recipes (delayed or current scaling) do.
    - ``int8``: symmetric per-tensor, ``s = amax / 127``, ``q = clamp(round(x/s)) · s``.
    """

    fmt: str
    replaces: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"Rounding.fmt must be one of {sorted(FORMATS)}, got {self.fmt!r}")

    @property
    def unit_roundoff(self) -> float | None:
        """u of THEORY §1 (None for int8, whose error is absolute)."""
        return FORMATS[self.fmt][2]

    def replace(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        dtype, fmax, _ = FORMATS[self.fmt]
        if self.fmt in ("bf16", "fp16"):
            return x.to(dtype).to(x.dtype)
        amax = x.detach().abs().amax().float()
        # An all-zero tensor rounds to itself; avoid 0/0.
        scale = torch.where(amax > 0, fmax / amax, torch.ones_like(amax))
        y = x.float() * scale
        if dtype is None:  # int8
            y = y.round().clamp(-fmax, fmax)
        else:
            y = y.clamp(-fmax, fmax).to(dtype).float()
        return (y / scale).to(x.dtype)


_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64,
             torch.bfloat16: torch.int16, torch.float16: torch.int16}


@dataclass(frozen=True)
class BitFlip(NoiseModel):
    """Silent data corruption: flip one random bit of randomly chosen elements.

    Choose elements either each with probability ``rate`` or exactly ``count`` of them
    (positions uniform, with replacement); each chosen element gets one bit flipped,
    drawn uniformly from ``bits`` (bit 0 the least significant mantissa bit; for float32
    bits 23-30 are the exponent, 31 the sign). Default ``bits``: all bits of the dtype.
    """

    rate: float | None = None
    count: int | None = None
    bits: tuple[int, ...] | None = None

    replaces: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.count is None):
            raise ValueError(
                f"BitFlip needs exactly one of rate or count, got rate={self.rate!r}, "
                f"count={self.count!r}"
            )
        if self.rate is not None and not (isinstance(self.rate, (int, float)) and 0 <= self.rate <= 1):
            raise ValueError(f"BitFlip.rate must be in [0, 1], got {self.rate!r}")
        if self.count is not None and not (isinstance(self.count, int) and self.count >= 0):
            raise ValueError(f"BitFlip.count must be an int >= 0, got {self.count!r}")
        if self.bits is not None:
            object.__setattr__(self, "bits", tuple(self.bits))
            bad = [b for b in self.bits if not (isinstance(b, int) and 0 <= b < 64)]
            if not self.bits or bad:
                raise ValueError(f"BitFlip.bits must be non-empty bit positions in [0, 64), got {self.bits!r}")

    @property
    def is_identity(self) -> bool:
        return self.rate == 0 or self.count == 0

    def replace(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.dtype not in _INT_VIEW:
            raise TypeError(f"BitFlip supports {sorted(map(str, _INT_VIEW))}, got a {x.dtype} tensor")
        int_dtype = _INT_VIEW[x.dtype]
        width = torch.iinfo(int_dtype).bits
        bits = self.bits if self.bits is not None else tuple(range(width))
        if max(bits) >= width:
            raise ValueError(f"BitFlip.bits {bits} exceed the {width} bits of a {x.dtype} tensor")
        flat = x.detach().contiguous().view(int_dtype).flatten().clone()
        bit_table = torch.tensor(bits, dtype=int_dtype, device=x.device)
        one = torch.ones((), dtype=int_dtype, device=x.device)
        if self.count is not None:
            where = torch.randint(flat.numel(), (self.count,), generator=generator, device=x.device)
            pick = torch.randint(len(bits), (self.count,), generator=generator, device=x.device)
            flat[where] ^= one << bit_table[pick]
        else:
            hit = torch.rand(flat.shape, generator=generator, device=x.device) < self.rate
            pick = torch.randint(len(bits), flat.shape, generator=generator, device=x.device)
            flat ^= (one << bit_table[pick]) * hit.to(int_dtype)
        return flat.view(x.dtype).view(x.shape)


@dataclass(frozen=True)
class Scale(NoiseModel):
    """Outlier activations: multiply selected elements by ``factor``.

    Selection: the last-dimension ``channels`` given (the outlier-feature pattern of
    large transformers), else each element with probability ``rate`` (1.0: all).
    """

    factor: float
    rate: float = 1.0
    channels: tuple[int, ...] | None = field(default=None)

    replaces: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.factor, (int, float)) or isinstance(self.factor, bool):
            raise ValueError(f"Scale.factor must be a number, got {self.factor!r}")
        if not (isinstance(self.rate, (int, float)) and 0 <= self.rate <= 1):
            raise ValueError(f"Scale.rate must be in [0, 1], got {self.rate!r}")
        if self.channels is not None:
            object.__setattr__(self, "channels", tuple(self.channels))
            if not self.channels or not all(isinstance(c, int) for c in self.channels):
                raise ValueError(f"Scale.channels must be a non-empty list of ints, got {self.channels!r}")

    @property
    def is_identity(self) -> bool:
        return self.factor == 1 or self.rate == 0

    def replace(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.channels is not None:
            if max(self.channels) >= x.shape[-1] or min(self.channels) < -x.shape[-1]:
                raise ValueError(
                    f"Scale.channels {self.channels} out of range for last dimension {x.shape[-1]}"
                )
            q = x.clone()
            idx = list(self.channels)
            q[..., idx] = x[..., idx] * self.factor
            return q
        if self.rate >= 1.0:
            return x * self.factor
        hit = torch.rand(x.shape, generator=generator, device=x.device) < self.rate
        return torch.where(hit, x * self.factor, x)
