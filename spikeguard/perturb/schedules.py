"""Schedules: per optimizer step, whether a perturbation is on and how strongly.

A schedule maps the optimizer step t (``trainer.global_step``, 0-based) to a magnitude
m_t ≥ 0 that scales the noise model's δ (0: off, 1: the noise model as configured).
Schedules are pure functions of t, so a resumed run replays them exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Schedule", "Always", "Window", "Burst", "Every", "Decay"]


class Schedule:
    """Base class: ``magnitude(step) -> float``."""

    def magnitude(self, step: int) -> float:
        raise NotImplementedError

    def active(self, step: int) -> bool:
        return self.magnitude(step) != 0


def _check_step(owner: str, key: str, value: object, minimum: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}.{key} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class Always(Schedule):
    """On at every step with magnitude 1."""

    def magnitude(self, step: int) -> float:
        return 1.0


@dataclass(frozen=True)
class Window(Schedule):
    """On for ``start <= t < end`` (``end=None``: no end)."""

    start: int
    end: int | None = None

    def __post_init__(self) -> None:
        _check_step("Window", "start", self.start)
        if self.end is not None:
            _check_step("Window", "end", self.end, minimum=self.start + 1)

    def magnitude(self, step: int) -> float:
        return float(step >= self.start and (self.end is None or step < self.end))


@dataclass(frozen=True)
class Burst(Schedule):
    """On for ``length`` steps from each step in ``at_steps``."""

    at_steps: tuple[int, ...]
    length: int = 1

    def __post_init__(self) -> None:
        steps = (self.at_steps,) if isinstance(self.at_steps, int) else self.at_steps
        if not isinstance(steps, Sequence) or not steps:
            raise ValueError(f"Burst.at_steps must be a non-empty list of steps, got {self.at_steps!r}")
        for s in steps:
            _check_step("Burst", "at_steps[]", s)
        object.__setattr__(self, "at_steps", tuple(sorted(steps)))
        _check_step("Burst", "length", self.length, minimum=1)

    def magnitude(self, step: int) -> float:
        return float(any(s <= step < s + self.length for s in self.at_steps))


@dataclass(frozen=True)
class Every(Schedule):
    """On at steps ``t`` with ``t % n == offset``."""

    n: int
    offset: int = 0

    def __post_init__(self) -> None:
        _check_step("Every", "n", self.n, minimum=1)
        _check_step("Every", "offset", self.offset)
        if self.offset >= self.n:
            raise ValueError(f"Every.offset must be < n={self.n}, got {self.offset!r}")

    def magnitude(self, step: int) -> float:
        return float(step % self.n == self.offset)


@dataclass(frozen=True)
class Decay(Schedule):
    """Magnitude ``scale · (t + 1)^(-power)``: a perturbation that shrinks over training.

    THEORY §3: with ``power = 1/4`` an absolute perturbation keeps the O(1/√T) rate of
    Proposition 2 (ζ² = O(1/√T)); a smaller power does not. ``t + 1`` so that step 0
    has magnitude ``scale``.
    """

    scale: float = 1.0
    power: float = 0.25

    def __post_init__(self) -> None:
        for key in ("scale", "power"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Decay.{key} must be a number >= 0, got {value!r}")

    def magnitude(self, step: int) -> float:
        return self.scale * (step + 1) ** (-self.power)
