"""The offline report: one self-contained HTML page (inline CSS, PNG figures as data URIs).

The run is read by :func:`spikeguard.rundir.load_run` (typed events and probe records), the
same reader the dashboard and the demo use, so the page shows what they see.
"""

from __future__ import annotations

import datetime
import math
from collections import Counter
from html import escape
from pathlib import Path
from typing import Any

import spikeguard
from spikeguard import keys
from spikeguard.measure.results import CONFIGS
from spikeguard.paths import RunPaths
from spikeguard.records import ProbeRecord, SpikeEvent, SpikePrediction
from spikeguard.report.errors import MissingDependency, ReportError
from spikeguard.rundir import EVENTS, PROBES, Run, load_run, num

__all__ = ["SECTIONS", "build_report", "render"]

#: The section titles, in page order (the tests check each is there).
SECTIONS = (
    "Loss and gradient norm",
    "Per-operator gradient ratios",
    "Amplification against depth",
    "Stability",
    "Spike events",
)

_CSS = """
:root { --ink: #1f2933; --muted: #616e7c; --line: #d9e2ec; --bg: #f5f7fa; --card: #ffffff;
        --red: #c0392b; --green: #1e8449; --amber: #b9770e; --purple: #7d3c98; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
       font: 15px/1.55 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Noto Sans", "Liberation Sans", sans-serif; }
main { max-width: 1160px; margin: 0 auto; padding: 28px 28px 48px; }
header h1 { font-size: 26px; margin: 0 0 4px; letter-spacing: -0.01em; }
header .run { color: var(--muted); font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "Liberation Mono", monospace;
              font-size: 13px; word-break: break-all; margin: 0 0 16px; }
.tiles { display: flex; flex-wrap: wrap; gap: 12px; margin: 0 0 8px; }
.tile { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px 16px; min-width: 150px; }
.tile .value { font-size: 22px; font-weight: 650; }
.tile .label { color: var(--muted); font-size: 12.5px; text-transform: uppercase; letter-spacing: 0.04em; }
.tile.alert .value { color: var(--red); }
.tile.ok .value { color: var(--green); }
section { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 18px 22px 20px; margin: 22px 0; }
section h2 { font-size: 19px; margin: 0 0 6px; }
section h3 { font-size: 15.5px; margin: 18px 0 4px; }
p { margin: 6px 0 10px; max-width: 80ch; }
.note { color: var(--muted); font-size: 14px; }
.empty { color: var(--muted); font-style: italic; padding: 10px 14px; background: var(--bg); border-radius: 6px; }
img { display: block; width: 100%; height: auto; margin: 10px 0 4px; }
code { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "Liberation Mono", monospace; font-size: 0.9em;
       background: var(--bg); padding: 1px 4px; border-radius: 4px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px; font-variant-numeric: tabular-nums; margin: 8px 0; }
th, td { padding: 6px 9px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; white-space: nowrap; }
th { background: var(--bg); font-weight: 600; font-size: 13px; color: var(--muted); vertical-align: bottom; }
th.num, td.num { text-align: right; }
th[colspan] { text-align: center; border-bottom: 1px solid #c3ccd6; }
.group { border-left: 1px solid var(--line); }
td.origin { white-space: normal; min-width: 150px; }
tbody tr:nth-child(even) { background: #fafbfc; }
tr.minor { color: var(--muted); }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600; }
.badge.recovered, .badge.recover { background: #d5f5e3; color: var(--green); }
.badge.diverged, .badge.diverge { background: #fadbd8; color: var(--red); }
.badge.not_recovered { background: #fdebd0; color: var(--amber); }
.badge.pending, .badge.none { background: #eaeded; color: var(--muted); }
.dir { font-size: 12px; color: var(--muted); }
details { margin-top: 10px; }
summary { cursor: pointer; color: var(--muted); }
pre { background: var(--bg); padding: 10px 12px; border-radius: 6px; font-size: 12.5px; overflow-x: auto; }
footer { color: var(--muted); font-size: 12.5px; text-align: center; margin-top: 28px; }
"""


def build_report(run_dir: str | Path | Run, out: str | Path | None = None) -> Path:
    """Write the offline HTML report of a run that used SpikeGuard and return its path.

    Args:
        run_dir: the run's log directory (``metrics.csv``, ``spikeguard/events.jsonl``,
            optionally ``spikeguard/probes.jsonl`` and ``hparams.yaml``), or a directory
            with exactly one such run below it (e.g. ``lightning_logs``); or a
            :class:`~spikeguard.rundir.Run` already loaded (the demo reads the run once).
        out: the HTML file to write (default ``RunPaths.at(run dir).report``,
            ``<run dir>/spikeguard/report.html``).

    Raises:
        ReportError: (a ``ValueError``) no such run, several runs below ``run_dir``, or
            an unreadable file; the message says which and why. Without matplotlib,
            :class:`MissingDependency`, both a ReportError and an ``ImportError``.
    """
    run = run_dir if isinstance(run_dir, Run) else load_run(run_dir)
    page = render(run)
    path = Path(out) if out is not None else RunPaths.at(run.dir).report
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
    except OSError as err:
        raise ReportError(f"cannot write the report to {path}: {err}") from None
    return path


def render(run: Run) -> str:
    """The report page of a loaded run, as one HTML string."""
    try:
        from spikeguard.report import plots
    except ImportError as err:
        raise MissingDependency(f"the report needs matplotlib ({err}): pip install 'spikeguard[report]'") from None
    sections = [
        _section_loss(run, plots),
        _section_heatmap(run, plots),
        _section_amplification(run, plots),
        _section_stability(run, plots),
        _section_events(run),
    ]
    title = f"SpikeGuard report: {run.dir.name or run.dir}"
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body><main>",
        _header(run),
        *sections,
        _footer(),
        "</main></body></html>",
    ])


# -- helpers ---------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    x = num(value)
    if math.isnan(x):
        return "—"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:.{digits}g}"


def _figure(fig: Any, alt: str) -> str:
    from spikeguard.report.plots import to_data_uri

    return f'<img src="{to_data_uri(fig)}" alt="{escape(alt)}">'


def _badge(text: str | None, css: str | None = None) -> str:
    if not text:
        return "—"
    return f'<span class="badge {escape(css or text)}">{escape(text.replace("_", " "))}</span>'


def _spikes(run: Run) -> list[SpikeEvent]:
    """Spikes proper: the loss, the global norm or a non-finite value (not operator-only anomalies)."""
    return [e for e in run.events if e.kind != "operator"]


# -- header ----------------------------------------------------------------------------------


def _header(run: Run) -> str:
    steps = run.steps
    spikes = _spikes(run)
    kinds = Counter(e.kind for e in run.events)
    found = ""
    if run.dir.resolve() != run.requested.resolve():
        found = f"<br>(the only run that used SpikeGuard below {escape(str(run.requested))})"
    files = ", ".join(f"<code>{escape(name)}</code>" + ("" if present else " (absent)") for name, present in run.files.items())
    recovered = sum(e.outcome == "recovered" for e in spikes)
    tiles = [
        ("steps", f"{steps[0]}–{steps[1]}" if steps else "—", ""),
        ("spikes", str(len(spikes)), "alert" if spikes else "ok"),
        ("operator anomalies", str(kinds.get("operator", 0)), ""),
        ("recovered", f"{recovered} / {len(spikes)}" if spikes else "—", ""),
        ("probes", str(len(run.probes)), ""),
    ]
    tile_html = "".join(
        f'<div class="tile {css}"><div class="value">{escape(value)}</div><div class="label">{escape(label)}</div></div>'
        for label, value, css in tiles
    )
    anomalies = kinds.get("operator", 0)
    anomalies_text = f"{anomalies} operator-only anomal{'y' if anomalies == 1 else 'ies'}"
    if spikes:
        by_kind = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()) if k != "operator")
        verdict = (
            f"<p><strong>{len(spikes)} spike{'s' if len(spikes) != 1 else ''}</strong> ({escape(by_kind)}) and "
            f"{anomalies_text}; details in <em>Spike events</em> below.</p>"
        )
    else:
        verdict = f"<p><strong>No spikes in this run.</strong> {anomalies_text.capitalize()} recorded.</p>"
    hparams = ""
    if run.hparams:
        hparams = f"<details><summary>hparams.yaml</summary><pre>{escape(run.hparams)}</pre></details>"
    return (
        f"<header><h1>SpikeGuard report</h1>"
        f'<p class="run">{escape(str(run.dir))}{found}</p>'
        f'<div class="tiles">{tile_html}</div>{verdict}'
        f'<p class="note">Files read: {files}.</p>{hparams}</header>'
    )


def _footer() -> str:
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"<footer>spikeguard {escape(spikeguard.__version__)} · generated {when} · self-contained, no network</footer>"


# -- sections --------------------------------------------------------------------------------


def _section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>{body}</section>'


def _section_loss(run: Run, plots: Any) -> str:
    fig = plots.loss_and_grad_norm(run)
    loss = run.series(keys.metric("loss"), "train/loss")
    parts = [(
        "<p>Triangles mark spike events at the step they were detected, at the loss and gradient norm "
        "the detector saw there (logged curves may skip that step). Above the loss, for each spike, the "
        '<span style="color:#7d3c98">predicted recovery k_rec</span> (THEORY §4) and the '
        '<span style="color:#1e8449">observed recovery</span> start at the spike.</p>'
    )]
    if loss is not None and loss[0] != keys.metric("loss"):
        parts.append(f'<p class="note">No <code>{keys.metric("loss")}</code> logged: the loss is <code>{escape(loss[0])}</code>.</p>')
    if not run.metrics:
        parts.append('<p class="note">No metrics.csv: only the values recorded in the events are shown.</p>')
    if fig is None:
        parts.append('<p class="empty">No loss, gradient norm or events were logged in this run.</p>')
    else:
        parts.append(_figure(fig, "loss and gradient norm over steps"))
    if not _spikes(run):
        parts.append('<p class="empty">No spikes in this run.</p>')
    return _section(SECTIONS[0], "".join(parts), "loss")


def _section_heatmap(run: Run, plots: Any) -> str:
    fig = plots.operator_heatmap(run)
    _, forward = run.operators
    if fig is None:
        body = (
            '<p class="empty">No per-operator ratios were logged '
            f"(<code>{escape(keys.operator_metric('<op>', 'msg_norm_ratio'))}</code>; "
            "SpikeGuard logs them with <code>operator_metrics=True</code> and a CSV logger).</p>"
        )
    else:
        order = (
            "Operators in forward order (from the probe), input end on top."
            if forward
            else "Operators in name order: only a probe records the forward order."
        )
        body = (
            "<p>Each operator's gradient message norm |g_i| and output RMS over their own robust baselines, "
            "at the logging steps. Blue: below baseline, red: above; grey: not logged. "
            f"Triangles on top mark events. {order}</p>" + _figure(fig, "per-operator ratio heatmap")
        )
    return _section(SECTIONS[1], body, "operators")


def _section_amplification(run: Run, plots: Any) -> str:
    if not run.probes:
        return _section(
            SECTIONS[2],
            f'<p class="empty">No probes in this run (no <code>{PROBES.as_posix()}</code>): '
            "attach <code>AmplificationProbe</code> to measure amplification.</p>",
            "amplification",
        )
    latest = run.probes[-1]
    body = [
        f"<p>The latest of {len(run.probes)} probe{'s' if len(run.probes) != 1 else ''} (step {latest.step}): "
        "per operator, the observed parameter-gradient error d_i next to Proposition 1's bound and, where measured, "
        "the first-order prediction, for forward, backward and both perturbations; faint lines are earlier probes."
        + (" Operators are numbered as in the table below." if len(latest.names) > plots.MAX_NAMED_OPERATORS else "")
        + "</p>",
        _figure(plots.amplification(run), "observed versus predicted amplification against depth"),
        _figure(plots.amplification_constants(run), "A^f and A^b per operator"),
        "<h3>Constants at the latest probe</h3>",
        _constants_table(latest),
    ]
    notes = latest.result.notes
    if notes:
        body.append('<p class="note">Probe notes: ' + "; ".join(escape(str(n)) for n in notes) + ".</p>")
    return _section(SECTIONS[2], "".join(body), "amplification")


def _constants_table(probe: ProbeRecord) -> str:
    result = probe.result
    c, names = result.constants, probe.names
    gains, param_gains = c.gains.tolist(), c.param_gains.tolist()
    forward, backward = result.amplification.forward.tolist(), result.amplification.backward.tolist()
    configs = [k for k in CONFIGS if k in result.observed]
    tightness = {k: result.observed[k].tightness.tolist() for k in configs}
    # Header cells are markup (sub/superscripts); only the configuration names come from the file.
    head = ["#", "operator", "<i>L<sub>i</sub></i> (gain)", "<i>M<sub>i</sub></i>", "<i>A<sup>f</sup></i>", "<i>A<sup>b</sup></i>",
            "<i>A<sup>f</sup></i> / <i>A<sup>b</sup></i>"] + [f"<i>d<sub>i</sub></i> / bound ({escape(k)})" for k in configs]
    rows = []
    for i, name in enumerate(names):
        af, ab = num(forward[i]), num(backward[i])
        cells = [gains[i], param_gains[i], af, ab, af / ab if ab > 0 else math.nan]
        cells += [tightness[k][i] for k in configs]
        rows.append(f'<tr><td class="num">{i}</td><td><code>{escape(name)}</code></td>' + "".join(f'<td class="num">{_fmt(v)}</td>' for v in cells) + "</tr>")
    thead = f'<th class="num">#</th><th>{head[1]}</th>' + "".join(f'<th class="num">{h}</th>' for h in head[2:])
    return f'<div class="scroll"><table><thead><tr>{thead}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _section_stability(run: Run, plots: Any) -> str:
    from spikeguard.report.plots import stability_series

    m, ratio = stability_series(run)
    lines = []
    if not m and ratio is None:
        return _section(
            SECTIONS[3],
            '<p class="empty">Relative bias m and sharpness: not measured in this run '
            "(<code>AmplificationProbe</code> measures m; with <code>sharpness=True</code>, the sharpness).</p>",
            "stability",
        )
    lines.append(
        "<p>THEORY §4: training recovers from a spike while the relative bias m of a persistent perturbation stays "
        "below 1 and the sharpness stays below the optimizer's stability threshold (ratio below 1).</p>"
    )
    if not m:
        lines.append('<p class="note">Relative bias m: not measured in this run.</p>')
    if ratio is None:
        lines.append(
            '<p class="note">Sharpness: not measured in this run (<code>AmplificationProbe(sharpness=True)</code> measures it).</p>'
        )
    lines.append(_figure(plots.stability(run), "relative bias m and sharpness ratio over steps"))
    worst = [f"m ({k}) ≤ {_fmt(max(v))}" for k, (_, v) in m.items() if v]
    if ratio is not None and ratio[1]:
        worst.append(f"sharpness ratio ≤ {_fmt(max(ratio[1]))}")
    if worst:
        lines.append('<p class="note">Largest values: ' + ", ".join(escape(w) for w in worst) + ".</p>")
    return _section(SECTIONS[3], "".join(lines), "stability")


def _section_events(run: Run) -> str:
    if not run.events:
        where = "" if run.files.get(EVENTS.as_posix()) else f" (no <code>{EVENTS.as_posix()}</code> in the run directory)"
        return _section(SECTIONS[4], f'<p class="empty">No spike events were recorded in this run{where}.</p>', "events")
    rows = []
    for e in run.events:
        p = e.predicted if e.predicted is not None else SpikePrediction()  # none made: every field unknown
        # num(): a log written before the typed records may hold null where nan is meant.
        factor, factor_bound, k_rec = num(p.factor), num(p.factor_bound), num(p.k_rec)
        notes = "; ".join(str(n) for n in p.notes)
        predicted_title = escape(p.reason or notes, quote=True)
        factor_title = escape(f"bound ×{_fmt(factor_bound)}" if not math.isnan(factor_bound) else notes, quote=True)
        origin = f"<code>{escape(e.origin)}</code>" if e.origin else "—"
        direction = f' <span class="dir">{escape(e.direction)}</span>' if e.direction else ""
        cells = [
            f'<td class="num">{e.step}</td>',
            f"<td>{escape(e.kind)}</td>",
            f'<td class="num">{_fmt(e.z)}</td>',
            f'<td class="num">×{_fmt(e.factor)}</td>',
            f'<td class="origin">{origin}{direction}</td>',
            f'<td class="num group" title="{factor_title}">' + (f"×{_fmt(factor)}" if not math.isnan(factor) else "—") + "</td>",
            f'<td title="{predicted_title}">{_badge(p.outcome)}</td>',
            f'<td class="num">{f"{k_rec:.0f}" if math.isfinite(k_rec) else "—"}</td>',
            f'<td class="group">{escape(e.action or "none")}</td>',
            f"<td>{escape(e.rerun or '—')}</td>",
            f'<td class="group">{_badge(e.outcome)}</td>',
            f'<td class="num">{e.recovery_steps if e.recovery_steps is not None else "—"}</td>',
        ]
        css = ' class="minor"' if e.kind == "operator" else ""
        rows.append(f"<tr{css}>{''.join(cells)}</tr>")
    thead = (
        '<tr><th rowspan="2" class="num">step</th><th rowspan="2">kind</th><th rowspan="2" class="num">z</th>'
        '<th rowspan="2" class="num">factor</th>'
        '<th rowspan="2">origin, direction</th><th colspan="3" class="group">predicted</th>'
        '<th rowspan="2" class="group">action</th><th rowspan="2">rerun</th><th colspan="2" class="group">observed</th></tr>'
        '<tr><th class="num group">factor</th><th>outcome</th><th class="num">k_rec</th><th class="group">outcome</th>'
        '<th class="num">recovery steps</th></tr>'
    )
    intro = (
        "<p>One row per event from <code>events.jsonl</code>. Factor: |Ĝ| over its baseline. "
        "Predicted: the theory's spike factor, outcome and recovery steps k_rec at the spike (hover for the reason); "
        "observed: what happened afterwards. Operator-only anomalies (one operator left its band while the loss and "
        "the global norm did not) are greyed.</p>"
    )
    return _section(
        SECTIONS[4],
        f'{intro}<div class="scroll"><table class="events"><thead>{thead}</thead><tbody>{"".join(rows)}</tbody></table></div>',
        "events",
    )
