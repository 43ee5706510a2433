"""Detection: the online spike detector, attribution, prediction and recovery (no Lightning)."""

from spikeguard.detect.attribution import attribute
from spikeguard.detect.config import DetectorConfig
from spikeguard.detect.detector import Predictor, SpikeDetector
from spikeguard.detect.prediction import predict_spike
from spikeguard.detect.recovery import track_recovery

__all__ = ["DetectorConfig", "SpikeDetector", "Predictor", "attribute", "predict_spike", "track_recovery"]
