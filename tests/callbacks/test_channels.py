"""How the callbacks talk: no order dependence, a probe store that survives resume, sinks."""

import itertools
import os
import warnings

import pytest
import torch
from helpers import tiny_data, tiny_lm, trainer

from spikeguard.callbacks import AmplificationProbe, Perturb, SpikeGuard
from spikeguard.perturb import Burst, Perturbation, Scale
from spikeguard.sinks import BaseSink

BURST = 60  # shares its step with a probe: the probe must be the one measured before the spike


def burst(step=BURST):
    return Perturb(perturbations=[Perturbation("transformer.ln_f", Scale(10.0), Burst([step]))])


def fit(root, callbacks, max_steps=BURST + 6, ckpt_path=None, **kwargs):
    torch.manual_seed(0)
    t = trainer(max_steps=max_steps, callbacks=callbacks, default_root_dir=str(root), **kwargs)
    t.fit(tiny_lm(), tiny_data(), ckpt_path=ckpt_path)
    return t


def test_callback_order_does_not_change_events_or_predictions(tmp_path):
    """Every order of SpikeGuard, Perturb and AmplificationProbe: the same events, predicted alike."""
    seen = []
    for i, order in enumerate(itertools.permutations(range(3))):
        guard = SpikeGuard(log_every_n_steps=10)
        callbacks = [guard, burst(), AmplificationProbe(every_n_steps=30, linearize=False, configs=("both",))]
        fit(tmp_path / str(i), [callbacks[k] for k in order])
        seen.append([e.to_dict() for e in guard.events])
    assert all(s == seen[0] for s in seen[1:])
    event = next(e for e in seen[0] if e["step"] == BURST)
    # The probe at step 60 ran before step 60's forward: it measured the weights the burst met.
    assert event["predicted"]["source"] == "probe" and event["predicted"]["probe_step"] == BURST


def test_resume_with_other_settings_keeps_state_and_predicts_from_the_restored_probe(tmp_path):
    """Stop at step 50, resume with another action and threshold: everything carries over."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    def callbacks(guard, probe):
        ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=50, save_top_k=-1)
        return [guard, Perturb(perturbations=[
            Perturbation("transformer.ln_f", Scale(10.0), Burst([30, 70])),
        ]), probe, ckpt]

    kw = dict(limit_train_batches=50, enable_checkpointing=True)
    first_guard, first_probe = SpikeGuard(log_every_n_steps=10), AmplificationProbe(every_n_steps=40, linearize=False)
    fit(tmp_path / "run", callbacks(first_guard, first_probe), max_steps=50, **kw)
    assert [e.step for e in first_guard.events if e.kind != "operator"] == [30]
    assert [r.step for r in first_probe.store.records] == [0, 40]
    ckpt = os.path.join(tmp_path / "ckpt", sorted(os.listdir(tmp_path / "ckpt"))[-1])

    guard = SpikeGuard(action="skip", detector=dict(threshold=5.0), log_every_n_steps=10)
    probe = AmplificationProbe(every_n_steps=40, linearize=False, probe_batch=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path / "run", callbacks(guard, probe), max_steps=75, ckpt_path=ckpt, **kw)
    said = [str(w.message) for w in caught if "changed settings" in str(w.message)]
    assert said and "action: 'none' -> 'skip'" in said[0] and "detector.threshold: 6.0 -> 5.0" in said[0]
    # Detector, events and counters carried over: the step-30 spike is still an event.
    assert [e.step for e in guard.events if e.kind != "operator"] == [30, 70]
    assert guard.events[0].to_dict() == first_guard.events[0].to_dict()
    # The probe store and its batch carried over; no probe ran between the resume and step 70,
    # so the spike at 70 was predicted from the restored step-40 probe.
    assert [r.step for r in probe.store.records] == [0, 40]
    assert torch.equal(probe.probe_batch["input_ids"], first_probe.probe_batch["input_ids"])
    late = next(e for e in guard.events if e.step == 70)
    assert late.predicted.source == "probe" and late.predicted.probe_step == 40
    assert late.action == "skip" and guard.num_skipped == 1


class Recorder(BaseSink):
    def __init__(self):
        self.spikes, self.outcomes, self.probes, self.steps = [], [], [], []

    def spike(self, event):
        self.spikes.append(event.step)

    def outcome(self, event):
        self.outcomes.append((event.step, event.outcome))

    def probe(self, record):
        self.probes.append(record.step)

    def metrics(self, metrics, step):
        if "spikeguard/grad_norm" in metrics:
            self.steps.append(step)


class Raising:
    def spike(self, event):
        raise ConnectionError("webhook down")

    def probe(self, record):
        raise ConnectionError("webhook down")


def test_a_user_sink_receives_everything_and_a_raising_one_is_reported_once(tmp_path):
    mine, bad = Recorder(), Raising()
    guard = SpikeGuard(log_every_n_steps=10, sinks=[mine, bad])
    probe = AmplificationProbe(every_n_steps=30, linearize=False, configs=("both",), sinks=[mine, bad])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = fit(tmp_path, [guard, burst(), probe])
    assert t.global_step == BURST + 6  # training went on
    assert BURST in mine.spikes and mine.spikes == [e.step for e in guard.events]
    assert (BURST, "recovered") in mine.outcomes
    assert mine.probes == [0, 30, 60]
    assert mine.steps[:3] == [0, 10, 20]
    failures = [str(w.message) for w in caught if "webhook down" in str(w.message)]
    # Once per callback that holds the sink, naming it and what it raised.
    assert len(failures) == 2
    assert "sink Raising.probe failed (ConnectionError: webhook down); training goes on" in failures[0]
    assert any("SpikeGuard: sink Raising.spike failed" in f for f in failures)


def test_bad_sinks_are_refused_with_what_a_sink_needs():
    with pytest.raises(TypeError, match=r"SpikeGuard.sinks\[0\] must have at least one of the methods \['spike', 'outcome', 'probe', 'metrics', 'close'\], got int"):
        SpikeGuard(sinks=[3])
    with pytest.raises(TypeError, match=r"AmplificationProbe.sinks must be a list of sinks, got 'slack'"):
        AmplificationProbe(sinks="slack")
