"""Small torch helpers shared across spikeguard."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence

import torch


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to reduce a tensor in: at least float32 (bf16 sums lose too much)."""
    return torch.promote_types(dtype, torch.float32)


def norm(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of all elements, accumulated in at least float32; 0-dim, on x's device."""
    return torch.linalg.vector_norm(x, dtype=accum_dtype(x.dtype))


def in_backward() -> bool:
    """True while autograd runs a backward pass, e.g. activation-checkpoint recomputation."""
    return torch._C._current_graph_task_id() != -1


# A probe, a sharpness measurement or a re-run runs extra passes through the model. While
# one does, the training-time observers (statistics) and perturbations (other Injectors)
# must stay out: the passes are not training steps. The owner is the object measuring.
_MEASURING: contextvars.ContextVar[object | None] = contextvars.ContextVar("spikeguard_measuring", default=None)


def measuring() -> object | None:
    """The object running measurement passes right now, or None during training."""
    return _MEASURING.get()


@contextlib.contextmanager
def measurement(owner: object):
    """Mark the passes inside as measurement passes owned by ``owner``."""
    token = _MEASURING.set(owner)
    try:
        yield
    finally:
        _MEASURING.reset(token)


# -- probe-time reductions (they sync with the host; never on a per-step path) -------------


def norm64(tensors: Sequence[torch.Tensor]) -> float:
    """|(t_1, ..., t_k)| accumulated in float64, as a Python float."""
    if not tensors:
        return 0.0
    with torch.no_grad():
        return math.sqrt(sum(float((t.detach().double() ** 2).sum()) for t in tensors))


def diff_norm64(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """|a - b| with the difference itself taken in float64 (no rounding in the subtraction)."""
    with torch.no_grad():
        return norm64([x.detach().double() - y.detach().double() for x, y in zip(a, b)])


def nan_ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b elementwise, nan where b is not positive."""
    out = torch.full_like(a, math.nan)
    ok = b > 0
    out[ok] = a[ok] / b[ok]
    return out
