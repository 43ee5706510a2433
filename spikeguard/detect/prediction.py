"""The theory's prediction for a spike, from the probe measured before it (THEORY §1, §3, §4)."""

from __future__ import annotations

import math
from typing import Any

from spikeguard import theory
from spikeguard.records import ProbeRecord, SpikeEvent, SpikePrediction

__all__ = ["predict_spike"]


def predict_spike(
    event: SpikeEvent, context: dict[str, Any], record: ProbeRecord | None, *, lr: float | None = None
) -> SpikePrediction:
    """The prediction for ``event`` from ``record``, the latest probe measured before it.

    - local size u at the origin: the relative change of the origin's statistic (output
      RMS forward, gradient message backward), ``u = |ratio - 1|``, a lower bound on
      |δ_k|/|z_k| (|ε_k|/|g_k|) by the triangle inequality;
    - predicted relative bias ``m_spike = A_k · |z_k| · u / |G|`` (Proposition 1 with the
      probe's constants, an upper bound) and the calibrated value ``tightness · m_spike``;
      the predicted spike factor is ``1 + m`` (``|Ĝ| ≤ |G| (1 + m)``);
    - outcome (THEORY §4): :func:`theory.spike_outcome` with the steady relative bias m
      of the probe's perturbation (the burst's own m if the spike persists for more than
      one step) and the probe's stability test (the ratio that is logged);
    - k_rec: :func:`theory.recovery_steps` with ``q = theory.pl_rate(γ, μ̂, m)``, γ the
      optimizer's effective step and μ̂ from :func:`theory.estimate_pl_constant` over the
      detector's window (``context["losses"]``, ``context["grad_norms"]``).

    ``lr`` stands in for the effective step when there is no probe. Everything is
    labelled an estimate where it is one (``notes``).
    """
    out: dict[str, Any] = {"source": "none"}
    notes: list[str] = []
    if record is None:
        notes.append("no probe before this step: attach AmplificationProbe for predicted spike factors")
    else:
        out["probe_step"] = record.step
    if record is not None and event.origin is not None and event.origin in record.names:
        k = record.names.index(event.origin)
        obs = record.result.observed[record.config]
        consts, amp = record.result.constants, record.result.amplification
        key = "out_rms" if event.direction == "forward" else "msg_norm"
        ratio = event.operator_ratios.get(event.origin, {}).get(key, math.nan)
        u = abs(ratio - 1) if math.isfinite(ratio) else math.inf
        if event.direction == "forward":
            a_k, size = float(amp.forward[k]), float(consts.output_norms[k])
        else:
            a_k, size = float(amp.backward[k]), float(consts.grad_msg_norms[k])
        m_bound = a_k * size * u / obs.grad_norm if obs.grad_norm > 0 else math.inf
        tightness = obs.total_tightness if math.isfinite(obs.total_tightness) else 1.0
        m_cal = tightness * m_bound
        out.update(
            source="probe", local_relative_size=u, m_bound=m_bound, m=m_cal,
            factor_bound=1 + m_bound, factor=1 + m_cal,
        )
    steady_m = record.result.observed[record.config].m if record is not None and record.steady else 0.0
    m_outcome = steady_m
    if event.duration > 1 and "m" in out:
        m_outcome = max(m_outcome, out["m"])  # the perturbation persisted: its own m counts
    stability = record.stability if record is not None else None
    if stability is not None:
        verdict = theory.spike_outcome(m_outcome, stability.sharpness, stability.threshold)
        out["sharpness_ratio"] = stability.ratio
    else:
        verdict = theory.spike_outcome(m_outcome)
    out.update(outcome=verdict.verdict, reason=verdict.reason, m_persistent=m_outcome)

    step_size = record.optimizer.effective_lr if record is not None and record.optimizer is not None else lr
    losses, grads = context.get("losses", []), context.get("grad_norms", [])
    floor, base = event.loss_floor, event.baseline_loss
    k_rec = math.nan
    if verdict.recovers and step_size and len(losses) >= 2 and math.isfinite(base) and base > floor:
        try:
            # THEORY §4: μ from |∇loss|² / (2(loss - loss_min)) over the window.
            mu = theory.estimate_pl_constant([g * g for g in grads], losses, min(losses))
            q = theory.pl_rate(step_size, mu, min(m_outcome, 0.999))
            if q < 0:  # γμ(1-m)/2 > 1: the estimate contracts past the floor in one step
                notes.append(f"q={q:.3g} < 0 clipped to 0 (γμ̂ beyond the PL step condition)")
                q = 0.0
            # The spike's loss excess: the loss seen at the spike, or the one-step rise
            # of THEORY §4 from the predicted bias (first order when no sharpness is known).
            g = event.baseline_grad_norm
            rise = 0.0
            if "m" in out and math.isfinite(g) and math.isfinite(out["m"]):
                sharpness = stability.sharpness if stability is not None else 0.0
                rise = theory.spike_height(step_size, g, out["m"] * g, max(sharpness, 0.0))
            observed = event.loss if math.isfinite(event.loss) else math.inf
            spike_excess = max(observed, base + max(rise, 0.0)) - floor
            # The same κ as the observed recovery uses (see SpikeEvent.recovery_threshold).
            kappa = (event.recovery_threshold - floor) / (base - floor) - 1
            k_rec = theory.recovery_steps(spike_excess, base - floor, q, kappa)
            out.update(mu_estimate=mu, q=q, predicted_rise=rise, kappa=kappa)
        except ValueError as err:
            notes.append(str(err))
    out["k_rec"] = k_rec
    return SpikePrediction(notes=tuple(notes), **out)
