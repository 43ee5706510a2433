"""The signal registry: every quantity the detector watches, in one table.

Statistics, detector, attribution, metric keys, report and dashboard all iterate
:data:`SIGNALS`; adding a signal is one entry here plus its computation in
:class:`spikeguard.measure.StepStatistics` (a field of :class:`StepStats` of the same
name). A signal is global (one value per step) or per operator (one value per operator
per step), and has:

- a direction (``forward``: activations; ``backward``: gradients; None: the loss side);
- the :class:`~spikeguard.detect.DetectorConfig` fields that set its z threshold and its
  minimum factor over the baseline;
- whether it may raise an event on its own (a tied or sparse parameter gradient jumps
  with the batch's tokens: it is watched and reported, never flagged alone);
- whether attribution reads it as evidence of where a spike starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Signal", "SIGNALS", "GLOBAL", "OPERATOR", "EVENT_PRECEDENCE", "Layout", "by_name"]


@dataclass(frozen=True)
class Signal:
    """One watched quantity (see the module docstring)."""

    name: str
    description: str
    scope: str  # "global" or "operator"
    direction: str | None = None
    threshold: str = "threshold"  # the DetectorConfig field of its robust z threshold
    min_factor: str = "min_factor"  # ... and of its factor over the baseline
    flags: bool = True
    attributes: bool = False
    summary: str = "last"  # its W&B run-summary rule


SIGNALS: tuple[Signal, ...] = (
    Signal("loss", "training loss (mean over the accumulation window)", "global"),
    Signal("grad_norm", "global gradient norm |G|", "global", summary="max"),
    Signal("out_amax", "max |output| of the operator", "operator", "forward",
           "operator_threshold", "operator_min_factor", attributes=True),
    Signal("out_rms", "RMS of the operator's output", "operator", "forward",
           "operator_threshold", "operator_min_factor", attributes=True),
    Signal("msg_norm", "norm of the gradient w.r.t. the operator's output, |g_i|", "operator", "backward",
           "operator_threshold", "operator_min_factor", attributes=True),
    Signal("param_grad_norm", "norm of the operator's own parameter gradient", "operator", "backward",
           "operator_threshold", "operator_min_factor", flags=False),
)

GLOBAL = tuple(s for s in SIGNALS if s.scope == "global")

#: Which global signal names a spike when several flag at once (an event's ``kind``).
EVENT_PRECEDENCE = ("grad_norm", "loss")
OPERATOR = tuple(s for s in SIGNALS if s.scope == "operator")


def by_name(name: str) -> Signal:
    for s in SIGNALS:
        if s.name == name:
            return s
    raise ValueError(f"no signal named {name!r}; the registry has {[s.name for s in SIGNALS]}")


class Layout:
    """Where each signal sits in the detector's vector for a given list of operators.

    The vector is the global signals in registry order, then each operator signal for
    every operator (forward order): ``[loss, grad_norm, out_amax_1..N, out_rms_1..N, ...]``.
    """

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        n = len(self.names)
        self._slices: dict[str, slice] = {}
        pos = 0
        for s in GLOBAL:
            self._slices[s.name] = slice(pos, pos + 1)
            pos += 1
        for s in OPERATOR:
            self._slices[s.name] = slice(pos, pos + n)
            pos += n
        self.size = pos
        #: The signal of each position, in order.
        self.signals: tuple[Signal, ...] = tuple(s for s in SIGNALS for _ in range(self._slices[s.name].stop - self._slices[s.name].start))

    def slice(self, name: str) -> slice:
        """The positions of signal ``name`` (one for a global signal, N for an operator one)."""
        try:
            return self._slices[name]
        except KeyError:
            raise ValueError(f"no signal named {name!r}; the registry has {list(self._slices)}") from None

    def index(self, name: str) -> int:
        """The position of a global signal."""
        sl = self.slice(name)
        if sl.stop - sl.start != 1 or by_name(name).scope != "global":
            raise ValueError(f"signal {name!r} is per operator: use slice()")
        return sl.start

    @property
    def num_global(self) -> int:
        return len(GLOBAL)
