"""spikeguard reproduce: the problem's constants, small spike runs and phase grid, probe bounds, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import pytest
import torch

from spikeguard import theory
from spikeguard.cli import main
from spikeguard.measure import hessian_top_eigenvalue
from spikeguard.perturb import Always, Injector, Scale, Window
from spikeguard.reproduce import experiments as ex
from spikeguard.reproduce import spikes as sp
from spikeguard.reproduce.cli import parse_only
from spikeguard.reproduce.problems import INSTALL_HINT, DTYPE, LogisticChain, Offset, breast_cancer, train

SKIP = "spikeguard reproduce needs scikit-learn and matplotlib: pip install 'spikeguard[reproduce]'"


@pytest.fixture(scope="module")
def data():
    pytest.importorskip("sklearn", reason=SKIP)
    pytest.importorskip("matplotlib", reason=SKIP)
    return breast_cancer()


@pytest.fixture(scope="module")
def settings():
    return ex.Settings.quick_preset(seed=0)


@pytest.fixture(scope="module")
def bench(data, settings):
    return ex.spike_bench(data, settings)


@pytest.fixture(scope="module")
def cases(bench):
    """Experiment 3's SGD runs (the momentum ones are exercised by the CLI test)."""
    picked = {k: v for k, v in ex.spike_cases(bench).items() if not k.startswith("momentum")}
    return {name: ex.spike_run(bench, **kwargs) for name, kwargs in picked.items()}


# -- the problem -----------------------------------------------------------------------


def test_data_is_standardized_with_an_intercept(data):
    X, y = data.X, data.y
    assert X.shape == (569, 31) and X.dtype == torch.float64
    assert torch.allclose(X[:, :-1].mean(0), torch.zeros(30, dtype=DTYPE), atol=1e-12)
    assert torch.allclose(X[:, :-1].std(0, unbiased=False), torch.ones(30, dtype=DTYPE), atol=1e-12)
    assert torch.equal(X[:, -1], torch.ones(569, dtype=DTYPE))
    assert set(y.tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("regularizer", ["l2", "nonconvex"])
@pytest.mark.parametrize("depth,gain", [(1, 1.0), (4, 1.0), (5, 0.8), (3, 1.25)])
def test_smoothness_is_attained_at_zero(data, regularizer, depth, gain):
    """L = C²(λ_max(XᵀX)/(4n) + ρ) is the Hessian's top eigenvalue at w = 0 (σ(1-σ) = 1/4, r'' = ρ)."""
    problem = LogisticChain(data, regularizer, 0.1, depth, gain)
    zero = torch.zeros(data.num_features, dtype=DTYPE)
    top = float(torch.linalg.eigvalsh(problem.hessian(zero))[-1])
    assert problem.smoothness() == pytest.approx(top, rel=1e-12)
    problem.set_weight(zero)
    lib = hessian_top_eigenvalue(lambda: problem.objective(problem.weight), [problem.weight], iterations=200,
                                 tol=1e-10, generator=torch.Generator().manual_seed(0))
    assert lib.value == pytest.approx(top, rel=1e-6)


@pytest.mark.parametrize("regularizer", ["l2", "nonconvex"])
def test_closed_forms_match_autograd_through_the_chain(data, regularizer):
    problem = LogisticChain(data, regularizer, 0.1, 4, 1.25)
    w = torch.randn(data.num_features, generator=torch.Generator().manual_seed(3), dtype=DTYPE) * 0.3
    problem.set_weight(w)
    chain_loss = problem.loss_fn(problem.model, (data.X, data.y))
    assert chain_loss.item() == pytest.approx(problem.objective(w).item(), rel=1e-13)
    (g,) = torch.autograd.grad(chain_loss, [problem.weight])
    assert torch.allclose(g, problem.gradient(w), rtol=1e-11, atol=1e-14)
    H = torch.autograd.functional.hessian(problem.objective, w)
    assert torch.allclose(H, problem.hessian(w), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("depth,gain", [(1, 1.0), (6, 0.8), (6, 1.25)])
def test_l2_chain_stays_strongly_convex_and_reparametrizes_the_same_problem(data, depth, gain):
    problem = LogisticChain(data, "l2", 0.1, depth, gain)
    gen = torch.Generator().manual_seed(depth)
    for _ in range(5):
        w = torch.randn(data.num_features, generator=gen, dtype=DTYPE)
        assert float(torch.linalg.eigvalsh(problem.hessian(w))[0]) >= problem.strong_convexity() * (1 - 1e-9)
    w_star, loss_star = problem.solve()
    base_w, base_loss = LogisticChain(data, "l2", 0.1, 1, 1.0).solve()
    assert loss_star == pytest.approx(base_loss, rel=1e-12)
    assert torch.allclose(problem.total_gain * w_star, base_w, rtol=1e-9, atol=1e-12)


def test_loss_curvature_is_the_supremum_of_h(data):
    """L_h = max(1/(4B), ρ): h's Hessian in z_N at z = 0 attains it, and nowhere exceeds it."""
    problem = LogisticChain(data, "nonconvex", 0.1, 3, 1.0)
    B = 16
    y = data.y[:B]
    random = torch.randn(B + 31, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    for z in (torch.zeros(B + 31, dtype=DTYPE), random):
        H = torch.autograd.functional.hessian(lambda t: problem.h(t, y), z)
        top = float(torch.linalg.eigvalsh(H).abs().max())
        assert top <= problem.loss_curvature(B) * (1 + 1e-12)
    assert top < problem.loss_curvature(B)
    H0 = torch.autograd.functional.hessian(lambda t: problem.h(t, y), torch.zeros(B + 31, dtype=DTYPE))
    assert float(torch.linalg.eigvalsh(H0).abs().max()) == pytest.approx(problem.loss_curvature(B), rel=1e-12)


def test_offset_is_a_constant_bias():
    x = torch.randn(4, 3, dtype=DTYPE)
    q, delta = Offset(0.5)(x, torch.Generator().manual_seed(0), 2.0)
    assert torch.equal(delta, torch.full_like(x, 1.0)) and torch.equal(q, x + 1.0)
    assert Offset(0.0).is_identity
    with pytest.raises(ValueError, match="Offset.value must be a finite number, got inf"):
        Offset(math.inf)


def test_problem_validates_its_settings(data):
    with pytest.raises(ValueError, match=r"regularizer must be one of \['l2', 'nonconvex'\], got 'l1'"):
        LogisticChain(data, "l1")
    with pytest.raises(ValueError, match="depth must be an int >= 1, got 0"):
        LogisticChain(data, depth=0)
    with pytest.raises(ValueError, match="gain must be > 0, got -1"):
        LogisticChain(data, gain=-1)


def test_training_is_deterministic(data):
    problem = LogisticChain(data, "l2", 0.1, 4, 1.0)

    def once():
        inj = Injector(problem.chain, forward={"1": (Offset(0.01), Always())}, seed=5)
        return train(problem, 50, 0.05, injectors=(inj,), batch_size=32, seed=7).excess

    assert torch.equal(once(), once())


# -- spikes: experiment 3 in small --------------------------------------------------------


def test_floor_bias_is_constant_in_w(bench):
    problem = bench.problem
    offset = Injector(problem.chain, backward={sp.FLOOR_OP: (Offset(bench.settings.floor_offset), Always())})
    w_star = problem.solve()[0]
    at = lambda w: sp._perturbed_gradient(problem, offset, w, 0) - problem.gradient(w)  # noqa: E731
    assert torch.allclose(at(w_star), at(bench.w_floor), rtol=1e-10, atol=1e-15)
    assert float(problem.gradient(bench.w_floor).norm()) == pytest.approx(bench.floor_bias, rel=1e-9)


def test_probe_measures_the_relative_bias_and_update_sharpness_scales_by_1_minus_m(bench):
    assert sp._measured_m(bench, 0.5) == pytest.approx(0.5, rel=1e-9)
    problem = bench.problem
    scaled = Injector(problem.chain, backward={sp.BIAS_OP: (Scale(0.5), Window(0))})
    assert ex.update_sharpness(problem, scaled, bench.w_floor, 1) == pytest.approx(0.5 * bench.sharpness, rel=1e-5)


def test_spike_outcomes_agree_with_the_theory(cases):
    for name, c in cases.items():
        assert c["predicted"] == c["observed"], name
    assert {c["observed"] for c in cases.values()} == {"recover", "diverge"}
    assert cases["SGD, m=1.5, γλ_b=1"]["stopped"] == "blew up"  # ascent: m ≥ 1
    assert cases["SGD, m=0, γλ_b=2.4"]["predicted_reason"].startswith("sharpness")


def test_spike_height_is_bounded_by_section_4(cases):
    for name, c in cases.items():
        assert c["spike_height_observed"] <= c["spike_height_bound"], name


def test_recovery_is_no_slower_than_k_rec(cases):
    """k_rec bounds the observed recovery: q = 1 - γμ(1-m)/2 is a worst-case contraction."""
    recovered = [c for c in cases.values() if c.get("k_rec_predicted") is not None]
    assert len(recovered) >= 3
    for c in recovered:
        assert c["recovery_steps_observed"] is not None
        assert c["recovery_steps_observed"] <= c["k_rec_predicted"]
    # The (1 - m) in q: m = 0.5 doubles k_rec, and the observed recovery about doubles too.
    k0, k5 = cases["SGD, m=0, γλ_b=1"], cases["SGD, m=0.5, γλ_b=1"]
    assert k5["k_rec_predicted"] / k0["k_rec_predicted"] == pytest.approx(2.0, rel=0.1)
    assert 1.5 <= k5["recovery_steps_observed"] / k0["recovery_steps_observed"] <= 3.0


@pytest.mark.xfail(strict=True, reason=(
    "Known gap between theory and observation (docs/reproduction.md): the observed recovery is 4-10x "
    "faster than k_rec, because Proposition 3's q = 1 - γμ(1-m)/2 contracts 4x slower than gradient "
    "descent's (1-γμ)^2 and a spike mostly excites sharp directions, while μ is a worst case."))
def test_recovery_within_twice_k_rec(cases):
    for c in cases.values():
        if c.get("k_rec_predicted") is not None:
            assert c["k_rec_predicted"] / 2 <= c["recovery_steps_observed"] <= 2 * c["k_rec_predicted"]


# -- experiment 4 on a small grid ---------------------------------------------------------


def test_phase_diagram_agrees_on_a_small_grid(data, settings, tmp_path):
    small = dataclasses.replace(settings, phase_biases=(0.0, 0.5, 1.25, 2.0), phase_ratios=(0.5, 0.9, 1.1, 1.5))
    out = ex.phase_diagram(data, small, tmp_path / "phase.png")
    cells = out["panels"]["sgd"]["cells"]
    assert len(cells) == 16
    assert out["agreement"] >= 0.9
    assert {c["observed"] for c in cells} == {"recover", "diverge"}
    assert (tmp_path / "phase.png").stat().st_size > 10_000


# -- experiment 5: the bound holds on every probe -----------------------------------------


def test_probe_bound_holds_and_the_asymmetry_follows_a_f_over_a_b(data, settings, tmp_path):
    small = dataclasses.replace(settings, depths=(1, 2, 4), gains=(0.8, 1.25))
    out = ex.forward_backward(data, small, tmp_path / "fb.png")
    assert out["bound_holds_on_every_probe"] and out["num_probes"] == 24
    for row in out["rows"]:
        for kind in ("relative", "absolute"):
            r = row[kind]
            assert r["observed_forward"] <= r["bound_forward"] and r["observed_backward"] <= r["bound_backward"]
    assert out["max_relative_error_M1"] < 1e-6 and out["max_relative_error_gains"] < 1e-9
    for gain, slopes in out["log_slope_per_operator"].items():
        # A^f_1/A^b_1 = L_h c^(2(N-1)): the observed ratio of absolute perturbations has that slope.
        assert slopes["A_ratio_first_op"] == pytest.approx(2 * math.log(float(gain)), rel=1e-9)
        assert slopes["absolute_observed_ratio"] == pytest.approx(slopes["A_ratio_first_op"], abs=0.02)


# -- the command --------------------------------------------------------------------------


def test_cli_quick_only_3_writes_figure_json_and_summary(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["reproduce", "--out", str(out), "--quick", "--only", "3"]) == 0
    for name in ("3_spikes.png", "results.json", "summary.md"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert list(doc["experiments"]) == ["3"]
    assert doc["agreement"]["spike_outcome_agreement"] == 1.0
    assert doc["command"] == "spikeguard reproduce --out DIR --quick --only 3"
    assert "Outcome agreement" in (out / "summary.md").read_text()
    err = capsys.readouterr().err
    assert "[1/1] experiment 3: spikes done in" in err


@pytest.mark.parametrize("value", ["7", "a", "1,1", "", "0", "1;2"])
def test_cli_rejects_bad_only(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["reproduce", "--out", str(tmp_path), "--only", value])
    assert err.value.code == 2
    assert "--only" in capsys.readouterr().err


def test_parse_only_keeps_the_order():
    assert parse_only("3,1") == (3, 1)
    assert parse_only(" 5 ") == (5,)


def test_cli_requires_out(capsys):
    with pytest.raises(SystemExit) as err:
        main(["reproduce", "--quick"])
    assert err.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_cli_out_must_be_a_directory(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("x")
    assert main(["reproduce", "--out", str(path), "--only", "3"]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_cli_without_scikit_learn_says_how_to_install(monkeypatch, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason=SKIP)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert main(["reproduce", "--out", str(tmp_path / "x"), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "scikit-learn" in err and INSTALL_HINT in err
    assert not (tmp_path / "x").exists()


def test_cli_help_lists_reproduce(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "reproduce" in capsys.readouterr().out


def test_theory_functions_are_what_the_predictions_use(bench):
    """The spike verdict and k_rec are theory.spike_outcome / theory.recovery_steps, not re-derived."""
    c = ex.spike_run(bench, lr=1 / bench.sharpness, m=0.0)
    expected = theory.spike_outcome(0.0, bench.sharpness, theory.stability_threshold(c["lr"]))
    assert c["predicted"] == expected.verdict and c["predicted_reason"] == expected.reason
    q = theory.pl_rate(c["lr"], c["mu_estimated"], 0.0)
    assert c["k_rec_predicted"] == theory.recovery_steps(c["spike_excess"], bench.floor, q, bench.settings.kappa)
