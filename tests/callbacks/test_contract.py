"""A contract every spikeguard callback keeps: state round-trips, hooks go away, keys are stable."""

import math

import pytest
import torch
from helpers import tiny_data, tiny_lm, trainer

import spikeguard.callbacks
from spikeguard.callbacks import AmplificationProbe, Perturb, SpikeGuard
from spikeguard.callbacks._base import CallbackBase
from spikeguard.perturb import Burst, Gaussian, Perturbation, Scale

FACTORIES = {
    "SpikeGuard": lambda: SpikeGuard(action="skip", log_every_n_steps=2, detector=dict(warmup=2, window=8)),
    "Perturb": lambda: Perturb(forward={"transformer.h.*": Gaussian(1e-3, relative=True)}),
    "AmplificationProbe": lambda: AmplificationProbe(every_n_steps=2, linearize=False, configs=("both",)),
}


def test_every_exported_callback_is_under_contract():
    assert set(FACTORIES) == set(spikeguard.callbacks.__all__)
    for name in spikeguard.callbacks.__all__:
        assert isinstance(FACTORIES[name](), getattr(spikeguard.callbacks, name))


def hooks_left(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def assert_same(a, b, where="state"):
    """Deep equality of two state dicts: tensors bitwise (NaN equal to NaN), floats exactly."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, sorted(a), sorted(b) if isinstance(b, dict) else b)
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.is_tensor(b), where
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_dict_round_trips_through_a_real_checkpoint(tmp_path, name):
    """A callback that has run writes a state; a fresh one loaded with it writes the same state back."""
    callback = FACTORIES[name]()
    burst = Perturb(perturbations=[Perturbation("transformer.ln_f", Scale(10.0), Burst([6]))], name="burst")
    t = trainer(max_steps=9, callbacks=[callback, burst], default_root_dir=str(tmp_path))
    t.fit(tiny_lm(), tiny_data())
    path = str(tmp_path / "last.ckpt")
    t.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["callbacks"][callback.state_key]
    if name == "SpikeGuard":  # it has seen the burst: the state holds a real event
        assert [e["step"] for e in state["detector"]["events"]] == [6]
    if name == "AmplificationProbe":  # probes at 0, 2, 4, 6, 8 and the probe batch
        assert [r["step"] for r in state["store"]["records"]] == [0, 2, 4, 6, 8]
        assert torch.is_tensor(state["store"]["batch"]["input_ids"])
    fresh = FACTORIES[name]()
    fresh.load_state_dict(state)
    assert_same(state, fresh.state_dict())


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_hooks_are_removed_after_fit_and_on_exception(tmp_path, name):
    callback = FACTORIES[name]()
    model = tiny_lm()
    trainer(max_steps=3, callbacks=[callback], default_root_dir=str(tmp_path)).fit(model, tiny_data())
    assert hooks_left(model) == 0

    class Boom(CallbackBase):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                raise RuntimeError("boom")

    callback, model = FACTORIES[name](), tiny_lm()
    t = trainer(max_steps=5, callbacks=[callback, Boom()], default_root_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="boom"):
        t.fit(model, tiny_data())
    assert hooks_left(model) == 0
    # SpikeGuard(action="skip") wraps optimizer.step: the wrapper is gone again.
    assert not any("SpikeGuard._patch" in getattr(opt.step, "__qualname__", "") for opt in t.optimizers)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_key_names_the_instance_not_its_settings(name):
    """Lightning restores a callback only under its exact key: settings must not be part of it."""
    key = FACTORIES[name]().state_key
    assert key.startswith(name) and "{" not in key
    assert key == FACTORIES[name]().state_key


def test_two_perturb_callbacks_never_collide():
    a = Perturb(forward={"transformer.h.0": Gaussian(0.1)})
    b = Perturb(forward={"transformer.h.1": Gaussian(0.1)})
    c = Perturb(forward={"transformer.h.0": Gaussian(0.1)}, name="again")
    assert len({a.state_key, b.state_key, c.state_key}) == 3
    assert a.state_key == Perturb(forward={"transformer.h.0": Gaussian(0.1)}, log_every_n_steps=5).state_key
