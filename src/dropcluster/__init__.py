"""DropCluster: data-driven structured dropout for convolutional networks."""

from dropcluster.hopkins import hopkins, spatial_hopkins
from dropcluster.rena import ReNAResult, rena

__version__ = "0.1.0"

__all__ = ["ReNAResult", "__version__", "hopkins", "rena", "spatial_hopkins"]
