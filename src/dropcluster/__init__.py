"""DropCluster: data-driven structured dropout for convolutional networks."""

# Imported eagerly: `from dropcluster import rena` must give the function, not the module of
# the same name that a lazy lookup would find once `dropcluster.rena` has been imported.
from dropcluster.hopkins import hopkins, spatial_hopkins
from dropcluster.rena import ReNAResult, rena

__version__ = "0.6.0"

__all__ = ["ReNAResult", "__version__", "hopkins", "rena", "spatial_hopkins"]
