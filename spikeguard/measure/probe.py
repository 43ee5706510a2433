"""The amplification probe: clean versus perturbed passes on a fixed batch, next to Proposition 1.

On one probe batch the probe measures what a perturbation actually did (the observed
e_i, b_i, d_i and |Ĝ - G| of THEORY §1 for forward-only, backward-only and both
perturbations) and the per-operator constants that predict it (L_i, M_i, H_i, H'_i,
|g_i|, L_h), then puts the observation next to Proposition 1's bound and next to the
first-order (linearized) prediction.

How it works. Each operator's output is cut from the graph that follows it: the rest of
the model sees a fresh leaf instead of z_i. Every operator then owns a segment of graph
from its input leaf (and its own parameters) to its output, so that

- the true (coupled) backward is the chain of per-segment vector-Jacobian products, one
  ``torch.autograd.grad`` per operator, which also yields every gradient message g_i
  and each operator's own parameter-gradient contribution K_i^T g_i (tied weights such
  as GPT-2's ``lm_head``/``wte`` are split per operator through aliases);
- a single ``torch.autograd.grad`` over all segments computes J_i^T u_i (or K_i^T u_i)
  for every operator at once, which is what power iteration and the H terms need;
- a forward-mode AD pass whose leaves carry tangents v_i computes every J_i v_i at once.

Nothing here touches ``.grad``, the parameters, the optimizer or the global RNG: every
gradient is taken with ``torch.autograd.grad`` and every pass replays the RNG state the
probe started with, so dropout masks are identical across passes and two clean passes
differ by exactly zero.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

from spikeguard import theory
from spikeguard._tensor import diff_norm64, measurement, nan_ratio, norm64
from spikeguard.operators import OperatorChain, hidden_tensor, replace_hidden_tensor
from spikeguard.perturb.injector import BACKWARD, FORWARD, Injector

__all__ = ["AmplificationProbe", "ProbeResult", "Observed", "Constants", "CONFIGS"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]

#: The perturbation configurations a probe can observe.
CONFIGS = ("forward", "backward", "both")


# -- results ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    """One configuration's observation next to its predictions (float64 CPU tensors).

    Attributes:
        e, b, d: observed forward output error, gradient-message error and
            parameter-gradient error per operator (THEORY §1).
        total: observed |Ĝ - G| over all parameters.
        grad_norm: |G|, the clean gradient norm.
        m: the relative bias |Ĝ - G| / |G| (THEORY §3).
        delta, eps: the applied |δ_i| and |ε_i|.
        bound: Proposition 1's bound from the measured constants.
        linear: the first-order prediction (forward-mode AD through the clean pass), or
            None when it could not be computed (see ``ProbeResult.notes``).
    """

    e: torch.Tensor
    b: torch.Tensor
    d: torch.Tensor
    total: float
    grad_norm: float
    m: float
    delta: torch.Tensor
    eps: torch.Tensor
    bound: theory.PropagationBound
    linear: theory.PropagationBound | None

    @property
    def tightness(self) -> torch.Tensor:
        """Observed d_i over the bound's d_i per operator (nan where the bound is 0)."""
        return nan_ratio(self.d, self.bound.d)

    @property
    def total_tightness(self) -> float:
        """Observed |Ĝ - G| over the bound's."""
        return self.total / self.bound.total if self.bound.total > 0 else math.nan


@dataclass(frozen=True)
class Constants:
    """THEORY §1's per-operator constants, measured at the clean point (first-order estimates).

    Besides the symbols of THEORY §1 (L_i, M_i, H_i, H'_i, |g_i|, L_h), ``output_norms``
    holds |z_i|, so that a relative perturbation size u (|δ_i| = u |z_i|) converts to
    the absolute size Proposition 1 takes.

    ``gains[0]`` is nan: the first operator's input is the data, whose error e_0 is 0, so
    L_1 never enters Proposition 1.
    """

    gains: torch.Tensor
    param_gains: torch.Tensor
    jac_smoothness: torch.Tensor
    param_jac_smoothness: torch.Tensor
    grad_msg_norms: torch.Tensor
    output_norms: torch.Tensor
    loss_curvature: float
    power_iterations: int
    converged: bool

    def theory_kwargs(self) -> dict[str, Any]:
        """The constants as keyword arguments of :func:`theory.propagate` / :func:`theory.amplification`."""
        return dict(
            gains=torch.nan_to_num(self.gains, nan=0.0),
            param_gains=self.param_gains,
            loss_curvature=self.loss_curvature,
            jac_smoothness=self.jac_smoothness,
            param_jac_smoothness=self.param_jac_smoothness,
            grad_msg_norms=self.grad_msg_norms,
        )


@dataclass(frozen=True)
class ProbeResult:
    """Everything one probe measured; ``observed[config]`` for each configuration run."""

    step: int
    names: tuple[str, ...]
    observed: dict[str, Observed]
    constants: Constants
    amplification: theory.Amplification
    notes: tuple[str, ...] = ()
    seconds: float = 0.0

    def table(self, config: str = "both") -> str:
        """Observed versus predicted per operator, as a fixed-width text table."""
        obs = self.observed[config]
        lin = obs.linear
        head = (
            f"{'operator':<24}{'L_i':>8}{'M_i':>9}{'e obs':>10}{'e bound':>10}{'e lin':>10}"
            f"{'d obs':>10}{'d bound':>10}{'d lin':>10}{'A^f':>9}{'A^b':>9}"
        )
        rows = [head]
        for i, name in enumerate(self.names):
            c = self.constants
            rows.append(
                f"{name:<24}{_fmt(c.gains[i], 8)}{_fmt(c.param_gains[i], 9)}"
                f"{_fmt(obs.e[i], 10)}{_fmt(obs.bound.e[i], 10)}{_fmt(lin.e[i] if lin else math.nan, 10)}"
                f"{_fmt(obs.d[i], 10)}{_fmt(obs.bound.d[i], 10)}{_fmt(lin.d[i] if lin else math.nan, 10)}"
                f"{_fmt(self.amplification.forward[i], 9)}{_fmt(self.amplification.backward[i], 9)}"
            )
        lin_total = f"{lin.total:.4g}" if lin else "n/a"
        rows.append(
            f"|G-Ĝ| observed {obs.total:.4g}, bound {obs.bound.total:.4g}, linear {lin_total}; "
            f"m = {obs.m:.4g}"
        )
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plain Python (floats and lists)."""
        c = self.constants
        out: dict[str, Any] = {
            "step": self.step,
            "names": list(self.names),
            "notes": list(self.notes),
            "seconds": self.seconds,
            "constants": {
                "gains": c.gains.tolist(),
                "param_gains": c.param_gains.tolist(),
                "jac_smoothness": c.jac_smoothness.tolist(),
                "param_jac_smoothness": c.param_jac_smoothness.tolist(),
                "grad_msg_norms": c.grad_msg_norms.tolist(),
                "output_norms": c.output_norms.tolist(),
                "loss_curvature": c.loss_curvature,
                "power_iterations": c.power_iterations,
                "converged": c.converged,
            },
            "amplification": {
                "forward": self.amplification.forward.tolist(),
                "backward": self.amplification.backward.tolist(),
            },
            "observed": {},
        }
        for config, obs in self.observed.items():
            out["observed"][config] = {
                "e": obs.e.tolist(), "b": obs.b.tolist(), "d": obs.d.tolist(),
                "total": obs.total, "grad_norm": obs.grad_norm, "m": obs.m,
                "delta": obs.delta.tolist(), "eps": obs.eps.tolist(),
                "bound": {"e": obs.bound.e.tolist(), "b": obs.bound.b.tolist(),
                          "d": obs.bound.d.tolist(), "total": obs.bound.total},
                "linear": None if obs.linear is None else {
                    "e": obs.linear.e.tolist(), "b": obs.linear.b.tolist(),
                    "d": obs.linear.d.tolist(), "total": obs.linear.total},
                "tightness": obs.tightness.tolist(),
            }
        return out


def _fmt(x: Any, width: int) -> str:
    return f"{float(x):>{width}.3g}"


# -- internals -------------------------------------------------------------------------


class _LossModule(nn.Module):
    """Wraps (model, loss_fn) so that ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


@dataclass
class _Pass:
    """One decoupled forward: outputs z_i (graph-attached), the leaves that replaced them."""

    loss: torch.Tensor
    outputs: list[torch.Tensor]
    leaves: list[torch.Tensor]
    aliases: list[list[torch.Tensor]]  # per operator, its parameters' aliases


@dataclass
class _Backward:
    """One chained backward through a _Pass."""

    msgs: list[torch.Tensor]  # ĝ_i at each operator's output (ε_i included)
    input_grads: list[torch.Tensor | None]  # J_i^T ĝ_i at operator i's input leaf
    op_grads: list[list[torch.Tensor]]  # K_i^T ĝ_i per alias of operator i
    other_grads: list[torch.Tensor]  # parameters owned by no operator


def _zeros_for(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like)]


def _unit(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    n = norm64(tensors)
    return ([t / n for t in tensors] if n > 0 else tensors), n


def _is_forward_ad_gap(err: BaseException) -> bool:
    """True for torch's errors about an op (or custom Function) without forward-mode AD."""
    text = str(err).lower()
    return isinstance(err, (NotImplementedError, RuntimeError)) and any(
        key in text for key in ("forward ad", "forward mode ad", "forward-mode ad")
    )


class AmplificationProbe:
    """Observed versus predicted propagation of perturbations on a fixed probe batch.

    Args:
        model: the model being trained (its mode, train or eval, is used as is).
        chain: its operators.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``, e.g.
            ``lambda m, b: m(**b).loss`` for a Hugging Face model.
        injector: the perturbations to probe with; the probe's own instance (it is
            attached, stepped and detached by the probe). Its schedules are evaluated at
            ``run(step=...)``; use ``Always`` schedules for a steady probe.
        power_iterations: power-iteration steps for L_i and M_i per probe, warm-started
            from the previous probe's vectors.
        first_power_iterations: steps on the first probe (cold start).
        tol: power iteration stops early once every operator's estimate changed by less
            than this fraction; ``Constants.converged`` says whether that happened.
        loss_curvature: L_h. ``"measure"`` (default) runs Hessian-vector power iteration
            on the loss in z_N at the clean point; a float uses that value (for softmax
            cross-entropy see :func:`theory.cross_entropy_curvature`).
        configs: which of ``"forward"``, ``"backward"``, ``"both"`` to observe.
        linearize: also compute the first-order prediction (one more forward-mode pass
            and one double backward).
        seed: for the random starting vectors of power iteration.

    Cost (a forward F, a backward B ≈ 2F): the observed configurations share two
    forwards and take one backward each plus the clean one; the H terms one batched B;
    each power-iteration step one forward-mode pass and one batched B for L and again
    for M; the linearized prediction one forward-mode pass and one double backward.
    ``benchmarks/probe_cost.py`` measures it in training-step equivalents.
    """

    def __init__(
        self,
        model: nn.Module,
        chain: OperatorChain,
        loss_fn: LossFn,
        injector: Injector,
        *,
        power_iterations: int = 1,
        first_power_iterations: int = 10,
        tol: float = 1e-2,
        loss_curvature: str | float = "measure",
        configs: Sequence[str] = CONFIGS,
        linearize: bool = True,
        seed: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"AmplificationProbe.model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(chain, OperatorChain):
            raise TypeError(f"AmplificationProbe.chain must be an OperatorChain, got {type(chain).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"AmplificationProbe.loss_fn must be callable (model, batch) -> loss, got {loss_fn!r}")
        if not isinstance(injector, Injector):
            raise TypeError(f"AmplificationProbe.injector must be an Injector, got {type(injector).__name__}")
        if injector.chain.names != chain.names:
            raise ValueError(
                "AmplificationProbe.injector was built on another chain: "
                f"{injector.chain.names} != {chain.names}"
            )
        for key, value in (("power_iterations", power_iterations), ("first_power_iterations", first_power_iterations)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AmplificationProbe.{key} must be an int >= 1, got {value!r}")
        if not isinstance(tol, (int, float)) or not tol > 0:
            raise ValueError(f"AmplificationProbe.tol must be > 0, got {tol!r}")
        if loss_curvature != "measure" and not (
            isinstance(loss_curvature, (int, float)) and not isinstance(loss_curvature, bool) and loss_curvature >= 0
        ):
            raise ValueError(
                f"AmplificationProbe.loss_curvature must be 'measure' or a number >= 0, got {loss_curvature!r}"
            )
        configs = tuple(configs)
        bad = [c for c in configs if c not in CONFIGS]
        if bad or not configs:
            raise ValueError(f"AmplificationProbe.configs must be a non-empty subset of {list(CONFIGS)}, got {list(configs)}")
        self.model = model
        self.chain = chain
        self.injector = injector
        self.power_iterations = power_iterations
        self.first_power_iterations = first_power_iterations
        self.tol = float(tol)
        self.loss_curvature = loss_curvature
        self.configs = configs
        self.linearize = linearize
        self.seed = seed

        self._wrapper = _LossModule(model, loss_fn)
        self._alias_names, self._alias_params = self._operator_parameters()
        owned = {id(p) for params in self._alias_params for p in params}
        self._others = [p for p in model.parameters() if p.requires_grad and id(p) not in owned]
        self._v: list[torch.Tensor] | None = None  # warm start for L_i
        self._V: list[list[torch.Tensor]] | None = None  # warm start for M_i
        self._math_attention = False
        self._notes: list[str] = []
        # Per-forward state of the tap hooks.
        self._mode = "off"
        self._outputs: list[Any] = []
        self._tangents: list[torch.Tensor | None] = []
        self._leaves: list[torch.Tensor | None] = []
        self._sink: list[torch.Tensor | None] | None = None
        self._v_in: list[torch.Tensor] = []
        self._deltas: list[torch.Tensor | None] = []

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
                    full = ".".join(x for x in ("model", prefix, pname) if x)
                    op_names.append(full)
                    op_params.append(p)
            names.append(op_names)
            params.append(op_params)
        return names, params

    # -- the tap: hooks that decouple operators ---------------------------------------------

    def _tap(self, index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self._mode == "off":
                return None
            z = hidden_tensor(output)
            if z is None:
                raise TypeError(f"AmplificationProbe: operator {self.chain.names[index]!r} returned no tensor")
            if self._outputs[index] is not None:
                raise ValueError(
                    f"AmplificationProbe: operator {self.chain.names[index]!r} ran twice in one forward; "
                    "the chain must fire each operator once (OperatorChain.verify checks this)"
                )
            if self._mode == "graph":
                self._outputs[index] = z
                if z.requires_grad:
                    z.register_hook(self._message_hook(index))
                leaf = z.detach().requires_grad_(True)
                self._leaves[index] = leaf
                return replace_hidden_tensor(output, leaf)
            primal, tangent = fwAD.unpack_dual(z)
            self._outputs[index] = primal
            self._tangents[index] = tangent
            if self._mode == "linear":
                delta = self._deltas[index]
                if delta is not None:
                    tangent = delta if tangent is None else tangent + delta
                self._tangents[index] = tangent
                new = primal if tangent is None else fwAD.make_dual(primal, tangent)
                if new.requires_grad:
                    new.register_hook(self._message_hook(index))
                return replace_hidden_tensor(output, new)
            # "gains" (tangents v_i at the leaves) and "params" (no tangent at the leaves)
            leaf = primal.detach()
            if self._mode == "gains" and index < len(self.chain) - 1:
                leaf = fwAD.make_dual(leaf, self._v_in[index])
            return replace_hidden_tensor(output, leaf)

        return hook

    def _message_hook(self, index: int):
        def hook(grad: torch.Tensor) -> None:
            if self._sink is not None:
                self._sink[index] = grad

        return hook

    @contextlib.contextmanager
    def _forward_mode(self, mode: str):
        n = len(self.chain)
        self._mode = mode
        self._outputs = [None] * n
        self._tangents = [None] * n
        self._leaves = [None] * n
        try:
            yield
            missing = [name for name, z in zip(self.chain.names, self._outputs) if z is None]
            if missing:
                raise ValueError(f"AmplificationProbe: operators did not run on the probe batch: {missing}")
        finally:
            self._mode = "off"

    def _attention_context(self):
        if not self._math_attention:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])

    def _replay_rng(self) -> None:
        torch.set_rng_state(self._rng_cpu)
        if self._rng_cuda is not None:
            torch.cuda.set_rng_state_all(self._rng_cuda)

    # -- passes --------------------------------------------------------------------------

    def _graph_forward(self, batch: Any, step: int, forward: bool) -> _Pass:
        """A decoupled forward with graph; δ applied when ``forward``."""
        self._replay_rng()
        self.injector.set_step(step)
        aliases = [[p.view_as(p) for p in params] for params in self._alias_params]
        named = {n: a for names, al in zip(self._alias_names, aliases) for n, a in zip(names, al)}
        with self.injector.only(forward=forward, backward=True), self._forward_mode("graph"), torch.enable_grad():
            loss = functional_call(self._wrapper, named, (batch,), tie_weights=False, strict=False)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0 or not loss.requires_grad:
            raise ValueError(
                "AmplificationProbe.loss_fn must return a scalar tensor that requires grad, got "
                f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}"
            )
        return _Pass(loss=loss, outputs=list(self._outputs), leaves=list(self._leaves), aliases=aliases)

    def _backward(self, p: _Pass, eps: bool) -> _Backward:
        """Chain the per-segment VJPs from the loss down: the true backward, split by operator."""
        n = len(self.chain)
        sink: list[torch.Tensor | None] = [None] * n
        self._sink = sink
        msgs: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
        input_grads: list[torch.Tensor | None] = [None] * n
        op_grads: list[list[torch.Tensor]] = [[] for _ in range(n)]
        others = [torch.zeros_like(o) for o in self._others]
        try:
            with self.injector.only(forward=True, backward=eps):
                res = torch.autograd.grad(
                    p.loss, [p.leaves[-1], *self._others], retain_graph=True, allow_unused=True
                )
                g = res[0] if res[0] is not None else torch.zeros_like(p.leaves[-1])
                others = [o + r for o, r in zip(others, _zeros_for(res[1:], self._others))]
                for i in reversed(range(n)):
                    inputs = ([p.leaves[i - 1]] if i > 0 else []) + p.aliases[i] + self._others
                    z = p.outputs[i]
                    if z.requires_grad:
                        res = torch.autograd.grad(z, inputs, grad_outputs=g, retain_graph=True, allow_unused=True)
                        res = _zeros_for(res, inputs)
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
            self._sink = None
        return _Backward(msgs=msgs, input_grads=input_grads, op_grads=op_grads, other_grads=others)

    def _full_grads(self, bw: _Backward) -> list[torch.Tensor]:
        """The real parameter gradient: tied parameters sum their operators' contributions."""
        total: dict[int, torch.Tensor] = {}
        for params, grads in zip(self._alias_params, bw.op_grads):
            for p, g in zip(params, grads):
                total[id(p)] = total[id(p)] + g if id(p) in total else g
        return list(total.values()) + bw.other_grads

    def _forward_ad(self, batch: Any, mode: str, named: dict[str, torch.Tensor] | None = None) -> None:
        """A forward-mode pass (no graph) in ``mode``; retries with math attention once."""
        for attempt in range(2):
            self._replay_rng()
            try:
                with (
                    self.injector.only(forward=False, backward=False),
                    self._attention_context(),
                    torch.no_grad(),
                    self._forward_mode(mode),
                ):
                    functional_call(self._wrapper, named or {}, (batch,), tie_weights=False, strict=False)
                return
            except (NotImplementedError, RuntimeError) as err:
                if attempt == 0 and _is_forward_ad_gap(err) and not self._math_attention:
                    self._math_attention = True
                    self._note("an attention kernel has no forward-mode AD: probe passes use the math SDPA backend")
                    continue
                raise

    def _note(self, text: str) -> None:
        if text not in self._notes:
            self._notes.append(text)

    # -- constants -----------------------------------------------------------------------

    def _power_gains(self, batch: Any, clean: _Pass, iterations: int) -> tuple[torch.Tensor, int, bool]:
        """L_i = |J_i|: power iteration on J_i^T J_i for operators 2..N (input: the previous leaf)."""
        n = len(self.chain)
        sigma = torch.full((n,), math.nan, dtype=torch.float64)
        if n < 2:
            return sigma, 0, True
        groups = [[leaf] for leaf in clean.leaves[:-1]]

        def forward_jvp(vectors):
            self._v_in = [v[0] for v in vectors]
            with fwAD.dual_level():
                self._forward_ad(batch, "gains")
                return list(self._tangents[1:])

        est, self._v, done, converged = self._power_iteration(
            groups, clean.outputs[1:], self._v, forward_jvp, iterations, self.seed, "L_i"
        )
        sigma[1:] = est
        return sigma, done, converged

    def _power_param_gains(self, batch: Any, clean: _Pass, iterations: int) -> tuple[torch.Tensor, int, bool]:
        """M_i = |K_i|: power iteration on K_i^T K_i over operator i's own parameters."""

        def forward_jvp(vectors):
            with fwAD.dual_level():
                named = {
                    name: fwAD.make_dual(p.detach(), v)
                    for names, params, vs in zip(self._alias_names, self._alias_params, vectors)
                    for name, p, v in zip(names, params, vs)
                }
                self._forward_ad(batch, "params", named)
                return list(self._tangents)

        est, self._V, done, converged = self._power_iteration(
            clean.aliases, clean.outputs, self._V, forward_jvp, iterations, self.seed + 1, "M_i"
        )
        return est, done, converged

    def _power_iteration(self, groups, outputs, vectors, forward_jvp, iterations, seed, symbol):
        """Top singular value of each map ``inputs of group i -> outputs[i]`` at once.

        Each step: u_i = J_i v_i (forward-mode AD, or the double-VJP trick where an op has
        no forward-mode formula), w_i = J_i^T u_i (one batched VJP: the segments are
        disjoint), σ_i ≈ sqrt(|w_i|) for unit v_i (a lower bound that converges to the top
        singular value), v_i <- w_i / |w_i|. Warm-started from ``vectors``.
        """
        shapes = [[t.shape for t in g] for g in groups]
        if vectors is None or [[v.shape for v in vs] for vs in vectors] != shapes:
            device = next((t.device for g in groups for t in g), torch.device("cpu"))
            gen = torch.Generator(device=device).manual_seed(seed)
            vectors = [
                _unit([torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype) for t in g])[0]
                for g in groups
            ]
        flat_inputs = [t for g in groups for t in g]
        est = torch.full((len(groups),), math.nan, dtype=torch.float64)
        prev, converged, done = None, False, 0
        double_vjp = None
        for it in range(iterations):
            jv = None
            if double_vjp is None:
                try:
                    jv = forward_jvp(vectors)
                except (NotImplementedError, RuntimeError) as err:
                    if not _is_forward_ad_gap(err):
                        raise
                    self._note(f"{symbol}: an operator has no forward-mode AD, J v by the double-VJP trick")
                    double_vjp = self._double_vjp(groups, outputs)
                    if double_vjp is False:
                        self._note(f"{symbol} not measured: neither forward-mode AD nor double backward works")
                        return est, vectors, done, False
            if jv is None:
                jv = double_vjp(vectors)
            jv = [torch.zeros_like(o) if t is None else t.detach() for t, o in zip(jv, outputs)]
            with self.injector.only(forward=False, backward=False):
                w = torch.autograd.grad(outputs, flat_inputs, grad_outputs=jv, retain_graph=True, allow_unused=True)
            w = _zeros_for(w, flat_inputs)
            pos = 0
            new_est = torch.zeros(len(groups), dtype=torch.float64)
            for i, g in enumerate(groups):
                wi = list(w[pos : pos + len(g)])
                pos += len(g)
                unit, size = _unit(wi)
                new_est[i] = math.sqrt(size)
                if size > 0:
                    vectors[i] = unit
            est, done = new_est, it + 1
            if prev is not None and bool(((est - prev).abs() <= self.tol * prev.abs().clamp_min(1e-30)).all()):
                converged = True
                break
            prev = est
        return est, vectors, done, converged

    def _double_vjp(self, groups, outputs):
        """J v = ∂/∂u <J^T u, v>: a JVP from two reverse passes (needs double backward)."""
        flat_inputs = [t for g in groups for t in g]
        us = [torch.zeros_like(o).requires_grad_(True) for o in outputs]
        try:
            with self.injector.only(forward=False, backward=False):
                wt = torch.autograd.grad(outputs, flat_inputs, grad_outputs=us, create_graph=True, allow_unused=True)
        except RuntimeError:
            return False
        keep = [i for i, w in enumerate(wt) if w is not None and w.requires_grad]

        def jvp(vectors):
            flat_v = [v for vs in vectors for v in vs]
            return list(
                torch.autograd.grad(
                    [wt[i] for i in keep], us, grad_outputs=[flat_v[i] for i in keep],
                    retain_graph=True, allow_unused=True,
                )
            )

        return jvp

    def _measure_loss_curvature(self, clean: _Pass, iterations: int = 20) -> float:
        """L_h: the top eigenvalue of ∇²h in z_N at the clean point, by HVP power iteration."""
        leaf = clean.leaves[-1]
        (g,) = torch.autograd.grad(clean.loss, leaf, create_graph=True)
        gen = torch.Generator(device=leaf.device).manual_seed(self.seed + 2)
        v = torch.randn(leaf.shape, generator=gen, device=leaf.device, dtype=leaf.dtype)
        v = v / v.norm()
        lam = 0.0
        for _ in range(iterations):
            (hv,) = torch.autograd.grad(g, leaf, grad_outputs=v, retain_graph=True, allow_unused=True)
            if hv is None:
                return 0.0
            new = float((v * hv).sum())
            size = hv.norm()
            if size == 0:
                return 0.0
            v = hv / size
            if abs(new - lam) <= 1e-4 * abs(new):
                return max(new, 0.0)
            lam = new
        return max(lam, 0.0)

    # -- the probe -----------------------------------------------------------------------

    def run(self, batch: Any, step: int = 0) -> ProbeResult:
        """Probe ``batch`` with the injector's perturbations at schedule step ``step``."""
        if self.injector.attached:
            raise ValueError(
                "AmplificationProbe needs its own Injector: this one is attached elsewhere "
                "(build a second Injector with the same perturbations for the probe)"
            )
        start = time.perf_counter()
        self._notes = [n for n in self._notes if "math SDPA" in n]
        n = len(self.chain)
        devices = [p.device for p in self.model.parameters()][:1]
        cuda = [d for d in devices if d.type == "cuda"]
        with torch.random.fork_rng(devices=cuda, enabled=True):
            self._rng_cpu = torch.get_rng_state()
            self._rng_cuda = torch.cuda.get_rng_state_all() if cuda else None
            # The injector first: the tap must see (and cut after) the perturbed output.
            self.injector.attach()
            handles = [op.module.register_forward_hook(self._tap(i)) for i, op in enumerate(self.chain)]
            try:
                # Training-time hooks (statistics, other Injectors) sit these passes out.
                with measurement(self.injector):
                    result = self._run(batch, step)
            finally:
                for h in handles:
                    h.remove()
                self.injector.detach()
                self.injector.keep_deltas = False
                self.injector.deltas.clear()
                self._outputs, self._tangents, self._leaves, self._deltas = [], [], [], []
        return ProbeResult(
            step=step, names=tuple(self.chain.names), observed=result[0], constants=result[1],
            amplification=result[2], notes=tuple(self._notes), seconds=time.perf_counter() - start,
        )

    def _run(self, batch: Any, step: int):
        n = len(self.chain)
        want_bwd = any(c in ("backward", "both") for c in self.configs)
        want_fwd = any(c in ("forward", "both") for c in self.configs)

        clean = self._graph_forward(batch, step, forward=False)
        c_bw = self._backward(clean, eps=False)
        G = self._full_grads(c_bw)
        g_norm = norm64(G)
        zeros = torch.zeros(n, dtype=torch.float64)

        def applied(direction: str) -> torch.Tensor:
            norms = self.injector.applied_norms(direction)
            return torch.tensor([float(norms.get(name, 0.0)) for name in self.chain.names], dtype=torch.float64)

        backs: dict[str, tuple[_Pass, _Backward, torch.Tensor, torch.Tensor]] = {}
        if want_bwd:
            bw = self._backward(clean, eps=True)
            backs["backward"] = (clean, bw, zeros, applied(BACKWARD))
        pert = None
        if want_fwd:
            self.injector.keep_deltas = self.linearize
            pert = self._graph_forward(batch, step, forward=True)
            delta = applied(FORWARD)
            self._deltas = [self.injector.deltas.get((name, FORWARD)) for name in self.chain.names]
            fw = self._backward(pert, eps=False)
            backs["forward"] = (pert, fw, delta, zeros)
            if "both" in self.configs:
                bw2 = self._backward(pert, eps=True)
                backs["both"] = (pert, bw2, delta, applied(BACKWARD))

        # -- constants at the clean point
        grad_msg = torch.tensor([norm64([m]) for m in c_bw.msgs], dtype=torch.float64)
        out_norms = torch.tensor([norm64([z]) for z in clean.outputs], dtype=torch.float64)
        iterations = self.first_power_iterations if self._v is None and self._V is None else self.power_iterations
        L, it_l, conv_l = self._power_gains(batch, clean, iterations)
        M, it_m, conv_m = self._power_param_gains(batch, clean, iterations)
        L_h = self._measure_loss_curvature(clean) if self.loss_curvature == "measure" else float(self.loss_curvature)
        H = torch.zeros(n, dtype=torch.float64)
        Hp = torch.zeros(n, dtype=torch.float64)
        e_fwd = zeros
        if pert is not None:
            e_fwd = torch.tensor(
                [norm64([a - b]) for a, b in zip(pert.outputs, clean.outputs)], dtype=torch.float64
            )
            H, Hp = self._smoothness(pert, c_bw, e_fwd)
        constants = Constants(
            gains=L, param_gains=M, jac_smoothness=H, param_jac_smoothness=Hp,
            grad_msg_norms=grad_msg, output_norms=out_norms, loss_curvature=L_h,
            power_iterations=max(it_l, it_m), converged=conv_l and conv_m,
        )
        kw = constants.theory_kwargs()
        amp = theory.amplification(**kw)

        linear_fwd = None
        if self.linearize and pert is not None:
            linear_fwd = self._linearize(batch, step)

        observed: dict[str, Observed] = {}
        for config in self.configs:
            p, bw, delta, eps = backs[config]
            e = e_fwd if config != "backward" else zeros
            b = torch.tensor([norm64([x - y]) for x, y in zip(bw.msgs, c_bw.msgs)], dtype=torch.float64)
            d = torch.tensor(
                [diff_norm64(x, y) for x, y in zip(bw.op_grads, c_bw.op_grads)], dtype=torch.float64
            )
            total = diff_norm64(self._full_grads(bw), G)
            bound = theory.propagate(forward=delta, backward=eps, **kw)
            observed[config] = Observed(
                e=e, b=b, d=d, total=total, grad_norm=g_norm,
                m=total / g_norm if g_norm > 0 else math.inf,
                delta=delta, eps=eps, bound=bound,
                linear=self._linear_for(config, linear_fwd, backs, c_bw),
            )
        return observed, constants, amp

    def _smoothness(self, pert: _Pass, clean_bw: _Backward, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """H_i, H'_i by finite difference along the observed forward error (THEORY §1 table):
        ``|(Ĵ_i - J_i)^T g_i| / e_{i-1}`` and ``|(K̂_i - K_i)^T g_i| / e_{i-1}``."""
        n = len(self.chain)
        outputs, inputs, slots = [], [], []
        for i in range(n):
            if pert.outputs[i].requires_grad:
                outputs.append(pert.outputs[i])
        grad_outputs = [clean_bw.msgs[i] for i in range(n) if pert.outputs[i].requires_grad]
        for i in range(n):
            slots.append(len(inputs))
            inputs.extend(([pert.leaves[i - 1]] if i > 0 else []) + pert.aliases[i])
        with self.injector.only(forward=False, backward=False):
            res = torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs, retain_graph=True, allow_unused=True)
        res = _zeros_for(res, inputs)
        H = torch.zeros(n, dtype=torch.float64)
        Hp = torch.zeros(n, dtype=torch.float64)
        for i in range(1, n):
            e_in = float(e[i - 1])
            if e_in <= 0:
                continue
            k = slots[i]
            H[i] = norm64([res[k] - clean_bw.input_grads[i]]) / e_in
            Hp[i] = diff_norm64(res[k + 1 : k + 1 + len(pert.aliases[i])], clean_bw.op_grads[i]) / e_in
        return H, Hp

    def _linearize(self, batch: Any, step: int) -> dict[str, Any] | None:
        """First-order change of (z_i, g_i, K_i^T g_i) along the applied δ: forward-over-reverse AD."""
        if all(d is None for d in self._deltas):
            return None
        n = len(self.chain)
        for attempt in range(2):
            self._replay_rng()
            sink: list[torch.Tensor | None] = [None] * n
            try:
                with fwAD.dual_level():
                    aliases = [[p.view_as(p) for p in params] for params in self._alias_params]
                    named = {nm: a for names, al in zip(self._alias_names, aliases) for nm, a in zip(names, al)}
                    with (
                        self.injector.only(forward=False, backward=False),
                        self._attention_context(),
                        self._forward_mode("linear"),
                        torch.enable_grad(),
                    ):
                        loss = functional_call(self._wrapper, named, (batch,), tie_weights=False, strict=False)
                        dz = list(self._tangents)
                    flat = [a for al in aliases for a in al]
                    self._sink = sink
                    try:
                        with self.injector.only(forward=False, backward=False):
                            grads = torch.autograd.grad(loss, flat, create_graph=True, allow_unused=True)
                    finally:
                        self._sink = None
                    dmsg = [None if s is None else fwAD.unpack_dual(s).tangent for s in sink]
                    dgrad = [None if g is None else fwAD.unpack_dual(g).tangent for g in grads]
                break
            except (NotImplementedError, RuntimeError) as err:
                if attempt == 0 and _is_forward_ad_gap(err) and not self._math_attention:
                    self._math_attention = True
                    self._note("an attention kernel has no forward-mode AD: probe passes use the math SDPA backend")
                    continue
                if _is_forward_ad_gap(err):
                    self._note(f"linearized prediction unavailable: {str(err).splitlines()[0]}")
                    return None
                raise
        zero_like = lambda t, ref: torch.zeros_like(ref) if t is None else t.detach()  # noqa: E731
        dz = [zero_like(t, o) for t, o in zip(dz, self._outputs)]
        dmsg = [None if t is None else t.detach() for t in dmsg]
        out_grads, pos = [], 0
        for params in self._alias_params:
            out_grads.append([zero_like(t, p) for t, p in zip(dgrad[pos : pos + len(params)], params)])
            pos += len(params)
        return {"dz": dz, "dmsg": dmsg, "dgrad": out_grads}

    def _linear_for(
        self, config: str, lin: dict[str, Any] | None, backs: dict, clean_bw: _Backward
    ) -> theory.PropagationBound | None:
        """Assemble the first-order prediction of a configuration.

        ε enters the backward linearly for a fixed forward, so the backward-only
        observation *is* its first-order term; δ's term comes from forward-over-reverse AD.
        """
        n = len(self.chain)
        parts_msg: list[list[torch.Tensor]] = [[] for _ in range(n)]
        parts_grad: list[list[list[torch.Tensor]]] = [[] for _ in range(n)]
        e = torch.zeros(n, dtype=torch.float64)
        if config in ("forward", "both"):
            if lin is None:
                return None
            e = torch.tensor([norm64([t]) for t in lin["dz"]], dtype=torch.float64)
            for i in range(n):
                if lin["dmsg"][i] is not None:
                    parts_msg[i].append(lin["dmsg"][i])
                parts_grad[i].append(lin["dgrad"][i])
        if config in ("backward", "both"):
            if "backward" not in backs:
                return None
            _, bw, _, _ = backs["backward"]
            for i in range(n):
                parts_msg[i].append(bw.msgs[i] - clean_bw.msgs[i])
                parts_grad[i].append([x - y for x, y in zip(bw.op_grads[i], clean_bw.op_grads[i])])
        b = torch.tensor([norm64([sum(ps)]) if ps else 0.0 for ps in parts_msg], dtype=torch.float64)
        per_op = [[sum(t) for t in zip(*ps)] if ps else [] for ps in parts_grad]
        d = torch.tensor([norm64(g) for g in per_op], dtype=torch.float64)
        total: dict[int, torch.Tensor] = {}
        for params, grads in zip(self._alias_params, per_op):
            for p, g in zip(params, grads):
                total[id(p)] = total[id(p)] + g if id(p) in total else g
        return theory.PropagationBound(e=e, b=b, d=d, total=norm64(list(total.values())))
