"""The plumbing the parts talk through: signals, configs, the probe store, JSON lines, paths."""

import json
import math
import os
import warnings

import pytest
import torch

from spikeguard import keys, signals
from spikeguard.config import ConfigError, from_mapping
from spikeguard.detect import DetectorConfig
from spikeguard.jsonl import JsonlWriter, decode_float, encode, read_jsonl
from spikeguard.paths import RunPaths

# -- signals ------------------------------------------------------------------------------


def test_the_layout_follows_the_registry():
    layout = signals.Layout(["a", "b", "c"])
    assert layout.size == len(signals.GLOBAL) + 3 * len(signals.OPERATOR)
    assert layout.index("loss") == 0 and layout.index("grad_norm") == 1
    assert layout.slice("out_amax") == slice(2, 5) and layout.slice("param_grad_norm") == slice(11, 14)
    assert [s.name for s in layout.signals[:3]] == ["loss", "grad_norm", "out_amax"]
    with pytest.raises(ValueError, match=r"no signal named 'nope'; the registry has \['loss', 'grad_norm'"):
        layout.slice("nope")
    with pytest.raises(ValueError, match="signal 'msg_norm' is per operator: use slice"):
        layout.index("msg_norm")


def test_keys_come_from_the_registry():
    assert set(keys.OPERATOR_STATS) == {s.name for s in signals.OPERATOR}
    assert keys.signal_metric(signals.by_name("loss")) == "spikeguard/loss"
    assert keys.signal_metric(signals.by_name("msg_norm"), "h.0") == "spikeguard/op/h.0/msg_norm"
    with pytest.raises(ValueError, match="signal 'msg_norm' is per operator: its key needs the operator's name"):
        keys.signal_metric(signals.by_name("msg_norm"))
    # Every signal may set its thresholds from a real DetectorConfig field.
    config = DetectorConfig()
    for s in signals.SIGNALS:
        assert getattr(config, s.threshold) > 0 and getattr(config, s.min_factor) >= 1


# -- configs ------------------------------------------------------------------------------


def test_from_mapping_names_the_dotted_key_and_close_matches():
    assert from_mapping(DetectorConfig, None, "X") == DetectorConfig()
    assert from_mapping(DetectorConfig, {"window": 64}, "X").window == 64
    same = DetectorConfig(window=32)
    assert from_mapping(DetectorConfig, same, "X") is same
    with pytest.raises(ConfigError) as err:
        from_mapping(DetectorConfig, {"treshold": 5.0}, "SpikeGuard.detector")
    assert str(err.value) == "SpikeGuard.detector.treshold is not a setting (did you mean 'threshold' or 'operator_threshold'?); got treshold=5.0"
    assert (err.value.key, err.value.value, err.value.unknown) == ("treshold", 5.0, True)
    with pytest.raises(ConfigError) as err:
        from_mapping(DetectorConfig, {"zzz": 1}, "X")
    assert str(err.value).startswith("X.zzz is not a setting (the settings are ['window', 'recent',")
    with pytest.raises(ValueError, match=r"^SpikeGuard.detector.recent must be an int >= 1, got 0$"):
        from_mapping(DetectorConfig, {"recent": 0}, "SpikeGuard.detector")
    with pytest.raises(TypeError, match="X must be a DetectorConfig or a dict of its fields, got int"):
        from_mapping(DetectorConfig, 3, "X")


# -- the probe store ------------------------------------------------------------------------


def _record(step):
    from spikeguard.measure.optim import OptimizerFacts, Stability
    from spikeguard.measure.results import Constants, Observed, ProbeResult
    from spikeguard.records import ProbeRecord
    from spikeguard.theory import Amplification, PropagationBound

    z = torch.zeros(2, dtype=torch.float64)
    bound = PropagationBound(e=z, b=z, d=torch.tensor([1.0, math.inf], dtype=torch.float64), total=math.inf)
    obs = Observed(e=z, b=z, d=z, total=0.5, grad_norm=2.0, m=0.25, delta=z, eps=z, bound=bound, linear=None)
    consts = Constants(gains=torch.tensor([math.nan, 1.5], dtype=torch.float64), param_gains=z + 1, jac_smoothness=z,
                       param_jac_smoothness=z, grad_msg_norms=z + 0.1, output_norms=z + 3, loss_curvature=0.5,
                       power_iterations=2, converged=False)
    result = ProbeResult(step=step, names=("a", "b"), observed={"both": obs}, constants=consts,
                         amplification=Amplification(forward=z + 2, backward=z + 1), notes=("a note",), seconds=0.1)
    return ProbeRecord(step=step, result=result, optimizer=OptimizerFacts("adam", 0.9, 1e-3, 2e-4),
                       stability=Stability(10.0, 38000.0, True), steady=True)


def test_probe_record_round_trips_through_json():
    from spikeguard.records import ProbeRecord

    record = _record(7)
    text = json.dumps(record.to_dict(), allow_nan=False)  # no bare NaN/Infinity tokens
    back = ProbeRecord.from_dict(json.loads(text))
    assert back.to_dict() == record.to_dict()
    assert math.isnan(float(back.result.constants.gains[0])) and back.result.observed["both"].bound.total == math.inf
    assert back.stability.ratio == pytest.approx(10.0 / 38000.0) and back.optimizer.effective_lr == 2e-4
    # A probe line written before ProbeRecord (a "sharpness" dict) still reads, with its test.
    old = record.to_dict()
    del old["stability"], old["optimizer"], old["steady"]
    old["sharpness"] = {"sharpness": 5.0, "stability_threshold": 2.0, "sharpness_ratio": 2.5}
    legacy = ProbeRecord.from_dict(old)
    assert legacy.stability.ratio == 2.5 and legacy.optimizer is None


def test_the_store_answers_the_latest_probe_at_or_before_a_step_and_round_trips():
    from spikeguard.store import ProbeStore

    store = ProbeStore(capacity=3)
    for step in (40, 0, 20, 60):  # out of order; the oldest is dropped at capacity
        store.add(_record(step))
    assert [r.step for r in store.records] == [20, 40, 60]
    assert store.latest().step == 60 and store.latest(at_or_before=59).step == 40
    assert store.latest(at_or_before=40).step == 40 and store.latest(at_or_before=19) is None
    store.add(_record(40))  # a second probe at a step replaces the first
    assert len(store) == 3
    store.batch = {"input_ids": torch.arange(6).view(2, 3)}
    again = ProbeStore(capacity=3)
    again.load_state_dict(store.state_dict())
    assert [r.to_dict() for r in again.records] == [r.to_dict() for r in store.records]
    assert torch.equal(again.batch["input_ids"], store.batch["input_ids"])
    with pytest.raises(TypeError, match="ProbeStore.add takes a ProbeRecord, got dict"):
        store.add({})
    with pytest.raises(ValueError, match="ProbeStore.capacity must be an int >= 1, got 0"):
        ProbeStore(capacity=0)


# -- JSON lines -----------------------------------------------------------------------------


def test_one_encoding_of_nonfinite_numbers():
    assert encode({"a": [math.inf, -math.inf, math.nan, 1.5], "b": (2,)}) == {"a": ["inf", "-inf", "nan", 1.5], "b": [2]}
    assert decode_float("inf") == math.inf and math.isnan(decode_float("nan")) and decode_float("x") == "x"


def test_a_failed_write_keeps_the_record_retries_and_never_leaves_half_a_line(tmp_path, monkeypatch):
    path = tmp_path / "log" / "events.jsonl"
    writer = JsonlWriter(path, owner="SpikeGuard")
    assert writer.append({"n": 1})
    real_fsync = os.fsync
    calls = []

    def full_disk(fd):
        calls.append(fd)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not writer.append({"n": 2})
        assert not writer.append({"n": 3})
    said = [str(w.message) for w in caught]
    assert len(said) == 1  # once, however many records wait
    assert f"SpikeGuard: could not write {path} (OSError: [Errno 28] No space left on device)" in said[0]
    assert writer.pending == 2
    assert [r for _, r in read_jsonl(path)] == [{"n": 1}]  # the half-written record was undone
    monkeypatch.setattr(os, "fsync", real_fsync)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert writer.append({"n": 4})
    assert "writable again; 3 kept record(s) written" in str(caught[0].message)
    assert [r["n"] for _, r in read_jsonl(path)] == [1, 2, 3, 4] and writer.pending == 0


def test_a_folder_that_disappears_is_recreated(tmp_path):
    import shutil

    writer = JsonlWriter(tmp_path / "run" / "probes.jsonl")
    writer.append({"n": 1})
    shutil.rmtree(tmp_path / "run")
    assert writer.append({"n": 2})
    assert [r for _, r in read_jsonl(tmp_path / "run" / "probes.jsonl")] == [{"n": 2}]


def test_run_paths_spell_every_artifact(tmp_path):
    paths = RunPaths.at(tmp_path)
    assert paths.events == tmp_path / "spikeguard" / "events.jsonl"
    assert paths.probes == tmp_path / "spikeguard" / "probes.jsonl"
    assert paths.report == tmp_path / "spikeguard" / "report.html"
    assert paths.metrics == tmp_path / "metrics.csv"
    assert RunPaths.at(tmp_path, tmp_path / "elsewhere").events == tmp_path / "elsewhere" / "events.jsonl"
    assert paths.relative(paths.events) == "spikeguard/events.jsonl"
