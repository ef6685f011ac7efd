"""DropCluster: data-driven structured dropout for convolutional networks."""

from importlib import import_module

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


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dropcluster' has no attribute {name!r}")


def __dir__():
    return __all__
