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
    exec(compile(BLOCKS[0], "README.md block 0", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "5 ['transformer.embed', 'transformer.h.0', 'transformer.h.1', 'transformer.ln_f', 'lm_head']" in out
    assert "['transformer.h.0', 'transformer.h.1']" in out


@pytest.mark.parametrize("script", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_example_script_runs(script, capsys):
    runpy.run_path(str(script), run_name="__main__")
    assert capsys.readouterr().out


def test_console_script_version():
    out = subprocess.run([sys.executable, "-m", "spikeguard.cli", "--version"], capture_output=True, text=True, check=True)
    assert re.fullmatch(r"spikeguard \d+\.\d+\.\d+\S*\n", out.stdout)
