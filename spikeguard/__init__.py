"""spikeguard: gradient-spike diagnostics for transformer training."""

from importlib.metadata import PackageNotFoundError, version

from spikeguard.operators import Operator, OperatorChain
from spikeguard.perturb import Injector

try:
    __version__ = version("spikeguard")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["Operator", "OperatorChain", "Injector", "__version__"]
