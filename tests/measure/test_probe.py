"""The amplification probe: observed against independent autograd runs, constants against
explicit Jacobians, bounds never below observation, and no side effects."""

import json
import math

import pytest
import torch
from helpers import assert_same_training_state, tiny_gpt2, training_state
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from spikeguard.measure.probe import AmplificationProbe
from spikeguard.operators import OperatorChain
from spikeguard.perturb import Gaussian, Injector, Uniform


def mse(model, batch):
    x, y = batch
    return 0.5 * (model(x) - y).pow(2).sum()


class Block(nn.Module):
    def __init__(self, a, b, act):
        super().__init__()
        self.lin = nn.Linear(a, b, dtype=torch.float64)
        self.act = act

    def forward(self, x):
        return self.act(self.lin(x))


def mlp(widths, seed, act=nn.Tanh):
    torch.manual_seed(seed)
    return nn.Sequential(*[Block(a, b, act()) for a, b in zip(widths[:-1], widths[1:])])


def batch_for(widths, seed, n=3):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, widths[0], generator=gen, dtype=torch.float64),
        torch.randn(n, widths[-1], generator=gen, dtype=torch.float64),
    )


def all_grads(model, loss):
    return torch.autograd.grad(loss, [p for p in model.parameters()])


# -- observed against an independent computation -------------------------------------------


def test_observed_total_equals_independent_autograd_with_tied_weights(ids):
    """The decoupled, chained backward is the true backward: compare with plain autograd."""
    model = tiny_gpt2(n_layer=3).double()
    chain = OperatorChain.from_model(model)
    spec = dict(forward={"transformer.h.0": Gaussian(0.01, relative=True)},
                backward={"transformer.h.2": Gaussian(0.01, relative=True)}, seed=4)
    loss_fn = lambda m, b: m(input_ids=b, labels=b).loss  # noqa: E731
    result = AmplificationProbe(model, chain, loss_fn, Injector(chain, **spec)).run(ids, step=0)

    params = list(model.parameters())  # wte and lm_head are one tensor: counted once
    clean = torch.autograd.grad(loss_fn(model, ids), params)
    reference = Injector(chain, **spec)
    totals = {}
    for config, fwd, bwd in [("forward", True, False), ("backward", False, True), ("both", True, True)]:
        reference.set_step(0)
        with reference, reference.only(forward=fwd, backward=bwd):
            perturbed = torch.autograd.grad(loss_fn(model, ids), params)
        totals[config] = float(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(perturbed, clean))))
        assert result.observed[config].total == pytest.approx(totals[config], rel=1e-9), config
    g_norm = float(torch.sqrt(sum((g**2).sum() for g in clean)))
    assert result.observed["both"].grad_norm == pytest.approx(g_norm, rel=1e-12)
    assert result.observed["both"].m == pytest.approx(totals["both"] / g_norm, rel=1e-9)


def test_observed_per_operator_errors_match_hooks():
    widths = [4, 5, 5, 3]
    model = mlp(widths, seed=0)
    chain = OperatorChain.from_model(model)
    batch = batch_for(widths, 0)
    spec = dict(forward={"1": Gaussian(0.05)}, backward={"2": Gaussian(0.05)}, seed=1)
    result = AmplificationProbe(model, chain, mse, Injector(chain, **spec)).run(batch)

    def capture(injector):
        outs, msgs = {}, {}
        hooks = []
        if injector:
            injector.set_step(0)
            injector.attach()
        for op in chain:
            def hook(m, a, out, name=op.name):
                outs[name] = out.detach()
                out.register_hook(lambda g: msgs.__setitem__(name, g))
            hooks.append(op.module.register_forward_hook(hook))
        try:
            loss = mse(model, batch)
            grads = torch.autograd.grad(loss, [op.module.lin.weight for op in chain] + [op.module.lin.bias for op in chain])
        finally:
            [h.remove() for h in hooks]
            if injector:
                injector.detach()
        return outs, msgs, grads

    z, g, G = capture(None)
    zh, gh, Gh = capture(Injector(chain, **spec))
    obs = result.observed["both"]
    n = len(chain)
    for i, name in enumerate(chain.names):
        assert float(obs.e[i]) == pytest.approx(float((zh[name] - z[name]).norm()), rel=1e-12, abs=1e-15)
        assert float(obs.b[i]) == pytest.approx(float((gh[name] - g[name]).norm()), rel=1e-12, abs=1e-15)
        d = math.sqrt(float((Gh[i] - G[i]).norm()) ** 2 + float((Gh[n + i] - G[n + i]).norm()) ** 2)
        assert float(obs.d[i]) == pytest.approx(d, rel=1e-12, abs=1e-15)


def test_two_clean_passes_differ_by_exactly_zero_with_dropout_on(ids):
    model = tiny_gpt2(n_layer=2, resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3).train()
    chain = OperatorChain.from_model(model)
    # A zero perturbation: the probe's two forwards and four backwards must coincide.
    injector = Injector(chain, forward={"transformer.h.0": Gaussian(0.0)}, backward={"transformer.h.1": Uniform(0.0)})
    result = AmplificationProbe(model, chain, lambda m, b: m(input_ids=b, labels=b).loss, injector).run(ids)
    for obs in result.observed.values():
        assert obs.total == 0.0
        assert torch.equal(obs.e, torch.zeros(len(chain), dtype=torch.float64))
        assert torch.equal(obs.b, torch.zeros(len(chain), dtype=torch.float64))
        assert torch.equal(obs.d, torch.zeros(len(chain), dtype=torch.float64))


def test_probe_leaves_params_grads_optimizer_and_rng_bitwise_unchanged(ids):
    model = tiny_gpt2(n_layer=2, resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2).train()
    chain = OperatorChain.from_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model(input_ids=ids, labels=ids).loss.backward()  # leave a .grad in place
    before = training_state(model, opt)
    torch.manual_seed(123)
    rng = torch.random.get_rng_state()

    injector = Injector(chain, forward={"transformer.h.*": Gaussian(0.1, relative=True)},
                        backward={"transformer.h.*": Gaussian(0.1, relative=True)})
    AmplificationProbe(model, chain, lambda m, b: m(input_ids=b, labels=b).loss, injector).run(ids)

    assert torch.equal(torch.random.get_rng_state(), rng)
    assert_same_training_state(before, training_state(model, opt))
    assert not injector.attached
    assert all(len(op.module._forward_hooks) == 0 for op in chain)


# -- constants against explicit Jacobians --------------------------------------------------


def test_power_iteration_matches_explicit_jacobian_norms():
    widths = [3, 4, 4, 2]
    model = mlp(widths, seed=3)
    chain = OperatorChain.from_model(model)
    x, y = batch_for(widths, 3, n=2)
    injector = Injector(chain, forward={"0": Gaussian(1e-6)})
    probe = AmplificationProbe(model, chain, mse, injector, first_power_iterations=500, tol=1e-10, loss_curvature=1.0)
    result = probe.run((x, y))
    assert math.isnan(float(result.constants.gains[0]))
    z = x
    for i, op in enumerate(chain):
        block = op.module
        if i > 0:
            J = torch.autograd.functional.jacobian(block, z).reshape(z.shape[0] * block.lin.out_features, -1)
            assert float(result.constants.gains[i]) == pytest.approx(float(torch.linalg.matrix_norm(J, ord=2)), rel=1e-6)
        params = (block.lin.weight, block.lin.bias)

        def f(w, b, z=z, block=block):
            return block.act(nn.functional.linear(z, w, b))

        Jw, Jb = torch.autograd.functional.jacobian(f, tuple(p.detach() for p in params))
        K = torch.cat([Jw.reshape(Jw.shape[0] * Jw.shape[1], -1), Jb.reshape(Jb.shape[0] * Jb.shape[1], -1)], dim=1)
        assert float(result.constants.param_gains[i]) == pytest.approx(float(torch.linalg.matrix_norm(K, ord=2)), rel=1e-6)
        z = block(z).detach()
    assert result.constants.converged and result.constants.power_iterations < 500


def test_loss_curvature_of_a_quadratic_is_measured_exactly():
    widths = [3, 3]
    model = mlp(widths, seed=0, act=nn.Identity)
    chain = OperatorChain.from_model(model)
    injector = Injector(chain, forward={"0": Gaussian(1e-3)})
    for c in (0.5, 3.0):
        loss = lambda m, b, c=c: c * mse(m, b)  # noqa: E731
        result = AmplificationProbe(model, chain, loss, injector).run(batch_for(widths, 0))
        assert result.constants.loss_curvature == pytest.approx(c, rel=1e-6)


class NoForwardAD(torch.autograd.Function):
    """x ↦ x³ with a backward but no forward-mode formula (like some fused kernels)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


class Cube(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3, dtype=torch.float64)

    def forward(self, x):
        return NoForwardAD.apply(self.lin(x))


def test_ops_without_forward_mode_ad_fall_back_to_double_vjp_and_say_so():
    torch.manual_seed(0)
    model = nn.Sequential(Cube(), Cube())
    chain = OperatorChain.from_model(model)
    x, y = batch_for([3, 3], 0, n=2)
    injector = Injector(chain, forward={"0": Gaussian(1e-4)})
    result = AmplificationProbe(model, chain, mse, injector, first_power_iterations=300, tol=1e-12).run((x, y))
    notes = " | ".join(result.notes)
    assert "L_i: an operator has no forward-mode AD, J v by the double-VJP trick" in notes
    assert "M_i: an operator has no forward-mode AD" in notes
    assert "linearized prediction unavailable" in notes
    assert result.observed["forward"].linear is None
    z = model[0](x)
    J = torch.autograd.functional.jacobian(model[1], z).reshape(6, 6)
    assert float(result.constants.gains[1]) == pytest.approx(float(torch.linalg.matrix_norm(J, ord=2)), rel=1e-6)


# -- predictions against observation -------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    depth=st.integers(2, 4),
    width=st.integers(2, 5),
    seed=st.integers(0, 1000),
    log_size=st.floats(-6.0, -3.0),
    linear=st.booleans(),
)
def test_bound_is_never_below_observation(depth, width, seed, log_size, linear):
    widths = [width] * (depth + 1)
    model = mlp(widths, seed, act=nn.Identity if linear else nn.Tanh)
    chain = OperatorChain.from_model(model)
    size = 10.0**log_size
    injector = Injector(chain, forward={"*": Gaussian(size)}, backward={"*": Gaussian(size)}, seed=seed)
    probe = AmplificationProbe(model, chain, mse, injector, first_power_iterations=200, tol=1e-10)
    result = probe.run(batch_for(widths, seed))
    for config, obs in result.observed.items():
        slack = 1 + 1e-6
        assert (obs.e <= obs.bound.e * slack + 1e-15).all(), config
        assert (obs.b <= obs.bound.b * slack + 1e-15).all(), config
        assert (obs.d <= obs.bound.d * slack + 1e-15).all(), config
        assert obs.total <= obs.bound.total * slack + 1e-15, config


def gpt2_probe(size, block="transformer.h.1", n_layer=4):
    model = tiny_gpt2(n_layer=n_layer, n_embd=64)
    chain = OperatorChain.from_model(model)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    injector = Injector(chain, forward={block: Gaussian(size, relative=True)}, seed=0)
    probe = AmplificationProbe(model, chain, lambda m, b: m(input_ids=b, labels=b).loss, injector, configs=("forward",))
    return chain, probe.run(ids)


def test_gpt2_error_grows_with_depth_at_the_slope_the_gains_predict():
    chain, result = gpt2_probe(1e-3)
    obs = result.observed["forward"]
    blocks = [chain.index(f"transformer.h.{i}") for i in (1, 2, 3)]
    e = obs.e[blocks]
    assert (e[1:] > e[:-1]).all()  # grows above the perturbed block
    observed_slope = float(torch.log(e[-1] / e[0])) / (len(blocks) - 1)
    gains = result.constants.gains[blocks[1:]]
    predicted_slope = float(torch.log(gains).mean())  # the bound's e_i = L_i e_{i-1} above the block
    # Spectral gains are worst-case directions: the observed per-block log-growth stays
    # below the prediction, within 1 nat per block for these pre-norm residual blocks.
    assert 0 < observed_slope <= predicted_slope
    assert predicted_slope - observed_slope < 1.0
    # The first-order prediction is exact to first order: within 2x (here within 1%).
    lin = obs.linear
    above = [chain.index(n) for n in chain.names[chain.index("transformer.h.1"):]]
    ratio = lin.e[above] / obs.e[above]
    assert ((ratio > 0.5) & (ratio < 2)).all()
    assert ((ratio - 1).abs() < 0.01).all()
    assert 0.5 < lin.total / obs.total < 2
    assert "math SDPA backend" in " ".join(result.notes)  # eval-mode CPU flash attention has no forward AD


def test_linear_prediction_degrades_gracefully_for_large_perturbations():
    _, small = gpt2_probe(1e-3)
    _, large = gpt2_probe(0.5)
    err = lambda r: abs(r.observed["forward"].linear.total / r.observed["forward"].total - 1)  # noqa: E731
    assert err(small) < err(large)


def test_warm_start_and_result_serialisation(ids):
    model = tiny_gpt2(n_layer=2)
    chain = OperatorChain.from_model(model)
    injector = Injector(chain, forward={"transformer.h.0": Gaussian(0.01, relative=True)})
    probe = AmplificationProbe(model, chain, lambda m, b: m(input_ids=b, labels=b).loss, injector, first_power_iterations=30)
    first = probe.run(ids)
    second = probe.run(ids, step=1)
    assert second.constants.power_iterations == 1  # warm-started: one step per probe after the first
    torch.testing.assert_close(second.constants.gains[1:], first.constants.gains[1:], rtol=2e-2, atol=0)
    data = json.loads(json.dumps(second.to_dict()))
    assert data["step"] == 1 and data["names"] == chain.names
    assert set(data["observed"]) == {"forward", "backward", "both"}
    table = second.table("forward")
    assert "transformer.h.0" in table and "|G-Ĝ| observed" in table


# -- errors --------------------------------------------------------------------------------


@pytest.fixture
def small():
    widths = [3, 3, 3]
    model = mlp(widths, seed=0)
    chain = OperatorChain.from_model(model)
    return model, chain, Injector(chain, forward={"0": Gaussian(0.1)}), batch_for(widths, 0)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(model="m"), TypeError, "AmplificationProbe.model must be an nn.Module, got str"),
        (dict(chain=[1]), TypeError, "AmplificationProbe.chain must be an OperatorChain, got list"),
        (dict(loss_fn=3), TypeError, "AmplificationProbe.loss_fn must be callable (model, batch) -> loss, got 3"),
        (dict(injector=None), TypeError, "AmplificationProbe.injector must be an Injector, got NoneType"),
        (dict(power_iterations=0), ValueError, "AmplificationProbe.power_iterations must be an int >= 1, got 0"),
        (dict(tol=0), ValueError, "AmplificationProbe.tol must be > 0, got 0"),
        (dict(loss_curvature="auto"), ValueError, "AmplificationProbe.loss_curvature must be 'measure' or a number >= 0, got 'auto'"),
        (dict(configs=("sideways",)), ValueError, "AmplificationProbe.configs must be a non-empty subset of ['forward', 'backward', 'both'], got ['sideways']"),
    ],
)
def test_bad_arguments(small, kwargs, error, message):
    model, chain, injector, _ = small
    args = dict(model=model, chain=chain, loss_fn=mse, injector=injector)
    args.update(kwargs)
    with pytest.raises(error) as err:
        AmplificationProbe(**args)
    assert str(err.value) == message


def test_injector_on_another_chain_is_refused(small):
    model, chain, _, _ = small
    other = OperatorChain.from_patterns(model, ["0"])
    with pytest.raises(ValueError, match=r"injector was built on another chain: \['0'\] != \['0', '1'\]"):
        AmplificationProbe(model, chain, mse, Injector(other, forward={"0": Gaussian(0.1)}))


def test_runtime_errors(small):
    model, chain, injector, batch = small
    with injector:
        with pytest.raises(ValueError, match="AmplificationProbe needs its own Injector: this one is attached elsewhere"):
            AmplificationProbe(model, chain, mse, injector).run(batch)
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar tensor that requires grad, got Tensor\(3, 3\)"):
        AmplificationProbe(model, chain, lambda m, b: m(b[0]) - b[1], injector).run(batch)
    skip = lambda m, b: 0.5 * (m[0](b[0]) - b[1]).pow(2).sum()  # noqa: E731 (operator '1' never runs)
    with pytest.raises(ValueError, match=r"operators did not run on the probe batch: \['1'\]"):
        AmplificationProbe(model, chain, skip, injector).run(batch)
    assert not injector.attached
