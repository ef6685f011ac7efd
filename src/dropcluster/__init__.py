"""DropCluster: data-driven structured dropout for convolutional networks."""

from dropcluster._lazy import lazy_exports

__version__ = "0.1.0"

# Public names and the module that defines each; imported on first use so that
# `import dropcluster` stays cheap and the command line starts fast.
_EXPORTS = {
    "ReNAResult": "dropcluster.rena",
    "rena": "dropcluster.rena",
    "hopkins": "dropcluster.hopkins",
    "spatial_hopkins": "dropcluster.hopkins",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
