"""The five reproduction experiments: the registry that runs them, and their public names.

Each experiment lives in its own module; each runs, draws its figure and returns
JSON-ready numbers:

1. :mod:`~spikeguard.reproduce.floor`: constant perturbation, the loss floor against ζ²;
2. :mod:`~spikeguard.reproduce.decay`: decaying perturbation, the O(1/√T) rate;
3. :mod:`~spikeguard.reproduce.spikes`: spikes, recovery or divergence after a burst (the
   module also holds the spike protocol and machinery that experiment 4 shares);
4. :mod:`~spikeguard.reproduce.phase`: the phase diagram over relative bias × step size;
5. :mod:`~spikeguard.reproduce.depth`: forward versus backward perturbations over depth.

Their sizes are :class:`~spikeguard.reproduce.settings.Settings`.

Every prediction comes from :mod:`spikeguard.theory`; every perturbation goes through an
:class:`~spikeguard.perturb.Injector` on the chain of :mod:`spikeguard.reproduce.problems`;
observed gradient errors come from :class:`~spikeguard.measure.AmplificationProbe` and
sharpness from :func:`~spikeguard.measure.hessian_top_eigenvalue`. Experiment functions
take ``(data, settings, figure_path)`` and return a dict of plain floats and lists.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from spikeguard.reproduce.decay import decaying_perturbation
from spikeguard.reproduce.depth import forward_backward
from spikeguard.reproduce.floor import constant_perturbation
from spikeguard.reproduce.phase import phase_diagram
from spikeguard.reproduce.problems import Data
from spikeguard.reproduce.settings import Settings, settings_dict
from spikeguard.reproduce.spikes import SpikeBench, spike_bench, spike_cases, spike_run, spikes, update_sharpness

__all__ = [
    "Settings",
    "EXPERIMENTS",
    "constant_perturbation",
    "decaying_perturbation",
    "spikes",
    "phase_diagram",
    "forward_backward",
    "SpikeBench",
    "spike_bench",
    "spike_run",
    "spike_cases",
    "update_sharpness",
    "run_experiment",
    "settings_dict",
]


#: number -> (short name, function, figure file name)
EXPERIMENTS = {
    1: ("constant perturbation", constant_perturbation, "1_constant_floor.png"),
    2: ("decaying perturbation", decaying_perturbation, "2_decay_rate.png"),
    3: ("spikes", spikes, "3_spikes.png"),
    4: ("phase diagram", phase_diagram, "4_phase_diagram.png"),
    5: ("forward versus backward", forward_backward, "5_forward_backward.png"),
}


def run_experiment(number: int, data: Data, s: Settings, out_dir: Path) -> tuple[dict[str, Any], float]:
    """Run experiment ``number`` into ``out_dir``; returns (results, seconds)."""
    _, fn, name = EXPERIMENTS[number]
    start = time.perf_counter()
    result = fn(data, s, out_dir / name)
    result["figure"] = name
    return result, time.perf_counter() - start
