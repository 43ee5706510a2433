"""The outputs besides the report read typed records, without training: the W&B event table
(:class:`~spikeguard.wandb.WandbSink`) and the dashboard's operator names, read through
:func:`spikeguard.rundir.load_run` as the report reads them (runs from ``synthetic.py``)."""

import types

import pytest
from report.synthetic import NAMES, events, probe, write_run

from spikeguard import wandb as sg_wandb
from spikeguard.cli import main
from spikeguard.dashboard import operators_from_run
from spikeguard.records import SpikeEvent, SpikePrediction
from spikeguard.rundir import load_run


class FakeRun:
    """Quacks like a wandb Run: its mode, defined metrics and alerts."""

    def __init__(self, mode):
        self.settings = types.SimpleNamespace(mode=mode)
        self.defined, self.alerts = [], []

    def define_metric(self, name, **kwargs):
        self.defined.append((name, kwargs))

    def alert(self, **kwargs):
        self.alerts.append(kwargs)


class FakeLogger:
    def __init__(self, run):
        self.experiment, self.tables = run, []

    def log_table(self, **kwargs):
        self.tables.append(kwargs)


def event(**fields):
    base = dict(id=5, step=5, kind="grad_norm", z=9.0, loss=3.0, grad_norm=8.0, factor=4.0, loss_factor=1.1)
    return SpikeEvent(**{**base, **fields})


# -- the W&B event table ---------------------------------------------------------------


def test_event_table_rows_from_typed_events():
    """The sink's table: one row per event, re-logged whole when an outcome arrives; no prediction, no values."""
    run = FakeRun("online")
    trainer = types.SimpleNamespace(loggers=[], is_global_zero=True, global_step=7)
    sink = sg_wandb.WandbSink(FakeLogger(run), trainer, alert=True)
    predicted = SpikePrediction(source="probe", factor=3.5, outcome="recover", k_rec=12.0)
    first = event(origin="h.0", direction="forward", predicted=predicted)
    sink.spike(first)
    sink.spike(event(id=9, step=9, z=float("inf"), predicted=None))
    first.outcome, first.recovery_steps = "recovered", 2
    trainer.global_step = 11
    sink.outcome(first)
    assert [t["step"] for t in sink.logger.tables] == [7, 7, 11]
    table = sink.logger.tables[-1]
    assert table["columns"] == list(sg_wandb.EVENT_COLUMNS)
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert [r["step"] for r in rows] == [5, 9]
    assert (rows[0]["predicted_factor"], rows[0]["predicted_outcome"], rows[0]["predicted_k_rec"]) == (3.5, "recover", 12.0)
    assert (rows[0]["outcome"], rows[0]["recovery_steps"], rows[0]["origin"]) == ("recovered", 2, "h.0")
    assert (rows[1]["predicted_factor"], rows[1]["predicted_outcome"], rows[1]["predicted_k_rec"]) == (None, None, None)
    assert rows[1]["z"] is None  # a non-finite number is no value in W&B
    assert [a["title"] for a in run.alerts] == ["spikeguard: grad_norm spike at step 5", "spikeguard: grad_norm spike at step 9"]
    assert run.alerts[0]["text"] == first.summary()


# -- the dashboard's operator names ----------------------------------------------------


def test_operators_from_run_reads_the_run_as_the_report_does(tmp_path):
    """One reader (spikeguard.rundir.load_run), one rule: the newest probe's names, in its order."""
    reordered = ("head", "h.1", "h.0", "embed", "extra")
    run_dir = write_run(tmp_path / "run", probes=[probe(0), probe(50, configs=("forward", "both"), names=reordered)])
    names, configs = operators_from_run(run_dir)
    assert names == list(reordered) == load_run(run_dir).operators[0]
    assert configs == ["forward", "both"]  # the newest probe's configurations
    assert operators_from_run(run_dir / "spikeguard") == (names, configs)
    assert operators_from_run(run_dir.parent) == (names, configs)  # the only run below, as for the report
    # No probes: metrics.csv's and the events' names, natural order; configurations from metrics.csv's m columns (none).
    bare = write_run(tmp_path / "bare", probes=[])
    assert operators_from_run(bare) == (list(NAMES), [])
    assert main(["dashboard", "--dry-run", "--run", str(bare)]) == 0  # no configuration logged: all of them


def test_operators_from_run_errors(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "metrics.csv").write_text("step,train/loss\n0,1.0\n")  # a run without SpikeGuard
    with pytest.raises(ValueError, match=r"no operator names in .*plain.*: looked in .*probes.jsonl.*not a run that used"):
        operators_from_run(tmp_path / "plain")
    # A run whose only event attributes nothing: a run, but no names in it.
    nameless = write_run(tmp_path / "nameless", probes=[], spikes=[e for e in events() if not e.operator_ratios], metrics=False)
    with pytest.raises(ValueError, match=r"no operator names in .*nameless.*: looked in .*nameless/spikeguard/probes.jsonl"):
        operators_from_run(nameless)
    broken = write_run(tmp_path / "broken")
    (broken / "spikeguard" / "probes.jsonl").write_text("[1]\n{}\n")
    with pytest.raises(ValueError, match=r"cannot read .*probes.jsonl:1: not a JSON object"):
        operators_from_run(broken)
    with pytest.raises(ValueError, match=r"2 runs that used SpikeGuard below"):
        operators_from_run(tmp_path)  # broken and nameless both qualify
