"""SpikeDetector, attribute and predict_spike on synthetic streams whose answers are known."""

from __future__ import annotations

import io
import json
import math
import statistics
import warnings
from contextlib import contextmanager
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from spikeguard import theory
from spikeguard.detect import DetectorConfig, SpikeDetector, attribute, predict_spike
from spikeguard.measure.optim import OptimizerFacts, Stability
from spikeguard.measure.results import Constants, Observed, ProbeResult
from spikeguard.records import ProbeRecord, SpikeEvent

NAMES = ("embed", "h.0", "h.1", "ln_f")
N = len(NAMES)
STATS = ("out_amax", "out_rms", "msg_norm", "param_grad_norm")  # the detector's packing order
MAD_TO_SIGMA = 1.4826


# -- synthetic streams -------------------------------------------------------------------


def stats(grad_norm=1.0, *, out_nonfinite=0, msg_nonfinite=0, grad_nonfinite=0, **per_op):
    """A StepStats-like namespace; per-operator fields are a number (all operators) or a list."""

    def vec(value, dtype=torch.float64):
        return torch.full((N,), value, dtype=dtype) if isinstance(value, (int, float)) else torch.tensor(value, dtype=dtype)

    fields = {key: vec(per_op.get(key, 1.0)) for key in STATS}
    return SimpleNamespace(
        **fields,
        grad_norm=torch.tensor(grad_norm, dtype=torch.float64),
        out_nonfinite=vec(out_nonfinite, torch.int64),
        msg_nonfinite=vec(msg_nonfinite, torch.int64),
        grad_nonfinite=torch.tensor(grad_nonfinite, dtype=torch.int64),
    )


def lognormal(steps, seed=0, loss_sigma=0.02, grad_sigma=0.1, op_sigma=0.1):
    """Per step: loss 2·e^(σn), grad norm e^(σn), each operator statistic e^(σn), seeded."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(steps, 2 + len(STATS) * N, generator=gen, dtype=torch.float64)
    rows = []
    for t in range(steps):
        ops = torch.exp(op_sigma * noise[t, 2:]).view(len(STATS), N)
        row = {"loss": 2.0 * math.exp(loss_sigma * float(noise[t, 0])), "grad_norm": math.exp(grad_sigma * float(noise[t, 1]))}
        row.update({key: ops[s].tolist() for s, key in enumerate(STATS)})
        rows.append(row)
    return rows


def feed(detector, step, row):
    extra = {k: v for k, v in row.items() if k not in ("loss", "grad_norm")}
    return detector.update(step, torch.tensor(row["loss"], dtype=torch.float64), stats(row["grad_norm"], **extra))


def run(detector, rows, start=0):
    """Feed rows from step ``start``; returns the per-step device flags as bools."""
    return [bool(feed(detector, start + i, row)) for i, row in enumerate(rows)]


#: The thresholds these tests are written for, spelled out so that they do not follow
#: the defaults (benchmarks/detection.py measures those).
THRESHOLDS = dict(
    threshold=6.0, min_factor=1.5, operator_threshold=8.0, operator_min_factor=4.0,
    attribution_threshold=4.0, attribution_min_factor=1.25, attribution_share=0.2, recent=16,
)


def small(**overrides):
    return DetectorConfig(**{"window": 32, "warmup": 16, **THRESHOLDS, **overrides})


def robust(values, recent=16):
    """(baseline, σ) as DetectorConfig documents them, from a full window of accepted log
    values, oldest first: the baseline is the median of the ``recent`` newest; σ is
    1.4826 · the median absolute deviation of each value from the median of its own
    chunk of ``recent`` values (chunks cut from the newest end). torch's median of an
    even count is the lower middle value, hence median_low."""
    usable = len(values) // recent * recent
    kept = values[len(values) - usable :]
    deviations = []
    for i in range(0, usable, recent):
        chunk = kept[i : i + recent]
        level = statistics.median_low(chunk)
        deviations += [abs(v - level) for v in chunk]
    return statistics.median_low(values[-recent:]), MAD_TO_SIGMA * statistics.median_low(deviations)


# -- detection ---------------------------------------------------------------------------


def test_flags_exactly_the_injected_steps_and_nothing_in_warmup():
    rows = lognormal(100)
    rows[5]["grad_norm"] *= 100  # inside warm-up: accepted, never flagged
    for t in (40, 70):
        rows[t]["grad_norm"] *= 10
    rows[85]["loss"] *= 3
    detector = SpikeDetector(NAMES, small())
    flags = run(detector, rows)
    assert [t for t, f in enumerate(flags) if f] == [40, 70, 85]
    new, _ = detector.poll()
    assert [(e.step, e.kind) for e in new] == [(40, "grad_norm"), (70, "grad_norm"), (85, "loss")]
    assert int(detector.accepted[1]) == 100 - 3  # warm-up's outlier went in, the spikes did not


def test_robust_z_matches_a_hand_computation():
    rows = lognormal(100)
    for t in (40, 70):
        rows[t]["grad_norm"] *= 10
    detector = SpikeDetector(NAMES, small())
    run(detector, rows[:70])
    assert int(detector.accepted[1]) == 69  # every step but the spike at 40 went in
    feed(detector, 70, rows[70])
    event = [e for e in detector.poll()[0] if e.step == 70][0]

    accepted = [math.log(r["grad_norm"]) for t, r in enumerate(rows[:70]) if t != 40][-32:]
    med, scale = robust(accepted)
    x = math.log(rows[70]["grad_norm"])
    assert event.z == pytest.approx((x - med) / scale, rel=1e-12)
    assert event.factor == pytest.approx(math.exp(x - med), rel=1e-12)
    assert event.baseline_grad_norm == pytest.approx(math.exp(med), rel=1e-12)
    losses = [math.log(r["loss"]) for t, r in enumerate(rows[:70]) if t != 40][-32:]
    assert event.baseline_loss == pytest.approx(math.exp(robust(losses)[0]), rel=1e-12)

    # And the z of an ordinary step, through latest_values.
    feed(detector, 71, rows[71])
    detector.poll()
    # 70 was a spike: the window at 71 is the one at 70.
    latest = detector.latest_values()
    assert latest["step"] == 71
    assert latest["grad_norm_z"] == pytest.approx((math.log(rows[71]["grad_norm"]) - med) / scale, rel=1e-12)
    assert latest["grad_norm_band"] == pytest.approx(math.exp(med + max(6 * scale, math.log(1.5))), rel=1e-12)


def test_spikes_never_enter_the_window_and_leave_the_band_unchanged():
    rows = lognormal(60)
    rows[40]["grad_norm"] *= 10
    rows[43]["grad_norm"] *= 10
    detector = SpikeDetector(NAMES, small())
    control = SpikeDetector(NAMES, small())  # the same stream without step 40
    bands, control_bands = {}, {}
    for t, row in enumerate(rows):
        before, accepted = detector.window.clone(), detector.accepted.clone()
        flag = bool(feed(detector, t, row))
        bands[t] = float(detector.upper_band)
        assert flag == (t in (40, 43))
        if flag:  # at a loss/grad spike no signal enters, the operators' included
            assert torch.equal(detector.window.nan_to_num(), before.nan_to_num())
            assert torch.equal(detector.accepted, accepted)
        if t != 40:
            feed(control, t, row)
            control_bands[t] = float(control.upper_band)
    assert math.log(rows[40]["grad_norm"]) not in detector.window[:, 1].tolist()
    assert math.log(rows[43]["grad_norm"]) not in detector.window[:, 1].tolist()
    # Loss and gradient norm: as if the first spike had never happened. (An operator
    # value well above its band may stay out for merge_gap steps after a spike: the tail rule.)
    assert torch.equal(detector.window[:, :2], control.window[:, :2])
    assert bands[41] == bands[40] and bands[43] == control_bands[43] and bands[59] == control_bands[59]
    assert [e.step for e in detector.poll()[0]] == [40, 43]


@pytest.mark.parametrize(
    "case",
    ["loss_nan", "loss_inf", "grad_norm_inf", "out_nonfinite", "msg_nonfinite", "grad_nonfinite"],
)
def test_nonfinite_values_flag_and_never_enter_the_window(case):
    rows = lognormal(50)
    detector = SpikeDetector(NAMES, small(window=16, warmup=8))
    run(detector, rows[:40])
    row = dict(rows[40])
    counts = {}
    if case == "loss_nan":
        row["loss"] = math.nan
    elif case == "loss_inf":
        row["loss"] = math.inf
    elif case == "grad_norm_inf":
        row["grad_norm"] = math.inf
    elif case == "out_nonfinite":
        row["out_amax"] = [1.0, math.inf, 1.0, 1.0]
        row["out_rms"] = [1.0, math.nan, 1.0, 1.0]
        counts["out_nonfinite"] = [0, 3, 0, 0]
    elif case == "msg_nonfinite":
        row["msg_norm"] = [math.nan, math.nan, 1.0, 1.0]
        counts["msg_nonfinite"] = [2, 1, 0, 0]
    else:
        counts["grad_nonfinite"] = 1  # the count alone flags, even with a finite norm
    accepted = detector.accepted.clone()
    flag = detector.update(40, torch.tensor(row["loss"], dtype=torch.float64), stats(row["grad_norm"], **{
        **{k: row[k] for k in STATS}, **counts}))
    assert bool(flag) and bool(detector.flag)
    assert torch.equal(detector.accepted, accepted)  # nothing entered
    run(detector, rows[41:], start=41)
    assert torch.isfinite(detector.window).all()  # full window, every value finite
    events = detector.poll()[0]
    assert [(e.step, e.kind, e.z) for e in events] == [(40, "nonfinite", math.inf)]


def test_min_factor_keeps_a_quiet_signal_from_flagging_small_wiggles():
    gen = torch.Generator().manual_seed(0)
    quiet = (1 + 1e-4 * torch.randn(60, generator=gen, dtype=torch.float64)).tolist()
    detector = SpikeDetector(NAMES, small())
    flags = []
    for t in range(60):
        factor = {40: 1.2, 50: 1.6}.get(t, 1.0)
        flags.append(bool(detector.update(t, torch.tensor(2.0 * quiet[t] * factor, dtype=torch.float64), stats(quiet[t]))))
    # z at step 40 is in the hundreds, yet 1.2x is under min_factor=1.5; 1.6x is not.
    assert [t for t, f in enumerate(flags) if f] == [50]
    row, k = detector.history[40], detector.num_signals  # [x | median | scale | ...]
    assert (row[0] - row[k]) / row[2 * k] > 100


# -- attribution -------------------------------------------------------------------------


def _vectors(**anomalies):
    """x, median, scale over [loss, grad | 4 stats x N]: baseline 0, scale 0.1; an
    anomaly ``stat=(operator index, ratio)`` sets x to log(ratio)."""
    k = 2 + len(STATS) * N
    x, median, scale = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64), torch.full((k,), 0.1, dtype=torch.float64)
    for key, pairs in anomalies.items():
        for i, ratio in pairs:
            x[2 + STATS.index(key) * N + i] = math.log(ratio) if math.isfinite(ratio) and ratio > 0 else ratio
    return x, median, scale


@pytest.mark.parametrize(
    "anomalies, expected",
    [
        # Forward: the first operator, in forward order, with anomalous activations, even
        # with (weaker) gradient-message anomalies above it.
        ({"out_amax": [(2, 10.0)], "out_rms": [(1, 4.0)], "msg_norm": [(3, 3.0)]}, ("h.0", "forward")),
        ({"out_amax": [(3, 10.0), (2, 10.0)]}, ("h.1", "forward")),
        # Backward: the top-most operator whose gradient message is anomalous.
        ({"msg_norm": [(1, 5.0), (2, 5.0)]}, ("h.1", "backward")),
        ({"msg_norm": [(0, math.inf)]}, ("embed", "backward")),  # non-finite: always anomalous
        # A shared parameter's gradient alone (GPT-2's tied embedding) names nothing...
        ({"param_grad_norm": [(0, 50.0), (3, 50.0)]}, (None, None)),
        # ...and does not outrank a gradient message lower down.
        ({"param_grad_norm": [(3, 50.0)], "msg_norm": [(1, 5.0)]}, ("h.0", "backward")),
        # Below attribution_threshold (z 4) or attribution_min_factor (1.25): not anomalous.
        ({"out_amax": [(1, math.exp(0.35))], "msg_norm": [(2, 1.2)]}, (None, None)),
    ],
)
def test_attribute_forward_then_backward_origin(anomalies, expected):
    x, median, scale = _vectors(**anomalies)
    origin, direction, ratios = attribute(NAMES, x, median, scale, small())
    assert (origin, direction) == expected
    for key, pairs in anomalies.items():
        for i, ratio in pairs:
            assert ratios[NAMES[i]][key] == pytest.approx(ratio)
    assert set(ratios) == set(NAMES) and all(set(r) == set(STATS) for r in ratios.values())


def test_operator_anomaly_with_loss_and_grad_in_band_is_an_operator_event():
    rows = lognormal(60)
    rows[45]["out_amax"] = [a * (20.0 if i == 2 else 1.0) for i, a in enumerate(rows[45]["out_amax"])]
    detector = SpikeDetector(NAMES, small())
    run(detector, rows[:45])
    before = detector.accepted.clone()
    flag = feed(detector, 45, rows[45])
    assert not bool(flag)  # the device flag is for loss / grad / non-finite only
    entered = detector.accepted - before
    amax_h1 = 2 + STATS.index("out_amax") * N + 2
    assert entered[amax_h1] == 0 and int(entered.sum()) == detector.num_signals - 1
    run(detector, rows[46:], start=46)
    (event,) = detector.poll()[0]
    assert (event.step, event.kind, event.origin, event.direction) == (45, "operator", "h.1", "forward")
    assert event.operator_ratios["h.1"]["out_amax"] > 15
    assert event.z == pytest.approx(float(detector.history[45][amax_h1] - detector.history[45][detector.num_signals + amax_h1])
                                    / float(detector.history[45][2 * detector.num_signals + amax_h1]))


def test_a_spike_is_attributed_through_the_detector():
    rows = lognormal(60)
    rows[45]["grad_norm"] *= 10
    rows[45]["msg_norm"] = [m * (6.0 if i <= 1 else 1.0) for i, m in enumerate(rows[45]["msg_norm"])]
    detector = SpikeDetector(NAMES, small())
    run(detector, rows)
    (event,) = detector.poll()[0]
    assert (event.kind, event.origin, event.direction) == ("grad_norm", "h.0", "backward")


# -- merging and recovery ----------------------------------------------------------------


def _flat(steps, loss=2.0, grad=1.0, seed=0):
    """Loss and grad norm with small seeded log noise (σ = 0.01)."""
    rows = lognormal(steps, seed=seed, loss_sigma=0.01, grad_sigma=0.01, op_sigma=0.01)
    for r in rows:
        r["loss"] *= loss / 2.0
        r["grad_norm"] *= grad
    return rows


def test_consecutive_flags_merge_into_one_event_with_their_duration():
    rows = _flat(80)
    for t in (40, 41, 42):
        rows[t]["grad_norm"] = 10.0
    rows[60]["grad_norm"] = 10.0
    detector = SpikeDetector(NAMES, small(loss_floor=1.0))
    run(detector, rows)
    events = detector.poll()[0]
    assert [(e.step, e.duration, e.outcome, e.recovery_steps) for e in events] == [
        (40, 3, "recovered", 3),  # 41 and 42 flagged: they merge and do not resolve
        (60, 1, "recovered", 1),
    ]


def test_flags_within_merge_gap_merge_while_the_event_is_pending():
    rows = _flat(80)
    rows[40]["grad_norm"] = rows[43]["grad_norm"] = 10.0
    rows[41]["loss"] = rows[42]["loss"] = 2.7  # over the recovery threshold, under the spike band
    rows[50]["grad_norm"] = rows[54]["grad_norm"] = 10.0
    rows[51]["loss"] = rows[52]["loss"] = rows[53]["loss"] = 2.7  # 54 is merge_gap + 1 after 50
    detector = SpikeDetector(NAMES, small(loss_floor=1.0))
    flags = run(detector, rows)
    assert [t for t, f in enumerate(flags) if f] == [40, 43, 50, 54]
    events = detector.poll()[0]
    assert [(e.step, e.duration) for e in events] == [(40, 4), (50, 1), (54, 1)]


def test_a_flagged_step_never_resolves_a_pending_event():
    rows = _flat(60)
    rows[40]["loss"] = 20.0
    rows[41]["grad_norm"] = 10.0  # loss back in band, but the step is itself a spike
    detector = SpikeDetector(NAMES, small(loss_floor=1.0))
    run(detector, rows)
    (event,) = detector.poll()[0]
    assert (event.kind, event.duration, event.outcome, event.recovery_steps) == ("loss", 2, "recovered", 2)


def test_recovery_steps_against_the_recovery_threshold():
    rows = _flat(60)
    rows[40]["loss"] = 20.0
    detector = SpikeDetector(NAMES, small(loss_floor=1.0))
    run(detector, rows[:41])
    (event,) = detector.poll()[0]
    assert int(detector.accepted[0]) == 40
    losses = [math.log(r["loss"]) for r in rows[:40]][-32:]
    med, scale = robust(losses)
    base = math.exp(med)
    threshold = max(1.0 + 1.1 * (base - 1.0), math.exp(med + 2.0 * scale))
    assert event.loss_floor == 1.0 and event.baseline_loss == pytest.approx(base, rel=1e-12)
    assert event.recovery_threshold == pytest.approx(threshold, rel=1e-12)
    assert event.loss_factor == pytest.approx(20.0 / base, rel=1e-12)
    # 41, 42 just above the threshold (not flagged: under 1.5x), 43 just below.
    steps = {41: threshold * 1.001, 42: threshold * 1.001, 43: threshold * 0.999}
    for t, loss in steps.items():
        assert not bool(detector.update(t, torch.tensor(loss, dtype=torch.float64), stats(rows[t]["grad_norm"])))
        _, resolved = detector.poll()
        assert resolved == ([event] if t == 43 else [])
    assert (event.outcome, event.recovery_steps) == ("recovered", 3)


def test_default_loss_floor_is_the_window_minimum():
    rows = _flat(50)
    rows[40]["loss"] = 20.0
    detector = SpikeDetector(NAMES, small())
    run(detector, rows[:41])
    (event,) = detector.poll()[0]
    assert event.loss_floor == pytest.approx(min(r["loss"] for r in rows[:40][-32:]), rel=1e-12)


def test_a_nonfinite_loss_after_a_spike_is_divergence_and_one_event():
    rows = _flat(60)
    rows[40]["grad_norm"] = 10.0
    detector = SpikeDetector(NAMES, small())
    run(detector, rows[:41])
    (event,) = detector.poll()[0]
    for t in range(41, 50):
        assert bool(detector.update(t, torch.tensor(math.nan), stats(math.nan)))
    new, resolved = detector.poll()
    assert new == [] and resolved == [event]
    assert (event.outcome, event.recovery_steps, event.duration) == ("diverged", None, 10)
    assert detector.events == [event]


def test_a_transient_nonfinite_step_that_comes_back_recovers():
    rows = _flat(60)
    rows[40]["loss"] = math.nan
    detector = SpikeDetector(NAMES, small())
    run(detector, rows)
    (event,) = detector.poll()[0]
    assert (event.kind, event.outcome, event.recovery_steps) == ("nonfinite", "recovered", 1)


def test_not_recovered_after_recover_within():
    rows = _flat(60)
    rows[40]["grad_norm"] = 10.0
    for t in range(41, 60):
        rows[t]["loss"] = 2.7
    detector = SpikeDetector(NAMES, small(recover_within=5, loss_floor=1.0))
    for t, row in enumerate(rows):
        feed(detector, t, row)
        _, resolved = detector.poll()
        if resolved:
            break
    assert t == 45
    assert [(e.step, e.outcome, e.recovery_steps) for e in resolved] == [(40, "not_recovered", None)]


# -- polling -----------------------------------------------------------------------------


def test_poll_returns_each_event_once():
    rows = lognormal(100)
    for t in (30, 50, 80):
        rows[t]["grad_norm"] *= 10
    detector = SpikeDetector(NAMES, small())
    seen = []
    for t, row in enumerate(rows):
        feed(detector, t, row)
        if t % 7 == 0:
            seen += detector.poll()[0]
    seen += detector.poll()[0]
    assert [e.step for e in seen] == [30, 50, 80]
    assert detector.poll() == ([], [])
    assert detector.events == seen


def test_rare_polling_works_up_to_history_and_warns_beyond():
    rows = lognormal(100)
    for t in (20, 50, 90):
        rows[t]["grad_norm"] *= 10
    detector = SpikeDetector(NAMES, small(history=64))
    run(detector, rows[:64])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [e.step for e in detector.poll()[0]] == [20, 50]  # exactly 64 steps: all read

    late = SpikeDetector(NAMES, small(history=64))
    run(late, rows)
    with pytest.warns(UserWarning) as record:
        new, _ = late.poll()
    assert str(record[0].message) == (
        "SpikeDetector.poll: 36 steps were overwritten before being read "
        "(poll at least every DetectorConfig.history=64 steps)"
    )
    assert [e.step for e in new] == [50, 90]  # step 20 was overwritten


# -- state -------------------------------------------------------------------------------


def _stream_with_everything(steps=120):
    rows = lognormal(steps)
    for t in (30, 75, 100):
        rows[t]["grad_norm"] *= 10
    rows[55]["out_amax"] = [1.0, math.inf, 1.0, 1.0]  # non-finite: inf in operator_ratios
    rows[65]["out_amax"] = [a * 20 for a in rows[65]["out_amax"]]
    return rows


def _extra(row, t):
    return {"out_nonfinite": [0, 1, 0, 0]} if t == 55 else {}


def _replay(detector, rows, start):
    flags = []
    for i, row in enumerate(rows):
        t = start + i
        extra = {k: v for k, v in row.items() if k not in ("loss", "grad_norm")}
        flags.append(bool(detector.update(t, torch.tensor(row["loss"], dtype=torch.float64),
                                          stats(row["grad_norm"], **extra, **_extra(row, t)))))
        if t % 10 == 0:
            detector.poll()
    return flags


def _dump(detector):
    return [json.dumps(e.to_dict(), sort_keys=True) for e in detector.events]


@pytest.mark.parametrize("cut", [57, 71])  # 57: unread non-finite step in flight; 71: pending event
def test_state_dict_round_trip_continues_the_same_stream(cut):
    rows = _stream_with_everything()
    config = small(window=16, warmup=8)
    original = SpikeDetector(NAMES, config)
    _replay(original, rows[:cut], 0)
    state = original.state_dict()
    flags_after = _replay(original, rows[cut:], cut)  # the state must not follow the live detector
    original.poll()

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    resumed = SpikeDetector(NAMES, config)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert _replay(resumed, rows[cut:], cut) == flags_after
    resumed.poll()
    assert torch.equal(resumed.window.nan_to_num(-1.0), original.window.nan_to_num(-1.0))
    assert torch.equal(resumed.accepted, original.accepted)
    assert torch.equal(resumed.upper_band, original.upper_band)
    assert _dump(resumed) == _dump(original)
    assert [e.step for e in original.events] == [30, 55, 65, 75, 100]
    ratio = resumed.events[1].operator_ratios["h.0"]["out_amax"]
    assert isinstance(ratio, float) and math.isinf(ratio)  # nested inf restored, not "inf"


def test_state_dict_loads_with_another_history_size():
    rows = _stream_with_everything()
    original = SpikeDetector(NAMES, small(window=16, warmup=8, history=64))
    _replay(original, rows[:79], 0)  # steps 71..78 not read yet
    resumed = SpikeDetector(NAMES, small(window=16, warmup=8, history=40))
    resumed.load_state_dict(original.state_dict())
    _replay(original, rows[79:], 79)
    _replay(resumed, rows[79:], 79)
    original.poll()
    resumed.poll()
    assert _dump(resumed) == _dump(original)


def test_load_state_dict_rejects_other_operators():
    state = SpikeDetector(NAMES, small()).state_dict()
    with pytest.raises(ValueError) as err:
        SpikeDetector(("embed", "h.0"), small()).load_state_dict(state)
    assert str(err.value) == (
        "SpikeDetector.load_state_dict: the checkpoint was taken with operators "
        "['embed', 'h.0', 'h.1', 'ln_f'], this detector watches ['embed', 'h.0']"
    )


@pytest.mark.parametrize("window", [16, 32, 64])
def test_a_resume_with_another_window_keeps_the_newest_values(window):
    """DetectorConfig.window changed on resume: each signal keeps its newest accepted values."""
    rows = lognormal(45, seed=3)
    original = SpikeDetector(NAMES, small())
    run(original, rows)  # 45 values: the 32-slot window has wrapped
    resized = SpikeDetector(NAMES, small(window=window, warmup=min(16, window)))
    resized.load_state_dict(original.state_dict())

    def newest(d):  # oldest to newest, per signal, NaN (never written) dropped
        w = d.config.window
        order = (d.position.unsqueeze(0) + torch.arange(w).unsqueeze(1)) % w
        ordered = d.window.gather(0, order)
        return [ordered[:, k][~torch.isnan(ordered[:, k])].tolist() for k in range(d.num_signals)]

    keep = min(window, 32)
    assert newest(resized) == [col[-keep:] for col in newest(original)]
    assert torch.equal(resized.accepted, original.accepted)
    # The baseline is the median of the 16 newest: unchanged by the resize.
    torch.testing.assert_close(resized._baseline()[0], original._baseline()[0])
    # And it keeps working: the next value lands after the newest.
    run(resized, lognormal(3, seed=4), start=45)
    assert newest(resized)[0][-4] == newest(original)[0][-1]


# -- no host sync ------------------------------------------------------------------------


@contextmanager
def no_host_sync(monkeypatch):
    def refuse(name):
        def method(*args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} called in SpikeDetector.update")

        return method

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"):
            m.setattr(torch.Tensor, name, refuse(name))
        yield


def test_update_never_syncs_with_the_host(monkeypatch):
    rows = _stream_with_everything()[:60]
    rows[40]["loss"] = math.nan
    rows[45]["loss"] *= 10
    detector = SpikeDetector(NAMES, small(window=16, warmup=8))
    loss_only = SpikeDetector(NAMES, small(window=16, warmup=8))
    inputs = []
    for t, row in enumerate(rows):  # built before patching: building reads numbers
        extra = {k: v for k, v in row.items() if k not in ("loss", "grad_norm")}
        inputs.append((torch.tensor(row["loss"]), stats(row["grad_norm"], **extra, **_extra(row, t))))
    for t, (loss, step_stats) in enumerate(inputs):
        with no_host_sync(monkeypatch):
            detector.update(t, loss, step_stats)
            loss_only.update(t, loss)
    assert [(e.step, e.kind) for e in detector.poll()[0]] == [
        (30, "grad_norm"), (40, "nonfinite"), (45, "loss"), (55, "nonfinite")
    ]
    assert [(e.step, e.kind) for e in loss_only.poll()[0]] == [(40, "nonfinite"), (45, "loss")]


# -- predict_spike -----------------------------------------------------------------------


def _record(tightness=0.25, lr=0.01, kind="sgd", beta=0.0, stability=None, steady_m=None):
    """A probe record with known constants: A^f, A^b, |z_k|, |g_k|, |G| = 50 and a tightness."""
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    n = len(NAMES)
    bound = theory.PropagationBound(e=torch.zeros(n), b=torch.zeros(n), d=torch.zeros(n), total=4.0)
    m = 0.01 if steady_m is None else steady_m
    obs = Observed(e=torch.zeros(n), b=torch.zeros(n), d=torch.zeros(n), total=tightness * 4.0, grad_norm=50.0, m=m,
                   delta=torch.zeros(n), eps=torch.zeros(n), bound=bound, linear=None)
    consts = Constants(gains=t([math.nan, 1.0, 1.0, 1.0]), param_gains=torch.ones(n), jac_smoothness=torch.zeros(n),
                       param_jac_smoothness=torch.zeros(n), grad_msg_norms=t([0.1, 0.2, 0.3, 0.4]),
                       output_norms=t([10.0, 20.0, 30.0, 40.0]), loss_curvature=0.5, power_iterations=1, converged=True)
    amp = theory.Amplification(forward=t([4.0, 3.0, 2.0, 1.0]), backward=t([1.0, 2.0, 3.0, 4.0]))
    result = ProbeResult(step=40, names=NAMES, observed={"both": obs}, constants=consts, amplification=amp)
    return ProbeRecord(step=40, result=result, optimizer=OptimizerFacts(kind, beta, lr, lr), stability=stability,
                       steady=steady_m is not None)


PREDICTION = _record()
CONTEXT = {"losses": [2.1, 2.0, 1.9, 2.2], "grad_norms": [1.0, 0.9, 0.8, 1.1]}


def _event(**overrides):
    settings = dict(
        id=50, step=50, kind="grad_norm", z=20.0, loss=3.0, grad_norm=5.0, factor=5.0, loss_factor=1.5,
        baseline_loss=2.0, baseline_grad_norm=1.0, loss_floor=1.5, recovery_threshold=2.05,
        origin="h.1", direction="forward",
        operator_ratios={"h.1": {"out_amax": 9.0, "out_rms": 3.0, "msg_norm": 1.0, "param_grad_norm": 1.0}},
    )
    settings.update(overrides)
    return SpikeEvent(**settings)


def test_predict_spike_forward_bias_factor_and_recovery():
    out = predict_spike(_event(), CONTEXT, PREDICTION)
    u = 3.0 - 1.0  # |ratio - 1| of out_rms at h.1 (index 2)
    m_bound = 2.0 * 30.0 * u / 50.0  # A^f_2 |z_2| u / |G| = 2.4
    assert out.source == "probe" and out.probe_step == 40 and out.local_relative_size == u
    assert out.m_bound == pytest.approx(m_bound) and out.m == pytest.approx(0.25 * m_bound)
    assert out.factor == pytest.approx(1 + 0.6) and out.factor_bound == pytest.approx(1 + 2.4)
    # One step: the outcome uses the steady m (0: the probe's perturbation is not steady), and the rule's own text.
    assert out.outcome == "recover" and out.m_persistent == 0.0
    assert out.reason == theory.spike_outcome(0.0).reason == "m=0 < 1 (sharpness not measured)"

    # k_rec, independently: μ̂ = min g²/(2(f - f_min)), q = 1 - γμ̂(1-m)/2 with m = 0.
    f, g = CONTEXT["losses"], CONTEXT["grad_norms"]
    mu = min(gi**2 / (2 * (fi - min(f))) for fi, gi in zip(f, g) if fi > min(f))
    q = 1 - 0.01 * mu * (1 - 0.0) / 2
    # Spike excess: the observed loss (the predicted first-order rise is negative here).
    spike_excess, floor_excess, kappa = 3.0 - 1.5, 2.0 - 1.5, (2.05 - 1.5) / (2.0 - 1.5) - 1
    assert out.mu_estimate == pytest.approx(mu) and out.q == pytest.approx(q)
    assert out.kappa == pytest.approx(0.1)
    assert out.predicted_rise == pytest.approx(-0.01 * 1.0 + 0.01 * 1.0 * 0.6)
    expected = math.log((spike_excess - floor_excess) / (kappa * floor_excess)) / math.log(1 / q)
    assert out.k_rec == pytest.approx(expected, rel=1e-9)
    assert out.k_rec == pytest.approx(theory.recovery_steps(spike_excess, floor_excess, q, kappa), rel=1e-12)


def test_predict_spike_backward_origin_uses_the_gradient_message():
    event = _event(origin="h.0", direction="backward", operator_ratios={"h.0": {"msg_norm": 0.2, "out_rms": 7.0}})
    out = predict_spike(event, CONTEXT, PREDICTION)
    u = 0.8
    assert out.m_bound == pytest.approx(2.0 * 0.2 * u / 50.0)  # A^b_1 |g_1| u / |G|
    assert out.m == pytest.approx(0.25 * out.m_bound)


def test_a_persistent_spike_with_m_at_least_one_diverges():
    prediction = _record(tightness=0.5)  # m = 0.5 · 2.4 = 1.2
    once = predict_spike(_event(), CONTEXT, prediction)
    assert once.m == pytest.approx(1.2) and once.outcome == "recover"  # one step: steady m
    persistent = predict_spike(_event(duration=3), CONTEXT, prediction)
    assert persistent.outcome == "diverge" and persistent.m_persistent == pytest.approx(1.2)
    assert persistent.reason == theory.spike_outcome(1.2).reason
    assert math.isnan(persistent.k_rec)
    # A persistent spike with m < 1 recovers, more slowly: q uses its m.
    slow = predict_spike(_event(duration=3), CONTEXT, PREDICTION)
    assert slow.outcome == "recover"
    assert slow.q == pytest.approx(1 - 0.01 * slow.mu_estimate * (1 - 0.6) / 2)
    # A steady probe perturbation is THEORY §4's persistent m, spike or no spike.
    steady = predict_spike(_event(), CONTEXT, _record(steady_m=0.3))
    assert steady.m_persistent == pytest.approx(0.3)


def test_sharpness_over_the_threshold_diverges():
    # Adam, β1 = 0.9, γ = 0.01: threshold (2+2β1)/((1-β1)γ) = 3800.
    threshold = theory.stability_threshold(0.01, "adam", 0.9)
    assert threshold == pytest.approx(3800)
    sharp = _record(kind="adam", beta=0.9, stability=Stability(4000.0, threshold, preconditioned=True))
    out = predict_spike(_event(), CONTEXT, sharp)
    assert out.outcome == "diverge" and out.sharpness_ratio == pytest.approx(4000 / 3800)
    assert out.reason == f"sharpness is {4000 / 3800:.3g}x the stability threshold (>= 1)"
    ok = predict_spike(_event(), CONTEXT, _record(kind="adam", beta=0.9, stability=Stability(1900.0, threshold, True)))
    assert ok.outcome == "recover" and "0.5x threshold" in ok.reason
    # With a sharpness the rise is THEORY §4's full bound, L = sharpness.
    g, beta = 1.0, 0.6
    assert ok.predicted_rise == pytest.approx(-0.01 * g**2 + 0.01 * g * beta + 1900.0 * 0.01**2 / 2 * (g + beta) ** 2)


def test_predict_spike_without_a_probe():
    out = predict_spike(_event(), CONTEXT, None)
    assert out.source == "none" and out.probe_step is None and "AmplificationProbe" in out.notes[0]
    assert out.outcome == "recover" and math.isnan(out.k_rec)  # no step size: no k_rec
    with_lr = predict_spike(_event(), CONTEXT, None, lr=0.01)
    assert with_lr.k_rec > 0 and math.isnan(with_lr.m)
    unknown = predict_spike(_event(origin="lm_head"), CONTEXT, PREDICTION)
    assert unknown.source == "none" and math.isnan(unknown.m)


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"window": 0}, "DetectorConfig.window must be an int >= 1, got 0"),
        ({"warmup": 2.5}, "DetectorConfig.warmup must be an int >= 1, got 2.5"),
        ({"merge_gap": True}, "DetectorConfig.merge_gap must be an int >= 1, got True"),
        ({"recover_within": -1}, "DetectorConfig.recover_within must be an int >= 1, got -1"),
        ({"history": 0}, "DetectorConfig.history must be an int >= 1, got 0"),
        ({"recent": 0}, "DetectorConfig.recent must be an int >= 1, got 0"),
        ({"regime_steps": 1.0}, "DetectorConfig.regime_steps must be an int >= 1, got 1.0"),
        ({"window": 8, "warmup": 9}, "DetectorConfig.warmup must be <= window=8, got 9"),
        ({"threshold": 0}, "DetectorConfig.threshold must be a finite number > 0, got 0"),
        ({"operator_threshold": -1.0}, "DetectorConfig.operator_threshold must be a finite number > 0, got -1.0"),
        ({"attribution_threshold": math.nan}, "DetectorConfig.attribution_threshold must be a finite number > 0, got nan"),
        ({"kappa": "0.1"}, "DetectorConfig.kappa must be a finite number > 0, got '0.1'"),
        ({"recover_z": False}, "DetectorConfig.recover_z must be a finite number > 0, got False"),
        ({"min_factor": 0.9}, "DetectorConfig.min_factor must be a finite number >= 1, got 0.9"),
        ({"operator_min_factor": None}, "DetectorConfig.operator_min_factor must be a finite number >= 1, got None"),
        ({"attribution_min_factor": 0}, "DetectorConfig.attribution_min_factor must be a finite number >= 1, got 0"),
        ({"attribution_share": 0}, "DetectorConfig.attribution_share must be in (0, 1], got 0"),
        ({"attribution_share": 1.5}, "DetectorConfig.attribution_share must be in (0, 1], got 1.5"),
        ({"loss_floor": math.inf}, "DetectorConfig.loss_floor must be None or a finite number, got inf"),
        ({"loss_floor": "0"}, "DetectorConfig.loss_floor must be None or a finite number, got '0'"),
        ({"loss_floor": True}, "DetectorConfig.loss_floor must be None or a finite number, got True"),
    ],
)
def test_config_errors_name_the_key_and_value(overrides, message):
    with pytest.raises(ValueError) as err:
        DetectorConfig(**overrides)
    assert str(err.value) == message


def test_detector_rejects_a_config_of_another_type():
    with pytest.raises(TypeError, match="SpikeDetector.config must be a DetectorConfig, got dict"):
        SpikeDetector(NAMES, {"window": 8})
