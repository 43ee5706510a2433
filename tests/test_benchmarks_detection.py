"""benchmarks/detection.py --quick runs and prints the JSON it promises; its scoring counts as documented."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import detection  # noqa: E402

DETECTORS = {"spikeguard", "spikeguard_device_flag", "lightning", "zclip", "olmo_core"}
METRICS = {"precision", "recall", "f1", "mean_delay", "detected", "bursts"}


def test_detection_quick_prints_its_json():
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "detection.py"), "--quick"],
        cwd=BENCHMARKS.parent, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # stdout is exactly one JSON object

    assert out["benchmark"] == "detection"
    assert set(out["detectors"]) == DETECTORS
    for result in out["detectors"].values():
        assert METRICS | {"false_positives", "per_type", "false_positive_steps", "missed"} <= set(result)
        assert set(result["per_type"]) == {"forward", "backward", "bitflip"}
        assert all(METRICS <= set(r) for r in result["per_type"].values())
        assert result["bursts"] == 4 and 0 <= result["f1"] <= 1
    assert set(out["goals"]) == {"f1", "better_than_lightning", "better_than_zclip", "better_than_olmo_core"}
    for g in out["goals"].values():
        assert set(g) == {"goal", "limit", "value", "met"}
    f1 = out["detectors"]["spikeguard"]["f1"]
    assert out["goals"]["f1"]["met"] == (f1 >= 0.95)
    assert out["goals"]["better_than_zclip"]["met"] == (f1 > out["detectors"]["zclip"]["f1"])
    assert "default" in out["tuning"] and out["setup"]["eval_seeds"] == [0]
    assert out["settings"]["quick"] is True


def test_scoring_merges_consecutive_flags_and_counts_the_tolerance():
    bursts = [detection.BurstSpec(10, "forward", "x", 5.0), detection.BurstSpec(30, "backward", "y", 10.0)]
    flags = [False] * 50
    for t in (11, 12, 13, 14, 20, 33, 40, 41):  # 11-14: one detection of the burst at 10
        flags[t] = True
    assert detection.detections(flags) == [(11, 14), (20, 20), (33, 33), (40, 41)]
    score = detection.score_run(flags, bursts)
    assert score["bursts"] == [{"kind": "forward", "detected": True, "delay": 1},
                               {"kind": "backward", "detected": False, "delay": None}]  # 33 > 30 + 2
    assert score["false_positive_steps"] == [20, 33, 40]
    total = detection.aggregate([score])
    assert (total["precision"], total["recall"], total["false_positives"]) == (0.25, 0.5, 3)
    assert total["f1"] == round(2 * 0.25 * 0.5 / 0.75, 4) and total["mean_delay"] == 1.0
    assert total["per_type"]["forward"]["precision"] == 0.25 and total["per_type"]["backward"]["recall"] == 0.0


def test_one_long_alarm_is_credited_with_one_burst():
    bursts = [detection.BurstSpec(t, "bitflip", "x", 30) for t in (10, 25, 40)]
    flags = [False] * 10 + [True] * 40  # flagged from the first burst on, every step
    score = detection.score_run(flags, bursts)
    assert [b["detected"] for b in score["bursts"]] == [True, False, False]
    assert score["detections"] == [["bitflip"]] and score["false_positive_steps"] == []
    # Two detections inside one burst's tolerance: both cover it, it is detected once.
    flags = [False] * 50
    flags[10] = flags[12] = True
    score = detection.score_run(flags, bursts)
    assert score["bursts"][0] == {"kind": "bitflip", "detected": True, "delay": 0}
    assert score["detections"] == [["bitflip"], ["bitflip"]]
    # The live-steps variant leaves out detections that end before its start.
    flags[5] = True
    assert detection.score_run(flags, bursts, start=8)["false_positive_steps"] == []
    assert detection.score_run(flags, bursts)["false_positive_steps"] == [5]


def test_peer_rules_on_a_hand_made_stream():
    losses = [3.0] * 30 + [9.5, 3.0, float("nan"), 3.0]
    flags = detection.lightning_flags(losses)
    assert [t for t, f in enumerate(flags) if f] == [30, 32]  # >= 3x the running mean; non-finite
    assert not any(detection.lightning_flags([3.0] * 30 + [8.9])[30:])  # under 3x

    norms = [1.0, 1.1] * 20 + [5.0]
    assert [t for t, f in enumerate(detection.zclip_flags(norms)) if f] == [40]
    assert not any(detection.zclip_flags([1.0, 1.1] * 12 + [50.0]))  # inside ZClip's 25-step warm-up

    wobble = [1.0 + 0.01 * (t % 5) for t in range(80)]
    flags = detection.olmo_core_flags(wobble[:70] + [2.0] + wobble[71:], wobble)
    assert [t for t, f in enumerate(flags) if f] == [70]
    assert not any(detection.olmo_core_flags([1.0] * 63 + [9.0], [1.0] * 64)[:63])  # fewer than 64 values
    assert detection.olmo_core_flags([1.0] * 63 + [9.0], [1.0] * 64)[63]  # std 0: z = inf (NaN would skip too)
