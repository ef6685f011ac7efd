"""Regularizer layers: DropCluster and the baselines, each as a function and a module."""

# Imported eagerly: `stochastic_depth` must name the function, not its module.
from dropcluster.nn.attach import attach, detach
from dropcluster.nn.clusters import Clusters
from dropcluster.nn.drop_rate import DropRateModule, check_drop_rate
from dropcluster.nn.dropblock import DropBlock2d, drop_block2d, drop_block2d_reference
from dropcluster.nn.dropcluster import DropCluster2d, drop_cluster2d
from dropcluster.nn.fitting import ClusterFit, RefitSchedule, fit_clusters
from dropcluster.nn.placements import (
    place_dropblock,
    place_dropcluster,
    place_dropout,
    place_stochastic_depth,
)
from dropcluster.nn.registry import REGULARIZERS, build_regularizer
from dropcluster.nn.schedule import DropRateSchedule
from dropcluster.nn.stochastic_depth import (
    StochasticDepth,
    StochasticDepthResidual,
    stochastic_depth,
)

__all__ = [
    "REGULARIZERS",
    "ClusterFit",
    "Clusters",
    "RefitSchedule",
    "DropBlock2d",
    "DropCluster2d",
    "DropRateModule",
    "DropRateSchedule",
    "StochasticDepth",
    "StochasticDepthResidual",
    "attach",
    "build_regularizer",
    "check_drop_rate",
    "detach",
    "drop_block2d",
    "drop_block2d_reference",
    "drop_cluster2d",
    "fit_clusters",
    "place_dropblock",
    "place_dropcluster",
    "place_dropout",
    "place_stochastic_depth",
    "stochastic_depth",
]
