"""benchmarks/overhead.py --quick runs every variant's fit and prints the JSON it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

VARIANTS = {
    "bare", "bare_2", "spikeguard/monitor", "spikeguard/skip", "perturb/gaussian", "perturb/e4m3",
    "peer/wandb_watch", "peer/lightning_grad_norm", "peer/zclip",
}
GOALS = {"spikeguard/monitor": 1.03, "spikeguard/skip": 1.05, "perturb/gaussian": 1.05, "perturb/e4m3": 1.15}
PEERS = {"peer/wandb_watch", "peer/lightning_grad_norm", "peer/zclip"}


def test_overhead_quick_prints_its_json():
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "overhead.py"), "--quick"],
        cwd=BENCHMARKS.parent, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # stdout is exactly one JSON object

    assert out["benchmark"] == "overhead"
    assert set(out["goals"]) == set(GOALS)
    for name, g in out["goals"].items():
        assert set(g) == {"goal", "limit", "value", "met"}
        assert g["limit"] == GOALS[name] and g["value"] == out["cpu_ratios"][name]
        assert g["met"] == (g["value"] <= g["limit"])
    assert set(out["cheaper_than_peers"]) == set(GOALS)
    for name, verdicts in out["cheaper_than_peers"].items():
        assert set(verdicts) == PEERS | {"all"}
        assert verdicts["all"] == all(verdicts[p] for p in PEERS)
        assert all(verdicts[p] == (out["cpu_ratios"][name] < out["cpu_ratios"][p]) for p in PEERS)

    for view in ("cpu_ratios", "wall_ratios", "step_cpu_ratios"):
        assert set(out[view]) == VARIANTS, view
        assert out[view]["bare"] == 1.0 and all(r > 0 for r in out[view].values())
    assert set(out["cpu_ratios_paired"]) == VARIANTS
    assert all(len(q) == 3 and q[0] <= q[1] <= q[2] for q in out["cpu_ratios_paired"].values())
    assert {"aa_ratio", "aa_paired", "baseline_iqr_rel", "bare_2_cpu_ratio", "bare_2_wall_ratio", "bare_2_step_cpu_ratio"} <= set(
        out["noise"]
    )
    timing = out["timing"]
    assert set(timing["variants"]) == VARIANTS and timing["baseline"] == "bare" and timing["steps_per_sample"] == 5
    assert out["bare_step_cpu_ms"] > 0 and out["bare_step_wall_ms"] > 0 and set(out["cold_ms_per_step"]) == VARIANTS

    # Every fit ran: 5 warm-up steps, then 5 per round (bare twice a round: the A/A copy).
    did = out["variants_did"]
    assert did["bare"]["steps"] == 5 + 2 * 2 * 5
    assert all(did[name]["steps"] == 5 + 2 * 5 for name in VARIANTS - {"bare"})
    assert did["spikeguard/skip"]["skipped_steps"] >= 0

    settings = out["settings"]
    assert settings["quick"] is True and settings["rounds"] == 2 and settings["steps_per_turn"] == 5
    assert out["machine"]["threads"] == 1 and out["machine"]["device"] == "cpu"
