"""Regularizer layers: DropCluster and the baselines, each as a function and a module."""

# Imported eagerly: `stochastic_depth` must name the function, not its module.
from dropcluster.nn.attach import attach, detach
from dropcluster.nn.clusters import Clusters
from dropcluster.nn.drop_rate import DropRateModule, check_drop_rate
from dropcluster.nn.dropblock import (
    DropBlock1d,
    DropBlock2d,
    DropBlock3d,
    drop_block1d,
    drop_block1d_reference,
    drop_block2d,
    drop_block2d_reference,
    drop_block3d,
    drop_block3d_reference,
)
from dropcluster.nn.dropcluster import (
    DropCluster1d,
    DropCluster2d,
    DropCluster3d,
    drop_cluster1d,
    drop_cluster2d,
    drop_cluster3d,
)
from dropcluster.nn.fitting import ClusterFit, RefitSchedule, fit_clusters
from dropcluster.nn.placements import (
    place_dropblock,
    place_dropcluster,
    place_dropout,
    place_stochastic_depth,
)
from dropcluster.nn.ranking import LayerRanking, LayerStructure, rank_layers
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
    "DropBlock1d",
    "DropBlock2d",
    "DropBlock3d",
    "DropCluster1d",
    "DropCluster2d",
    "DropCluster3d",
    "DropRateModule",
    "DropRateSchedule",
    "LayerRanking",
    "LayerStructure",
    "StochasticDepth",
    "StochasticDepthResidual",
    "attach",
    "build_regularizer",
    "check_drop_rate",
    "detach",
    "drop_block1d",
    "drop_block1d_reference",
    "drop_block2d",
    "drop_block2d_reference",
    "drop_block3d",
    "drop_block3d_reference",
    "drop_cluster1d",
    "drop_cluster2d",
    "drop_cluster3d",
    "fit_clusters",
    "place_dropblock",
    "place_dropcluster",
    "place_dropout",
    "place_stochastic_depth",
    "rank_layers",
    "stochastic_depth",
]
