"""The amplification probe: clean versus perturbed passes on a fixed batch, next to Proposition 1.

On one probe batch the probe measures what a perturbation actually did (the observed
e_i, b_i, d_i and |Ĝ - G| of THEORY §1 for forward-only, backward-only and both
perturbations) and the per-operator constants that predict it (L_i, M_i, H_i, H'_i,
|g_i|, L_h), then puts the observation next to Proposition 1's bound and next to the
first-order (linearized) prediction. The passes are those of
:mod:`spikeguard.measure.decoupled`; the results are the data classes of
:mod:`spikeguard.measure.results`.

Nothing here touches ``.grad``, the parameters, the optimizer or the global RNG: every
gradient is taken with ``torch.autograd.grad``, every pass replays the RNG state the
probe started with, and the passes run as a measurement (:mod:`spikeguard.passes`):
training-time statistics and other Injectors sit them out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

from spikeguard import passes, theory
from spikeguard._tensor import RngState, diff_norm64, norm64
from spikeguard.measure.decoupled import Backward, Decoupled, LossFn, Pass, is_forward_ad_gap, zeros_for
from spikeguard.measure.linalg import Vectors, power_iteration
from spikeguard.measure.results import CONFIGS, Constants, Observed, ProbeResult
from spikeguard.operators import OperatorChain
from spikeguard.perturb.injector import BACKWARD, FORWARD, Injector

__all__ = ["AmplificationProbe", "ProbeResult", "Observed", "Constants", "CONFIGS"]


class _Unmeasurable(Exception):
    """A constant cannot be measured: neither forward-mode AD nor double backward works."""


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
        self._notes: list[str] = []
        self.passes = Decoupled(model, chain, loss_fn, injector, self._note)
        self._v: list[Vectors] | None = None  # warm start for L_i
        self._V: list[Vectors] | None = None  # warm start for M_i

    def _note(self, text: str) -> None:
        if text not in self._notes:
            self._notes.append(text)

    # -- constants -----------------------------------------------------------------------

    def _power_gains(self, batch: Any, clean: Pass, iterations: int) -> tuple[torch.Tensor, int, bool]:
        """L_i = |J_i|: power iteration on J_i^T J_i for operators 2..N (input: the previous leaf)."""
        n = len(self.chain)
        sigma = torch.full((n,), math.nan, dtype=torch.float64)
        if n < 2:
            return sigma, 0, True
        groups = [[leaf] for leaf in clean.leaves[:-1]]
        d = self.passes

        def forward_jvp(vectors: list[Vectors]) -> list[torch.Tensor | None]:
            d.v_in = [v[0] for v in vectors]
            with fwAD.dual_level():
                d.forward_ad(batch, "gains")
                return list(d.tangents[1:])

        est, self._v, done, converged = self._gram_top(groups, clean.outputs[1:], self._v, forward_jvp, iterations, self.seed, "L_i")
        sigma[1:] = est
        return sigma, done, converged

    def _power_param_gains(self, batch: Any, clean: Pass, iterations: int) -> tuple[torch.Tensor, int, bool]:
        """M_i = |K_i|: power iteration on K_i^T K_i over operator i's own parameters."""
        d = self.passes

        def forward_jvp(vectors: list[Vectors]) -> list[torch.Tensor | None]:
            with fwAD.dual_level():
                named = {
                    name: fwAD.make_dual(p.detach(), v)
                    for names, params, vs in zip(d.alias_names, d.alias_params, vectors)
                    for name, p, v in zip(names, params, vs)
                }
                d.forward_ad(batch, "params", named)
                return list(d.tangents)

        est, self._V, done, converged = self._gram_top(clean.aliases, clean.outputs, self._V, forward_jvp, iterations, self.seed + 1, "M_i")
        return est, done, converged

    def _gram_top(self, groups, outputs, vectors, forward_jvp, iterations, seed, symbol):
        """Top singular value σ_i of each map ``inputs of group i -> outputs[i]``, all at once.

        :func:`~spikeguard.measure.linalg.power_iteration` on ``J_i^T J_i``: u_i = J_i v_i
        (forward-mode AD, or the double-VJP trick where an op has no forward-mode formula),
        w_i = J_i^T u_i (one batched VJP: the segments are disjoint), σ_i ≈ sqrt(|w_i|) for
        unit v_i (a lower bound that converges to the top singular value). Warm-started
        from ``vectors``. Returns ``(σ, vectors, iterations, converged)``.
        """
        shapes = [[t.shape for t in g] for g in groups]
        if vectors is None or [[v.shape for v in vs] for vs in vectors] != shapes:
            device = next((t.device for g in groups for t in g), torch.device("cpu"))
            gen = torch.Generator(device=device).manual_seed(seed)
            vectors = [[torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype) for t in g] for g in groups]
        flat_inputs = [t for g in groups for t in g]
        double_vjp: list[Any] = []  # set once forward-mode AD failed

        def apply(vs: list[Vectors]) -> list[Vectors]:
            jv = None
            if not double_vjp:
                try:
                    jv = forward_jvp(vs)
                except (NotImplementedError, RuntimeError) as err:
                    if not is_forward_ad_gap(err):
                        raise
                    self._note(f"{symbol}: an operator has no forward-mode AD, J v by the double-VJP trick")
                    fallback = self._double_vjp(groups, outputs)
                    if fallback is None:
                        raise _Unmeasurable(symbol) from None
                    double_vjp.append(fallback)
            if jv is None:
                jv = double_vjp[0](vs)
            jv = [torch.zeros_like(o) if t is None else t.detach() for t, o in zip(jv, outputs)]
            with self.injector.only(forward=False, backward=False):
                w = torch.autograd.grad(outputs, flat_inputs, grad_outputs=jv, retain_graph=True, allow_unused=True)
            w = zeros_for(w, flat_inputs)
            out, pos = [], 0
            for g in groups:
                out.append(list(w[pos : pos + len(g)]))
                pos += len(g)
            return out

        try:
            found = power_iteration(apply, vectors, iterations, self.tol)
        except _Unmeasurable:
            self._note(f"{symbol} not measured: neither forward-mode AD nor double backward works")
            return torch.full((len(groups),), math.nan, dtype=torch.float64), vectors, 0, False
        return found.norms.sqrt(), found.vectors, found.iterations, found.converged

    def _double_vjp(self, groups, outputs):
        """J v = ∂/∂u <J^T u, v>: a JVP from two reverse passes (needs double backward); None without it."""
        flat_inputs = [t for g in groups for t in g]
        us = [torch.zeros_like(o).requires_grad_(True) for o in outputs]
        try:
            with self.injector.only(forward=False, backward=False):
                wt = torch.autograd.grad(outputs, flat_inputs, grad_outputs=us, create_graph=True, allow_unused=True)
        except RuntimeError:
            return None
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

    def _measure_loss_curvature(self, clean: Pass, iterations: int = 20) -> float:
        """L_h: the top eigenvalue of ∇²h in z_N at the clean point, by HVP power iteration."""
        leaf = clean.leaves[-1]
        (g,) = torch.autograd.grad(clean.loss, leaf, create_graph=True)
        if not g.requires_grad:
            return 0.0  # h is linear in z_N: no curvature
        gen = torch.Generator(device=leaf.device).manual_seed(self.seed + 2)
        v = torch.randn(leaf.shape, generator=gen, device=leaf.device, dtype=leaf.dtype)

        def hvp(vs: list[Vectors]) -> list[Vectors]:
            (hv,) = torch.autograd.grad(g, leaf, grad_outputs=vs[0][0], retain_graph=True, allow_unused=True)
            return [[torch.zeros_like(leaf) if hv is None else hv]]

        found = power_iteration(hvp, [[v]], iterations, 1e-4)
        return max(float(found.values[0]), 0.0)

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
        devices = [p.device for p in self.model.parameters()][:1]
        rng = RngState.capture(devices)
        self.passes.rng = rng
        # The injector first: the tap must see (and cut after) the perturbed output.
        self.injector.attach()
        try:
            with rng.forked(), self.passes.tapped(), passes.measure(owner=self.injector):
                with self.injector.recording(deltas=self.linearize) as applied:
                    result = self._run(batch, step, applied)
        finally:
            self.injector.detach()
            self.passes.rng = None
        return ProbeResult(
            step=step, names=tuple(self.chain.names), observed=result[0], constants=result[1],
            amplification=result[2], notes=tuple(self._notes), seconds=time.perf_counter() - start,
        )

    def _run(self, batch: Any, step: int, applied: Any):
        n = len(self.chain)
        d = self.passes
        want_bwd = any(c in ("backward", "both") for c in self.configs)
        want_fwd = any(c in ("forward", "both") for c in self.configs)

        clean = d.graph_forward(batch, step, forward=False)
        c_bw = d.backward(clean, eps=False)
        G = d.full_grads(c_bw)
        g_norm = norm64(G)
        zeros = torch.zeros(n, dtype=torch.float64)

        def sizes(direction: str) -> torch.Tensor:
            norms = applied.norms(direction)
            return torch.tensor([float(norms.get(name, 0.0)) for name in self.chain.names], dtype=torch.float64)

        backs: dict[str, tuple[Pass, Backward, torch.Tensor, torch.Tensor]] = {}
        if want_bwd:
            bw = d.backward(clean, eps=True)
            backs["backward"] = (clean, bw, zeros, sizes(BACKWARD))
        pert = None
        if want_fwd:
            pert = d.graph_forward(batch, step, forward=True)
            delta = sizes(FORWARD)
            d.deltas = [applied.delta(name, FORWARD) for name in self.chain.names]
            fw = d.backward(pert, eps=False)
            backs["forward"] = (pert, fw, delta, zeros)
            if "both" in self.configs:
                bw2 = d.backward(pert, eps=True)
                backs["both"] = (pert, bw2, delta, sizes(BACKWARD))

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
            e_fwd = torch.tensor([norm64([a - b]) for a, b in zip(pert.outputs, clean.outputs)], dtype=torch.float64)
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
            dd = torch.tensor([diff_norm64(x, y) for x, y in zip(bw.op_grads, c_bw.op_grads)], dtype=torch.float64)
            total = diff_norm64(d.full_grads(bw), G)
            bound = theory.propagate(forward=delta, backward=eps, **kw)
            observed[config] = Observed(
                e=e, b=b, d=dd, total=total, grad_norm=g_norm,
                m=total / g_norm if g_norm > 0 else math.inf,
                delta=delta, eps=eps, bound=bound,
                linear=self._linear_for(config, linear_fwd, backs, c_bw),
            )
        return observed, constants, amp

    def _smoothness(self, pert: Pass, clean_bw: Backward, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        res = zeros_for(res, inputs)
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
        d = self.passes
        if all(x is None for x in d.deltas):
            return None
        n = len(self.chain)

        def run() -> tuple[list, list, list]:
            d.replay_rng()
            sink: list[torch.Tensor | None] = [None] * n
            with fwAD.dual_level():
                aliases, named = d.new_aliases()
                with self.injector.only(forward=False, backward=False), d.mode("linear"), torch.enable_grad():
                    loss = functional_call(d.wrapper, named, (batch,), tie_weights=False, strict=False)
                    dz = list(d.tangents)
                flat = [a for al in aliases for a in al]
                d.sink = sink
                try:
                    with self.injector.only(forward=False, backward=False):
                        grads = torch.autograd.grad(loss, flat, create_graph=True, allow_unused=True)
                finally:
                    d.sink = None
                dmsg = [None if s is None else fwAD.unpack_dual(s).tangent for s in sink]
                dgrad = [None if g is None else fwAD.unpack_dual(g).tangent for g in grads]
            return dz, dmsg, dgrad

        try:
            dz, dmsg, dgrad = d.with_forward_ad_retry(run)
        except (NotImplementedError, RuntimeError) as err:
            if not is_forward_ad_gap(err):
                raise
            self._note(f"linearized prediction unavailable: {str(err).splitlines()[0]}")
            return None
        zero_like = lambda t, ref: torch.zeros_like(ref) if t is None else t.detach()  # noqa: E731
        dz = [zero_like(t, o) for t, o in zip(dz, d.outputs)] if d.outputs else dz
        dmsg = [None if t is None else t.detach() for t in dmsg]
        out_grads, pos = [], 0
        for params in d.alias_params:
            out_grads.append([zero_like(t, p) for t, p in zip(dgrad[pos : pos + len(params)], params)])
            pos += len(params)
        return {"dz": dz, "dmsg": dmsg, "dgrad": out_grads}

    def _linear_for(
        self, config: str, lin: dict[str, Any] | None, backs: dict, clean_bw: Backward
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
        dd = torch.tensor([norm64(g) for g in per_op], dtype=torch.float64)
        total = self.passes.per_parameter(per_op)
        return theory.PropagationBound(e=e, b=b, d=dd, total=norm64(list(total.values())))
