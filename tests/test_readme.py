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
