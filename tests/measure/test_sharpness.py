"""measure/sharpness.py against brute force: explicit Hessians, eigvalsh, simulated GD and Adam."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from spikeguard import theory
from spikeguard.measure.sharpness import (
    Sharpness,
    adam_preconditioner,
    hessian_top_eigenvalue,
    preconditioned_top_eigenvalue,
    stability,
)

# -- fixtures built by hand -----------------------------------------------------------------


def spd(eigenvalues, seed=0):
    """A = Q diag(λ) Qᵀ with a random orthogonal Q, float64."""
    gen = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def quadratic(a, seed=1):
    """The parameter w and the closure loss(w) = ½ wᵀAw (Hessian exactly A)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(a.shape[0], generator=gen, dtype=torch.float64).requires_grad_()
    return w, lambda: 0.5 * w @ a @ w


def tiny_mlp(seed=0):
    """A 3-4-2 tanh MLP (26 parameters, float64), a batch and its MSE closure."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    return model, lambda: nn.functional.mse_loss(model(x), y), (x, y)


def explicit_hessian(model, x, y):
    """∇²loss over the flattened parameters, by torch.autograd.functional.hessian."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss(v):
        parts = torch.split(v, [s.numel() for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(names, parts, shapes)}
        return nn.functional.mse_loss(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat)


def adam_steps(model, loss_fn, cls=torch.optim.Adam, steps=5, **kw):
    opt = cls(model.parameters(), lr=0.01, **kw)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    return opt


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- λ_max(∇²loss) ------------------------------------------------------------------------


def test_quadratic_top_eigenvalue_and_warm_start():
    a = spd([10.0, 5.0, 3.0, 2.0, 1.0, 0.5])
    w, loss = quadratic(a)
    s = hessian_top_eigenvalue(loss, [w], iterations=100, tol=1e-8, generator=gen())
    assert s.value == pytest.approx(10.0, rel=1e-4)
    assert s.converged and not s.preconditioned and s.shift == 0.0
    assert s.vector[0].shape == w.shape and float(s.vector[0].norm()) == pytest.approx(1.0, rel=1e-12)

    # One training step later the Hessian moved a little: the old vector is a better start.
    a2 = a + 0.05 * spd([1.0, -1.0, 0.5, 0.2, -0.3, 0.1], seed=5)
    w2, loss2 = quadratic(a2)
    top2 = float(torch.linalg.eigvalsh(a2).max())
    cold = hessian_top_eigenvalue(loss2, [w2], iterations=100, tol=1e-8, generator=gen(1))
    warm = hessian_top_eigenvalue(loss2, [w2], iterations=100, tol=1e-8, init=s.vector)
    assert cold.converged and warm.converged
    assert warm.value == pytest.approx(top2, rel=1e-4) and cold.value == pytest.approx(top2, rel=1e-4)
    assert warm.iterations < cold.iterations


@pytest.mark.parametrize(
    "eigenvalues, top",
    [
        ([-50.0, 10.0, 1.0, 0.5, 0.1], 10.0),  # a large negative eigenvalue dominates
        ([-5.0, 5.0, 1.0, 0.2], 5.0),  # a ± pair of equal magnitude: plain iteration mixes them
        ([-10.0, -3.0, -1.0], -1.0),  # negative definite: λ_max is the least negative
    ],
)
def test_indefinite_hessian_reports_the_most_positive_eigenvalue(eigenvalues, top):
    a = spd(eigenvalues, seed=3)
    w, loss = quadratic(a)
    s = hessian_top_eigenvalue(loss, [w], iterations=400, tol=1e-12, generator=gen())
    assert s.converged
    assert s.value == pytest.approx(top, rel=1e-4)
    # The shifted pass ran, with σ the spectral radius.
    assert s.shift == pytest.approx(max(abs(e) for e in eigenvalues), rel=1e-3)
    # Its vector is the top eigenvector of A.
    v = s.vector[0]
    assert float((a @ v - top * v).norm()) < 1e-3


def test_matches_eigvalsh_of_the_explicit_hessian_of_a_tiny_mlp():
    model, loss, (x, y) = tiny_mlp()
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == 26
    h = explicit_hessian(model, x, y)
    eig = torch.linalg.eigvalsh(h)
    s = hessian_top_eigenvalue(loss, params, iterations=2000, tol=1e-13, generator=gen())
    assert s.converged
    assert s.value == pytest.approx(float(eig.max()), rel=1e-6)
    # The per-parameter vector, flattened, is an eigenvector of the explicit Hessian.
    v = torch.cat([t.flatten() for t in s.vector])
    assert float((h @ v - s.value * v).norm()) < 1e-4 * float(eig.abs().max())


def test_unused_and_linear_parameters_have_zero_hessian_rows():
    a = spd([4.0, 2.0, 1.0])
    w, quad = quadratic(a)
    b = torch.ones(2, dtype=torch.float64, requires_grad=True)  # enters linearly: ∇ is constant
    unused = torch.ones(3, dtype=torch.float64, requires_grad=True)
    s = hessian_top_eigenvalue(lambda: quad() + b.sum(), [w, b, unused], iterations=100, tol=1e-10, generator=gen())
    assert s.value == pytest.approx(4.0, rel=1e-6)
    assert float(s.vector[1].abs().max()) == 0.0 and float(s.vector[2].abs().max()) == 0.0
    # A loss linear in every parameter has a zero Hessian.
    s = hessian_top_eigenvalue(lambda: b.sum(), [b], generator=gen())
    assert s.value == 0.0 and s.converged


# -- λ_max(P⁻¹∇²loss) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, kw",
    [(torch.optim.Adam, {}), (torch.optim.Adam, {"amsgrad": True}), (torch.optim.AdamW, {"weight_decay": 0.1})],
)
def test_preconditioned_matches_explicit_computation_after_adam_steps(cls, kw):
    model, loss, (x, y) = tiny_mlp(seed=2)
    opt = adam_steps(model, loss, cls, steps=5, betas=(0.9, 0.95), eps=1e-6, **kw)
    params = list(model.parameters())

    # P = sqrt(v / (1 - β2^t)) + ε, by hand from optimizer.state.
    key = "max_exp_avg_sq" if kw.get("amsgrad") else "exp_avg_sq"
    p_hand = []
    for p in params:
        st = opt.state[p]
        t = int(st["step"])
        assert t == 5
        p_hand.append((st[key] / (1 - 0.95**t)).sqrt().flatten() + 1e-6)
    p_hand = torch.cat(p_hand)
    torch.testing.assert_close(
        torch.cat([t.flatten() for t in adam_preconditioner(opt, params)]), p_hand, rtol=1e-12, atol=0
    )

    h = explicit_hessian(model, x, y)
    d = p_hand.rsqrt()
    expected = float(torch.linalg.eigvalsh(d[:, None] * h * d[None, :]).max())
    # Same as the largest eigenvalue of the non-symmetric P⁻¹H.
    assert float(torch.linalg.eigvals(h / p_hand[:, None]).real.max()) == pytest.approx(expected, rel=1e-8)

    s = preconditioned_top_eigenvalue(loss, params, opt, iterations=2000, tol=1e-13, generator=gen())
    assert s.preconditioned and s.converged
    assert s.value == pytest.approx(expected, rel=1e-6)


# -- side effects -------------------------------------------------------------------------


def test_measurement_leaves_grads_params_optimizer_and_rng_untouched():
    model, loss, _ = tiny_mlp(seed=4)
    opt = adam_steps(model, loss, steps=3)
    params = list(model.parameters())
    g = gen(7)
    for p in params[:-1]:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    params[-1].grad = None
    before_params = [p.detach().clone() for p in params]
    before_grads = [None if p.grad is None else p.grad.clone() for p in params]
    before_state = copy.deepcopy(opt.state_dict())
    before_rng = torch.get_rng_state()

    hessian_top_eigenvalue(loss, params, iterations=10, generator=gen())
    preconditioned_top_eigenvalue(loss, params, opt, iterations=10, generator=gen())

    assert torch.equal(torch.get_rng_state(), before_rng)
    for p, b in zip(params, before_params):
        assert torch.equal(p, b)
    for p, b in zip(params, before_grads):
        assert (p.grad is None) if b is None else torch.equal(p.grad, b)
    after_state = opt.state_dict()
    assert after_state["param_groups"] == before_state["param_groups"]
    assert after_state["state"].keys() == before_state["state"].keys()
    for k, st in before_state["state"].items():
        assert after_state["state"][k].keys() == st.keys()
        for name, value in st.items():
            assert torch.equal(after_state["state"][k][name], value)


def test_same_generator_seed_gives_bitwise_the_same_estimate():
    model, loss, _ = tiny_mlp()
    runs = [hessian_top_eigenvalue(loss, model.parameters(), iterations=5, generator=gen(3)) for _ in range(2)]
    assert runs[0].value == runs[1].value
    assert all(torch.equal(u, v) for u, v in zip(runs[0].vector, runs[1].vector))


# -- THEORY §4 against simulated training ---------------------------------------------------


@pytest.mark.parametrize("factor", [1.2, 0.8])
def test_gd_diverges_exactly_when_sharpness_exceeds_two_over_lr(factor):
    lr = 0.1
    threshold = theory.stability_threshold(lr, "sgd")  # 2/γ = 20
    a = spd([factor * threshold, 10.0, 5.0, 1.0], seed=2)
    w, loss = quadratic(a)
    s = hessian_top_eigenvalue(loss, [w], iterations=200, tol=1e-10, generator=gen())
    report = stability(s, lr, "sgd")
    assert report["threshold"] == threshold
    assert report["ratio"] == pytest.approx(factor, rel=1e-6)

    start = float(w.detach().norm())
    with torch.no_grad():
        w_t = w.detach().clone()
        for _ in range(100):
            w_t -= lr * (a @ w_t)  # GD on ½ wᵀAw
    if factor > 1:
        assert report["ratio"] > 1 and float(w_t.norm()) > 1e6 * start
    else:
        assert report["ratio"] < 1 and float(w_t.norm()) < 1e-3 * start


@pytest.mark.parametrize("factor", [1.2, 0.8])
def test_frozen_preconditioner_adam_diverges_exactly_above_the_adam_threshold(factor):
    """Cohen et al.'s model: Adam with P frozen is EMA-momentum GD preconditioned by P⁻¹.

    Measure λ_max(P⁻¹A) with P from a real Adam state, pick γ so that it is ``factor``
    times the Adam threshold (2+2β1)/((1-β1)γ), and simulate
    ``m ← β1 m + (1-β1)∇loss, w ← w - γ P⁻¹ m`` on the quadratic.
    """
    beta1 = 0.9
    a = spd([30.0, 8.0, 2.0, 0.5], seed=6)
    w, loss = quadratic(a)
    opt = torch.optim.Adam([w], lr=1e-3, betas=(beta1, 0.999))
    for _ in range(3):
        opt.zero_grad()
        loss().backward()
        opt.step()
    s = preconditioned_top_eigenvalue(loss, [w], opt, iterations=500, tol=1e-12, generator=gen())
    p = adam_preconditioner(opt, [w])[0]
    lr = (2 + 2 * beta1) / ((1 - beta1) * s.value / factor)
    report = stability(s, lr, "adam", beta1)
    assert report["ratio"] == pytest.approx(factor, rel=1e-6)

    with torch.no_grad():
        w_t, m = w.detach().clone(), torch.zeros_like(w)
        start = float(w_t.norm())
        for _ in range(400):
            m = beta1 * m + (1 - beta1) * (a @ w_t)
            w_t = w_t - lr * m / p
    if factor > 1:
        assert float(w_t.norm()) > 1e6 * start
    else:
        assert float(w_t.norm()) < 1e-3 * start


# -- errors ----------------------------------------------------------------------------------


def test_errors_name_the_key_the_value_and_what_is_allowed():
    model, loss, _ = tiny_mlp()
    params = list(model.parameters())

    with pytest.raises(ValueError, match="iterations must be an int >= 1, got 0"):
        hessian_top_eigenvalue(loss, params, iterations=0)
    with pytest.raises(ValueError, match="tol must be a number > 0, got 0"):
        hessian_top_eigenvalue(loss, params, tol=0)
    with pytest.raises(ValueError, match="tol must be a number > 0, got -0.1"):
        preconditioned_top_eigenvalue(loss, params, torch.optim.Adam(params), tol=-0.1)
    frozen = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"params\[1\] \(shape \(3,\)\) has requires_grad=False"):
        hessian_top_eigenvalue(loss, [params[0], frozen])
    with pytest.raises(ValueError, match="params must hold at least one tensor"):
        hessian_top_eigenvalue(loss, [])
    with pytest.raises(TypeError, match="loss_fn must be a callable"):
        hessian_top_eigenvalue(loss(), params)
    with pytest.raises(ValueError, match=r"loss_fn\(\) must return a scalar tensor, got \(8, 2\)"):
        hessian_top_eigenvalue(lambda: model(torch.zeros(8, 3, dtype=torch.float64)), params)
    with torch.no_grad():
        detached = loss()
    with pytest.raises(ValueError, match=r"no autograd graph .* torch.no_grad\(\)"):
        hessian_top_eigenvalue(lambda: detached, params)
    with pytest.raises(ValueError, match=r"init\[0\] must be a tensor of shape \(4, 3\) like params\[0\], got \(3,\)"):
        hessian_top_eigenvalue(loss, params, init=[torch.ones(3)] + [torch.ones_like(p) for p in params[1:]])
    with pytest.raises(ValueError, match="init must hold one tensor per parameter \\(4\\), got 1"):
        hessian_top_eigenvalue(loss, params, init=[torch.ones(4, 3)])

    fresh = torch.optim.Adam(params)
    with pytest.raises(
        ValueError,
        match=r"optimizer has no Adam state for params\[0\] \(shape \(4, 3\)\) yet: .* "
        r"needs at least one optimizer step first",
    ):
        preconditioned_top_eigenvalue(loss, params, fresh)
    assert len(fresh.state) == 0  # the failed look-up created no state
    with pytest.raises(
        TypeError,
        match=r"optimizer must be one of \['torch.optim.Adam', 'torch.optim.AdamW'\] .* got torch.optim.sgd.SGD",
    ):
        preconditioned_top_eigenvalue(loss, params, torch.optim.SGD(params, lr=0.1))
    opt = adam_steps(model, loss, steps=1)
    with pytest.raises(ValueError, match=r"params\[0\] \(shape \(3,\)\) is not in the optimizer's param_groups"):
        adam_preconditioner(opt, [torch.zeros(3, requires_grad=True)])

    plain = Sharpness(1.0, 1, True, False, None)
    pre = Sharpness(1.0, 1, True, True, None)
    with pytest.raises(ValueError, match=r"optimizer='adam' needs the preconditioned sharpness .* got a plain"):
        stability(plain, 0.1, "adam")
    with pytest.raises(ValueError, match=r"optimizer='sgd' needs the plain sharpness .* got a preconditioned one"):
        stability(pre, 0.1, "sgd")
    with pytest.raises(ValueError, match=r"optimizer must be one of \['sgd', 'momentum', 'adam'\], got 'lion'"):
        stability(plain, 0.1, "lion")
    assert stability(plain, 0.1, "momentum", 0.9)["threshold"] == pytest.approx(38.0, rel=1e-15)
