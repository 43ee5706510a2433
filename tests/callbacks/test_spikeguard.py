"""SpikeGuard in real (tiny) Lightning runs: detection, attribution, prediction, actions, resume."""

import json
import math
import os
import warnings

import pytest
import torch
from helpers import assert_same_training_state, tiny_data, tiny_lm, trainer, training_state

from spikeguard.callbacks import AmplificationProbe, Perturb, SpikeGuard
from spikeguard.events import read_events
from spikeguard.perturb import Burst, Gaussian, Perturbation, Scale

BURST_STEP = 150

BURSTS = {
    # An outlier after the final norm: the logits blow up, loss and gradient spike.
    "forward": (Perturbation("transformer.ln_f", Scale(10.0), Burst([BURST_STEP])), "transformer.ln_f"),
    # A corrupted gradient message in a block: the gradient spikes, the loss does not.
    "backward": (
        Perturbation("transformer.h.1", Gaussian(30.0, relative=True), Burst([BURST_STEP]), direction="backward"),
        "transformer.h.1",
    ),
}


def at_burst(guard):
    """The event at the burst's step (a tiny model also has natural operator anomalies)."""
    return next(e for e in guard.events if e.step == BURST_STEP)


def run(tmp_path, callbacks, max_steps=220, **kwargs):
    torch.manual_seed(0)
    model, data = tiny_lm(), tiny_data()
    t = trainer(max_steps=max_steps, callbacks=callbacks, default_root_dir=str(tmp_path), **kwargs)
    t.fit(model, data)
    return t, model


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_burst_is_detected_attributed_predicted_and_recovers(tmp_path, direction):
    perturbation, operator = BURSTS[direction]
    guard = SpikeGuard(log_every_n_steps=20)
    probe = AmplificationProbe(every_n_steps=100, linearize=False)
    t, _ = run(tmp_path, [guard, Perturb(perturbations=[perturbation]), probe])

    # No false spike elsewhere. A natural batch can still move one operator's own
    # statistics far enough to be an "operator" anomaly (reported, never at the burst).
    spikes = [e for e in guard.events if e.kind != "operator"]
    assert [e.step for e in spikes] == [BURST_STEP]
    event = spikes[0]
    assert event.kind == "grad_norm" and event.factor > 3
    assert (event.origin, event.direction) == (operator, direction)
    assert event.predicted.source == "probe" and event.predicted.probe_step == 100  # measured before the burst
    assert event.predicted.outcome == "recover"
    assert event.predicted.factor > 1 and event.predicted.factor_bound >= event.predicted.factor
    assert event.outcome == "recovered" and event.recovery_steps is not None and event.recovery_steps >= 1
    # The same event, with its outcome, is in the run's log.
    logged = read_events(os.path.join(tmp_path, "spikeguard", "events.jsonl"))
    assert (BURST_STEP, operator, "recovered") in [(e.step, e.origin, e.outcome) for e in logged]
    assert [e.to_dict() for e in logged] == [e.to_dict() for e in guard.events]  # the log holds the events, whole


def test_no_perturbation_no_event_and_metrics_logged(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    guard = SpikeGuard(log_every_n_steps=20)
    logger = CSVLogger(str(tmp_path), name="run")
    run(tmp_path, [guard], max_steps=120, logger=logger)
    assert [e for e in guard.events if e.kind != "operator"] == []
    import csv

    rows = list(csv.DictReader(open(os.path.join(logger.log_dir, "metrics.csv"))))
    logged = {k for r in rows for k, v in r.items() if v}
    assert {"spikeguard/loss", "spikeguard/grad_norm", "spikeguard/grad_norm_z", "spikeguard/spikes"} <= logged
    assert "spikeguard/op/transformer.h.0/msg_norm" in logged
    assert "spikeguard/op/transformer.h.0/out_rms_ratio" in logged
    steps = sorted({int(r["step"]) for r in rows if r.get("spikeguard/loss")})
    assert steps[:4] == [0, 20, 40, 60]  # read and logged on logging steps only


def make_watcher(step):
    from spikeguard.callbacks._base import CallbackBase

    class Watch(CallbackBase):
        before = after = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == step:
                Watch.before = training_state(pl_module, trainer.optimizers[0], grads=False)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == step + 1:
                Watch.after = training_state(pl_module, trainer.optimizers[0], grads=False)

    return Watch()


def test_skip_is_a_true_skip(tmp_path):
    perturbation, operator = BURSTS["backward"]
    guard = SpikeGuard(action="skip", log_every_n_steps=20)
    watch = make_watcher(BURST_STEP)
    run(tmp_path, [guard, Perturb(perturbations=[perturbation]), watch], max_steps=BURST_STEP + 5)
    assert guard.num_skipped == 1 and at_burst(guard).action == "skip"
    assert_same_training_state(watch.before, watch.after)  # no parameter change, Adam's state and step untouched
    # The step before the burst did update: a skip is the exception, not the rule.
    watch2 = make_watcher(BURST_STEP - 1)
    guard2 = SpikeGuard(action="skip", log_every_n_steps=20)
    run(tmp_path / "b", [guard2, Perturb(perturbations=[perturbation]), watch2], max_steps=BURST_STEP + 1)
    assert not torch.equal(watch2.before[0]["model.transformer.h.0.mlp.c_fc.weight"], watch2.after[0]["model.transformer.h.0.mlp.c_fc.weight"])


def test_clip_scales_the_gradient_to_the_band(tmp_path):
    perturbation, _ = BURSTS["backward"]
    from spikeguard.callbacks._base import CallbackBase

    seen = {}

    class AfterClip(CallbackBase):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == BURST_STEP:
                grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
                seen["norm"] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
                seen["band"] = float(guard.detector.upper_band)

    guard = SpikeGuard(action="clip", log_every_n_steps=20)
    run(tmp_path, [guard, Perturb(perturbations=[perturbation]), AfterClip()], max_steps=BURST_STEP + 3)
    assert seen["norm"] == pytest.approx(seen["band"], rel=1e-4)
    assert at_burst(guard).action == "clip" and at_burst(guard).factor > 3
    assert guard.num_clipped == 1


def test_skip_under_gradscaler_keeps_the_scaler_consistent(tmp_path):
    from pytorch_lightning.plugins.precision import MixedPrecision

    perturbation, _ = BURSTS["backward"]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=40)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    guard = SpikeGuard(action="skip", log_every_n_steps=20)
    watch = make_watcher(BURST_STEP)
    run(tmp_path, [guard, Perturb(perturbations=[perturbation]), watch], max_steps=BURST_STEP + 8, plugins=[plugin])
    assert guard.num_skipped == 1
    assert_same_training_state(watch.before, watch.after)
    # The scaler kept stepping and growing after the skip (no "unscale_() has already been
    # called" error on the next step), its scale a power of two that grew every 40 steps,
    # its per-optimizer state reset for the next iteration as after any step.
    scale = float(scaler.get_scale())
    assert math.isfinite(scale) and scale > 2.0**8 and math.log2(scale) == int(math.log2(scale))
    assert len(scaler._per_optimizer_states) == 0


def test_nonfinite_gradient_is_an_event_skipped_and_never_in_the_statistics(tmp_path):
    from spikeguard.perturb import BitFlip

    # Flip the top exponent bit of one gradient element: an inf / huge value reaches the gradient.
    bad = Perturbation("transformer.h.0", BitFlip(count=4, bits=[30]), Burst([BURST_STEP]), direction="backward")
    guard = SpikeGuard(action="skip", log_every_n_steps=20)
    _, model = run(tmp_path, [guard, Perturb(perturbations=[bad])], max_steps=BURST_STEP + 20)
    kinds = {e.step: e.kind for e in guard.events}
    assert kinds.get(BURST_STEP) in ("nonfinite", "grad_norm")
    assert guard.num_skipped >= 1
    window = guard.detector.window
    assert torch.isfinite(window[~torch.isnan(window)]).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_loss_does_not_crash(tmp_path):
    bad = Perturbation("transformer.ln_f", Scale(float("inf")), Burst([BURST_STEP]))
    guard = SpikeGuard(action="skip", log_every_n_steps=20)
    t, model = run(tmp_path, [guard, Perturb(perturbations=[bad])], max_steps=BURST_STEP + 10)
    event = next(e for e in guard.events if e.step == BURST_STEP)
    assert event.kind == "nonfinite"
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was skipped
    window = guard.detector.window
    assert torch.isfinite(window[~torch.isnan(window)]).all()


def test_a_failing_logger_does_not_stop_training(tmp_path):
    from pytorch_lightning.loggers import Logger

    class Broken(Logger):
        name = "broken"
        version = 0

        def log_metrics(self, metrics, step=None):
            # Lightning's own logging is not ours to protect: fail on spikeguard's keys only.
            if any(k.startswith("spikeguard/") for k in metrics):
                raise ConnectionError("W&B is down")

        def log_hyperparams(self, params):
            pass

    guard = SpikeGuard(log_every_n_steps=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t, _ = run(tmp_path, [guard], max_steps=40, logger=Broken())
    assert t.global_step == 40
    messages = [str(w.message) for w in caught if "SpikeGuard" in str(w.message)]
    assert messages and "Broken.log_metrics failed (ConnectionError: W&B is down); training goes on" in messages[0]


def test_resume_gives_the_same_detector_state_and_events(tmp_path):
    perturbation, _ = BURSTS["forward"]
    from pytorch_lightning.callbacks import ModelCheckpoint

    def callbacks(root, guard):
        return [guard, Perturb(perturbations=[perturbation]),
                ModelCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=100, save_top_k=-1)]

    # An epoch of exactly 100 steps: the checkpoint at step 100 is an epoch boundary, so the
    # resumed data order is the uninterrupted one.
    kw = dict(limit_train_batches=100, enable_checkpointing=True)
    full = SpikeGuard(log_every_n_steps=20)
    run(tmp_path / "full", callbacks(tmp_path / "full", full), max_steps=200, **kw)
    first = SpikeGuard(log_every_n_steps=20)
    run(tmp_path / "part", callbacks(tmp_path / "part", first), max_steps=100, **kw)
    ckpt = os.path.join(tmp_path / "part" / "ckpt", sorted(os.listdir(tmp_path / "part" / "ckpt"))[-1])
    resumed = SpikeGuard(log_every_n_steps=20)
    torch.manual_seed(0)
    model, data = tiny_lm(), tiny_data()
    t = trainer(max_steps=200, callbacks=callbacks(tmp_path / "part", resumed), default_root_dir=str(tmp_path / "part"), **kw)
    t.fit(model, data, ckpt_path=ckpt)

    assert [e.to_dict() for e in resumed.events] == [e.to_dict() for e in full.events]
    assert BURST_STEP in [e.step for e in full.events]
    for key in ("window", "position", "accepted"):
        assert torch.equal(getattr(resumed.detector, key), getattr(full.detector, key)), key
    # One log, no duplicates: the part before the checkpoint and the resumed part.
    logged = read_events(os.path.join(tmp_path / "part", "spikeguard", "events.jsonl"))
    assert [e.step for e in logged] == [e.step for e in full.events]


def test_state_dict_round_trip():
    guard = SpikeGuard()
    guard.num_skipped, guard.num_clipped = 3, 1
    state = guard.state_dict()
    other = SpikeGuard()
    other.load_state_dict(state)
    assert (other.num_skipped, other.num_clipped) == (3, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SpikeGuard().load_state_dict({"num_skipped": 0})
    assert "no detector state in the checkpoint; starting fresh" in str(caught[0].message)
    # Settings stay out of the key, so a resume with another action or threshold finds its state.
    assert guard.state_key == SpikeGuard(action="skip", detector=dict(threshold=4.0)).state_key == "SpikeGuard"
    assert SpikeGuard(name="second").state_key == "SpikeGuard[second]"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(action="panic"), "SpikeGuard.action must be one of ['none', 'clip', 'skip'], got 'panic'"),
        (dict(detector=dict(threshold=0)), "SpikeGuard.detector.threshold must be a finite number > 0, got 0"),
        (dict(detector=dict(window=0)), "SpikeGuard.detector.window must be an int >= 1, got 0"),
        (dict(detector=dict(warmup=500)), "SpikeGuard.detector.warmup must be <= window=128, got 500"),
        (dict(detector=dict(min_factor=0.5)), "SpikeGuard.detector.min_factor must be a finite number >= 1, got 0.5"),
        (dict(detector=dict(windw=64)), "SpikeGuard.detector.windw is not a setting (did you mean 'window'?); got windw=64"),
        (dict(detector=dict(kappa=-1.0)), "SpikeGuard.detector.kappa must be a finite number > 0, got -1.0"),
        (dict(max_consecutive_skips=0), "SpikeGuard.max_consecutive_skips must be an int >= 1, got 0"),
        (dict(rerun_tolerance=0), "SpikeGuard.rerun_tolerance must be > 0, got 0"),
        (dict(log_every_n_steps=0), "SpikeGuard.log_every_n_steps must be None or an int >= 1, got 0"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as err:
        SpikeGuard(**kwargs)
    assert str(err.value) == message


def test_setup_preconditions_name_what_is_available(tmp_path):
    import pytorch_lightning as pl

    class Opaque(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])

        def training_step(self, batch, idx):
            x = batch
            for b in self.blocks:
                x = b(x)
            return x.pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), 0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(16, 4), batch_size=4)

    with pytest.raises(ValueError, match=r"SpikeGuard could not discover the operators of Opaque: pass chain=\[patterns\] .*\['blocks.\*'\]"):
        trainer(max_steps=2, callbacks=[SpikeGuard()], default_root_dir=str(tmp_path)).fit(Opaque())
    with pytest.raises(ValueError, match=r"model_attr='net': Opaque has no submodule of that name; its children are \['blocks'\]"):
        trainer(max_steps=2, callbacks=[SpikeGuard(model_attr="net")], default_root_dir=str(tmp_path)).fit(Opaque())
    guard = SpikeGuard(chain=["blocks.*"], detector=dict(warmup=2, window=4))
    trainer(max_steps=8, callbacks=[guard], default_root_dir=str(tmp_path)).fit(Opaque())
    assert guard.detector.names == ("blocks.0", "blocks.1")
    with pytest.raises(ValueError, match=r"SpikeGuard\(rerun=True\) .* needs Trainer\(accumulate_grad_batches=1\), got 2"):
        trainer(max_steps=2, callbacks=[SpikeGuard(rerun=True)], accumulate_grad_batches=2, default_root_dir=str(tmp_path)).fit(Opaque())


def test_rerun_tells_transient_from_reproducible(tmp_path):
    transient = Perturbation("transformer.ln_f", Scale(10.0), Burst([BURST_STEP]))
    guard = SpikeGuard(rerun=True, log_every_n_steps=20)
    run(tmp_path / "t", [guard, Perturb(perturbations=[transient])], max_steps=BURST_STEP + 5)
    assert at_burst(guard).rerun == "transient"  # the fault does not recur on the re-run
    guard = SpikeGuard(rerun=True, log_every_n_steps=20)
    run(tmp_path / "r", [guard, Perturb(perturbations=[transient], transient=False)], max_steps=BURST_STEP + 5)
    assert at_burst(guard).rerun == "reproducible"  # a data-like perturbation recurs


def test_gradient_accumulation_and_bf16(tmp_path):
    perturbation, operator = BURSTS["forward"]
    guard = SpikeGuard(log_every_n_steps=20)
    run(tmp_path, [guard, Perturb(perturbations=[perturbation])], max_steps=BURST_STEP + 10,
        accumulate_grad_batches=2, precision="bf16-mixed")
    assert (at_burst(guard).origin, at_burst(guard).kind) == (operator, "grad_norm")


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning.pytorch"])
def test_works_with_both_lightning_packages(tmp_path, package):
    perturbation, operator = BURSTS["forward"]
    import importlib

    pl = importlib.import_module(package)
    guard = SpikeGuard(log_every_n_steps=20)
    callbacks = [guard, Perturb(perturbations=[perturbation]), AmplificationProbe(every_n_steps=100, linearize=False)]
    assert all(isinstance(c, pl.Callback) for c in callbacks)

    if package == "pytorch_lightning":
        model, data = tiny_lm(), tiny_data()
    else:  # the recipes' modules are pytorch_lightning's; a lightning.pytorch user writes their own
        inner = tiny_lm()

        class Module(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.model = inner.model

            def training_step(self, batch, idx):
                return self.model(**batch).loss

            def configure_optimizers(self):
                return inner.configure_optimizers()

        model = Module()
        loader = tiny_data()
        loader.setup("fit")
        data = None
    t = trainer(package=package, max_steps=BURST_STEP + 10, callbacks=callbacks, default_root_dir=str(tmp_path))
    torch.manual_seed(0)
    if data is None:
        t.fit(model, train_dataloaders=loader.train_dataloader())
    else:
        t.fit(model, data)
    assert (at_burst(guard).origin, at_burst(guard).kind) == (operator, "grad_norm")


def test_no_host_sync_per_step_in_monitor_mode(tmp_path, monkeypatch):
    """Outside logging steps SpikeGuard's hooks never read a tensor on the host."""
    guard = SpikeGuard(log_every_n_steps=25)
    reads = []

    def forbid(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            if guarding[0]:
                reads.append(name)
            return original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    guarding = [False]
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        forbid(name)
    for hook in ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step"):
        original = getattr(guard, hook)

        def wrapped(*args, original=original, **kwargs):
            guarding[0] = True
            try:
                return original(*args, **kwargs)
            finally:
                guarding[0] = False

        setattr(guard, hook, wrapped)
    run(tmp_path, [guard], max_steps=60)
    assert reads == []
