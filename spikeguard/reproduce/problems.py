"""The reproduction's problem: regularized logistic regression written as a chain of N operators.

Data: scikit-learn's breast-cancer set (569 samples, 30 features), each feature
standardized to mean 0 and variance 1, plus a constant intercept column; labels ±1.

The operator chain (THEORY §1). Operator 1 reads the parameters in, operators 2..N
are fixed gains::

    z_1 = f_1(x; w) = [x w ; w]        (B logits, then a copy of w: shape (B + p,))
    z_i = c · z_{i-1},   i = 2..N      (no parameters; Jacobian c·I, so L_i = c exactly)
    h(z_N) = (1/B) Σ_b log(1 + exp(-y_b z_N[b])) + r(z_N[B:])

so that, with ``C = c^(N-1)`` and ``v = C w``,
``loss(w) = (1/B) Σ_b log(1 + exp(-y_b x_b·v)) + r(v)``: every depth and gain is the same
problem in z_N-space (and in v), reparametrized; its minimizer is ``w* = v*/C``.

Why this design:

- *The convex case stays convex.* z_N is linear in w and h is convex in z_N (softplus
  of a linear function plus a convex r), so the loss is convex in w for every depth and
  gain: the depth changes how perturbations propagate, never the geometry of the
  problem. A deep linear factorization ``x W_1 ... W_N`` would make even the ℓ2 problem
  non-convex in its parameters.
- *Depth is a dial with exact constants.* Every gain operator has ``L_i = c`` exactly,
  so A^f and A^b of Proposition 1 are known in closed form and a sweep over N (and over
  c < 1, c = 1, c > 1) shows the damped, linear and geometric regimes of THEORY §2.
- *The regularizer runs through the chain.* THEORY's relative bias m is relative to
  |∇loss|. If r(w) were added outside the chain, a relative perturbation
  ``|ε_i| ≤ u|g_i|`` would only bound β relative to the *data* gradient, which at a
  regularized minimum is ``-∇r(w*) ≠ 0`` while ∇loss = 0: every relative perturbation
  would have m = ∞ there and Propositions 2-3 would predict nothing. Carrying a copy of
  w through the operators makes ``G = K_1^T g_1`` the whole gradient, so scaling a
  gradient message by (1 - s) is exactly a relative bias m = s.

Regularizers: ``"l2"``, ``r(v) = (λ/2)|v|²`` (λ-strongly convex in v, so the PL
inequality holds with μ = λ at C = 1, μ = λC² in w); ``"nonconvex"``,
``r(v) = λ Σ_j v_j²/(1 + v_j²)``, whose curvature ``λ(2 - 6v²)/(1 + v²)³`` lies in
[-λ/2, 2λ] (PL is not guaranteed; μ must be estimated, with
:func:`spikeguard.theory.estimate_pl_constant`).

Constants, computed, not guessed (:meth:`LogisticChain.smoothness` and friends):

- smoothness ``L = C² (λ_max(XᵀX)/(4n) + ρ)``, with ρ = λ (ℓ2) or 2λ (non-convex): the
  logistic Hessian is ``Xᵀ diag(σ(1-σ)) X / n`` in v and σ(1-σ) ≤ 1/4, attained at
  w = 0, where r'' = ρ too, so L is attained;
- ``L_h``, the curvature of h in z_N: ``max(1/(4B), ρ)`` (h's Hessian is block
  diagonal: σ(1-σ)/B per logit, r'' per weight copy);
- ``M_1 = |K_1| = (λ_max(X_BᵀX_B) + 1)^½`` for a batch X_B (``K_1 = [X_B ; I]``);
  ``M_i = 0`` for the gain operators; all H_i and H'_i vanish on the path a
  perturbation can reach (the gains are linear, and z_0 = x is never perturbed).
"""

from __future__ import annotations

import contextlib
import importlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spikeguard import theory
from spikeguard.operators import OperatorChain
from spikeguard.perturb import Injector, NoiseModel

__all__ = [
    "INSTALL_HINT",
    "REGULARIZERS",
    "require",
    "Data",
    "breast_cancer",
    "Offset",
    "ReadIn",
    "Gain",
    "LogisticChain",
    "Trajectory",
    "train",
]

INSTALL_HINT = "pip install 'spikeguard[reproduce]'"
REGULARIZERS = ("l2", "nonconvex")
DTYPE = torch.float64


def require(module: str) -> Any:
    """Import an optional dependency of ``spikeguard reproduce``, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        name = {"sklearn": "scikit-learn"}.get(top, top)
        raise ModuleNotFoundError(
            f"spikeguard reproduce needs {name} ({err}); install it with: {INSTALL_HINT}"
        ) from err


# -- data -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    """A binary classification set: ``X`` (n, p) float64 with an intercept column, ``y`` ±1."""

    X: torch.Tensor
    y: torch.Tensor
    name: str

    @property
    def num_samples(self) -> int:
        return self.X.shape[0]

    @property
    def num_features(self) -> int:
        return self.X.shape[1]


def breast_cancer() -> Data:
    """scikit-learn's breast-cancer set, standardized (population std), intercept appended."""
    datasets = require("sklearn.datasets")
    raw = datasets.load_breast_cancer()
    X = torch.tensor(raw.data, dtype=DTYPE)
    X = (X - X.mean(0)) / X.std(0, unbiased=False)
    X = torch.cat([X, torch.ones(X.shape[0], 1, dtype=DTYPE)], dim=1)
    y = torch.tensor(raw.target, dtype=DTYPE) * 2 - 1
    return Data(X=X, y=y, name="breast_cancer")


# -- a deterministic absolute perturbation ------------------------------------------------


@dataclass(frozen=True)
class Offset(NoiseModel):
    """A constant shift, ``δ = value`` in every element: a deterministic absolute bias.

    The library's absolute models (:class:`~spikeguard.perturb.Gaussian`,
    :class:`~spikeguard.perturb.Uniform`) draw fresh zero-mean noise every step, which
    acts on SGD like extra gradient variance. Propositions 2-3 bound a *bias* ζ; this
    model is one: the same δ every step (a miscalibrated activation, a stuck gradient
    offset). ``|δ| = value · numel^½`` exactly.
    """

    value: float

    def __post_init__(self) -> None:
        if not isinstance(self.value, (int, float)) or isinstance(self.value, bool) or not math.isfinite(self.value):
            raise ValueError(f"Offset.value must be a finite number, got {self.value!r}")

    @property
    def is_identity(self) -> bool:
        return self.value == 0

    def sample(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.full_like(x, self.value)


# -- the operators ----------------------------------------------------------------------


class ReadIn(nn.Module):
    """f_1(x; w) = [x w ; w]: the batch's logits followed by a copy of w, shape (B + p,)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_features, dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x @ self.weight, self.weight])  # (B,) logits, (p,) weight copy


class Gain(nn.Module):
    """f_i(z) = c · z: a fixed operator with Jacobian c·I (L_i = c, no parameters)."""

    def __init__(self, gain: float):
        super().__init__()
        self.register_buffer("gain", torch.tensor(float(gain), dtype=DTYPE))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.gain * z


# -- the problem ------------------------------------------------------------------------


@dataclass
class LogisticChain:
    """Regularized logistic regression as an N-operator chain (see the module docstring).

    Args:
        data: the data set (:func:`breast_cancer`).
        regularizer: ``"l2"`` (convex, PL with μ = λ) or ``"nonconvex"``.
        lam: λ > 0.
        depth: N ≥ 1, the number of operators (1 read-in, N-1 gains).
        gain: c > 0, the gain of each of operators 2..N.
    """

    data: Data
    regularizer: str = "l2"
    lam: float = 0.1
    depth: int = 4
    gain: float = 1.0
    model: nn.Sequential = field(init=False, repr=False)
    chain: OperatorChain = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"LogisticChain.regularizer must be one of {list(REGULARIZERS)}, got {self.regularizer!r}")
        if not isinstance(self.lam, (int, float)) or isinstance(self.lam, bool) or not self.lam > 0:
            raise ValueError(f"LogisticChain.lam must be > 0, got {self.lam!r}")
        if not isinstance(self.depth, int) or isinstance(self.depth, bool) or self.depth < 1:
            raise ValueError(f"LogisticChain.depth must be an int >= 1, got {self.depth!r}")
        if not isinstance(self.gain, (int, float)) or isinstance(self.gain, bool) or not self.gain > 0:
            raise ValueError(f"LogisticChain.gain must be > 0, got {self.gain!r}")
        self.model = nn.Sequential(ReadIn(self.data.num_features), *[Gain(self.gain) for _ in range(self.depth - 1)])
        self.chain = OperatorChain.from_model(self.model)
        self._solution: tuple[torch.Tensor, float] | None = None

    # -- the loss ------------------------------------------------------------------------

    @property
    def total_gain(self) -> float:
        """C = c^(N-1): the product of the gains, z_N = C · z_1."""
        return float(self.gain) ** (self.depth - 1)

    @property
    def weight(self) -> nn.Parameter:
        return self.model[0].weight

    def set_weight(self, w: torch.Tensor) -> None:
        with torch.no_grad():
            self.weight.copy_(w)

    def penalty(self, w: torch.Tensor) -> torch.Tensor:
        """r(w): ``(λ/2)|w|²`` or ``λ Σ w²/(1+w²)``."""
        if self.regularizer == "l2":
            return 0.5 * self.lam * (w * w).sum()
        w2 = w * w
        return self.lam * (w2 / (1 + w2)).sum()

    def h(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """h(z_N): mean logistic loss of the B logits plus r of the (scaled) weight copy."""
        B = y.shape[0]
        return F.softplus(-y * z[:B]).mean() + self.penalty(z[B:])

    def loss_fn(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``loss_fn(model, (x, y))``, the form :class:`~spikeguard.measure.AmplificationProbe` takes."""
        x, y = batch
        return self.h(model(x), y)

    def objective(self, w: torch.Tensor) -> torch.Tensor:
        """The clean full-data loss at w, computed directly (no hooks, no chain)."""
        X, y, v = self.data.X, self.data.y, self.total_gain * w
        return F.softplus(-y * (X @ v)).mean() + self.penalty(v)

    def gradient(self, w: torch.Tensor) -> torch.Tensor:
        """∇loss(w) on the full data, in closed form."""
        X, y, C = self.data.X, self.data.y, self.total_gain
        v = C * w
        s = torch.sigmoid(-y * (X @ v))
        data = -(X.T @ (y * s)) / X.shape[0]
        penalty = self.lam * v if self.regularizer == "l2" else self.lam * 2 * v / (1 + v * v) ** 2
        return C * (data + penalty)

    def hessian(self, w: torch.Tensor) -> torch.Tensor:
        """∇²loss(w) on the full data, in closed form (p × p)."""
        X, C = self.data.X, self.total_gain
        v = C * w
        s = torch.sigmoid(X @ v)
        H = (X.T * (s * (1 - s))) @ X / X.shape[0]
        if self.regularizer == "l2":
            return C * C * (H + self.lam * torch.eye(X.shape[1], dtype=DTYPE))
        v2 = v * v
        return C * C * (H + torch.diag(self.lam * (2 - 6 * v2) / (1 + v2) ** 3))

    # -- constants -----------------------------------------------------------------------

    @property
    def penalty_curvature(self) -> float:
        """ρ = sup |r''|: λ for ℓ2, 2λ for the non-convex penalty (attained at w = 0)."""
        return self.lam if self.regularizer == "l2" else 2 * self.lam

    def smoothness(self) -> float:
        """L = C² (λ_max(XᵀX)/(4n) + ρ): the largest curvature of the loss anywhere (attained at 0)."""
        X = self.data.X
        top = float(torch.linalg.eigvalsh(X.T @ X)[-1])
        return self.total_gain**2 * (top / (4 * X.shape[0]) + self.penalty_curvature)

    def strong_convexity(self) -> float | None:
        """μ for the PL inequality: λC² for ℓ2 (strong convexity implies PL with that μ); None otherwise."""
        return self.lam * self.total_gain**2 if self.regularizer == "l2" else None

    def loss_curvature(self, batch_size: int) -> float:
        """L_h = max(1/(4B), ρ): the largest curvature of h in z_N, anywhere."""
        return max(1 / (4 * batch_size), self.penalty_curvature)

    def exact_constants(self, x: torch.Tensor) -> dict[str, Any]:
        """Proposition 1's constants for a batch x, exactly: keyword arguments of :func:`theory.propagate`."""
        top = float(torch.linalg.eigvalsh(x.T @ x)[-1])
        gains = [0.0] + [float(self.gain)] * (self.depth - 1)  # L_1 never enters (e_0 = 0)
        param_gains = [math.sqrt(top + 1)] + [0.0] * (self.depth - 1)
        return dict(gains=gains, param_gains=param_gains, loss_curvature=self.loss_curvature(x.shape[0]))

    def param_gain_bound(self, batch_size: int | None) -> float:
        """sup over batches of M_1 = |[X_B ; I]|: ``(B max_i |x_i|² + 1)^½`` for B samples drawn
        with replacement (B copies of the longest row attain it), ``(λ_max(XᵀX) + 1)^½`` for the
        full data (``batch_size=None``)."""
        X = self.data.X
        if batch_size is None:
            top = float(torch.linalg.eigvalsh(X.T @ X)[-1])
        else:
            top = batch_size * float((X * X).sum(1).max())
        return math.sqrt(top + 1)

    def amplification(self, batch_size: int | None) -> theory.Amplification:
        """A^f, A^b of Proposition 1 with constants that hold for every batch of this size."""
        B = self.data.num_samples if batch_size is None else batch_size
        gains = [0.0] + [float(self.gain)] * (self.depth - 1)
        param_gains = [self.param_gain_bound(batch_size)] + [0.0] * (self.depth - 1)
        return theory.amplification(gains, param_gains, self.loss_curvature(B))

    def gradient_variance(self, w: torch.Tensor, batch_size: int) -> float:
        """σ² = E|G_B - ∇loss|² at w for B samples drawn with replacement (the penalty cancels)."""
        X, y, C = self.data.X, self.data.y, self.total_gain
        s = torch.sigmoid(-y * (X @ (C * w)))
        per_sample = -C * (y * s)[:, None] * X  # (n, p): data gradient of each sample
        centred = per_sample - per_sample.mean(0)
        return float((centred * centred).sum(1).mean()) / batch_size

    def solve(self) -> tuple[torch.Tensor, float]:
        """A minimizer w* and loss* (Newton for ℓ2; L-BFGS then Newton for the non-convex penalty)."""
        if self._solution is None:
            w = torch.zeros(self.data.num_features, dtype=DTYPE)
            if self.regularizer == "nonconvex":
                w = _lbfgs(self.objective, w)
            w = self.newton(lambda v: self.gradient(v), w)
            self._solution = (w, float(self.objective(w)))
        return self._solution

    def newton(self, grad, w: torch.Tensor, *, steps: int = 50, tol: float = 1e-13) -> torch.Tensor:
        """Solve ``grad(w) = 0`` by Newton's method with this loss's Hessian (a fixed point of a biased run)."""
        for _ in range(steps):
            g = grad(w)
            if float(g.norm()) < tol:
                break
            w = w - torch.linalg.solve(self.hessian(w), g)
        return w

    def excess(self, w: torch.Tensor) -> float:
        """loss(w) - loss*."""
        return float(self.objective(w)) - self.solve()[1]


def _lbfgs(fn, w0: torch.Tensor) -> torch.Tensor:
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = fn(w)
        loss.backward()
        return loss

    for _ in range(4):
        opt.step(closure)
    return w.detach()


# -- training ---------------------------------------------------------------------------


@dataclass
class Trajectory:
    """What :func:`train` recorded, one entry per step (after that step's update).

    ``excess[t] = loss(w_{t+1}) - loss*`` on the full data with no perturbation;
    ``grad_sq[t] = |∇loss(w_{t+1})|²`` when recorded; ``bias[(t, |Ĝ_t - G_t|)]`` on the
    steps where the bias was measured; ``first_weights`` = w_1, the point right after
    step 0; ``stopped`` says why the run ended early (``None``: it ran all its steps).
    """

    excess: torch.Tensor
    grad_sq: torch.Tensor | None
    first_weights: torch.Tensor
    bias: list[tuple[int, float]] = field(default_factory=list)
    stopped: str | None = None


def train(
    problem: LogisticChain,
    steps: int,
    lr: float,
    *,
    injectors: tuple[Injector, ...] = (),
    w0: torch.Tensor | None = None,
    momentum: float = 0.0,
    batch_size: int | None = None,
    seed: int = 0,
    record_grad: bool = False,
    bias_every: int = 0,
    monitor=None,
) -> Trajectory:
    """SGD (heavy-ball momentum when ``momentum > 0``) on the chain, with perturbations.

    Every step: the injectors move to the step (``set_step``), the minibatch loss runs
    through the perturbed chain, ``Ĝ`` is its gradient, and
    ``v ← momentum·v + Ĝ; w ← w - lr·v`` (torch's SGD convention, for which THEORY §4's
    momentum threshold ``(2+2β)/γ`` holds). Minibatches of ``batch_size`` samples are
    drawn with replacement from a generator seeded with ``seed``; ``None`` uses the full
    data every step. Every ``bias_every`` steps (0: never) the clean gradient G of the
    same batch is computed too, with the injectors switched off, and ``|Ĝ - G|`` recorded.
    ``monitor(t, excess) -> str | None`` may stop the run (its return value is the reason).
    """
    X, y = problem.data.X, problem.data.y
    n = X.shape[0]
    gen = torch.Generator().manual_seed(seed)
    problem.set_weight(torch.zeros(problem.data.num_features, dtype=DTYPE) if w0 is None else w0)
    w = problem.weight
    loss_star = problem.solve()[1]
    buf = torch.zeros_like(w)
    excess, grad_sq, bias = [], [], []
    first = None
    stopped = None
    for inj in injectors:
        inj.attach()
    try:
        for t in range(steps):
            for inj in injectors:
                inj.set_step(t)
            if batch_size is None:
                xb, yb = X, y
            else:
                idx = torch.randint(n, (batch_size,), generator=gen)
                xb, yb = X[idx], y[idx]
            (g,) = torch.autograd.grad(problem.loss_fn(problem.model, (xb, yb)), [w])
            if bias_every and t % bias_every == 0:
                with contextlib.ExitStack() as stack:
                    for inj in injectors:
                        stack.enter_context(inj.only(forward=False, backward=False))
                    (clean,) = torch.autograd.grad(problem.loss_fn(problem.model, (xb, yb)), [w])
                bias.append((t, float((g - clean).norm())))
            with torch.no_grad():
                buf = momentum * buf + g if momentum else g
                w.sub_(lr * buf)
                if first is None:
                    first = w.detach().clone()
                value = float(problem.objective(w)) - loss_star
                excess.append(value)
                if record_grad:
                    grad_sq.append(float(problem.gradient(w).pow(2).sum()))
            if monitor is not None:
                stopped = monitor(t, value)
                if stopped:
                    break
    finally:
        for inj in injectors:
            inj.detach()
    return Trajectory(
        excess=torch.tensor(excess, dtype=DTYPE),
        grad_sq=torch.tensor(grad_sq, dtype=DTYPE) if record_grad else None,
        first_weights=w.detach().clone() if first is None else first,
        bias=bias,
        stopped=stopped,
    )
