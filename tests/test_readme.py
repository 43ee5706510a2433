"""The README's Python examples and the example scripts run as written."""

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, capsys):
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "__readme__"})


def test_readme_chain_example_prints_what_it_says(capsys):
    block = next(b for b in BLOCKS if "OperatorChain.from_model" in b and "from_patterns" in b)
    exec(compile(block, "README.md chain example", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "5 ['transformer.embed', 'transformer.h.0', 'transformer.h.1', 'transformer.ln_f', 'lm_head']" in out
    assert "['transformer.h.0', 'transformer.h.1']" in out


@pytest.mark.parametrize("script", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_example_script_runs(script, capsys):
    runpy.run_path(str(script), run_name="__main__")
    assert capsys.readouterr().out


def test_readme_probe_example_prints_observed_and_predicted(capsys):
    block = next(b for b in BLOCKS if "AmplificationProbe(model" in b)
    exec(compile(block, "README.md probe example", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "e obs" in out and "d bound" in out and "transformer.h.1" in out and "|G-Ĝ| observed" in out


def test_readme_has_no_placeholders():
    text = (ROOT / "README.md").read_text()
    assert not re.search(r"\b(RECIPE|RESULT)_[A-Z0-9]+\b|BENCHMARK_TABLE", text)


def test_console_script_version():
    out = subprocess.run([sys.executable, "-m", "spikeguard.cli", "--version"], capture_output=True, text=True, check=True)
    assert re.fullmatch(r"spikeguard \d+\.\d+\.\d+\S*\n", out.stdout)


def test_demo_summary_prints_what_the_readme_shows():
    """The README's demo summary, from typed events (SpikeEvent; predicted None where none was made)."""
    from spikeguard.demo import summary
    from spikeguard.paths import RunPaths
    from spikeguard.records import SpikeEvent, SpikePrediction

    shown = next(b for b in re.findall(r"```text\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S) if "Spike at step" in b)
    files = RunPaths.at("runs/demo/logs/version_0")
    burst = SpikeEvent(
        id=200, step=200, kind="grad_norm", z=21.9, loss=5.0, grad_norm=30.0, factor=27.3, loss_factor=1.3,
        origin="transformer.ln_f", direction="forward", outcome="recovered", recovery_steps=1,
        predicted=SpikePrediction(source="probe", factor=3.98, factor_bound=5970.0, outcome="recover", k_rec=41.0),
    )
    unpredicted = SpikeEvent(id=250, step=250, kind="loss", z=7.0, loss=9.0, grad_norm=3.0, factor=1.5, loss_factor=2.0)
    anomaly = SpikeEvent(id=260, step=260, kind="operator", z=12.0, loss=3.0, grad_norm=2.0, factor=1.0, loss_factor=1.0)
    result = {
        "events": [burst, unpredicted, anomaly], "seconds": 28.0, "report": str(files.report),
        "events_file": str(files.events), "wandb_run": "runs/demo/wandb/offline-run-...",
    }
    printed = summary(result).splitlines()
    for line in shown.strip("\n").splitlines():
        assert line in printed, line
    assert "  predicted: n/a, spike factor ~n/a (bound n/a), k_rec = n/a steps" in printed
    assert "  observed: pending" in printed
    assert "Operator anomalies (no loss/gradient spike): steps [260]" in printed
    assert "spikeguard demo finished in 28 s" in printed
