"""Perturbations: noise models, schedules and the Injector that applies them."""

from spikeguard.perturb.injector import BACKWARD, FORWARD, Injector, Perturbation
from spikeguard.perturb.noise import FORMATS, BitFlip, Gaussian, NoiseModel, Rounding, Scale, Uniform
from spikeguard.perturb.schedules import Always, Burst, Decay, Every, Schedule, Window

__all__ = [
    "Injector",
    "Perturbation",
    "FORWARD",
    "BACKWARD",
    "NoiseModel",
    "Gaussian",
    "Uniform",
    "Rounding",
    "BitFlip",
    "Scale",
    "FORMATS",
    "Schedule",
    "Always",
    "Window",
    "Burst",
    "Every",
    "Decay",
]
