"""Small torch helpers shared across spikeguard."""

from __future__ import annotations

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
