"""A contract every spikeguard callback keeps: state round-trips, hooks go away."""

import pytest
import torch
from helpers import tiny_data, tiny_lm, trainer

from spikeguard.callbacks import AmplificationProbe, Perturb, SpikeGuard
from spikeguard.callbacks._base import CallbackBase
from spikeguard.perturb import Gaussian

FACTORIES = {
    "SpikeGuard": lambda: SpikeGuard(action="skip", log_every_n_steps=2, warmup=2, window=8),
    "Perturb": lambda: Perturb(forward={"transformer.h.*": Gaussian(1e-3, relative=True)}),
    "AmplificationProbe": lambda: AmplificationProbe(every_n_steps=2, linearize=False, configs=("both",)),
}


def hooks_left(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_dict_round_trips_through_a_real_checkpoint(tmp_path, name):
    callback = FACTORIES[name]()
    t = trainer(max_steps=5, callbacks=[callback], default_root_dir=str(tmp_path))
    t.fit(tiny_lm(), tiny_data())
    path = str(tmp_path / "last.ckpt")
    t.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["callbacks"][callback.state_key]
    fresh = FACTORIES[name]()
    fresh.load_state_dict(state)
    again = fresh.state_dict()
    assert again.keys() == state.keys()
    for key in state:
        if isinstance(state[key], dict):  # the detector's nested state
            for k, v in state[key].items():
                if torch.is_tensor(v):  # NaN marks empty window slots: equal to NaN here
                    torch.testing.assert_close(again[key][k], v, rtol=0, atol=0, equal_nan=True)
                else:
                    assert v == again[key][k], (key, k)
        else:
            assert state[key] == again[key], key


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
