"""The probe's passes: a forward whose operators are cut apart, and the backward chained through them.

Each operator's output is cut from the graph that follows it: the rest of the model sees
a fresh leaf instead of z_i. Every operator then owns a segment of graph from its input
leaf (and its own parameters) to its output, so that

- the true (coupled) backward is the chain of per-segment vector-Jacobian products, one
  ``torch.autograd.grad`` per operator, which also yields every gradient message g_i
  and each operator's own parameter-gradient contribution K_i^T g_i (tied weights such
  as GPT-2's ``lm_head``/``wte`` are split per operator through aliases);
- a single ``torch.autograd.grad`` over all segments computes J_i^T u_i (or K_i^T u_i)
  for every operator at once, which is what power iteration and the H terms need;
- a forward-mode AD pass whose leaves carry tangents v_i computes every J_i v_i at once.

Every pass replays the RNG state the measurement started with, so dropout masks are
identical across passes and two clean passes differ by exactly zero.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

from spikeguard._tensor import RngState
from spikeguard.operators import OperatorChain, hidden_tensor, replace_hidden_tensor
from spikeguard.perturb.injector import Injector

__all__ = ["LossFn", "Pass", "Backward", "Decoupled", "zeros_for", "is_forward_ad_gap", "math_attention"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]

_FORWARD_AD_NOTE = "an attention kernel has no forward-mode AD: probe passes use the math SDPA backend"


class _LossModule(nn.Module):
    """Wraps (model, loss_fn) so that ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


@dataclass
class Pass:
    """One decoupled forward: outputs z_i (graph-attached), the leaves that replaced them."""

    loss: torch.Tensor
    outputs: list[torch.Tensor]
    leaves: list[torch.Tensor]
    aliases: list[list[torch.Tensor]]  # per operator, its parameters' aliases


@dataclass
class Backward:
    """One chained backward through a :class:`Pass`."""

    msgs: list[torch.Tensor]  # ĝ_i at each operator's output (ε_i included)
    input_grads: list[torch.Tensor | None]  # J_i^T ĝ_i at operator i's input leaf
    op_grads: list[list[torch.Tensor]]  # K_i^T ĝ_i per alias of operator i
    other_grads: list[torch.Tensor]  # parameters owned by no operator


def zeros_for(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like)]


def is_forward_ad_gap(err: BaseException) -> bool:
    """True for torch's errors about an op (or custom Function) without forward-mode AD."""
    text = str(err).lower()
    return isinstance(err, (NotImplementedError, RuntimeError)) and any(
        key in text for key in ("forward ad", "forward mode ad", "forward-mode ad")
    )


def math_attention() -> contextlib.AbstractContextManager[None]:
    """Scaled-dot-product attention on its math backend, which has forward-mode AD and double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


class Decoupled:
    """The decoupled passes of one (model, chain, loss_fn), perturbed by ``injector`` where asked.

    Args:
        model, chain, loss_fn: what is measured.
        injector: the measurement's own perturbations (switched per pass with
            :meth:`Injector.only`).
        note: where a remark about how the passes ran goes (e.g. the math attention
            fallback).
    """

    def __init__(self, model: nn.Module, chain: OperatorChain, loss_fn: LossFn, injector: Injector, note: Callable[[str], None]):
        self.model = model
        self.chain = chain
        self.injector = injector
        self.note = note
        self.wrapper = _LossModule(model, loss_fn)
        self.alias_names, self.alias_params = self._operator_parameters()
        owned = {id(p) for params in self.alias_params for p in params}
        self.others = [p for p in model.parameters() if p.requires_grad and id(p) not in owned]
        self.use_math_attention = False
        self.rng: RngState | None = None
        # Per-forward state of the tap hooks.
        self._mode = "off"
        self.outputs: list[Any] = []
        self.tangents: list[torch.Tensor | None] = []
        self._leaves: list[torch.Tensor | None] = []
        self.sink: list[torch.Tensor | None] | None = None
        self.v_in: list[torch.Tensor] = []
        self.deltas: list[torch.Tensor | None] = []

    @property
    def loss_fn(self) -> LossFn:
        return self.wrapper.loss_fn

    # -- setup ---------------------------------------------------------------------------

    def _operator_parameters(self) -> tuple[list[list[str]], list[list[nn.Parameter]]]:
        """Per operator: the names (under the wrapper) and parameters of its w_i."""
        module_names: dict[int, str] = {}
        for name, module in self.model.named_modules(remove_duplicate=False):
            module_names.setdefault(id(module), name)
        names, params = [], []
        for op in self.chain:
            op_names, op_params, seen = [], [], set()
            for module in op.param_modules or (op.module,):
                prefix = module_names[id(module)]
                for pname, p in module.named_parameters(remove_duplicate=False):
                    if not p.requires_grad or id(p) in seen:
                        continue
                    seen.add(id(p))
                    op_names.append(".".join(x for x in ("model", prefix, pname) if x))
                    op_params.append(p)
            names.append(op_names)
            params.append(op_params)
        return names, params

    def new_aliases(self) -> tuple[list[list[torch.Tensor]], dict[str, torch.Tensor]]:
        """Fresh views of every operator's parameters, and the name map ``functional_call`` takes."""
        aliases = [[p.view_as(p) for p in params] for params in self.alias_params]
        named = {n: a for names, al in zip(self.alias_names, aliases) for n, a in zip(names, al)}
        return aliases, named

    @contextlib.contextmanager
    def tapped(self) -> Iterator[None]:
        """The tap hooks on every operator for the block (after the injector's, which runs first)."""
        handles = [op.module.register_forward_hook(self._tap(i)) for i, op in enumerate(self.chain)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.outputs, self.tangents, self._leaves, self.deltas = [], [], [], []

    # -- the tap: hooks that decouple operators ---------------------------------------------

    def _tap(self, index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self._mode == "off":
                return None
            z = hidden_tensor(output)
            if z is None:
                raise TypeError(f"AmplificationProbe: operator {self.chain.names[index]!r} returned no tensor")
            if self.outputs[index] is not None:
                raise ValueError(
                    f"AmplificationProbe: operator {self.chain.names[index]!r} ran twice in one forward; "
                    "the chain must fire each operator once (OperatorChain.verify checks this)"
                )
            if self._mode == "graph":
                self.outputs[index] = z
                if z.requires_grad:
                    z.register_hook(self._message_hook(index))
                leaf = z.detach().requires_grad_(True)
                self._leaves[index] = leaf
                return replace_hidden_tensor(output, leaf)
            primal, tangent = fwAD.unpack_dual(z)
            self.outputs[index] = primal
            self.tangents[index] = tangent
            if self._mode == "linear":
                delta = self.deltas[index]
                if delta is not None:
                    tangent = delta if tangent is None else tangent + delta
                self.tangents[index] = tangent
                new = primal if tangent is None else fwAD.make_dual(primal, tangent)
                if new.requires_grad:
                    new.register_hook(self._message_hook(index))
                return replace_hidden_tensor(output, new)
            # "gains" (tangents v_i at the leaves) and "params" (no tangent at the leaves)
            leaf = primal.detach()
            if self._mode == "gains" and index < len(self.chain) - 1:
                leaf = fwAD.make_dual(leaf, self.v_in[index])
            return replace_hidden_tensor(output, leaf)

        return hook

    def _message_hook(self, index: int):
        def hook(grad: torch.Tensor) -> None:
            if self.sink is not None:
                self.sink[index] = grad

        return hook

    @contextlib.contextmanager
    def mode(self, mode: str) -> Iterator[None]:
        n = len(self.chain)
        self._mode = mode
        self.outputs = [None] * n
        self.tangents = [None] * n
        self._leaves = [None] * n
        try:
            yield
            missing = [name for name, z in zip(self.chain.names, self.outputs) if z is None]
            if missing:
                raise ValueError(f"AmplificationProbe: operators did not run on the probe batch: {missing}")
        finally:
            self._mode = "off"

    def attention(self) -> contextlib.AbstractContextManager[None]:
        return math_attention() if self.use_math_attention else contextlib.nullcontext()

    def replay_rng(self) -> None:
        if self.rng is not None:
            self.rng.restore()

    def with_forward_ad_retry(self, fn: Callable[[], Any]) -> Any:
        """``fn()``; when an attention kernel lacks forward-mode AD, once more on the math backend."""
        for attempt in range(2):
            try:
                with self.attention():
                    return fn()
            except (NotImplementedError, RuntimeError) as err:
                if attempt == 0 and is_forward_ad_gap(err) and not self.use_math_attention:
                    self.use_math_attention = True
                    self.note(_FORWARD_AD_NOTE)
                    continue
                raise
        raise AssertionError("unreachable")

    # -- passes --------------------------------------------------------------------------

    def graph_forward(self, batch: Any, step: int, forward: bool) -> Pass:
        """A decoupled forward with graph; δ applied when ``forward``."""
        self.replay_rng()
        self.injector.set_step(step)
        aliases, named = self.new_aliases()
        with self.injector.only(forward=forward, backward=True), self.mode("graph"), torch.enable_grad():
            loss = functional_call(self.wrapper, named, (batch,), tie_weights=False, strict=False)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0 or not loss.requires_grad:
            raise ValueError(
                "AmplificationProbe.loss_fn must return a scalar tensor that requires grad, got "
                f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}"
            )
        return Pass(loss=loss, outputs=list(self.outputs), leaves=list(self._leaves), aliases=aliases)

    def backward(self, p: Pass, eps: bool) -> Backward:
        """Chain the per-segment VJPs from the loss down: the true backward, split by operator."""
        n = len(self.chain)
        sink: list[torch.Tensor | None] = [None] * n
        self.sink = sink
        msgs: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
        input_grads: list[torch.Tensor | None] = [None] * n
        op_grads: list[list[torch.Tensor]] = [[] for _ in range(n)]
        others = [torch.zeros_like(o) for o in self.others]
        try:
            with self.injector.only(forward=True, backward=eps):
                res = torch.autograd.grad(p.loss, [p.leaves[-1], *self.others], retain_graph=True, allow_unused=True)
                g = res[0] if res[0] is not None else torch.zeros_like(p.leaves[-1])
                others = [o + r for o, r in zip(others, zeros_for(res[1:], self.others))]
                for i in reversed(range(n)):
                    inputs = ([p.leaves[i - 1]] if i > 0 else []) + p.aliases[i] + self.others
                    z = p.outputs[i]
                    if z.requires_grad:
                        res = zeros_for(
                            torch.autograd.grad(z, inputs, grad_outputs=g, retain_graph=True, allow_unused=True), inputs
                        )
                    else:
                        res = [torch.zeros_like(t) for t in inputs]
                    msgs[i] = sink[i] if sink[i] is not None else g
                    k = 1 if i > 0 else 0
                    op_grads[i] = res[k : k + len(p.aliases[i])]
                    others = [o + r for o, r in zip(others, res[k + len(p.aliases[i]) :])]
                    if i > 0:
                        input_grads[i] = res[0]
                        g = res[0]
        finally:
            self.sink = None
        return Backward(msgs=msgs, input_grads=input_grads, op_grads=op_grads, other_grads=others)

    def full_grads(self, bw: Backward) -> list[torch.Tensor]:
        """The real parameter gradient: tied parameters sum their operators' contributions."""
        return list(self.per_parameter(bw.op_grads).values()) + bw.other_grads

    def per_parameter(self, op_grads: Sequence[Sequence[torch.Tensor]]) -> dict[int, torch.Tensor]:
        """Per parameter (by identity), the sum of its operators' gradient contributions."""
        total: dict[int, torch.Tensor] = {}
        for params, grads in zip(self.alias_params, op_grads):
            for p, g in zip(params, grads):
                total[id(p)] = total[id(p)] + g if id(p) in total else g
        return total

    def forward_ad(self, batch: Any, mode: str, named: dict[str, torch.Tensor] | None = None) -> None:
        """A forward-mode pass (no graph) in ``mode``; retries with math attention once."""

        def run() -> None:
            self.replay_rng()
            with self.injector.only(forward=False, backward=False), torch.no_grad(), self.mode(mode):
                functional_call(self.wrapper, named or {}, (batch,), tie_weights=False, strict=False)

        self.with_forward_ad_retry(run)
