"""The benchmarks run and print the JSON they promise; the shared harness reports what it says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _common  # noqa: E402


def test_probe_cost_quick_prints_its_json():
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "probe_cost.py"), "--quick"],
        cwd=BENCHMARKS.parent, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # stdout is exactly one JSON object

    assert out["benchmark"] == "probe_cost"
    assert set(out["goals"]) == {"statistics_overhead", "probe_step_equivalents"}
    for g in out["goals"].values():
        assert set(g) == {"goal", "limit", "value", "met"}
        assert g["met"] == (g["value"] <= g["limit"])
    stats = out["statistics"]
    assert stats["ratio_attached"] > 0 and stats["ratio_detached"] > 0
    assert set(stats["timing"]["variants"]) == {"bare_step", "stats_attached", "stats_detached"}
    assert set(stats["timing"]["noise"]) == {"aa_ratio", "aa_paired", "baseline_iqr_rel"}
    probe = out["probe"]
    assert set(probe["options"]) == {"default", "no_linearize", "observed_only"}
    for option in probe["options"].values():
        assert option["warm_step_equivalents"] > 0 and option["cold_s"] > 0
    warm = probe["phases"]["warm"]
    assert {"graph_forwards", "chained_backwards", "linearized_prediction", "other"} <= set(warm)
    assert warm["chained_backwards"]["calls"] == 4  # clean + one per configuration
    assert out["settings"]["quick"] is True and out["settings"]["rounds"] == 3
    assert out["machine"]["threads"] == 1 and out["machine"]["device"] == "cpu"


def test_compare_interleaves_and_reports_ratios():
    order = []
    variants = {"a": lambda: order.append("a"), "b": (lambda: order.append("b"), 2)}
    timing = _common.compare(variants, baseline="a", rounds=3, warmup=1)

    # 4 rounds of a, b (2 calls a sample), and the A/A copy of a, the order rotated each round.
    assert order[:4] == ["a", "b", "b", "a"] and order[4:8] == ["b", "b", "a", "a"]
    assert len(order) == 4 * (1 + 2 + 1)
    assert timing["baseline"] == "a" and timing["rounds"] == 3
    assert set(timing["variants"]) == {"a", "b"}
    assert timing["variants"]["a"]["ratio"] == 1.0
    assert timing["variants"]["a"]["ratio_paired"] == [1.0, 1.0, 1.0]
    assert timing["variants"]["b"]["number"] == 2
    assert timing["noise"]["aa_ratio"] > 0
    with pytest.raises(ValueError, match="baseline 'c'"):
        _common.compare(variants, baseline="c", rounds=1, warmup=0)


def test_emit_prints_and_saves(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(_common, "RESULTS_DIR", tmp_path)
    bench = _common.Benchmark("unit", rounds=5, quick_rounds=2)
    args = bench.parse_args(["--quick", "--save", "--threads", "1"])
    assert (args.rounds, args.warmup) == (2, 1)

    payload = bench.emit({"goals": {"x": _common.goal(1.5, 2.0, "x <= 2")}})
    printed = json.loads(capsys.readouterr().out)
    assert printed == payload == json.loads((tmp_path / "unit.json").read_text())
    assert printed["goals"]["x"]["met"] is True
    assert printed["settings"]["rounds"] == 2 and "save" not in printed["settings"]
    assert {"torch", "threads", "cpu_count", "device"} <= set(printed["machine"])
