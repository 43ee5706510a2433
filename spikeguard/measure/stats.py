"""Cheap per-step statistics of each operator's output, gradient message and parameter gradients."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from spikeguard import passes
from spikeguard._tensor import accum_dtype, in_backward, norm
from spikeguard.operators import OperatorChain, hidden_tensor

__all__ = ["StepStatistics", "StepStats"]



def _num_nonfinite(x: Tensor, _norm: Tensor | None = None) -> Tensor:
    """Exact count of ±inf and NaN elements of ``x``; 0-dim int64, on x's device."""
    # 0·x is NaN exactly where x is ±inf or NaN and 0 elsewhere; NaN counts as nonzero.
    # torch.isfinite costs four elementwise kernels, this two (three on CUDA).
    return torch.count_nonzero(x * 0)


def _nonfinite_flag(x: Tensor, norm_x: Tensor) -> Tensor:
    """1 if ``x`` holds an inf or NaN, else 0 (int64), from its norm: no pass over ``x``.

    A norm is non-finite exactly when an element is (or the sum of squares overflows).
    """
    return (~torch.isfinite(norm_x)).to(torch.int64)


def _amax(x: Tensor) -> Tensor:
    """max |x| in at least float32 (NaN propagates).

    One pass with no temporary (``aminmax``): ``vector_norm(ord=inf)`` is 10-30x slower on
    CPU, and ``abs()`` allocates a copy of x, whose page faults cost more than the pass.
    """
    low, high = torch.aminmax(x)
    return torch.maximum(high, -low).to(accum_dtype(x.dtype))


def _per_operator(rows: list[list[Tensor]], zero: Tensor, reduce: Callable[[Tensor], Tensor]) -> Tensor:
    """(N,) ``reduce`` over each operator's recorded values: one stack, one reduction.

    Rows are padded with ``zero`` to a common width M, so an operator with no values
    reports 0 (``zero`` is neutral for sums, for norms and for the max of |.|).
    """
    width = max(1, max(len(row) for row in rows))
    flat = [v for row in rows for v in row + [zero] * (width - len(row))]
    return reduce(torch.stack(flat).view(len(rows), width))  # (N, M) -> (N,)


def _row_norm(m: Tensor) -> Tensor:
    return torch.linalg.vector_norm(m, dim=1)  # ‖(‖y_1‖, .., ‖y_M‖)‖ = (Σ_k ‖y_k‖²)^½


def _row_max(m: Tensor) -> Tensor:
    return m.amax(dim=1)


def _row_sum(m: Tensor) -> Tensor:
    return m.sum(dim=1)


@dataclass(frozen=True, eq=False)
class StepStats:
    """The statistics of one optimizer step, as device tensors (reading them syncs).

    Per operator, in forward order (shape (N,)), over the accumulation window:

    ==================  ==================================================================
    field               meaning
    ==================  ==================================================================
    ``out_rms``         RMS of the output z_i: ``(Σ_k |z_i^k|² / Σ_k numel(z_i^k))^½``
    ``out_amax``        ``max_k max |z_i^k|``
    ``out_nonfinite``   passes whose output held an inf/NaN (elements, when exact; int64)
    ``msg_norm``        |g_i|, the gradient with respect to z_i: ``(Σ_k |g_i^k|²)^½``
    ``msg_nonfinite``   the same for the gradients (int64)
    ``param_grad_norm`` ``|G_i|``, the norm of the ``.grad`` of the operator's parameters
    ==================  ==================================================================

    Global (0-dim): ``grad_norm``, the norm of every parameter's ``.grad`` (a parameter
    shared between operators counted once), and ``grad_nonfinite``, the number of
    parameters whose ``.grad`` holds an inf or NaN (or whose norm overflows; int64).
    Floats are at least float32.
    """

    names: tuple[str, ...]
    out_rms: Tensor
    out_amax: Tensor
    out_nonfinite: Tensor
    msg_norm: Tensor
    msg_nonfinite: Tensor
    param_grad_norm: Tensor
    grad_norm: Tensor
    grad_nonfinite: Tensor

    _PER_OPERATOR = ("out_rms", "out_amax", "out_nonfinite", "msg_norm", "msg_nonfinite", "param_grad_norm")
    _GLOBAL = ("grad_norm", "grad_nonfinite")
    _COUNTS = frozenset({"out_nonfinite", "msg_nonfinite", "grad_nonfinite"})

    def to_host(self) -> dict[str, Any]:
        """Everything as Python numbers, in one device-to-host transfer.

        Returns ``{"names": [...], "out_rms": [float, ...], ..., "grad_norm": float,
        "grad_nonfinite": int}``; per-operator fields are lists in forward order, counts
        are ints.
        """
        n = len(self.names)
        fields = [getattr(self, k) for k in self._PER_OPERATOR]
        fields += [getattr(self, k).reshape(1) for k in self._GLOBAL]
        # float64 holds float32 exactly and counts up to 2^53 exactly.
        values = torch.cat([f.to(torch.float64) for f in fields]).tolist()  # the one sync
        out: dict[str, Any] = {"names": list(self.names)}
        for j, key in enumerate(self._PER_OPERATOR):
            row = values[j * n : (j + 1) * n]
            out[key] = [int(v) for v in row] if key in self._COUNTS else row
        for j, key in enumerate(self._GLOBAL):
            v = values[len(self._PER_OPERATOR) * n + j]
            out[key] = int(v) if key in self._COUNTS else v
        return out


class StepStatistics:
    """Per-operator activation and gradient statistics, accumulated on device.

    Args:
        chain: the operators to watch.
        model: the model the chain belongs to; its parameters that no operator owns
            still count in the global gradient norm. Default: only the operators'
            parameters count.
        exact_nonfinite: count non-finite *elements* (one more pass over every output
            and gradient, ~1 ms a step on a small CPU model). Default: count the passes
            whose tensor holds any, which the norm already tells for free.

    Usage, once per optimizer step::

        stats = StepStatistics(chain, model).attach()
        stats.reset()
        for batch in micro_batches:      # gradient accumulation
            model(**batch).loss.backward()
        step_stats = stats.collect()      # after backward, before optimizer.step()
        optimizer.step()
        logged = step_stats.to_host()     # the only host sync, when logging

    What the hooks do: a forward hook on each operator takes a norm, a max |.| and the
    non-finite count of the output's hidden tensor (see
    :func:`spikeguard.operators.hidden_tensor`) under ``torch.no_grad()``, and, if that
    tensor requires grad, registers a tensor hook on it that takes the norm and the
    non-finite count of its gradient g_i (THEORY §1). Hooks only observe: outputs and
    gradients are bitwise unchanged. Each value is a 0-dim device tensor appended to a
    list; :meth:`collect` stacks them, so nothing syncs with the host until
    :meth:`StepStats.to_host`. Reductions run in at least float32 (bf16 models too).

    Aggregation over the accumulation window (every forward and backward since
    :meth:`reset`): sums of squares add, so ``out_rms`` is the RMS over all elements
    seen and ``msg_norm`` the root of the summed squared norms; ``out_amax`` is the max;
    non-finite counts add. ``param_grad_norm``, ``grad_norm`` and ``grad_nonfinite`` read
    the accumulated ``.grad`` at :meth:`collect` time. :meth:`collect` does not reset;
    call :meth:`reset` at the start of each optimizer step.

    Every forward while attached counts (evaluation passes too: detach or reset around
    them). An operator that did not run in the window, or whose output got no
    gradient, reports 0 for its norms and counts; a parameter with no ``.grad`` counts
    0. A parameter shared between operators (GPT-2's ``lm_head.weight`` is
    ``transformer.wte.weight``) counts in the ``param_grad_norm`` of every operator that
    owns it and once in ``grad_norm``. Activation checkpointing: the forward that
    autograd recomputes during backward is not counted again.
    """

    def __init__(self, chain: OperatorChain, model: nn.Module | None = None, exact_nonfinite: bool = False):
        if not isinstance(chain, OperatorChain):
            raise TypeError(f"StepStatistics.chain must be an OperatorChain, got {type(chain).__name__}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(
                f"StepStatistics.model must be a torch.nn.Module or None, got {type(model).__name__}"
            )
        if model is not None:
            inside = {id(m) for m in model.modules()}
            outside = [op.name for op in chain if id(op.module) not in inside]
            if outside:
                raise ValueError(
                    f"StepStatistics.model: operators {outside} are not modules of the given "
                    f"{type(model).__name__}; pass the model the chain was built from"
                )
        self.chain = chain
        self.model = model
        self.exact_nonfinite = bool(exact_nonfinite)
        # Every parameter once (by identity); each operator's as indices into that list.
        self._params: list[nn.Parameter] = []
        position: dict[int, int] = {}

        def index(p: nn.Parameter) -> int:
            if id(p) not in position:
                position[id(p)] = len(self._params)
                self._params.append(p)
            return position[id(p)]

        self._owned_by = [[index(p) for p in op.parameters()] for op in chain]
        for p in model.parameters() if model is not None else ():
            index(p)
        self._handles: list[Any] = []
        self._tensor_handles: list[Any] = []
        self._scale_cache: tuple[tuple, Tensor] | None = None
        self.reset()

    # -- lifecycle -------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> StepStatistics:
        """Register the hooks (idempotent)."""
        if not self._handles:
            self._handles = [
                op.module.register_forward_hook(self._make_hook(i)) for i, op in enumerate(self.chain)
            ]
        return self

    def detach(self) -> None:
        """Remove every hook (idempotent), including gradient hooks still waiting for a backward."""
        for handle in self._handles + self._tensor_handles:
            handle.remove()
        self._handles.clear()
        self._tensor_handles.clear()

    def __enter__(self) -> StepStatistics:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def reset(self) -> None:
        """Start a new accumulation window (a new optimizer step)."""
        n = len(self.chain)
        self._out_norm: list[list[Tensor]] = [[] for _ in range(n)]
        self._out_amax: list[list[Tensor]] = [[] for _ in range(n)]
        self._out_nonfinite: list[list[Tensor]] = [[] for _ in range(n)]
        self._out_numel = [0] * n
        self._msg_norm: list[list[Tensor]] = [[] for _ in range(n)]
        self._msg_nonfinite: list[list[Tensor]] = [[] for _ in range(n)]
        # The backward of the last window has run: its tensor hooks are spent.
        self._tensor_handles.clear()

    # -- the hooks -------------------------------------------------------------------

    def _make_hook(self, i: int):
        name = self.chain[i].name

        count = _num_nonfinite if self.exact_nonfinite else _nonfinite_flag

        def grad_hook(g: Tensor) -> None:
            with torch.no_grad():
                n = norm(g)
                self._msg_norm[i].append(n)
                self._msg_nonfinite[i].append(count(g, n))

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not passes.records_statistics():
                return  # a probe's or a re-run's passes are not part of the training step
            y = hidden_tensor(output)
            if y is None or not y.is_floating_point():
                raise TypeError(
                    f"StepStatistics: operator {name!r} returned {type(output).__name__} with no "
                    "floating-point tensor to measure; choose operators whose output is a hidden state"
                )
            if not in_backward():  # a forward recomputed for checkpointing was counted already
                with torch.no_grad():
                    n = norm(y)
                    self._out_norm[i].append(n)
                    self._out_amax[i].append(_amax(y))
                    self._out_nonfinite[i].append(count(y, n))
                self._out_numel[i] += y.numel()
            if y.requires_grad:
                # In a reentrant checkpoint the gradient flows only through the recomputed output.
                self._tensor_handles.append(y.register_hook(grad_hook))

        return hook

    # -- reading ---------------------------------------------------------------------

    def collect(self) -> StepStats:
        """The window's statistics as device tensors, without a host sync.

        Call after the last backward of the step and before ``optimizer.step()`` (and
        before ``zero_grad``): the parameter statistics read ``.grad``.
        """
        device = self._device()
        zero = torch.zeros((), device=device)
        count_zero = torch.zeros((), dtype=torch.int64, device=device)
        with torch.no_grad():
            out_norm = _per_operator(self._out_norm, zero, _row_norm)
            msg_norm = _per_operator(self._msg_norm, zero, _row_norm)
            param_grad_norm, grad_norm, grad_nonfinite = self._param_stats(zero, count_zero)
            return StepStats(
                names=tuple(self.chain.names),
                out_rms=out_norm / self._sqrt_numel(out_norm),
                out_amax=_per_operator(self._out_amax, zero, _row_max),
                out_nonfinite=_per_operator(self._out_nonfinite, count_zero, _row_sum),
                msg_norm=msg_norm,
                msg_nonfinite=_per_operator(self._msg_nonfinite, count_zero, _row_sum),
                param_grad_norm=param_grad_norm,
                grad_norm=grad_norm,
                grad_nonfinite=grad_nonfinite,
            )

    def _device(self) -> torch.device:
        for row in self._out_norm:
            if row:
                return row[0].device
        return self._params[0].device if self._params else torch.device("cpu")

    def _sqrt_numel(self, like: Tensor) -> Tensor:
        """(N,) ``sqrt(numel)`` per operator (1 where none ran), copied without a host sync."""
        key = (tuple(self._out_numel), like.dtype, like.device)
        if self._scale_cache is None or self._scale_cache[0] != key:
            host = torch.tensor([math.sqrt(max(n, 1)) for n in self._out_numel], dtype=like.dtype)
            if like.device.type == "cuda":
                host = host.pin_memory()  # a copy from pageable memory would sync
            self._scale_cache = (key, host.to(like.device, non_blocking=True))
        return self._scale_cache[1]

    def _param_stats(self, zero: Tensor, count_zero: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-operator ``|G_i|``, the global grad norm and non-finite count, from ``.grad``."""
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for j, p in enumerate(self._params):
            if p.grad is not None:
                groups.setdefault((p.grad.device, p.grad.dtype), []).append(j)
        param_norm: dict[int, Tensor] = {}
        for (_, dtype), indices in groups.items():
            grads = [self._params[j].grad for j in indices]
            param_norm.update(zip(indices, torch._foreach_norm(grads, 2, dtype=accum_dtype(dtype))))
        per_op = _per_operator(
            [[param_norm[j] for j in row if j in param_norm] for row in self._owned_by], zero, _row_norm
        )
        if not param_norm:
            return per_op, zero, count_zero
        norms = torch.stack(list(param_norm.values()))
        grad_norm = torch.linalg.vector_norm(norms)
        # Parameters, not elements: a gradient's norm is non-finite exactly when it holds an
        # inf or NaN (or overflows), so the count is free; an element count would cost a
        # pass over every gradient (3 ms of an 87 ms step in benchmarks/overhead.py).
        return per_op, grad_norm, (~torch.isfinite(norms)).sum()

    def __repr__(self) -> str:
        return f"StepStatistics(N={len(self.chain)}, attached={self.attached})"
