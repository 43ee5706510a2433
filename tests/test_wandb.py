"""W&B: metric definitions, event table and alerts in a real offline run; the dashboard spec, workspace and CLI."""

import csv
import glob
import importlib.util
import json
import os
import re
import struct
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from helpers import TINY_GPT2, tiny_data, tiny_lm, trainer

from spikeguard import keys
from spikeguard import wandb as sg_wandb
from spikeguard.callbacks import AmplificationProbe, Perturb, SpikeGuard
from spikeguard.cli import main
from spikeguard.dashboard import (
    build_workspace,
    dashboard_spec,
    operators_from_run,
    spec_keys,
    spec_regexes,
)
from spikeguard.events import SpikeEvent, read_events
from spikeguard.perturb import Burst, Perturbation, Scale
from spikeguard.recipes.modules import CausalLMModule

# wandb-workspaces' pydantic models warn about their own validators on import.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:wandb_workspaces.*")

BURST_STEP = 60
BURST_OPERATOR = "transformer.ln_f"
MAX_STEPS = 120


# -- reading an offline run ------------------------------------------------------------


def wandb_records(path):
    """The protobuf records of a ``run-<id>.wandb`` transaction log.

    wandb 0.31 has no Python reader for it (the Go core writes it). The format is
    LevelDB's log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of
    chunks, each ``crc32 (4) | length (2, LE) | type (1)`` + data; types FULL=1,
    FIRST=2, MIDDLE=3, LAST=4; a block tail shorter than a chunk header is padding.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log ({len(data)} bytes)"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        assert kind in (1, 2, 3, 4), f"unknown chunk type {kind} at byte {pos} of {path}"
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def history_rows(records):
    """Each history record as ``{key: value}`` (a table's value is its JSON metadata dict)."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            path = [item.key] if item.key else list(item.nested_key)
            value = json.loads(item.value_json)
            if len(path) == 1:
                row[path[0]] = value
            else:
                row.setdefault(path[0], {})[path[1]] = value
        rows.append(row)
    return rows


class SGDModule(CausalLMModule):
    """The tiny LM with SGD + momentum.

    Why not its AdamW: one step into training, Adam's preconditioned sharpness is far above
    its threshold, so every spike is predicted to diverge and has no k_rec; with SGD the
    run logs every key the dashboard plots, predicted recovery included.
    """

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """One real training: WandbLogger(offline=True) and a CSVLogger beside it, a burst at step 60."""
    from pytorch_lightning.loggers import CSVLogger, WandbLogger
    from wandb.sdk.wandb_run import Run

    import wandb

    tmp = tmp_path_factory.mktemp("offline_run")
    alerts, log_kwargs = [], []
    original_log = Run.log

    def log(self, *args, **kwargs):
        log_kwargs.append(sorted(kwargs))
        return original_log(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                         ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")):
            mp.setenv(var, str(tmp / sub))
        mp.setenv("WANDB_MODE", "offline")  # WandbLogger(offline=True) sets "dryrun": restored after
        mp.setenv("WANDB_SILENT", "true")
        mp.setattr(Run, "alert", lambda self, *a, **k: alerts.append((a, k)))
        mp.setattr(Run, "log", log)

        torch.manual_seed(0)
        model = SGDModule(config=TINY_GPT2, vocab_size=256, lr=0.01)
        guard = SpikeGuard(log_every_n_steps=5)
        burst = Perturb(perturbations=[Perturbation(BURST_OPERATOR, Scale(10.0), Burst([BURST_STEP]))])
        probe = AmplificationProbe(every_n_steps=50, sharpness=True, sharpness_iterations=5)
        # The CSVLogger first: trainer.log_dir is its directory, so spikeguard/ sits beside metrics.csv.
        csv_logger = CSVLogger(str(tmp), name="csv")
        wandb_logger = WandbLogger(offline=True, save_dir=str(tmp), project="spikeguard-test")
        t = trainer(max_steps=MAX_STEPS, callbacks=[guard, burst, probe], logger=[csv_logger, wandb_logger],
                    default_root_dir=str(tmp))
        try:
            t.fit(model, tiny_data())
        finally:
            wandb.finish()  # flushes the transaction log
    (run_dir,) = glob.glob(str(tmp / "wandb" / "offline-run-*"))
    (log_path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    records = wandb_records(log_path)
    assert any(r.WhichOneof("record_type") == "history" for r in records), f"no history in {log_path}"
    return types.SimpleNamespace(
        tmp=tmp, run_dir=Path(run_dir), records=records, rows=history_rows(records),
        csv_dir=Path(csv_logger.log_dir), guard=guard, probe=probe, alerts=alerts, log_kwargs=log_kwargs,
    )


def logged_keys(run):
    return {k for row in run.rows for k in row}


def csv_keys(run):
    with open(run.csv_dir / "metrics.csv", newline="") as f:
        return {k for row in csv.DictReader(f) for k, v in row.items() if v}


# -- the offline run -------------------------------------------------------------------


def test_the_run_had_its_burst_predicted_and_recovered(offline_run):
    event = next(e for e in offline_run.guard.events if e.step == BURST_STEP)
    assert (event.origin, event.outcome) == (BURST_OPERATOR, "recovered")
    assert event.predicted is not None and event.predicted.outcome == "recover" and event.predicted.k_rec > 0
    assert offline_run.probe.num_probes == 3  # steps 0, 50, 100


def test_every_key_every_panel_names_was_logged(offline_run):
    operators = list(offline_run.probe.latest.names)
    logged = logged_keys(offline_run)
    for spec in (dashboard_spec(operators), dashboard_spec(None)):
        missing = [k for k in spec_keys(spec) if k not in logged]
        assert not missing, f"panels name keys the run never logged: {missing}"
        for pattern in spec_regexes(spec):
            assert any(re.search(pattern, k) for k in logged), f"no logged key matches {pattern}"
    # Per-operator panels of the named spec cover every operator of the chain.
    named = spec_keys(dashboard_spec(operators))
    for op in operators:
        assert keys.probe_operator_metric("both", op, "d_observed") in named
        assert keys.operator_metric(op, "msg_norm_ratio") in named


def test_the_csv_beside_got_the_same_spikeguard_keys(offline_run):
    in_wandb = {k for k in logged_keys(offline_run) if k.startswith(keys.PREFIX + "/")}
    in_csv = {k for k in csv_keys(offline_run) if k.startswith(keys.PREFIX + "/")}
    assert in_wandb - in_csv == {sg_wandb.EVENT_TABLE_KEY}  # tables go to W&B only
    assert in_csv <= in_wandb


def test_every_row_carries_the_step_and_no_log_call_passes_step(offline_run):
    assert offline_run.log_kwargs and all("step" not in kw for kw in offline_run.log_kwargs)
    rows = [r for r in offline_run.rows if any(k.startswith(keys.PREFIX + "/") for k in r)]
    assert rows and all(keys.STEP in r for r in rows)
    burst = [r for r in rows if r.get(keys.metric("spike", "factor")) is not None and r[keys.STEP] == BURST_STEP]
    assert burst, "the burst's spike factor is logged at its own step"


def test_define_metric_records_once_per_run(offline_run):
    metrics = [r.metric for r in offline_run.records if r.WhichOneof("record_type") == "metric"]
    glob_records = [m for m in metrics if m.glob_name == f"{keys.PREFIX}/*"]
    assert len(glob_records) == 1 and glob_records[0].step_metric == keys.STEP
    by_name = {}
    for m in metrics:
        if m.name:
            by_name.setdefault(m.name, []).append(m)
    assert keys.STEP in by_name
    for key in keys.STATIC_KEYS:
        (record,) = by_name[key.name]  # once
        assert record.step_metric == keys.STEP
        rule = keys.summary_of(key.name)
        assert getattr(record.summary, rule), (key.name, rule)
        assert [f for f in ("min", "max", "mean", "last") if getattr(record.summary, f)] == [rule]
    assert keys.summary_of(keys.metric("spike", "factor")) == "max"
    assert keys.summary_of(keys.metric("spikes")) == "last"


def test_event_table_is_logged(offline_run):
    tables = [r[sg_wandb.EVENT_TABLE_KEY] for r in offline_run.rows if sg_wandb.EVENT_TABLE_KEY in r]
    assert tables and all(t["_type"] == "table-file" for t in tables)
    # Re-logged whole as rows change: the last one has the burst with its outcome.
    latest = offline_run.run_dir / "files" / tables[-1]["path"]
    table = json.loads(latest.read_text())
    assert table["columns"] == list(sg_wandb.EVENT_COLUMNS)
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    burst = next(r for r in rows if r["step"] == BURST_STEP)
    assert (burst["origin"], burst["direction"], burst["outcome"]) == (BURST_OPERATOR, "forward", "recovered")
    assert burst["predicted_outcome"] == "recover" and burst["predicted_k_rec"] > 0
    assert len(rows) == len(offline_run.guard.events)


def test_no_alert_offline(offline_run):
    assert offline_run.alerts == []
    assert offline_run.guard.events  # there were spikes to alert about


# -- sinks without a server ------------------------------------------------------------


class FakeRun:
    def __init__(self, mode):
        self.settings = types.SimpleNamespace(mode=mode)
        self.defined, self.alerts = [], []

    def define_metric(self, name, **kwargs):
        self.defined.append((name, kwargs))

    def alert(self, **kwargs):
        self.alerts.append(kwargs)


class FakeLogger:
    """Quacks like Lightning's WandbLogger for the sink (found by class name)."""

    def __init__(self, run):
        self.experiment, self.tables = run, []

    def log_table(self, **kwargs):
        self.tables.append(kwargs)


FakeLogger.__name__ = "WandbLogger"


def fake_trainer(*loggers, rank_zero=True):
    return types.SimpleNamespace(loggers=list(loggers), is_global_zero=rank_zero, global_step=7)


def event():
    return SpikeEvent(id=5, step=5, kind="grad_norm", z=9.0, loss=3.0, grad_norm=8.0, factor=4.0, loss_factor=1.1)


@pytest.mark.parametrize("mode,alerted", [("online", True), ("offline", False), ("dryrun", False), ("disabled", False)])
def test_alert_only_when_online(mode, alerted):
    run = FakeRun(mode)
    (sink,) = sg_wandb.sinks_for(fake_trainer(FakeLogger(run)))
    sink.spike(event())
    assert bool(run.alerts) is alerted
    assert sg_wandb.is_online(run) is alerted
    assert sink.logger.tables[-1]["step"] == 7 and sink.logger.tables[-1]["key"] == sg_wandb.EVENT_TABLE_KEY
    quiet = FakeRun(mode)
    (sink,) = sg_wandb.sinks_for(fake_trainer(FakeLogger(quiet)), alert=False)
    sink.spike(event())
    assert quiet.alerts == []


def test_define_metrics_once_per_run_and_not_on_other_ranks():
    run = FakeRun("offline")
    sg_wandb.sinks_for(fake_trainer(FakeLogger(run)))
    sg_wandb.sinks_for(fake_trainer(FakeLogger(run)))  # a second SpikeGuard, or a second fit
    globs = [d for d in run.defined if d[0] == f"{keys.PREFIX}/*"]
    assert globs == [(f"{keys.PREFIX}/*", {"step_metric": keys.STEP})]
    other = FakeRun("offline")
    sg_wandb.sinks_for(fake_trainer(FakeLogger(other), rank_zero=False))
    assert other.defined == []
    assert sg_wandb.sinks_for(fake_trainer(object())) == []  # no WandbLogger: no sink


class BrokenRun:
    def __getattr__(self, name):
        raise RuntimeError("W&B is down")


def test_failing_wandb_warns_and_training_goes_on(tmp_path):
    from pytorch_lightning.loggers.logger import Logger

    class WandbLogger(Logger):  # named like Lightning's: spikeguard's sinks pick it up
        name, version = "broken", "0"

        def __init__(self):
            super().__init__()
            self.metrics = []

        @property
        def experiment(self):
            return BrokenRun()

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.metrics.append(dict(metrics))

        def log_table(self, **kwargs):
            return self.experiment.log(kwargs)

    torch.manual_seed(0)
    logger = WandbLogger()
    guard = SpikeGuard(log_every_n_steps=5)
    burst = Perturb(perturbations=[Perturbation(BURST_OPERATOR, Scale(10.0), Burst([40]))])
    t = trainer(max_steps=60, callbacks=[guard, burst], logger=logger, default_root_dir=str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(tiny_lm(), tiny_data())
    messages = [str(w.message) for w in caught]
    assert t.global_step == 60
    assert any("W&B define_metric failed" in m and "training goes on" in m for m in messages), messages
    assert any("WandbSink.spike failed (RuntimeError: W&B is down)" in m for m in messages), messages
    assert 40 in [e.step for e in read_events(tmp_path / "spikeguard" / "events.jsonl")]
    assert any(keys.metric("grad_norm") in m for m in logger.metrics)  # metrics still logged


def test_wandb_and_wandb_workspaces_missing(monkeypatch, capsys):
    for name in ("wandb", "wandb_workspaces", "wandb_workspaces.workspaces", "wandb_workspaces.reports.v2"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    # spikeguard.wandb imports without W&B (a fresh copy of the module, not the loaded one).
    spec = importlib.util.spec_from_file_location("_sg_wandb_copy", sg_wandb.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy.sinks_for(fake_trainer()) == []
    with pytest.raises(ImportError, match=re.escape("pip install 'spikeguard[dashboard]'")):
        build_workspace(dashboard_spec(["a"]), "e", "p")
    assert main(["dashboard", "--entity", "e", "--project", "p", "--operators", "a"]) == 2
    assert "pip install 'spikeguard[dashboard]'" in capsys.readouterr().err
    assert main(["dashboard", "--dry-run", "--operators", "a"]) == 0  # the spec needs no W&B


# -- the dashboard spec and workspace --------------------------------------------------


def test_spec_layout_and_every_key_from_the_key_builders():
    spec = dashboard_spec(["embed", "h.0", "head"])
    assert [s["name"] for s in spec["sections"]] == [
        "Overview", "Spike events", "Amplification", "Forward versus backward", "Stability",
    ]
    assert json.loads(json.dumps(spec)) == spec
    assert spec["x_axis"] == keys.STEP
    panels = [p for s in spec["sections"] for p in s["panels"]]
    assert {p["kind"] for p in panels} == {"line", "bar", "table"}
    assert all(("keys" in p) != ("regex" in p) for p in panels)
    named = spec_keys(spec)
    assert all(k.startswith(keys.PREFIX + "/") for k in named)
    assert sg_wandb.EVENT_TABLE_KEY in named
    assert {k.name for k in keys.STATIC_KEYS} - set(named) == {keys.metric("probe", "seconds")}
    assert keys.probe_operator_metric("both", "h.0", "d_linear") in named
    assert keys.probe_constant_metric("head", "A_ratio") in named
    # Fewer configurations: panels follow them.
    forward_only = spec_keys(dashboard_spec(["embed"], configs=("forward",)))
    assert keys.probe_operator_metric("forward", "embed", "d_observed") in forward_only
    assert not [k for k in forward_only if "/probe/both/" in k or "/probe/backward/" in k]


def test_regex_spec_matches_any_operator_name():
    spec = dashboard_spec(None)
    assert spec["operators"] is None
    assert not [k for k in spec_keys(spec) if "/op/" in k]
    patterns = spec_regexes(spec)
    for op in ("transformer.h.11", "model.layers.0.mlp", "lm_head"):
        for key in (keys.probe_operator_metric("both", op, "d_bound"), keys.probe_constant_metric(op, "A_f"),
                    keys.operator_metric(op, "out_rms_ratio"), keys.perturb_metric("backward", op)):
            assert any(re.search(p, key) for p in patterns), key
    assert not any(re.search(p, keys.metric("op", "a", "b", "out_rms_ratio")) for p in patterns)  # one segment


@pytest.mark.parametrize("operators,configs,match", [
    ([], ("both",), "operators"), (["a", "a"], ("both",), "twice"), (["a/b"], ("both",), "'/'"),
    ("abc", ("both",), "operators"), (["a"], ("sideways",), "configs"), (["a"], (), "configs"),
])
def test_spec_rejects_bad_arguments(operators, configs, match):
    with pytest.raises(ValueError, match=match):
        dashboard_spec(operators, configs)


def test_build_workspace_without_network():
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    for spec in (dashboard_spec(["embed", "h.0", "head"]), dashboard_spec(None)):
        workspace = build_workspace(spec, "my-entity", "my-project", name="spikes")
        assert isinstance(workspace, ws.Workspace)
        assert (workspace.entity, workspace.project, workspace.name) == ("my-entity", "my-project", "spikes")
        assert [s.name for s in workspace.sections] == [s["name"] for s in spec["sections"]]
        for section, expected in zip(workspace.sections, spec["sections"]):
            assert len(section.panels) == len(expected["panels"])
            for panel, p in zip(section.panels, expected["panels"]):
                if p["kind"] == "table":
                    assert isinstance(panel, wr.WeavePanelSummaryTable) and panel.table_name == p["keys"][0]
                elif p["kind"] == "bar":
                    assert isinstance(panel, wr.BarPlot) and panel.metrics == p["keys"]
                else:
                    assert isinstance(panel, wr.LinePlot) and panel.x == keys.STEP
                    assert panel.metric_regex == p.get("regex") and panel.y == p.get("keys", [])
        assert workspace.settings.x_axis == keys.STEP
    with pytest.raises(ValueError, match="entity"):
        build_workspace(spec, "", "p")


# -- the command -----------------------------------------------------------------------


def test_cli_dry_run_prints_the_spec(offline_run, capsys):
    assert main(["dashboard", "--dry-run", "--operators", "embed, h.0,head", "--name", "mine"]) == 0
    assert json.loads(capsys.readouterr().out) == dashboard_spec(["embed", "h.0", "head"], name="mine")
    assert main(["dashboard", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out) == dashboard_spec(None)
    # From the run's log directory: the probe's names, in forward order.
    assert main(["dashboard", "--dry-run", "--run", str(offline_run.csv_dir)]) == 0
    assert json.loads(capsys.readouterr().out) == dashboard_spec(list(offline_run.probe.latest.names))


def test_operators_from_run_fallbacks(offline_run, tmp_path):
    names = list(offline_run.probe.latest.names)
    assert operators_from_run(offline_run.csv_dir) == (names, ["forward", "backward", "both"])
    assert operators_from_run(offline_run.csv_dir / "spikeguard") == (names, ["forward", "backward", "both"])
    # Without probes.jsonl: metrics.csv's logged operator columns (load_run's), then the events' operator ratios.
    (tmp_path / "spikeguard").mkdir()
    (tmp_path / "metrics.csv").write_text((offline_run.csv_dir / "metrics.csv").read_text())
    ops, configs = operators_from_run(tmp_path)
    assert sorted(ops) == sorted(names) and configs == ["forward", "backward", "both"]
    (tmp_path / "metrics.csv").unlink()
    (tmp_path / "spikeguard" / "events.jsonl").write_text((offline_run.csv_dir / "spikeguard" / "events.jsonl").read_text())
    ops, configs = operators_from_run(tmp_path)
    assert sorted(ops) == sorted(names) and configs == []


@pytest.mark.parametrize("argv,message", [
    (["--operators", "a"], "--entity and --project required"),
    (["--entity", "e", "--operators", "a"], "--project required"),
    (["--dry-run", "--run", "NOPE"], "is not a directory"),
    (["--dry-run", "--run", "EMPTY"], "no operator names in"),
])
def test_cli_errors(argv, message, tmp_path, capsys):
    (tmp_path / "EMPTY").mkdir()
    argv = [str(tmp_path / a) if a in ("NOPE", "EMPTY") else a for a in argv]
    assert main(["dashboard", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


@pytest.mark.parametrize("argv,message", [
    (["--run", "x", "--operators", "a"], "not allowed with argument"),
    (["--operators", "a,,b"], "--operators takes operator names"),
    (["--operators", "a,b,a"], "names an operator twice"),
])
def test_cli_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["dashboard", "--dry-run", *argv])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_cli_saves_the_workspace(monkeypatch, capsys):
    import wandb_workspaces.workspaces as ws

    saved = []
    monkeypatch.setattr(ws.Workspace, "save", lambda self: saved.append(self) or self)  # no network
    assert main(["dashboard", "--entity", "e", "--project", "p", "--operators", "a,b", "--name", "N"]) == 0
    (workspace,) = saved
    assert (workspace.entity, workspace.project, workspace.name) == ("e", "p", "N")
    assert "saved W&B workspace 'N' to e/p" in capsys.readouterr().err

    def refuse(self):
        raise RuntimeError("not logged in")

    monkeypatch.setattr(ws.Workspace, "save", refuse)
    assert main(["dashboard", "--entity", "e", "--project", "p"]) == 1
    assert "saving the workspace to W&B failed (RuntimeError: not logged in)" in capsys.readouterr().err
