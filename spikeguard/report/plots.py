"""The report's figures: matplotlib (Agg, no pyplot), each returned as a PNG data URI.

Figures read the typed records of :class:`spikeguard.rundir.Run` (events, probe records),
with tensors turned into lists where matplotlib and numpy want plain numbers.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from matplotlib import rc_context
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import blended_transform_factory

from spikeguard import keys
from spikeguard.measure.results import CONFIGS
from spikeguard.records import ProbeRecord, SpikeEvent
from spikeguard.rundir import Run, num

__all__ = [
    "amplification", "amplification_constants", "loss_and_grad_norm", "operator_heatmap", "stability",
    "stability_series", "to_data_uri",
]

INK = "#1f2933"
LOSS = "#1f4e79"
GRAD = "#2a7f62"
BAND = "#8a949e"
SPIKE = "#c0392b"
OPERATOR_EVENT = "#e08e0b"
PREDICTED = "#7d3c98"
RECOVERED = "#27ae60"
DIVERGED = "#c0392b"
CONFIG_COLOURS = {"forward": "#1f77b4", "backward": "#d62728", "both": "#6c5b7b"}

_STYLE = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.labelsize": 11,
    "axes.edgecolor": "#9aa5b1",
    "axes.labelcolor": INK,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e4e7eb",
    "grid.linewidth": 0.8,
    "xtick.color": INK,
    "ytick.color": INK,
    "legend.fontsize": 10,
    "legend.frameon": False,
    "figure.dpi": 100,
}


@contextmanager
def _style() -> Iterator[None]:
    with rc_context(_STYLE):
        yield


def to_data_uri(fig: Figure, dpi: int = 130) -> str:
    """The figure as an inline ``data:image/png;base64,...`` (no file, no network)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _finite(x: Any) -> bool:
    return math.isfinite(num(x))


def _positive(steps: list[int], values: list[float]) -> tuple[list[int], list[float]]:
    kept = [(s, v) for s, v in zip(steps, values) if math.isfinite(v) and v > 0]
    return [s for s, _ in kept], [v for _, v in kept]


# -- 1. loss and gradient norm ---------------------------------------------------------------


def loss_and_grad_norm(run: Run) -> Figure | None:
    """Loss (top) and gradient norm with its band (bottom, log), spikes marked, recovery spans."""
    loss = run.series(keys.metric("loss"), "train/loss")
    grad = run.series(keys.metric("grad_norm"))
    band = run.series(keys.metric("grad_norm_band"))
    if loss is None and grad is None and not run.events:
        return None
    span = run.steps or (0, 1)
    with _style():
        fig = Figure(figsize=(11, 6.6), layout="constrained")
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1.15, 1])
        if loss is not None:
            top.plot(loss[1], loss[2], color=LOSS, lw=1.4, label=loss[0])
        if grad is not None:
            bottom.plot(*_positive(grad[1], grad[2]), color=GRAD, lw=1.4, label=grad[0])
        if band is not None:
            bottom.plot(*_positive(band[1], band[2]), color=BAND, lw=1.1, ls="--", drawstyle="steps-post",
                        label=f"{band[0]} (detector's upper band)")
        bottom.set_yscale("log")
        top.set_ylabel("loss")
        bottom.set_ylabel("gradient norm |G|")
        bottom.set_xlabel("optimizer step")

        labelled = len(run.events) <= 12
        for event in run.events:
            colour = OPERATOR_EVENT if event.kind == "operator" else SPIKE
            step, loss_at, grad_at = event.step, num(event.loss), num(event.grad_norm)
            for ax in (top, bottom):
                ax.axvline(step, color=colour, lw=0.9, alpha=0.35, zorder=0)
            if math.isfinite(loss_at):
                top.plot(step, loss_at, "v", color=colour, ms=8, mec="white", zorder=5)
                if labelled:
                    top.annotate(f"{step}", (step, loss_at), xytext=(6, 2), textcoords="offset points",
                                 color=colour, fontsize=9, fontweight="bold")
            if math.isfinite(grad_at) and grad_at > 0:
                bottom.plot(step, grad_at, "v", color=colour, ms=8, mec="white", zorder=5)
        _recovery_spans(top, run.events, span, labelled)

        # One legend above the plot: inside, it would cover a spike wherever the spike is.
        handles = top.get_legend_handles_labels()[0] + bottom.get_legend_handles_labels()[0]
        kinds = {e.kind == "operator" for e in run.events}
        if False in kinds:
            handles += [
                Line2D([], [], marker="v", ls="", color=SPIKE, ms=8, label="spike (loss, grad_norm, nonfinite)"),
                Line2D([], [], color=PREDICTED, lw=3, marker="|", ms=9, label="predicted recovery (k_rec)"),
                Line2D([], [], color=RECOVERED, lw=3, marker="|", ms=9, label="observed recovery"),
            ]
        if True in kinds:
            handles.append(Line2D([], [], marker="v", ls="", color=OPERATOR_EVENT, ms=8, label="operator anomaly"))
        top.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.02), ncol=3, borderaxespad=0)
        # A loss that spans decades (a divergence) reads on a log axis.
        low, high = top.get_ylim()
        if loss is not None and min(loss[2]) > 0 and max(loss[2]) / min(loss[2]) > 30:
            top.set_yscale("log")
            low, high = top.get_ylim()
            top.set_ylim(top=high * (high / low) ** 0.3)  # room for the recovery spans
        else:
            top.set_ylim(top=high + 0.3 * (high - low))
        pad = max(2.0, 0.01 * (span[1] - span[0]))
        bottom.set_xlim(span[0] - pad, span[1] + pad)
    return fig


def _recovery_spans(ax: Any, events: list[SpikeEvent], span: tuple[int, int], labelled: bool) -> None:
    """Per spike, a bar from the spike over k_rec steps (predicted) and over the observed recovery."""
    to_axes = blended_transform_factory(ax.transData, ax.transAxes)
    first, last = span
    for event in events:
        if event.kind == "operator":
            continue  # an operator-only anomaly moved neither the loss nor |G|: nothing to recover from
        step, predicted = event.step, event.predicted  # None: no prediction was made
        k_rec = num(predicted.k_rec) if predicted is not None else math.nan
        rows = []
        if predicted is not None and predicted.outcome == "diverge":
            rows.append((0.95, math.inf, PREDICTED, "predicted: diverge"))
        elif math.isfinite(k_rec):
            rows.append((0.95, step + k_rec, PREDICTED, f"k_rec ≈ {k_rec:.0f}"))
        outcome, steps = event.outcome, event.recovery_steps
        if outcome == "recovered" and steps is not None:
            rows.append((0.885, step + int(steps), RECOVERED, f"{int(steps)} step{'s' if int(steps) != 1 else ''}"))
        elif outcome in ("diverged", "not_recovered"):
            rows.append((0.885, math.inf, DIVERGED, outcome.replace("_", " ")))
        for y, end, colour, text in rows:
            beyond = end > last  # k_rec past the end of the run, or no recovery: the bar runs off the plot
            ax.plot([step, min(end, last)], [y, y], color=colour, lw=3, marker="|" if not beyond else None, ms=9, mew=2,
                    transform=to_axes, solid_capstyle="butt")
            if beyond:
                ax.plot(last, y, ">", color=colour, ms=7, transform=to_axes)
            if labelled:
                # Near the right edge the label goes inside, above the bar, so that it stays on the plot.
                inside = min(end, last) > last - 0.12 * (last - first)
                ax.annotate(text, (min(end, last), y), xycoords=to_axes, xytext=(-4, 7) if inside else (5, 0),
                            textcoords="offset points", va="center", ha="right" if inside else "left",
                            fontsize=8.5, color=colour)


# -- 2. per-operator ratios ------------------------------------------------------------------


def operator_heatmap(run: Run) -> Figure | None:
    """Per-operator statistic over its own baseline, steps × operators, log colour scale centred on 1."""
    names, _ = run.operators
    panels = []
    for stat, title in (("msg_norm", "gradient message $|g_i|$ / baseline"), ("out_rms", "output RMS / baseline")):
        rows = {n: run.metrics.get(keys.operator_metric(n, f"{stat}_ratio")) for n in names}
        if any(rows.values()):
            panels.append((title, rows))
    if not panels:
        return None
    steps = sorted({s for _, rows in panels for r in rows.values() if r for s in r[0]})
    column = {s: i for i, s in enumerate(steps)}
    grids = []
    for _, rows in panels:
        grid = np.full((len(names), len(steps)), np.nan)
        for i, name in enumerate(names):
            if rows[name]:
                for s, v in zip(*rows[name]):
                    grid[i, column[s]] = v if v > 0 else np.nan
        grids.append(grid)
    finite = np.concatenate([g[np.isfinite(g)] for g in grids])
    reach = float(np.clip(np.abs(np.log10(finite)).max() if finite.size else 1.0, math.log10(2), 3.0))
    norm = LogNorm(vmin=10**-reach, vmax=10**reach)
    edges = np.array(steps, dtype=float)
    if len(edges) > 1:
        mids = (edges[1:] + edges[:-1]) / 2
        edges = np.concatenate([[2 * edges[0] - mids[0]], mids, [2 * edges[-1] - mids[-1]]])
    else:
        edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
    height = min(max(1.6, 0.3 * len(names) + 0.9), 9.0)  # inches per panel
    labels = _operator_labels(names)
    with _style(), rc_context({"axes.grid": False}):
        fig = Figure(figsize=(11, height * len(panels) + 0.4), layout="constrained")
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        for ax, (title, _), grid in zip(axes, panels, grids):
            ax.set_facecolor("#eceff1")  # steps not logged
            mesh = ax.pcolormesh(edges, np.arange(len(names) + 1), np.ma.masked_invalid(grid), norm=norm,
                                 cmap="RdBu_r", shading="flat")
            every = max(1, math.ceil(len(names) / 40))  # at most 40 names per panel
            rows_shown = range(0, len(names), every)
            ax.set_yticks([i + 0.5 for i in rows_shown], [labels[i] for i in rows_shown], fontsize=8 if len(names) > 16 else 9)
            ax.set_ylim(len(names), 0)  # first operator (the input end) on top
            ax.set_title(title, loc="left", pad=14)
            to_axes = blended_transform_factory(ax.transData, ax.transAxes)
            for event in run.events:  # an arrow above the panel at each event
                colour = OPERATOR_EVENT if event.kind == "operator" else SPIKE
                ax.annotate("", xy=(event.step, 1.0), xycoords=to_axes, xytext=(0, 11), textcoords="offset points",
                            arrowprops={"arrowstyle": "-|>", "color": colour, "lw": 1.5})
            for side in ("top", "right"):
                ax.spines[side].set_visible(False)
        axes[-1].set_xlabel("optimizer step")
        # Below the panels: its size then does not depend on how many operators they hold.
        bar = fig.colorbar(mesh, ax=list(axes), location="bottom", shrink=0.45, aspect=45, pad=0.02)
        bar.set_label("statistic / its baseline (log scale)")
    return fig


def _operator_labels(names: list[str]) -> list[str]:
    """Long names shortened from the left (the depth index is at the right end)."""
    return [n if len(n) <= 34 else "…" + n[-33:] for n in names]


# -- 3. amplification against depth ----------------------------------------------------------


def _config_order(probe: ProbeRecord) -> list[str]:
    return [c for c in CONFIGS if c in probe.result.observed]


#: Beyond this many operators a panel a third of the page wide labels its x axis by index.
MAX_NAMED_OPERATORS = 12
#: Earlier probes drawn faintly behind the latest one (the most recent ones).
NUM_EARLIER_PROBES = 5


def _depth_axis(ax: Any, names: list[str], width: str = "full") -> None:
    """Operator names under a depth axis; by index (as in the constants table) where names would not fit."""
    if width == "third" and len(names) > MAX_NAMED_OPERATORS:
        ax.set_xlabel("operator index (forward order)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        return
    ax.set_xlabel("operator (forward order)")
    rotation, size = (40, 9) if len(names) <= MAX_NAMED_OPERATORS else (90, 8 if len(names) <= 40 else 6.5)
    step = max(1, math.ceil(len(names) / 80))
    ticks = list(range(0, len(names), step))
    ax.set_xticks(ticks, [_operator_labels(names)[i] for i in ticks], rotation=rotation, ha="right" if rotation < 90 else "center",
                  fontsize=size, rotation_mode="anchor" if rotation < 90 else "default")


def _earlier(run: Run, names: list[str]) -> list[ProbeRecord]:
    """The most recent earlier probes over the same operators."""
    return [p for p in run.probes[:-1] if list(p.names) == names][-NUM_EARLIER_PROBES:]


def _log_values(values: list[Any]) -> np.ndarray:
    """Numbers (a tensor's ``.tolist()``) as an array for a log axis."""
    out = np.array([num(v) for v in values], dtype=float)
    out[~(out > 0)] = np.nan  # zero or missing: no point on a log axis
    return out


def amplification(run: Run) -> Figure | None:
    """Observed d_i against Proposition 1's bound (and the linear prediction) over depth, per configuration."""
    if not run.probes:
        return None
    latest = run.probes[-1]
    names = list(latest.names)
    configs = _config_order(latest)
    x = np.arange(len(names))
    with _style():
        fig = Figure(figsize=(11, 4.4), layout="constrained")
        axes = fig.subplots(1, len(configs), sharey=True, squeeze=False)[0]
        fig.get_layout_engine().set(wspace=0.04)
        for ax, config in zip(axes, configs):
            obs = latest.result.observed[config]
            colour = CONFIG_COLOURS.get(config, INK)
            for earlier in _earlier(run, names):
                if config in earlier.result.observed:
                    ax.plot(x, _log_values(earlier.result.observed[config].d.tolist()), color=colour, lw=0.8, alpha=0.22)
            ax.plot(x, _log_values(obs.bound.d.tolist()), color=INK, lw=1.6, ls="-", marker="s", ms=5, label="Proposition 1 bound")
            if obs.linear is not None:
                ax.plot(x, _log_values(obs.linear.d.tolist()), color=PREDICTED, lw=1.4, ls="--", marker="^", ms=5,
                        label="linear prediction")
            ax.plot(x, _log_values(obs.d.tolist()), color=colour, lw=2, marker="o", ms=6, label=f"observed, {config}")
            ax.set_yscale("log")
            ax.set_title(f"{config}: m = {num(obs.m):.3g}", loc="left")
            _depth_axis(ax, names, "third" if len(configs) > 1 else "full")
        axes[0].set_ylabel("parameter-gradient error $d_i$")
        if _earlier(run, names):
            count = len(_earlier(run, names))
            axes[0].plot([], [], color=INK, lw=0.8, alpha=0.3, label=f"observed, {count} earlier probe{'s' if count > 1 else ''}")
        # One legend under the panels: inside, it would hide a curve on a log axis that spans decades.
        handles: dict[str, Any] = {}
        for ax in axes:
            handles.update(zip(*reversed(ax.get_legend_handles_labels())))
        order = sorted(handles, key=lambda label: (label.startswith("observed"), "earlier" in label))
        fig.legend([handles[k] for k in order], order, loc="outside lower center", ncol=min(len(order), 4))
    return fig


def amplification_constants(run: Run) -> Figure | None:
    """A^f and A^b per operator at the latest probe, earlier probes as faint points."""
    if not run.probes:
        return None
    latest = run.probes[-1]
    names = list(latest.names)
    x = np.arange(len(names))
    width = 0.38
    with _style():
        fig = Figure(figsize=(11, 3.9), layout="constrained")
        ax = fig.subplots()
        for offset, field, label, colour in ((-width / 2, "forward", "$A^f$ (forward)", CONFIG_COLOURS["forward"]),
                                             (width / 2, "backward", "$A^b$ (backward)", CONFIG_COLOURS["backward"])):
            values = _log_values(getattr(latest.result.amplification, field).tolist())
            ax.bar(x + offset, np.nan_to_num(values, nan=0.0), width, color=colour, alpha=0.85, label=label)
            for earlier in _earlier(run, names):
                ax.plot(x + offset, _log_values(getattr(earlier.result.amplification, field).tolist()), "_", color=INK, ms=10,
                        alpha=0.45)
        if _earlier(run, names):
            ax.plot([], [], "_", color=INK, ms=10, alpha=0.45, label="earlier probes")
        ax.set_yscale("log")
        ax.set_ylabel("amplification of a unit perturbation")
        ax.set_title(f"$A^f$ and $A^b$ per operator (probe at step {latest.step})", loc="left")
        _depth_axis(ax, names)
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, borderaxespad=0.3)
    return fig


# -- 4. stability ----------------------------------------------------------------------------


def stability_series(run: Run) -> tuple[dict[str, tuple[list[int], list[float]]], tuple[list[int], list[float]] | None]:
    """m per configuration and the sharpness ratio over steps: from metrics.csv, else probes.jsonl.

    The ratio from a probe record is ``record.stability.ratio`` (None when the sharpness
    was not measured at that probe), the number the callbacks log and predictions use.
    """
    m = {c: run.metrics[keys.probe_metric(c, "m")] for c in CONFIGS if keys.probe_metric(c, "m") in run.metrics}
    if not m:
        for probe in run.probes:
            for config, obs in probe.result.observed.items():
                if _finite(obs.m):
                    steps, values = m.setdefault(config, ([], []))
                    steps.append(probe.step)
                    values.append(num(obs.m))
    sharp = run.series(keys.metric("probe", "sharpness_ratio"))
    ratio = (sharp[1], sharp[2]) if sharp else None
    if ratio is None:
        kept = [(p.step, num(p.stability.ratio if p.stability is not None else None)) for p in run.probes]
        kept = [(s, v) for s, v in kept if math.isfinite(v)]
        ratio = ([s for s, _ in kept], [v for _, v in kept]) if kept else None
    return m, ratio


def stability(run: Run) -> Figure | None:
    """m against 1 and the sharpness ratio against 1 over steps (the panels that were measured)."""
    m, ratio = stability_series(run)
    panels = [p for p in ("m", "sharpness") if (p == "m" and m) or (p == "sharpness" and ratio)]
    if not panels:
        return None
    with _style():
        fig = Figure(figsize=(11, 3.6), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, panel in zip(axes, panels):
            if panel == "m":
                for config, (steps, values) in m.items():
                    ax.plot(*_positive(steps, values), marker="o", ms=4, lw=1.5, color=CONFIG_COLOURS.get(config, INK),
                            label=f"m ({config})")
                ax.axhline(1.0, color=SPIKE, ls="--", lw=1.3, label="m = 1: no longer a descent direction")
                ax.set_yscale("log")
                ax.set_ylabel("relative bias m")
                ax.set_title("Relative bias m of the probe's perturbation", loc="left")
            else:
                ax.plot(*ratio, marker="o", ms=4, lw=1.5, color=LOSS, label="sharpness / stability threshold")
                ax.axhline(1.0, color=SPIKE, ls="--", lw=1.3, label="1: edge of stability")
                ax.set_yscale("log")
                ax.set_ylabel("sharpness ratio")
                ax.set_title("Sharpness against the optimizer's threshold", loc="left")
            ax.set_xlabel("optimizer step")
            ax.legend(loc="best")
    return fig
