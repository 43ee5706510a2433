"""Lightning callbacks: SpikeGuard, Perturb and AmplificationProbe."""

from spikeguard.callbacks.perturb import Perturb
from spikeguard.callbacks.probe import AmplificationProbe
from spikeguard.callbacks.spikeguard import SpikeGuard

__all__ = ["SpikeGuard", "Perturb", "AmplificationProbe"]
