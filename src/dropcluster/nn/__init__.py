"""Regularizer layers: DropCluster and the baselines, each as a function and a module."""

from dropcluster._lazy import lazy_exports

_EXPORTS = {
    "DropRateModule": "dropcluster.nn._drop_rate",
    "check_drop_rate": "dropcluster.nn._drop_rate",
    "drop_cluster2d": "dropcluster.nn.dropcluster",
    "DropCluster2d": "dropcluster.nn.dropcluster",
    "drop_block2d": "dropcluster.nn.dropblock",
    "DropBlock2d": "dropcluster.nn.dropblock",
    "stochastic_depth": "dropcluster.nn.stochastic_depth",
    "StochasticDepth": "dropcluster.nn.stochastic_depth",
    "StochasticDepthResidual": "dropcluster.nn.stochastic_depth",
    "DropRateSchedule": "dropcluster.nn.schedule",
    "REGULARIZERS": "dropcluster.nn.registry",
    "build_regularizer": "dropcluster.nn.registry",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
