"""Sharpness λ_max(∇²loss) and Adam's preconditioned sharpness, for THEORY §4's stability rule.

THEORY §4: a step of size γ is stable while the sharpness stays below the optimizer's
threshold (:func:`spikeguard.theory.stability_threshold`): ``λ_max(∇²loss) < 2/γ`` for
SGD, and for Adam the *preconditioned* sharpness ``λ_max(P⁻¹∇²loss) < (2+2β1)/((1-β1)γ)``
with ``P = diag(sqrt(v̂) + ε)``, ``v̂ = v/(1-β2^t)`` read from Adam's state (Cohen et al.,
"Adaptive gradient methods at the edge of stability", 2022).

Both are top eigenvalues found by power iteration on Hessian-vector products
(double backward through ``torch.autograd.grad``, never ``.backward()``, so every
``.grad`` stays untouched). Power iteration converges to the eigenvalue of largest
*magnitude*, while the rule needs the most *positive* one; when the dominant
eigenvalue is negative (or a ± pair of equal magnitude dominates), a second pass
iterates on the shifted operator ``H + σI`` with ``σ`` the spectral radius found by the
first, whose top eigenvalue is ``λ_max + σ`` (see :func:`hessian_top_eigenvalue`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from spikeguard import theory
from spikeguard.measure.linalg import Vectors, power_iteration
from spikeguard.measure.linalg import vnorm as _norm
from spikeguard.measure.optim import adam_denominator, optimizer_kind

__all__ = [
    "Sharpness",
    "hessian_top_eigenvalue",
    "adam_preconditioner",
    "preconditioned_top_eigenvalue",
    "stability",
    "optimizer_sharpness",
    "SUPPORTED_OPTIMIZERS",
]

#: Optimizers whose state defines the preconditioner P (AdamW subclasses Adam in torch).
SUPPORTED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)
_SUPPORTED_NAMES = ["torch.optim.Adam", "torch.optim.AdamW"]


@dataclass(frozen=True)
class Sharpness:
    """A top-eigenvalue estimate.

    Attributes:
        value: the estimate of λ_max (most positive eigenvalue) of ∇²loss, or of
            P^{-1/2}∇²loss P^{-1/2} (same eigenvalues as P⁻¹∇²loss) when ``preconditioned``.
        iterations: Hessian-vector products used, both passes together.
        converged: the last pass stopped because the relative change of its Rayleigh
            quotient fell below ``tol``; False when it ran out of iterations.
        preconditioned: whether ``value`` is Adam's preconditioned sharpness.
        vector: the last eigenvector estimate, unit norm over all parameters, one tensor
            per parameter, in the coordinates of the iterated operator (``P^{1/2}u`` for an
            eigenvector u of P⁻¹∇²loss). Pass it as ``init`` to warm-start the next call.
        shift: σ ≥ 0 such that ``value`` came from iterating on ``H + σI`` (0 when the
            dominant eigenvalue was already the most positive one).
    """

    value: float
    iterations: int
    converged: bool
    preconditioned: bool
    vector: Vectors | None
    shift: float = 0.0


# -- checks -------------------------------------------------------------------------------


def _check_settings(iterations: int, tol: float) -> None:
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol > 0:
        raise ValueError(f"tol must be a number > 0, got {tol!r}")


def _check_params(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    params = list(params)
    if not params:
        raise ValueError("params must hold at least one tensor, got an empty sequence")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if not p.requires_grad:
            raise ValueError(
                f"params[{i}] (shape {tuple(p.shape)}) has requires_grad=False; the Hessian is "
                "taken over tensors with requires_grad=True only (pass the trainable ones)"
            )
    return params


def _start_vector(
    params: list[torch.Tensor], init: Sequence[torch.Tensor] | None, generator: torch.Generator | None
) -> Vectors:
    if init is None:
        # Drawn on the generator's device and moved, so a CPU generator serves any device.
        device = None if generator is None else generator.device
        return [
            torch.randn(p.shape, generator=generator, dtype=p.dtype, device=device or p.device).to(p.device)
            for p in params
        ]
    init = list(init)
    if len(init) != len(params):
        raise ValueError(f"init must hold one tensor per parameter ({len(params)}), got {len(init)}")
    for i, (v, p) in enumerate(zip(init, params)):
        if not isinstance(v, torch.Tensor) or v.shape != p.shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"init[{i}] must be a tensor of shape {tuple(p.shape)} like params[{i}], got {got}")
    init = [v.detach().to(device=p.device, dtype=p.dtype) for v, p in zip(init, params)]
    if _norm(init) == 0:
        raise ValueError("init must be a non-zero vector, got all zeros")
    return init


# -- the Hessian-vector product -------------------------------------------------------------


def _hvp(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> Callable[[Vectors], Vectors]:
    """``v ↦ ∇²loss · v`` by double backward, from one evaluation of ``loss_fn``."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable () -> scalar loss tensor, got {type(loss_fn).__name__}")
    with torch.enable_grad():
        loss = loss_fn()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn() must return a scalar tensor, got {got}")
        if not loss.requires_grad:
            raise ValueError(
                "loss_fn() returned a loss with no autograd graph (requires_grad=False): it does not "
                "depend on params, or it was computed under torch.no_grad()/inference_mode"
            )
        # autograd.grad, not backward: nothing is accumulated into .grad.
        grads = torch.autograd.grad(loss.reshape(()), params, create_graph=True, allow_unused=True)
    # Parameters the gradient does not depend on (unused, or entering the loss linearly)
    # have zero rows in the Hessian; only the others are differentiated again.
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def hvp(v: Vectors) -> Vectors:
        out = [torch.zeros_like(p) for p in params]
        if not live:
            return out
        hv = torch.autograd.grad(
            [grads[i] for i in live], params, grad_outputs=[v[i] for i in live],
            retain_graph=True, allow_unused=True,
        )
        return [h.detach() if h is not None else o for h, o in zip(hv, out)]

    return hvp


# -- power iteration ------------------------------------------------------------------------


def _power_iteration(
    apply: Callable[[Vectors], Vectors], v: Vectors, iterations: int, tol: float
) -> tuple[float, float, Vectors, int, bool]:
    """:func:`spikeguard.measure.linalg.power_iteration` on one symmetric operator:
    ``(λ, ρ, v, k, converged)``, the Rayleigh quotient and ``|Av|`` at the last iterate, the
    next iterate, the products used and whether it converged."""
    out = power_iteration(lambda vs: [apply(vs[0])], [v], iterations, tol)
    return float(out.values[0]), float(out.norms[0]), out.vectors[0], out.iterations, out.converged


def _top_eigenvalue(
    apply: Callable[[Vectors], Vectors],
    params: list[torch.Tensor],
    iterations: int,
    tol: float,
    generator: torch.Generator | None,
    init: Sequence[torch.Tensor] | None,
    preconditioned: bool,
) -> Sharpness:
    """λ_max of a symmetric operator: power iteration, then a shifted pass when needed."""
    start = _start_vector(params, init, generator)
    lam, rho, v, used, converged = _power_iteration(apply, start, iterations, tol)
    if lam >= (1 - tol) * rho:
        # v is (to tol) an eigenvector whose eigenvalue is positive and of the largest
        # magnitude: it is λ_max.
        return Sharpness(lam, used, converged, preconditioned, v)
    # The dominant eigenvalue is negative, or a ± pair dominates. ρ estimates the spectral
    # radius, so A + ρI is (nearly) positive semi-definite and its dominant eigenvalue is
    # λ_max + ρ. The second pass starts afresh (or from init): the first pass's vector is
    # the bottom eigenvector, which the shifted operator sends to ~0.
    sigma = rho
    restart = _start_vector(params, init, generator)
    mu, _, v, more, converged = _power_iteration(
        lambda x: [a + sigma * xi for a, xi in zip(apply(x), x)], restart, iterations, tol
    )
    return Sharpness(mu - sigma, used + more, converged, preconditioned, v, shift=sigma)


def hessian_top_eigenvalue(
    loss_fn: Callable[[], torch.Tensor],
    params: Iterable[torch.Tensor],
    *,
    iterations: int = 20,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    init: Sequence[torch.Tensor] | None = None,
) -> Sharpness:
    """THEORY §4's sharpness ``λ_max(∇²loss)`` over ``params``, by power iteration.

    ``loss_fn`` is a closure ``() -> scalar loss`` that recomputes the loss from
    ``params`` (e.g. ``lambda: F.cross_entropy(model(x), y)``); it is called exactly
    once, under ``torch.enable_grad()``, and the graph is reused for every
    Hessian-vector product ``∇²loss·v = ∂(∇loss·v)/∂w`` (double backward). Include in
    it every term whose curvature you want counted (an L2 penalty, say). Parameters,
    their ``.grad`` and the global RNG (when ``generator`` is given) are left untouched.

    Power iteration finds the eigenvalue of largest magnitude. When that is the most
    positive one (the Rayleigh quotient ``vᵀHv`` equals ``|Hv|`` to ``tol``), it is
    returned. Otherwise (a dominant negative eigenvalue, or a ± pair) a second pass
    iterates on ``H + σI`` with ``σ = |Hv|`` the spectral radius from the first, and
    returns ``λ_max(H + σI) - σ``, with ``shift = σ``. That pass converges at rate
    ``(λ_2 + σ)/(λ_max + σ)``, slower than on H, and its absolute error is relative to
    ``λ_max + σ``: check ``converged`` and raise ``iterations`` when a large negative
    eigenvalue makes it slow.

    Args:
        loss_fn: closure recomputing the scalar loss.
        params: tensors with ``requires_grad=True`` (e.g. ``model.parameters()``).
        iterations: most Hessian-vector products per pass (at most two passes).
        tol: stop when the Rayleigh quotient's relative change is below it.
        generator: source of the random start vector; the global RNG when None.
        init: start vector, one tensor per parameter (a previous ``Sharpness.vector``).
    """
    _check_settings(iterations, tol)
    params = _check_params(params)
    hvp = _hvp(loss_fn, params)
    return _top_eigenvalue(hvp, params, iterations, tol, generator, init, preconditioned=False)


# -- Adam's preconditioned sharpness --------------------------------------------------------


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> Vectors:
    """Adam's diagonal preconditioner ``P = sqrt(v̂) + ε``, ``v̂ = v/(1-β2^t)``, per parameter.

    Read from ``optimizer.state`` (``exp_avg_sq`` = v, or ``max_exp_avg_sq`` with
    amsgrad; ``step`` = t) and each parameter's group (``betas``, ``eps``), computed as
    torch's Adam computes its denominator. The state is only read (``state.get``, which
    does not create entries).
    """
    if not isinstance(optimizer, SUPPORTED_OPTIMIZERS):
        raise TypeError(
            f"optimizer must be one of {_SUPPORTED_NAMES} "
            f"(the preconditioner P = diag(sqrt(v̂)+ε) is Adam's second-moment state), "
            f"got {type(optimizer).__module__}.{type(optimizer).__name__}"
        )
    params = _check_params(params)
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    out = []
    for i, p in enumerate(params):
        group = groups.get(id(p))
        if group is None:
            raise ValueError(
                f"params[{i}] (shape {tuple(p.shape)}) is not in the optimizer's param_groups"
            )
        denom = adam_denominator(optimizer, p, group)
        if denom is None:
            key = "max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"
            raise ValueError(
                f"optimizer has no Adam state for params[{i}] (shape {tuple(p.shape)}) yet: "
                f"state has keys {sorted(optimizer.state.get(p, {}))}, needs 'step' and {key!r}, which "
                "optimizer.step() creates; the preconditioned sharpness needs at least one "
                "optimizer step first"
            )
        out.append(denom)
    return out


def preconditioned_top_eigenvalue(
    loss_fn: Callable[[], torch.Tensor],
    params: Iterable[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    iterations: int = 20,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    init: Sequence[torch.Tensor] | None = None,
) -> Sharpness:
    """THEORY §4's Adam sharpness ``λ_max(P⁻¹∇²loss)``, P from :func:`adam_preconditioner`.

    P⁻¹H is not symmetric, but ``P^{-1/2} H P^{-1/2}`` is similar to it (same
    eigenvalues) and symmetric, so the power iteration (and its negative-eigenvalue
    handling, see :func:`hessian_top_eigenvalue`) runs on ``v ↦ D H D v`` with
    ``D = P^{-1/2}``. ``Sharpness.vector`` lives in those coordinates. Compare the value
    with ``stability_threshold(lr, "adam", β1)``. Arguments as for
    :func:`hessian_top_eigenvalue`; ``params`` must be in ``optimizer`` and have taken
    at least one step.
    """
    _check_settings(iterations, tol)
    params = _check_params(params)
    d = [pc.rsqrt() for pc in adam_preconditioner(optimizer, params)]  # D = P^{-1/2}
    hvp = _hvp(loss_fn, params)

    def apply(v: Vectors) -> Vectors:
        return [di * h for di, h in zip(d, hvp([di * vi for di, vi in zip(d, v)]))]

    return _top_eigenvalue(apply, params, iterations, tol, generator, init, preconditioned=True)


# -- THEORY §4's rule -----------------------------------------------------------------------


def stability(sharpness: Sharpness, lr: float, optimizer: str = "sgd", beta: float = 0.9) -> dict[str, float]:
    """THEORY §4: the sharpness against the optimizer's stability threshold.

    Returns ``{"sharpness": λ, "threshold": theory.stability_threshold(lr, optimizer,
    beta), "ratio": λ / threshold}``; training is stable while ``ratio < 1``. Adam's
    threshold applies to the preconditioned sharpness only, SGD's and momentum's to the
    plain one, and mixing them raises.
    """
    if not isinstance(sharpness, Sharpness):
        raise TypeError(f"sharpness must be a Sharpness, got {type(sharpness).__name__}")
    threshold = theory.stability_threshold(lr, optimizer, beta)
    if (optimizer == "adam") != sharpness.preconditioned:
        kind = "preconditioned" if sharpness.preconditioned else "plain (not preconditioned)"
        raise ValueError(
            f"optimizer={optimizer!r} needs "
            + ("the preconditioned sharpness (preconditioned_top_eigenvalue)" if optimizer == "adam"
               else "the plain sharpness (hessian_top_eigenvalue)")
            + f", got a {kind} one"
        )
    return {"sharpness": sharpness.value, "threshold": threshold, "ratio": sharpness.value / threshold}


def optimizer_sharpness(
    loss_fn: Callable[[], torch.Tensor],
    params: Iterable[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    iterations: int = 20,
    tol: float = 1e-3,
    init: Sequence[torch.Tensor] | None = None,
) -> Sharpness | None:
    """The sharpness THEORY §4 tests for this optimizer: preconditioned for Adam, plain otherwise.

    None for Adam before its first step (no second moments yet, nothing to precondition
    with), and for an Adam-like optimizer (``betas`` in its groups) without Adam's state. Pair the value with :func:`spikeguard.measure.optim.stability_of`.
    """
    if optimizer_kind(optimizer)[0] == "adam":
        try:
            return preconditioned_top_eigenvalue(loss_fn, params, optimizer, iterations=iterations, tol=tol, init=init)
        except (ValueError, TypeError):  # no state yet, or an Adam-like optimizer whose state is not Adam's
            return None
    return hessian_top_eigenvalue(loss_fn, params, iterations=iterations, tol=tol, init=init)
