"""Perturb and AmplificationProbe callbacks in tiny Lightning runs."""

import json
import os

import pytest
import torch
from helpers import tiny_data, tiny_lm, trainer

from spikeguard import keys
from spikeguard.callbacks import AmplificationProbe, Perturb, SpikeGuard
from spikeguard.callbacks._base import CallbackBase
from spikeguard.perturb import Always, Burst, Every, Gaussian, Perturbation, Rounding, Scale


class Applied(CallbackBase):
    """Records the Perturb callback's applied norms after every optimizer step's backward."""

    def __init__(self, perturb):
        self.perturb, self.seen = perturb, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.seen[trainer.global_step] = {k: float(v) for k, v in self.perturb.injector.applied_norms().items()}


def test_schedules_follow_the_optimizer_step_under_accumulation(tmp_path):
    perturb = Perturb(forward={"transformer.h.1": (Gaussian(0.1, relative=True), Every(3))})
    applied = Applied(perturb)
    t = trainer(max_steps=7, callbacks=[perturb, applied], accumulate_grad_batches=2, default_root_dir=str(tmp_path))
    t.fit(tiny_lm(), tiny_data())
    assert sorted(applied.seen) == list(range(7))
    on = [step for step, norms in applied.seen.items() if norms]
    assert on == [0, 3, 6]  # keyed on the optimizer step, not on the micro-batch
    assert not perturb.injector.attached  # detached at teardown


def test_perturbations_and_dicts_combine_and_are_logged(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    perturb = Perturb(
        forward={"transformer.h.0": Rounding("e4m3")},
        perturbations=[Perturbation("transformer.h.1", Gaussian(1e-3, relative=True), direction="backward")],
    )
    logger = CSVLogger(str(tmp_path), name="run")
    trainer(max_steps=21, callbacks=[perturb], logger=logger, log_every_n_steps=10, default_root_dir=str(tmp_path)).fit(tiny_lm(), tiny_data())
    assert set(perturb.injector.specs["forward"]) == {"transformer.h.0"}
    assert set(perturb.injector.specs["backward"]) == {"transformer.h.1"}
    import csv

    rows = list(csv.DictReader(open(os.path.join(logger.log_dir, "metrics.csv"))))
    logged = {k for r in rows for k, v in r.items() if v}
    assert keys.perturb_metric("forward", "transformer.h.0") in logged
    assert keys.perturb_metric("backward", "transformer.h.1") in logged


def test_perturb_does_not_touch_validation(tmp_path):
    perturb = Perturb(forward={"transformer.ln_f": Scale(2.0)})
    attached = {"train": [], "val": []}

    class Watch(CallbackBase):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            attached["train"].append(perturb.injector.attached)

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            attached["val"].append(perturb.injector.attached)

    t = trainer(max_steps=4, callbacks=[perturb, Watch()], limit_val_batches=2, val_check_interval=2,
                num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    t.fit(tiny_lm(), tiny_data())
    assert attached["train"] == [True] * 4
    assert attached["val"] and not any(attached["val"])


def test_perturb_state_dict_checks_the_seed():
    p = Perturb(forward={"*": Gaussian(0.1)}, seed=3)
    state = p.state_dict()
    Perturb(forward={"*": Gaussian(0.1)}, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match=r"written with seed=3, this callback has seed=4; the resumed run would inject different noise"):
        Perturb(forward={"*": Gaussian(0.1)}, seed=4).load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(), ValueError, "Perturb needs at least one of forward=, backward= or perturbations=, got none"),
        (dict(perturbations=[1]), TypeError, "Perturb.perturbations must be a list of Perturbation, got [1]"),
        (dict(forward={"*": Gaussian(0.1)}, seed="x"), TypeError, "Perturb.seed must be an int, got 'x'"),
        (dict(forward={"*": Gaussian(0.1)}, log_every_n_steps=0), ValueError, "Perturb.log_every_n_steps must be None or an int >= 1, got 0"),
    ],
)
def test_perturb_bad_arguments(kwargs, error, message):
    with pytest.raises(error) as err:
        Perturb(**kwargs)
    assert str(err.value) == message


def test_unknown_operator_fails_in_setup_with_close_names(tmp_path):
    t = trainer(max_steps=1, callbacks=[Perturb(forward={"transformer.blocks.*": Gaussian(0.1)})], default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"'transformer.blocks.\*' matches no operator of the chain; close names: \["):
        t.fit(tiny_lm(), tiny_data())


# -- AmplificationProbe ----------------------------------------------------------------


def test_probe_runs_on_schedule_logs_writes_and_publishes(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    probe = AmplificationProbe(every_n_steps=10, linearize=False, sharpness=True, sharpness_iterations=5)
    logger = CSVLogger(str(tmp_path), name="run")
    t = trainer(max_steps=25, callbacks=[probe], logger=logger, default_root_dir=str(tmp_path))
    t.fit(tiny_lm(), tiny_data())
    assert probe.num_probes == 3  # steps 0, 10, 20, each before that step's update
    with open(os.path.join(logger.log_dir, "spikeguard", "probes.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [0, 10, 20] and all(r["type"] == "probe" for r in records)
    # Step 0 runs before Adam's first step: no second moments, no preconditioned sharpness.
    assert records[0]["stability"] is None
    for r in records[1:]:
        assert r["stability"]["sharpness"] > 0 and r["stability"]["preconditioned"]
        assert r["stability"]["ratio"] == pytest.approx(r["stability"]["sharpness"] / r["stability"]["threshold"])
    # The store holds the same records, typed, for SpikeGuard's predictions.
    latest = probe.store.latest()
    assert [r.step for r in probe.store.records] == [0, 10, 20]
    assert latest.names == tuple(records[-1]["names"]) and latest.optimizer.kind == "adam"
    assert latest.optimizer.lr == pytest.approx(1e-3) and latest.optimizer.effective_lr > 0
    assert latest.result.observed["both"].grad_norm > 0 and not latest.steady
    # The logged ratio is the one an outcome is decided with: threshold at the configured γ.
    from spikeguard import theory

    assert latest.stability.threshold == pytest.approx(theory.stability_threshold(1e-3, "adam", 0.9))
    import csv

    rows = list(csv.DictReader(open(os.path.join(logger.log_dir, "metrics.csv"))))
    logged = {k for r in rows for k, v in r.items() if v}
    assert keys.probe_metric("both", "total_bound") in logged
    assert keys.probe_operator_metric("forward", "transformer.h.0", "d_observed") in logged
    assert keys.probe_constant_metric("transformer.h.1", "A_f") in logged
    assert keys.metric("probe", "sharpness_ratio") in logged


def test_probe_batch_comes_from_the_datamodule_and_stays_fixed(tmp_path):
    probe = AmplificationProbe(every_n_steps=5, linearize=False, configs=("forward",))
    data = tiny_data()
    trainer(max_steps=6, callbacks=[probe], default_root_dir=str(tmp_path)).fit(tiny_lm(), data)
    assert torch.equal(probe.probe_batch["input_ids"], data.probe_batch()["input_ids"])


def test_probe_state_dict_round_trip():
    probe = AmplificationProbe(every_n_steps=7)
    probe.num_probes, probe._last_step = 4, 21
    other = AmplificationProbe(every_n_steps=7)
    other.load_state_dict(probe.state_dict())
    assert (other.num_probes, other._last_step) == (4, 21)
    # Settings stay out of the key: a resume with another period keeps the store.
    assert probe.state_key == AmplificationProbe(every_n_steps=50).state_key == "AmplificationProbe"
    assert AmplificationProbe(name="fp8").state_key == "AmplificationProbe[fp8]"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(every_n_steps=0), ValueError, "AmplificationProbe.every_n_steps must be an int >= 1, got 0"),
        (dict(sharpness_iterations=0), ValueError, "AmplificationProbe.sharpness_iterations must be an int >= 1, got 0"),
        (dict(loss_fn=5), TypeError, "AmplificationProbe.loss_fn must be callable (model, batch) -> loss, got 5"),
        (dict(configs=("up",)), ValueError, "AmplificationProbe.configs must be a non-empty subset of ['forward', 'backward', 'both'], got ['up']"),
    ],
)
def test_probe_bad_arguments(kwargs, error, message):
    with pytest.raises(error) as err:
        AmplificationProbe(**kwargs)
    assert str(err.value) == message


def test_probe_without_a_loss_says_how_to_give_one(tmp_path):
    import pytorch_lightning as pl

    class NoLoss(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))

        def training_step(self, batch, idx):
            return self.model(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), 0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(16, 4), batch_size=4)

    t = trainer(max_steps=2, callbacks=[AmplificationProbe(every_n_steps=1)], default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"AmplificationProbe needs a loss: the model's output has no .loss. Pass loss_fn=\(model, batch\) -> loss, or define probe_loss\(model, batch\) on NoLoss"):
        t.fit(NoLoss())
    probe = AmplificationProbe(every_n_steps=1, loss_fn=lambda m, b: m(b).pow(2).mean(), linearize=False)
    trainer(max_steps=2, callbacks=[probe], default_root_dir=str(tmp_path)).fit(NoLoss())
    assert probe.num_probes == 2


def test_probe_passes_leave_training_statistics_and_injectors_alone(tmp_path):
    """SpikeGuard's statistics and Perturb's faults sit out the probe's passes."""
    perturb = Perturb(forward={"transformer.ln_f": (Scale(1e3), Always())})
    probe = AmplificationProbe(every_n_steps=2, linearize=False)
    guard = SpikeGuard(log_every_n_steps=1, detector=dict(warmup=2, window=8))
    trainer(max_steps=12, callbacks=[guard, probe], default_root_dir=str(tmp_path)).fit(tiny_lm(), tiny_data())
    assert guard.events == []  # no probe pass counted as a training step
    # The probe's own clean pass ran without Perturb's ×1000 (its m would be enormous).
    trainer(max_steps=3, callbacks=[perturb, probe], default_root_dir=str(tmp_path / "p")).fit(tiny_lm(), tiny_data())
    assert probe.latest.observed["both"].m < 1
