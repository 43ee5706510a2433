"""What the callbacks share: a base class both Lightning packages accept, and small helpers.

``pytorch_lightning.Callback`` and ``lightning.pytorch.Callback`` are different classes
with the same interface, and each Trainer checks ``isinstance`` against its own. The
callbacks here derive from every one that is installed, so one class works with both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from spikeguard.operators import OperatorChain, _pattern_hint

__all__ = ["CallbackBase", "resolve_model", "resolve_chain", "adopt_renamed_state", "log_dir", "world", "all_reduce_max", "all_reduce_mean"]


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


def adopt_renamed_state(callback: Any, trainer: Any, checkpoint: dict[str, Any]) -> str | None:
    """In ``on_load_checkpoint``: give ``callback`` the state a checkpoint holds under an older key.

    Lightning restores a callback's state only under its exact ``state_key`` and drops
    it otherwise. Older spikeguard versions put settings into the key (``SpikeGuard{'action':
    'none', ...}``), so a resume with another setting, or from an older checkpoint, would
    lose the detector without a word. When the checkpoint has no state under this
    callback's key but exactly one such older key of the same class that no other
    callback of the trainer claims, it is moved to this key (and the key it came from
    is returned).
    """
    states = checkpoint.get("callbacks")
    key = callback.state_key
    if not isinstance(states, dict) or key in states:
        return None
    cls = type(callback).__name__
    claimed = {c.state_key for c in getattr(trainer, "callbacks", [])}
    candidates = [k for k in states if isinstance(k, str) and k.startswith(cls + "{") and k not in claimed]
    if len(candidates) != 1:
        return None
    states[key] = states.pop(candidates[0])
    return candidates[0]


def log_dir(trainer: Any) -> str:
    """The run's log directory (a collective under DDP: every rank must call it)."""
    return trainer.log_dir or trainer.default_root_dir


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
