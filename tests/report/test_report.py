"""The offline report of a real tiny run: self-contained HTML, every section, the CLI and its errors, a browser."""

import base64
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_data, tiny_lm, trainer

from spikeguard.cli import main
from spikeguard.events import read_events
from spikeguard.report import SECTIONS, ReportError, build_report, find_run

BURST_STEP = 150
ORIGIN = "transformer.ln_f"

# The figures need matplotlib (the ``report`` extra); the error paths do not.
needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed: pip install 'spikeguard[report]'"
)


def fit(root, callbacks, max_steps):
    from pytorch_lightning.loggers import CSVLogger

    torch.manual_seed(0)
    logger = CSVLogger(str(root), name="lightning_logs")
    t = trainer(max_steps=max_steps, callbacks=callbacks, default_root_dir=str(root), logger=logger)
    t.fit(tiny_lm(), tiny_data())
    return Path(logger.log_dir)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """200 steps with a forward burst at step 150 and a probe every 50 steps."""
    from spikeguard.callbacks import AmplificationProbe, Perturb, SpikeGuard
    from spikeguard.perturb import Burst, Perturbation, Scale

    burst = Perturbation(ORIGIN, Scale(10.0), Burst([BURST_STEP]))
    callbacks = [SpikeGuard(log_every_n_steps=5), Perturb(perturbations=[burst]),
                 AmplificationProbe(every_n_steps=50, linearize=False)]
    return fit(tmp_path_factory.mktemp("run"), callbacks, max_steps=200)


@pytest.fixture(scope="module")
def report(run_dir):
    path = build_report(run_dir)
    return path, path.read_text(encoding="utf-8")


def rows(page):
    """The event table's body rows, as lists of cell texts (tags stripped)."""
    table = page[page.index('<table class="events">'):]
    body = table[table.index("<tbody>"):table.index("</tbody>")]
    return [[re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", r)]
            for r in re.findall(r"<tr[^>]*>(.*?)</tr>", body)]


@needs_matplotlib
def test_report_is_written_next_to_the_events_and_self_contained(run_dir, report):
    path, page = report
    assert path == run_dir / "spikeguard" / "report.html" and path.is_file()
    # Nothing is fetched: no external src/href, scripts, stylesheets or CSS imports.
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert not re.search(r"<script|<link|@import|url\(", page, re.IGNORECASE)
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) >= 5  # loss, heatmap, amplification x2, stability
    for uri in images:
        assert uri.startswith("data:image/png;base64,")
        assert base64.b64decode(uri.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


@needs_matplotlib
def test_header_and_every_section(run_dir, report):
    _, page = report
    header = page[page.index("<header>"):page.index("</header>")]
    assert str(run_dir) in header
    assert "0–199" in header  # the steps
    spikes = [e for e in read_events(run_dir / "spikeguard" / "events.jsonl") if e.kind != "operator"]
    assert re.search(rf'<div class="value">{len(spikes)}</div><div class="label">spikes</div>', header)
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page
    assert "Sharpness: not measured in this run" in page  # the probe ran without sharpness=True


@needs_matplotlib
def test_event_table_has_the_burst_its_origin_prediction_and_outcome(run_dir, report):
    _, page = report
    events = read_events(run_dir / "spikeguard" / "events.jsonl")
    table = rows(page)
    assert len(table) == len(events)
    burst = next(r for r in table if r[0] == str(BURST_STEP))
    _, kind, z, factor, origin, predicted_factor, predicted, k_rec, action, rerun, observed, recovery = burst
    assert kind == "grad_norm" and origin == f"{ORIGIN} forward"
    assert predicted == "recover" and observed == "recovered" and action == "none" and rerun == "—"
    event = next(e for e in events if e.step == BURST_STEP)
    assert z == f"{event.z:.3g}"
    assert event.predicted is not None  # a probe ran before the burst: a prediction was made
    predicted_k_rec = event.predicted.k_rec
    assert recovery == str(event.recovery_steps)
    assert k_rec == (f"{predicted_k_rec:.0f}" if math.isfinite(predicted_k_rec) else "—")
    assert factor == f"×{event.factor:.3g}" and predicted_factor == f"×{event.predicted.factor:.3g}"


@needs_matplotlib
def test_cli_end_to_end_from_the_directory_above_the_run(run_dir, tmp_path, capsys):
    above = run_dir.parent  # lightning_logs/ holds exactly one run: it is used, and the CLI says so
    assert find_run(above) == run_dir
    out = tmp_path / "nested" / "report.html"
    assert main(["report", str(above), "--out", str(out)]) == 0
    assert out.is_file() and "<h2>Spike events</h2>" in out.read_text(encoding="utf-8")
    printed = capsys.readouterr()
    assert f"wrote {out}" in printed.out and f"using {run_dir}" in printed.err


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["report", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "RUN_DIR" in text and "--out" in text and "spikeguard/report.html" in text


def _several(root):
    for version in ("version_0", "version_1"):
        (root / version / "spikeguard").mkdir(parents=True)
        (root / version / "spikeguard" / "events.jsonl").write_text("")
    return root


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing", "run directory not found: {d}/missing"),
        (lambda d: (d / "file.txt").write_text("x") and d / "file.txt", "not a directory: {d}/file.txt"),
        (lambda d: d, "not a run that used SpikeGuard: no spikeguard/events.jsonl or spikeguard metrics in {d}"),
        (lambda d: (d / "metrics.csv").write_text("step,train/loss\n0,1.0\n") and d,
         "not a run that used SpikeGuard: no spikeguard/events.jsonl or spikeguard metrics in {d}"),
        (lambda d: (d / "metrics.csv").write_text("epoch,spikeguard/loss\n0,1.0\n") and d,
         "cannot read {d}/metrics.csv: no 'step' column"),
        (lambda d: (d / "metrics.csv").write_bytes(b"\xff\xfe\x00step") and d, "cannot read {d}/metrics.csv: 'utf-8' codec"),
        (lambda d: (d / "spikeguard").mkdir() or (d / "spikeguard" / "events.jsonl").write_text("{oops\n{}\n") and d,
         "cannot read {d}/spikeguard/events.jsonl:1: not a JSON object"),
        (lambda d: (d / "spikeguard").mkdir() or (d / "spikeguard" / "probes.jsonl").write_text("[1]\n{}\n") and d,
         "cannot read {d}/spikeguard/probes.jsonl:1: not a JSON object (got list)"),
        (lambda d: _several(d), "2 runs that used SpikeGuard below {d}; name one of them:\n  {d}/version_0\n  {d}/version_1"),
    ],
    ids=["missing", "file", "empty", "no-spikeguard-metrics", "no-step-column", "binary-csv", "bad-events", "bad-probes",
         "several"],
)
def test_cli_errors_exit_2_with_a_message(tmp_path, capsys, make, message):
    path = make(tmp_path)
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert message.format(d=tmp_path) in err
    assert err.startswith("spikeguard report: error: ")
    with pytest.raises(ReportError):  # the API raises what the CLI prints
        build_report(path)


def test_without_matplotlib_the_report_is_an_import_error_and_exit_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "spikeguard").mkdir()
    (tmp_path / "spikeguard" / "events.jsonl").write_text("")
    import spikeguard.report

    monkeypatch.setitem(sys.modules, "spikeguard.report.plots", None)  # import fails as without matplotlib
    monkeypatch.delattr(spikeguard.report, "plots", raising=False)  # (an earlier import left it on the package)
    with pytest.raises(ImportError, match=r"pip install 'spikeguard\[report\]'"):  # the demo's optional path
        build_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert "the report needs matplotlib" in capsys.readouterr().err


@needs_matplotlib
def test_run_without_spikes(tmp_path):
    from spikeguard.callbacks import SpikeGuard

    # Operator anomalies off: a tiny model's natural ones would be events (not spikes) too.
    quiet = fit(tmp_path, [SpikeGuard(log_every_n_steps=5, detector=dict(operator_min_factor=1e6))], max_steps=40)
    assert not (quiet / "spikeguard" / "events.jsonl").exists()  # the log is created at the first event
    page = build_report(quiet, tmp_path / "quiet.html").read_text(encoding="utf-8")
    assert "<strong>No spikes in this run.</strong>" in page
    assert "No spike events were recorded in this run (no <code>spikeguard/events.jsonl</code>" in page
    assert "No probes in this run" in page
    assert "Relative bias m and sharpness: not measured in this run" in page
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == 2  # loss/|G| and the heatmap


# -- a run written from typed records (no training) --------------------------------------


@needs_matplotlib
def test_every_event_field_comes_from_the_typed_record(tmp_path):
    from report.synthetic import PREDICTED, write_run

    from spikeguard.paths import RunPaths
    from spikeguard.rundir import load_run

    run_dir = write_run(tmp_path / "run")
    path = build_report(run_dir)
    assert path == RunPaths.at(run_dir).report
    page = path.read_text(encoding="utf-8")
    predicted, unpredicted, anomaly = rows(page)
    assert predicted == ["60", "grad_norm", "21.5", "×27.2", "h.1 forward", "×3.25", "recover", "12", "none", "—",
                         "recovered", "3"]
    # No prediction made (SpikeEvent.predicted is None): every predicted cell is empty, nothing raises.
    assert unpredicted == ["80", "loss", "9", "×2", "—", "—", "—", "—", "none", "—", "pending", "—"]
    assert anomaly[:2] == ["90", "operator"] and anomaly[4] == "embed backward"
    assert page.count('<tr class="minor">') == 1
    # Hover texts: the bound on the factor, the reason for the outcome.
    assert f'title="bound ×{PREDICTED.factor_bound:.3g}"' in page and f'title="{PREDICTED.reason}"' in page
    header = page[page.index("<header>"):page.index("</header>")]
    for value, label in (("2", "spikes"), ("1", "operator anomalies"), ("1 / 2", "recovered"), ("2", "probes")):
        assert f'<div class="value">{value}</div><div class="label">{label}</div>' in header
    # A Run already loaded gives the same page and the same default path (the demo reads the run once).
    assert build_report(load_run(run_dir)) == path


@needs_matplotlib
def test_probe_sections_come_from_the_probe_records(tmp_path):
    from report.synthetic import NAMES, write_run

    page = build_report(write_run(tmp_path)).read_text(encoding="utf-8")
    assert "The latest of 2 probes (step 50)" in page
    assert "Operators in forward order (from the probe)" in page
    assert "Probe notes: linearize skipped for backward." in page
    table = page[page.index("<h3>Constants at the latest probe</h3>"):]
    body = table[table.index("<tbody>"):table.index("</tbody>")]
    cells = [[re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", r)]
             for r in re.findall(r"<tr>(.*?)</tr>", body)]
    assert [r[1] for r in cells] == list(NAMES)
    # index, name, L_i (nan for the first: e_0 = 0), M_i, A^f, A^b, A^f/A^b, d_i/bound per configuration.
    assert cells[0] == ["0", "embed", "—", "0.25", "4", "2", "2", "0.5", "0.5", "0.5"]
    assert cells[3][2:5] == ["3.5", "1", "16"]
    # The sharpness ratio is Stability.ratio of the probe that measured it; m comes from each probe's observations.
    assert "sharpness ratio ≤ 0.75" in page and "m (both) ≤ 0.15" in page
    assert "Sharpness: not measured" not in page


def test_stability_series_reads_stability_records(tmp_path):
    pytest.importorskip("matplotlib")
    from report.synthetic import probe, write_run

    from spikeguard.records import Stability
    from spikeguard.report.plots import stability_series
    from spikeguard.rundir import load_run

    records = [probe(0), probe(10, stability=Stability(sharpness=3.0, threshold=2.0)), probe(20, configs=("forward",)),
               probe(30, stability=Stability(sharpness=1.0, threshold=4.0))]
    m, ratio = stability_series(load_run(write_run(tmp_path / "a", probes=records)))
    assert ratio == ([10, 30], [1.5, 0.25])  # probes without a stability record are skipped, not zero
    assert m["forward"] == ([0, 10, 20, 30], [0.05] * 4) and m["both"][0] == [0, 10, 30]
    m, ratio = stability_series(load_run(write_run(tmp_path / "b", probes=[probe(0)])))
    assert ratio is None and set(m) == {"forward", "backward", "both"}


def _chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return found or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


@needs_matplotlib
@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install chromium): no browser check")
def test_report_renders_in_headless_chromium(report, tmp_path):
    from matplotlib.image import imread

    path, _ = report
    shot = tmp_path / "report.png"
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,3000",
    ]
    subprocess.run([_chromium(), *flags, path.resolve().as_uri()], capture_output=True, timeout=90, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = imread(shot)[..., :3]  # (H, W, 3) floats in [0, 1]
    assert pixels.shape[:2] == (3000, 1280)
    colours = {tuple(c) for c in (pixels[::4, ::4].reshape(-1, 3) * 255).astype(int).tolist()}
    assert len(colours) > 200  # text, figures, badges: not a blank or single-colour page
    dark = (pixels.mean(axis=-1) < 0.5).mean()
    assert dark > 0.005  # there is text and there are lines
