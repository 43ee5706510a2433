"""Attribution: the operator where a spike starts, and whether it started forward or backward."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from spikeguard import signals
from spikeguard.detect.config import DetectorConfig
from spikeguard.detect.robust import ratio_of

__all__ = ["attribute"]


def attribute(
    names: Sequence[str], x: torch.Tensor, median: torch.Tensor, scale: torch.Tensor, config: DetectorConfig
) -> tuple[str | None, str | None, dict[str, dict[str, float]]]:
    """Where a spike starts, from each operator's statistics against its own baseline.

    ``x``, ``median`` and ``scale`` are the detector's log values, baselines and noise
    scales in the :class:`~spikeguard.signals.Layout` of ``names``. Each operator gets an
    anomaly score per direction: the largest robust z of its forward signals (output
    amax and RMS) and of its backward ones (the gradient message), from the registry's
    signals marked ``attributes``. A score counts when it exceeds
    ``attribution_threshold``, its factor over the median exceeds
    ``attribution_min_factor``, and it reaches ``attribution_share`` of the largest score
    of that direction (so that step-to-step noise of a quiet operator is not mistaken for
    the start of a large spike); a non-finite statistic always counts.

    The direction with the stronger evidence wins: when the largest forward score is at
    least the largest backward one, the origin is the *first* operator (forward order)
    whose forward score counts, a forward origin; otherwise it is the *top-most*
    operator whose backward score counts, a backward origin (a gradient perturbation
    only travels down, and leaves this step's activations exactly as they were). A
    forward perturbation also moves gradients everywhere below it, which is why forward
    evidence is weighed first. Parameter gradients are reported but not used: a tied
    weight (GPT-2's ``lm_head`` is the embedding) is anomalous wherever its twin is.

    Returns ``(origin, direction, ratios)``; ``ratios[operator][signal]`` is each
    operator's statistic over its own baseline, every operator signal included.
    """
    layout = signals.Layout(names)
    ratios: dict[str, dict[str, float]] = {name: {} for name in names}
    scores: dict[str, list[float]] = {}
    log_min = math.log(config.attribution_min_factor)
    for sig in signals.OPERATOR:
        sl = layout.slice(sig.name)
        row = []
        for name, value, med, sc in zip(names, x[sl].tolist(), median[sl].tolist(), scale[sl].tolist()):
            ratios[name][sig.name] = ratio_of(value, med)
            if not math.isfinite(value):
                row.append(math.inf)  # inf, or NaN kept raw: always anomalous
            elif not math.isfinite(med) or value - med <= log_min:
                row.append(0.0)
            else:
                row.append((value - med) / max(sc, 1e-12))
        scores[sig.name] = row

    def evidence(direction: str) -> list[float]:
        rows = [scores[s.name] for s in signals.OPERATOR if s.attributes and s.direction == direction]
        return [max(col) for col in zip(*rows)] if rows else [0.0] * len(names)

    def anomalous(row: list[float]) -> list[bool]:
        top = max(row, default=0.0)
        cut = config.attribution_share * top if math.isfinite(top) else math.inf
        return [v == math.inf or (v > config.attribution_threshold and v >= cut) for v in row]

    forward, backward = evidence("forward"), evidence("backward")
    if max(forward, default=0.0) >= max(backward, default=0.0):
        for name, flag in zip(names, anomalous(forward)):
            if flag:
                return name, "forward", ratios
    for name, flag in reversed(list(zip(names, anomalous(backward)))):
        if flag:
            return name, "backward", ratios
    return None, None, ratios
