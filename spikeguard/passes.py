"""The pass context: which kind of pass runs through the model now, read by every hook.

A training run sends three kinds of passes through the same modules:

- ``TRAIN``: the training step itself (forward and backward of ``training_step``);
- ``RERUN``: SpikeGuard recomputing a spiking step on the same batch, weights and RNG
  (``SpikeGuard(rerun=True)``) to tell a transient fault from a reproducible spike;
- ``MEASURE``: extra passes of a measurement (the amplification probe, a sharpness
  estimate, an origin replay), which own the perturbations they apply.

Every hook asks this module what to do instead of reading flags other parts set:

=====================  ==========  ===============================  ===================
hook                   ``TRAIN``   ``RERUN``                        ``MEASURE``
=====================  ==========  ===============================  ===================
per-step statistics    record      skip                             skip
an Injector            apply all   apply its persistent ones only   apply if it is the
                                   (transient faults do not recur)  measurement's owner
=====================  ==========  ===============================  ===================

The decision is taken when an operator's forward runs and is carried by the gradient
hook registered there, so a backward that autograd runs on another thread obeys the
pass its forward belonged to.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["PassKind", "Pass", "current", "rerun", "measure", "records_statistics", "applies"]


class PassKind(str, enum.Enum):
    """What a pass through the model is for."""

    TRAIN = "train"
    RERUN = "rerun"
    MEASURE = "measure"


@dataclass(frozen=True)
class Pass:
    """The pass running now: its kind and, for a measurement, the object that owns it."""

    kind: PassKind = PassKind.TRAIN
    owner: object | None = None


_TRAIN = Pass()
_CURRENT: contextvars.ContextVar[Pass] = contextvars.ContextVar("spikeguard_pass", default=_TRAIN)


def current() -> Pass:
    """The pass running now (``TRAIN`` outside any other context)."""
    return _CURRENT.get()


@contextlib.contextmanager
def _entered(p: Pass) -> Iterator[Pass]:
    token = _CURRENT.set(p)
    try:
        yield p
    finally:
        _CURRENT.reset(token)


def rerun() -> contextlib.AbstractContextManager[Pass]:
    """Mark the passes inside as a re-run of a training step."""
    return _entered(Pass(PassKind.RERUN))


def measure(owner: object | None = None) -> contextlib.AbstractContextManager[Pass]:
    """Mark the passes inside as measurement passes; only ``owner``'s perturbations apply.

    ``owner`` is the Injector whose perturbations the measurement studies (the probe's
    own), or None for a measurement of the clean model (a sharpness estimate).
    """
    return _entered(Pass(PassKind.MEASURE, owner))


def records_statistics(p: Pass | None = None) -> bool:
    """Per-step statistics describe training steps only."""
    return (p or current()).kind is PassKind.TRAIN


def applies(injector: object, transient: bool, p: Pass | None = None) -> bool:
    """Whether ``injector`` applies a perturbation (``transient`` or persistent) in pass ``p``."""
    p = p or current()
    if p.kind is PassKind.TRAIN:
        return True
    if p.kind is PassKind.RERUN:
        return not transient
    return p.owner is injector
