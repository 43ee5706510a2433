"""What the callbacks share: a base class both Lightning packages accept, and small helpers.

``pytorch_lightning.Callback`` and ``lightning.pytorch.Callback`` are different classes
with the same interface, and each Trainer checks ``isinstance`` against its own. The
callbacks here derive from every one that is installed, so one class works with both.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from spikeguard.operators import OperatorChain, _pattern_hint

__all__ = ["CallbackBase", "resolve_model", "resolve_chain", "SafeLogger", "shared", "Shared"]


def _callback_bases() -> tuple[type, ...]:
    bases = []
    try:
        import pytorch_lightning

        bases.append(pytorch_lightning.Callback)
    except ImportError:
        pass
    try:
        import lightning.pytorch

        bases.append(lightning.pytorch.Callback)
    except ImportError:
        pass
    if not bases:
        raise ImportError(
            "spikeguard.callbacks needs PyTorch Lightning: pip install pytorch-lightning (or lightning)"
        )
    return tuple(bases)


CallbackBase = type(
    "CallbackBase",
    _callback_bases(),
    {"__doc__": "A Lightning Callback for pytorch_lightning and lightning.pytorch alike.", "__module__": __name__},
)


def resolve_model(pl_module: nn.Module, model_attr: str | None) -> nn.Module:
    """The model the operators live in: ``pl_module.<model_attr>``, else ``pl_module.model``
    when it exists, else the LightningModule itself."""
    if model_attr is None:
        model = getattr(pl_module, "model", None)
        return model if isinstance(model, nn.Module) else pl_module
    try:
        model = pl_module.get_submodule(model_attr)
    except AttributeError:
        children = [name for name, _ in pl_module.named_children()]
        raise ValueError(
            f"model_attr={model_attr!r}: {type(pl_module).__name__} has no submodule of that name; "
            f"its children are {children}"
        ) from None
    return model


def resolve_chain(owner: str, model: nn.Module, chain: OperatorChain | list[str] | None) -> OperatorChain:
    """An OperatorChain on ``model`` from what the user passed (None: discover it)."""
    if isinstance(chain, OperatorChain):
        modules = {id(m) for m in model.modules()}
        outside = [op.name for op in chain if id(op.module) not in modules]
        if outside:
            raise ValueError(f"{owner}.chain: operators {outside} are not modules of {type(model).__name__}")
        return chain
    if chain is None:
        try:
            return OperatorChain.from_model(model)
        except ValueError:
            raise ValueError(
                f"{owner} could not discover the operators of {type(model).__name__}: pass "
                f"chain=[patterns] (names under the model, e.g. {_pattern_hint(model)}) "
                "or model_attr= to point at the model inside the LightningModule"
            ) from None
    if isinstance(chain, (list, tuple)) and all(isinstance(p, str) for p in chain):
        return OperatorChain.from_patterns(model, list(chain))
    raise TypeError(f"{owner}.chain must be None, an OperatorChain or a list of name patterns, got {chain!r}")


class SafeLogger:
    """Log to every logger of a trainer; a logger that raises is reported once, not fatal."""

    def __init__(self, owner: str):
        self.owner = owner
        self._failed: set[int] = set()

    def log(self, trainer: Any, metrics: dict[str, float], step: int) -> None:
        if not metrics:
            return
        for logger in trainer.loggers:
            try:
                logger.log_metrics(metrics, step=step)
            except Exception as err:  # a failing logger must never stop training
                if id(logger) not in self._failed:
                    self._failed.add(id(logger))
                    warnings.warn(
                        f"{self.owner}: {type(logger).__name__}.log_metrics failed ({type(err).__name__}: "
                        f"{err}); training goes on, later failures of this logger are silent",
                        stacklevel=2,
                    )

    def call(self, trainer: Any, what: str, fn: Any) -> Any:
        """Run ``fn()`` (a logger-specific extra, e.g. a W&B table) with the same protection."""
        try:
            return fn()
        except Exception as err:
            key = hash(what)
            if key not in self._failed:
                self._failed.add(key)
                warnings.warn(f"{self.owner}: {what} failed ({type(err).__name__}: {err}); training goes on", stacklevel=2)
            return None


@dataclass
class Shared:
    """State the callbacks exchange through the trainer, without depending on each other."""

    prediction: Any = None  # spikeguard.detect.Prediction from the latest probe
    probe_result: Any = None  # the latest ProbeResult
    rerun_active: bool = False  # SpikeGuard is re-running a step: transient faults stay off


_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shared(trainer: Any) -> Shared:
    """The :class:`Shared` state of a trainer (created on first use)."""
    state = _SHARED.get(trainer)
    if state is None:
        state = _SHARED[trainer] = Shared()
    return state


def world(trainer: Any) -> int:
    return int(getattr(trainer, "world_size", 1) or 1)


def all_reduce_max(t: torch.Tensor, trainer: Any) -> torch.Tensor:
    """Max over ranks, on the device (no host sync); identity on one process."""
    if world(trainer) > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


def all_reduce_mean(t: torch.Tensor, trainer: Any) -> torch.Tensor:
    if world(trainer) > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        t = t / world(trainer)
    return t
