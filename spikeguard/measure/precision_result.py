"""What the precision probe measures, as data: :class:`PrecisionResult` (see :mod:`spikeguard.measure.precision`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from spikeguard import theory
from spikeguard.measure.results import Constants, bound_to_dict
from spikeguard.measure.results import fmt as _fmt

__all__ = ["PrecisionResult", "LOSS_HEAD", "PRECISION_DTYPES"]

#: Autocast dtypes the probe supports, with their :data:`~spikeguard.perturb.FORMATS` name.
PRECISION_DTYPES: dict[torch.dtype, str] = {torch.bfloat16: "bf16", torch.float16: "fp16"}


#: The name of the last source in :attr:`PrecisionResult.source_names`: what ``loss_fn``
#: computes after the last operator.
LOSS_HEAD = "(loss head)"


@dataclass(frozen=True)
class PrecisionResult:
    """What one precision probe measured (float64 CPU tensors, 0-based over operators).

    Two attributions of the predicted error, the same terms grouped two ways:

    - ``contribution`` groups by where a perturbation *lands* (Proposition 1's index):
      ε_i counts for operator i although operator i+1's backward produced it;
    - ``source`` groups by the computation that *produced* it: operator i's forward
      (δ_i), its parameter gradient (κ_i) and its backward into its input (ε_{i-1}),
      plus the loss head's backward (ε_N). This one answers "which operator's low
      precision costs me": an operator that runs wholly in fp32 has source 0.

    Attributes:
        names: the operators, in chain order.
        dtype: the autocast dtype probed.
        unit_roundoff: u of that format (bf16 2^-8, fp16 2^-11).
        local_forward: |δ_i|, see the module docstring.
        local_backward: |ε_i|, the error of the message w.r.t. operator i's output
            introduced by the low-precision backward of what sits above it (operator i+1,
            or the loss head for the last operator).
        local_param: |κ_i|, the error of operator i's own parameter-gradient computation.
        relative_forward: |δ_i| / |z_i| (compare with ``unit_roundoff``).
        relative_backward: |ε_i| / |g_i|.
        relative_param: |κ_i| / |K_i^T g_i| (nan where operator i's module reaches no
            parameter of its own).
        constants: the Proposition 1 constants used.
        predicted: Proposition 1 with those constants and these δ, ε, its parameter
            errors ``d_i`` raised by |κ_i| and ``total = (Σ d_i²)^½`` recomputed; a
            first-order bound on ``observed_total``.
        contribution: (N,) ``A^f_i |δ_i| + A^b_i |ε_i| + |κ_i|``
            (:func:`theory.amplification`); sums to ``Σ_i predicted.d_i`` exactly
            (≥ ``predicted.total``).
        source: (N+1,) ``A^f_i |δ_i| + |κ_i| + A^b_{i-1} |ε_{i-1}|`` per operator, then
            ``A^b_N |ε_N|`` for the loss head; the same sum.
        observed_total: |Ĝ_low - G|: the whole forward and backward under autocast
            against the whole pass in fp32, over all trainable parameters.
        grad_norm: |G|, the fp32 gradient norm.
        notes: how the numbers were obtained, and anything that limits them.
    """

    names: tuple[str, ...]
    dtype: torch.dtype
    unit_roundoff: float
    local_forward: torch.Tensor
    local_backward: torch.Tensor
    local_param: torch.Tensor
    relative_forward: torch.Tensor
    relative_backward: torch.Tensor
    relative_param: torch.Tensor
    constants: Constants
    predicted: theory.PropagationBound
    contribution: torch.Tensor
    source: torch.Tensor
    observed_total: float
    grad_norm: float
    notes: tuple[str, ...] = ()

    @property
    def source_names(self) -> tuple[str, ...]:
        """The names of ``source``'s entries: the operators, then :data:`LOSS_HEAD`."""
        return self.names + (LOSS_HEAD,)

    @property
    def share(self) -> torch.Tensor:
        """``contribution`` as fractions of its sum."""
        return _fractions(self.contribution)

    @property
    def source_share(self) -> torch.Tensor:
        """``source`` as fractions of its sum."""
        return _fractions(self.source)

    @property
    def largest_contributor(self) -> str:
        """The operator whose output or message carries the most predicted error."""
        return self.names[int(torch.argmax(self.contribution))]

    @property
    def largest_source(self) -> str:
        """The operator (or the loss head) whose low-precision computation costs the most."""
        return self.source_names[int(torch.argmax(self.source))]

    @property
    def relative_error(self) -> float:
        """Observed |Ĝ_low - G| / |G|: the fraction of the gradient that is rounding noise."""
        return self.observed_total / self.grad_norm if self.grad_norm > 0 else math.nan

    def table(self) -> str:
        """Per operator: local relative errors, amplification, both shares; then the totals."""
        amp = theory.amplification(**self.constants.theory_kwargs())
        at, source = self.share, self.source_share
        rows = [
            f"{'operator':<24}{'|δ|/|z|':>10}{'|ε|/|g|':>10}{'|κ|/|G_i|':>11}"
            f"{'A^f':>10}{'A^b':>10}{'at':>8}{'source':>8}"
        ]
        for i, name in enumerate(self.names):
            rows.append(
                f"{name:<24}{_fmt(self.relative_forward[i], 10)}{_fmt(self.relative_backward[i], 10)}"
                f"{_fmt(self.relative_param[i], 11)}{_fmt(amp.forward[i], 10)}{_fmt(amp.backward[i], 10)}"
                f"{_pct(at[i])}{_pct(source[i])}"
            )
        rows.append(f"{LOSS_HEAD:<24}{'':>59}{_pct(source[-1])}")
        fmt = PRECISION_DTYPES[self.dtype]
        ratio = self.predicted.total / self.observed_total if self.observed_total > 0 else math.inf
        rows.append(
            f"{fmt} (u = {self.unit_roundoff:.3g}): |Ĝ-G| observed {self.observed_total:.4g}, "
            f"predicted {self.predicted.total:.4g} ({ratio:.3g}x); |G| = {self.grad_norm:.4g}, "
            f"relative {self.relative_error:.3g}"
        )
        rows.append(
            f"largest source {self.largest_source} ({100 * float(source.max()):.1f}%); "
            f"largest at {self.largest_contributor} ({100 * float(at.max()):.1f}%)"
        )
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plain Python (floats, lists and strings)."""
        return {
            "names": list(self.names),
            "dtype": str(self.dtype).removeprefix("torch."),
            "unit_roundoff": self.unit_roundoff,
            "local_forward": self.local_forward.tolist(),
            "local_backward": self.local_backward.tolist(),
            "local_param": self.local_param.tolist(),
            "relative_forward": self.relative_forward.tolist(),
            "relative_backward": self.relative_backward.tolist(),
            "relative_param": self.relative_param.tolist(),
            "constants": self.constants.to_dict(),
            "predicted": bound_to_dict(self.predicted),
            "contribution": self.contribution.tolist(),
            "share": self.share.tolist(),
            "largest_contributor": self.largest_contributor,
            "source_names": list(self.source_names),
            "source": self.source.tolist(),
            "source_share": self.source_share.tolist(),
            "largest_source": self.largest_source,
            "observed_total": self.observed_total,
            "grad_norm": self.grad_norm,
            "relative_error": self.relative_error,
            "notes": list(self.notes),
        }


def _fractions(x: torch.Tensor) -> torch.Tensor:
    total = float(x.sum())
    return x / total if total > 0 else torch.zeros_like(x)


def _pct(x: Any) -> str:
    return f"{100 * float(x):>7.1f}%"


# -- helpers ---------------------------------------------------------------------------


