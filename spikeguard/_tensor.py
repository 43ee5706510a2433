"""Small torch helpers shared across spikeguard."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class RngState:
    """The global RNG state of the CPU and of the CUDA devices in use, to replay passes.

    Dropout draws from the global RNG: a measurement that replays this state before each
    of its passes gets identical masks in all of them, and restoring it afterwards leaves
    training's RNG stream as if nothing had run.
    """

    cpu: torch.Tensor
    cuda: tuple[torch.Tensor, ...] | None

    @classmethod
    def capture(cls, devices: Sequence[torch.device] = ()) -> RngState:
        """The state now; CUDA's too when one of ``devices`` is a CUDA device."""
        cuda = any(torch.device(d).type == "cuda" for d in devices) and torch.cuda.is_available()
        return cls(cpu=torch.get_rng_state(), cuda=tuple(torch.cuda.get_rng_state_all()) if cuda else None)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(list(self.cuda))

    @contextlib.contextmanager
    def forked(self) -> Iterator[RngState]:
        """Run the block from this state and put the state back afterwards."""
        saved = RngState.capture(["cuda"] if self.cuda is not None else [])
        self.restore()
        try:
            yield self
        finally:
            saved.restore()


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
