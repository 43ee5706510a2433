"""A run directory written from typed records by spikeguard's own writers, without training.

The report, the dashboard and the demo read runs through :func:`spikeguard.rundir.load_run`;
these runs let their tests check every field they show against the record it came from,
in seconds, whatever state the training callbacks are in.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from spikeguard import keys, theory
from spikeguard.events import EventLog
from spikeguard.measure.results import Constants, Observed, ProbeResult
from spikeguard.paths import RunPaths
from spikeguard.records import ProbeRecord, SpikeEvent, SpikePrediction, Stability
from spikeguard.sinks import ProbeLogSink

NAMES = ("embed", "h.0", "h.1", "head")


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def observed(m: float, linear: bool = True, names: tuple[str, ...] = NAMES) -> Observed:
    n = len(names)
    d = _t(*[0.5 * 2.0**i for i in range(n)])
    bound = theory.PropagationBound(e=_t(*range(n)), b=_t(*range(n, 0, -1)), d=d * 2.0, total=float(d.sum()) * 2.0)
    return Observed(
        e=_t(*[0.1 * (i + 1) for i in range(n)]), b=_t(*[0.2] * n), d=d, total=float(d.norm()), grad_norm=5.0, m=m,
        delta=_t(*[1e-3] * n), eps=_t(*[0.0] * n), bound=bound, linear=bound if linear else None,
    )


def probe(step: int, configs: tuple[str, ...] = ("forward", "backward", "both"), names: tuple[str, ...] = NAMES,
          stability: Stability | None = None, m: float = 0.05, notes: tuple[str, ...] = ()) -> ProbeRecord:
    n = len(names)
    constants = Constants(
        gains=_t(math.nan, *[1.5 + i for i in range(n - 1)]), param_gains=_t(*[0.25 * (i + 1) for i in range(n)]),
        jac_smoothness=_t(*[0.0] * n), param_jac_smoothness=_t(*[0.0] * n), grad_msg_norms=_t(*[1.0] * n),
        output_norms=_t(*[2.0] * n), loss_curvature=0.5, power_iterations=10, converged=True,
    )
    result = ProbeResult(
        step=step, names=tuple(names), observed={c: observed(m * (1 + i), linear=c != "backward", names=names)
                                                 for i, c in enumerate(configs)},
        constants=constants,
        amplification=theory.Amplification(forward=_t(*[4.0 * (i + 1) for i in range(n)]),
                                           backward=_t(*[2.0 * (i + 1) for i in range(n)])),
        notes=notes, seconds=0.5,
    )
    return ProbeRecord(step=step, result=result, stability=stability)


PREDICTED = SpikePrediction(source="probe", probe_step=50, factor=3.25, factor_bound=61.0, outcome="recover",
                            reason="m below 1 and the sharpness below its threshold", k_rec=12.0, notes=("mu estimated",))


def events() -> list[SpikeEvent]:
    """A predicted spike that recovered, an unpredicted one still pending, an operator anomaly."""
    return [
        SpikeEvent(id=60, step=60, kind="grad_norm", z=21.5, loss=3.5, grad_norm=40.0, factor=27.25, loss_factor=1.2,
                   origin="h.1", direction="forward", operator_ratios={"h.1": {"out_rms": 10.0}, "head": {"out_rms": 2.0}},
                   predicted=PREDICTED, outcome="recovered", recovery_steps=3),
        SpikeEvent(id=80, step=80, kind="loss", z=9.0, loss=9.0, grad_norm=math.inf, factor=2.0, loss_factor=3.0,
                   predicted=None),
        SpikeEvent(id=90, step=90, kind="operator", z=12.0, loss=3.0, grad_norm=2.0, factor=1.0, loss_factor=1.0,
                   origin="embed", direction="backward"),
    ]


def write_run(root: Path, *, probes: list[ProbeRecord] | None = None, spikes: list[SpikeEvent] | None = None,
              metrics: bool = True) -> Path:
    """``root`` as a run directory: metrics.csv, spikeguard/events.jsonl, spikeguard/probes.jsonl."""
    files = RunPaths.at(root)
    root.mkdir(parents=True, exist_ok=True)
    if metrics:
        columns = ["step", keys.metric("loss"), keys.metric("grad_norm")]
        columns += [keys.operator_metric(n, "msg_norm_ratio") for n in NAMES]
        lines = [",".join(columns)]
        for step in range(0, 100, 5):
            ratios = [f"{1.0 + 0.1 * i + (5.0 if step == 60 else 0.0):.3f}" for i in range(len(NAMES))]
            lines.append(",".join([str(step), f"{3.0 - step / 100:.3f}", f"{2.0 + (30.0 if step == 60 else 0.0):.3f}", *ratios]))
        files.metrics.write_text("\n".join(lines) + "\n")
    log = EventLog(files.events)
    for event in spikes if spikes is not None else events():
        outcome, steps = event.outcome, event.recovery_steps
        event.outcome, event.recovery_steps = "pending", None  # as the callback writes it: the spike, then its outcome
        log.spike(event)
        if outcome != "pending":
            event.outcome, event.recovery_steps = outcome, steps
            log.outcome(event)
    sink = ProbeLogSink(files.probes)
    for record in probes if probes is not None else [probe(0), probe(50, stability=Stability(sharpness=30.0, threshold=40.0),
                                                                      notes=("linearize skipped for backward",))]:
        sink.probe(record)
    sink.close()
    return root
