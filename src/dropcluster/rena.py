"""Batched ReNA: recursive nearest agglomeration of the sites of every channel at once.

ReNA (Hoyos-Idrobo et al., IEEE TPAMI 2019) clusters the P = H*W pixels of one channel, using
the N images of a minibatch as the samples that describe each pixel and the 4-neighbour pixel
grid as the graph; DropCluster (paper, Algorithm 1) runs it on every channel of the first conv
layer's output. This module runs all channels in lock-step rounds of tensor operations, on any
device, with the semantics of the reference implementation (nilearn's
``recursive_neighbor_agglomeration``): docs/design.md, "ReNA, exactly", describes every step,
the tie rule, the early exit and the exact power-of-two scaling of extreme channels.

Beyond the paper (which clusters 2-D maps), the same algorithm runs on 1-D sequences
(N, C, L) and 3-D volumes (N, C, D, H, W): the grid joins each site to its 2 neighbours per
axis (2 in 1-D, 4 in 2-D, 6 in 3-D), as nilearn's grid of a 3-D mask does. Only the level-0
grid depends on the rank; every later round works on graphs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from dropcluster.validation import check_choice, check_float, check_int, check_tensor

__all__ = [
    "IDENTICAL_NEIGHBOUR_MODES",
    "UNSTRUCTURED_MODES",
    "ReNAResult",
    "check_modes",
    "connected_components",
    "grid_edges",
    "rena",
]


UNSTRUCTURED_MODES = ("rena", "dead", "hopkins", "none")
IDENTICAL_NEIGHBOUR_MODES = ("merge", "split")

# Channels whose largest magnitude lies outside [2**_MIN_EXPONENT, 2**_MAX_EXPONENT) are scaled
# into it by a power of two. Inside it, float32 squared distances summed over N samples stay
# below 2**(2 * 32 + 2) * N, far from overflow, and their reciprocals stay normal.
_MIN_EXPONENT = -32
_MAX_EXPONENT = 32


@dataclass(frozen=True)
class ReNAResult:
    """Clusters found by :func:`rena` for every channel.

    Attributes:
        labels: (C, *spatial) int64: (C, L), (C, H, W) or (C, D, H, W), the spatial shape of
            the input. Cluster of each site, in ``[0, n_found[c])``, numbered by each cluster's
            smallest row-major site index (``h * W + w`` in 2-D, ``(d * H + h) * W + w`` in 3-D).
        n_found: (C,) int64. Number of clusters each channel ended with.
        structured: (C,) bool. Channels DropCluster clusters; the others are masked (see the
            ``unstructured`` argument of :func:`rena`).
        sizes: (C, K) int64. Sites per cluster, ``K = max(n_clusters, n_found.max())``; zero
            past ``n_found[c]``.
        n_clusters: the requested number of clusters, after clamping to the number of sites P.
        n_rounds: agglomeration rounds run (the maximum over channels; channels run in
            lock-step).
    """

    labels: Tensor
    n_found: Tensor
    structured: Tensor
    sizes: Tensor
    n_clusters: int
    n_rounds: int

    @property
    def n_structured(self) -> int:
        """Number of structured channels."""
        return int(self.structured.sum())


def rena(
    x: Tensor,
    n_clusters: int,
    *,
    max_rounds: int = 1000,
    threshold: float = 1e-7,
    unstructured: str = "dead",
    identical_neighbours: str = "merge",
    hopkins_threshold: float = 0.55,
    generator: torch.Generator | None = None,
) -> ReNAResult:
    """Cluster the sites of every channel of ``x`` with ReNA, all channels at once.

    Args:
        x: (N, C, L), (N, C, H, W) or (N, C, D, H, W) activations, any real dtype and device;
            N >= 2 samples (the inputs of a minibatch) describe each site (position, pixel or
            voxel), whose neighbours are the 2 adjacent sites along each axis (1-D and 3-D are
            our extension; the paper is 2-D). Level-0 distances are computed in float64, the
            rest in float32 (float64 for float64 input); extreme channels are scaled exactly
            first.
        n_clusters: clusters wanted per channel, k >= 1 (clamped to the number of sites P,
            ``L``, ``H * W`` or ``D * H * W``, with a warning).
        max_rounds: maximum agglomeration rounds (the paper: 1000; 3-6 are typical).
        threshold: relative tolerance for near-tied nearest neighbours and the floor of edge
            weights after level 0 (nilearn's ``threshold``), in (0, 1).
        unstructured: which channels are *unstructured* (masked by DropCluster): ``"dead"``
            (default: every map of the batch constant), ``"rena"`` (the paper's: ReNA ends with
            more than k clusters), ``"hopkins"`` (Spatial Hopkins below
            ``hopkins_threshold``, plus the dead channels; every spatial size >= 3) or
            ``"none"``. docs/design.md, "Unstructured channels", compares them.
        identical_neighbours: ``"merge"`` (default: neighbours identical in every sample are
            one node before the first round, so a structured channel reaches k clusters) or
            ``"split"`` (the reference's: their edge is deleted, which can leave more than k).
            Unstructured channels always keep the reference result.
        hopkins_threshold: threshold of the ``"hopkins"`` rule (0.5: no structure).
        generator: random source for the Spatial Hopkins sample (``"hopkins"`` rule only).

    Returns:
        A :class:`ReNAResult`. A structured channel has ``n_found == n_clusters``, except with
        ``"merge"`` on fewer distinct regions (fewer) or ``"split"`` with ``unstructured !=
        "rena"`` (possibly more, with a warning).

    Raises:
        ValueError: wrong rank, fewer than 2 samples, no sites, non-finite values, bad options.

    Example::

        result = rena(torch.relu(torch.randn(64, 16, 12, 12)), 15)
        result.labels.shape, result.n_found  # (16, 12, 12), tensor([15, 15, ...])
        rena(torch.randn(64, 8, 4, 6, 6), 10).labels.shape  # (8, 4, 6, 6)
    """
    n_clusters, max_rounds, threshold, low, high = _check_arguments(
        x, n_clusters, max_rounds, threshold, unstructured, identical_neighbours, hopkins_threshold
    )
    n_channels, *spatial = x.shape[1:]
    if n_channels == 0:
        return _empty_result(spatial, n_clusters, x.device)
    graphs = _level0_graphs(x.detach(), low, high, threshold)
    if unstructured == "rena":
        labels, n_found, structured, n_rounds = _cluster_by_paper_rule(
            graphs, n_clusters, max_rounds, threshold, identical_neighbours
        )
    else:
        structured = _structured_without_rena(
            x, graphs.weights, unstructured, hopkins_threshold, generator
        )
        labels, n_found, n_rounds = _cluster_with_verdict(
            graphs, structured, n_clusters, max_rounds, threshold, identical_neighbours
        )
    return _result(labels, n_found, structured, n_clusters, n_rounds, spatial)


def grid_edges(*sizes: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """The edges of a grid of any rank (1-3 in :func:`rena`): each site joined to its 2
    neighbours per axis, sites numbered row-major (``h * W + w`` for ``grid_edges(H, W)``).

    Args:
        sizes: the grid's spatial sizes, e.g. ``L``, ``H, W`` or ``D, H, W``, each >= 1.
        device: where the edges are made (keyword only).

    Returns:
        (u, v): two (E,) int64 tensors with ``u < v``, ``E = sum over axes of P * (n - 1) / n``
        for P sites and an axis of size n. Edges are grouped by axis, the last axis first (in
        2-D: the horizontal edges row by row, then the vertical ones), each group row-major,
        matching :func:`_level0_weights`.
    """
    if not sizes:
        raise ValueError("grid_edges needs at least one size, but got none")
    sizes = tuple(check_int("grid size", size, minimum=1) for size in sizes)
    index = torch.arange(math.prod(sizes), device=device).view(sizes)
    u_parts, v_parts = [], []
    for axis in reversed(range(len(sizes))):
        length = sizes[axis] - 1
        u_parts.append(index.narrow(axis, 0, length).reshape(-1))
        v_parts.append(index.narrow(axis, 1, length).reshape(-1))
    return torch.cat(u_parts), torch.cat(v_parts)


def connected_components(n_nodes: int, a: Tensor, b: Tensor) -> Tensor:
    """Label each node by the smallest node of its connected component.

    Hooking of roots onto smaller roots plus pointer jumping (Shiloach-Vishkin style): a few
    sweeps of tensor operations, no Python loop over nodes.

    Args:
        n_nodes: number of nodes.
        a, b: (E,) int64 endpoints of the undirected edges.

    Returns:
        (n_nodes,) int64: for each node, the smallest node index in its component.
    """
    parent = torch.arange(n_nodes, device=a.device)
    if a.numel() == 0:
        return parent
    while True:
        root_a = parent[a]
        root_b = parent[b]
        hooked = parent.scatter_reduce(
            0, torch.maximum(root_a, root_b), torch.minimum(root_a, root_b), "amin"
        )
        while True:
            jumped = hooked[hooked]
            if torch.equal(jumped, hooked):
                break
            hooked = jumped
        if torch.equal(hooked, parent):
            return parent
        parent = hooked


def check_modes(unstructured: str, identical_neighbours: str) -> None:
    """Raise ValueError unless both are valid option values of :func:`rena`."""
    check_choice("unstructured", unstructured, UNSTRUCTURED_MODES)
    check_choice("identical_neighbours", identical_neighbours, IDENTICAL_NEIGHBOUR_MODES)


def _check_arguments(
    x: Tensor,
    n_clusters: int,
    max_rounds: int,
    threshold: float,
    unstructured: str,
    identical_neighbours: str,
    hopkins_threshold: float,
) -> tuple[int, int, float, Tensor | None, Tensor | None]:
    """Check the arguments of :func:`rena`, the one place they are checked.

    Returns:
        n_clusters clamped to the number of sites, max_rounds, threshold, and the (C,) smallest
        and largest value of each channel (None when x has no channels).
    """
    check_tensor("x", x, (3, 4, 5), "(N, C, L), (N, C, H, W) or (N, C, D, H, W)")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"x should hold real numbers, but got dtype {x.dtype}")
    n_samples, _, *spatial = x.shape
    site = _SITE_NAMES[len(spatial)]
    shown = "x".join(str(size) for size in spatial)
    if n_samples < 2:
        raise ValueError(f"ReNA needs at least 2 samples per {site}, but got N={n_samples}")
    n_sites = math.prod(spatial)
    if n_sites == 0:
        raise ValueError(f"x has no {site}s: spatial shape {shown}")
    low = high = None
    if x.numel() > 0:
        # Per-channel min/max: they propagate NaN and expose infinities without a full-size
        # boolean temporary, and give the channel scales (two reductions over the channel
        # dimension, not one aminmax per image and channel).
        detached = x.detach()
        dims = _channel_reduction_dims(x)
        low, high = detached.amin(dim=dims), detached.amax(dim=dims)
        if x.is_floating_point():
            finite = torch.isfinite(low) & torch.isfinite(high)
            if not bool(finite.all()):
                bad = (~finite).nonzero().squeeze(1).tolist()
                raise ValueError(
                    f"x should hold finite values, but it contains NaN or infinite values in "
                    f"channel(s) {bad[:10]}{' ...' if len(bad) > 10 else ''}"
                )
    n_clusters = check_int("n_clusters", n_clusters, minimum=1)
    max_rounds = check_int("max_rounds", max_rounds, minimum=1)
    threshold = check_float("threshold", threshold, above=0.0, below=1.0)
    check_modes(unstructured, identical_neighbours)
    if unstructured == "hopkins":
        check_float("hopkins_threshold", hopkins_threshold, minimum=0.0, maximum=1.0)
        if min(spatial) < 3:
            smallest = "x".join("3" * len(spatial))
            raise ValueError(
                f'unstructured="hopkins" needs maps of at least {smallest}, but got {shown}'
            )
    if n_clusters > n_sites:
        warnings.warn(
            f"n_clusters={n_clusters} is larger than the {n_sites} {site}s of a "
            f"{shown} map; using n_clusters={n_sites}",
            UserWarning,
            stacklevel=3,
        )
        n_clusters = n_sites
    return n_clusters, max_rounds, threshold, low, high


# What a site is called in messages, by the number of spatial dimensions.
_SITE_NAMES = {1: "position", 2: "pixel", 3: "voxel"}


def _channel_reduction_dims(x: Tensor) -> tuple[int, ...]:
    """The dimensions of ``x`` (N, C, *spatial) that a per-channel reduction runs over."""
    return (0, *range(2, x.dim()))


def _empty_result(spatial: list[int], n_clusters: int, device: torch.device) -> ReNAResult:
    """The result for an input without channels."""
    return ReNAResult(
        labels=torch.zeros(0, *spatial, dtype=torch.int64, device=device),
        n_found=torch.zeros(0, dtype=torch.int64, device=device),
        structured=torch.zeros(0, dtype=torch.bool, device=device),
        sizes=torch.zeros(0, n_clusters, dtype=torch.int64, device=device),
        n_clusters=n_clusters,
        n_rounds=0,
    )


@dataclass(frozen=True)
class _ChannelGraphs:
    """The level-0 graph of every channel: its nodes' features and its weighted grid edges.

    Attributes:
        samples: (N, C, P) site values, float32 (float64 for float64 input), each channel
            multiplied by its power of two (see :func:`_channel_scaling`).
        weights: (C, E0) float64 level-0 weights, edges in the order of :func:`grid_edges`.
        grid_u, grid_v: (E0,) int64 grid edges.
        floor: (C,) floor of the edge weights of each channel, in the features' dtype, when some
            channel is scaled; None: ``threshold`` everywhere.
        has_identical_neighbours: (C,) bool, channels with an edge of weight 0.
    """

    samples: Tensor
    weights: Tensor
    grid_u: Tensor
    grid_v: Tensor
    floor: Tensor | None
    has_identical_neighbours: Tensor

    def select(self, channels: Tensor) -> _ChannelGraphs:
        """The graphs of the channels at the (K,) int64 indices ``channels``."""
        return _ChannelGraphs(
            samples=self.samples[:, channels],
            weights=self.weights[channels],
            grid_u=self.grid_u,
            grid_v=self.grid_v,
            floor=None if self.floor is None else self.floor[channels],
            has_identical_neighbours=self.has_identical_neighbours[channels],
        )


def _level0_graphs(x: Tensor, low: Tensor, high: Tensor, threshold: float) -> _ChannelGraphs:
    """Features, grid edges and level-0 weights of every channel of the (N, C, *spatial) ``x``.

    ``low``/``high`` are the (C,) extremes of each channel, which set its scaling.
    """
    n_samples, n_channels, *spatial = x.shape
    feature_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    samples = x.reshape(n_samples, n_channels, math.prod(spatial)).to(feature_dtype)
    factor, floor = _channel_scaling(low, high, feature_dtype, threshold)
    if factor is not None:
        samples = samples * factor.to(feature_dtype).view(1, n_channels, 1)
    grid_u, grid_v = grid_edges(*spatial, device=x.device)
    weights = _level0_weights(x, factor)
    return _ChannelGraphs(
        samples=samples,
        weights=weights,
        grid_u=grid_u,
        grid_v=grid_v,
        floor=floor,
        has_identical_neighbours=(weights == 0).any(dim=1),
    )


def _cluster_by_paper_rule(
    graphs: _ChannelGraphs,
    n_clusters: int,
    max_rounds: int,
    threshold: float,
    identical_neighbours: str,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """ReNA with the reference semantics, and the paper's verdict: more than k clusters is
    unstructured. Under ``"merge"`` the structured channels with identical neighbours are
    clustered again with those neighbours contracted.

    Returns:
        labels (C, P) int64, n_found (C,) int64, structured (C,) bool, number of rounds run.
    """
    labels, n_found, n_rounds = _agglomerate(graphs, None, n_clusters, max_rounds, threshold)
    structured = n_found <= n_clusters
    if identical_neighbours == "merge":
        redo = structured & graphs.has_identical_neighbours
        if bool(redo.any()):
            redo_idx = redo.nonzero().squeeze(1)
            contract = torch.ones(redo_idx.numel(), dtype=torch.bool, device=labels.device)
            redo_labels, redo_found, redo_rounds = _agglomerate(
                graphs.select(redo_idx), contract, n_clusters, max_rounds, threshold
            )
            labels[redo_idx] = redo_labels
            n_found[redo_idx] = redo_found
            n_rounds = max(n_rounds, redo_rounds)
    return labels, n_found, structured, n_rounds


def _cluster_with_verdict(
    graphs: _ChannelGraphs,
    structured: Tensor,
    n_clusters: int,
    max_rounds: int,
    threshold: float,
    identical_neighbours: str,
) -> tuple[Tensor, Tensor, int]:
    """ReNA on every channel once the (C,) bool ``structured`` verdict is known. Under
    ``"merge"`` identical neighbours are contracted in the structured channels.

    Returns:
        labels (C, P) int64, n_found (C,) int64, number of rounds run.
    """
    contract = None
    if identical_neighbours == "merge":
        contract = structured & graphs.has_identical_neighbours
    labels, n_found, n_rounds = _agglomerate(graphs, contract, n_clusters, max_rounds, threshold)
    overfull = structured & (n_found > n_clusters)
    if bool(overfull.any()):
        warnings.warn(
            f"{int(overfull.sum())} structured channel(s) ended with more than "
            f"n_clusters={n_clusters} clusters (identical_neighbours={identical_neighbours!r}, "
            f"max_rounds={max_rounds}); their labels go up to n_found - 1",
            RuntimeWarning,
            stacklevel=3,
        )
    return labels, n_found, n_rounds


def _result(
    labels: Tensor,
    n_found: Tensor,
    structured: Tensor,
    n_clusters: int,
    n_rounds: int,
    spatial: list[int],
) -> ReNAResult:
    """The :class:`ReNAResult` of (C, P) labels, with the cluster sizes counted."""
    n_channels = n_found.numel()
    n_columns = max(n_clusters, int(n_found.max()))
    sizes = torch.zeros(n_channels, n_columns, dtype=torch.int64, device=labels.device)
    sizes.scatter_add_(1, labels, torch.ones_like(labels))
    return ReNAResult(
        labels=labels.view(n_channels, *spatial),
        n_found=n_found,
        structured=structured,
        sizes=sizes,
        n_clusters=n_clusters,
        n_rounds=n_rounds,
    )


def _channel_scaling(
    low: Tensor, high: Tensor, dtype: torch.dtype, threshold: float
) -> tuple[Tensor | None, Tensor | None]:
    """Powers of two that bring each channel's largest magnitude into the safe range.

    Args:
        low, high: (C,) smallest and largest value of each channel.
        dtype: the feature dtype, float32 or float64.
        threshold: the floor of the edge weights in the unscaled units.

    Returns:
        (factor, floor): (C,) float64 factors ``2**s`` and (C,) ``dtype`` floors
        ``threshold * 2**(2 s)``, or (None, None) when no channel needs scaling. A floor below
        the smallest normal number is raised to it; one above 1 is lowered to 1, which is still
        above every weight of its channel (an upscaled channel has weights below ``N * 2**-62``),
        so every weight is floored to the same value either way.
    """
    peak = torch.maximum(low.double().abs(), high.double().abs()).tolist()
    info = torch.finfo(dtype)
    lowest, highest = round(math.log2(info.tiny)), math.floor(math.log2(info.max))
    shifts = []
    for value in peak:
        exponent = math.frexp(value)[1]  # value in [2**(exponent - 1), 2**exponent); 0 for 0
        shift = min(0, _MAX_EXPONENT - exponent) + max(0, _MIN_EXPONENT - exponent)
        shifts.append(min(max(shift, lowest), highest))
    if not any(shifts):
        return None, None
    # The unscaled path compares with the floor rounded to the feature dtype.
    floor_value = float(torch.tensor(threshold, dtype=dtype))
    floors = []
    for shift in shifts:
        try:
            scaled = math.ldexp(floor_value, 2 * shift)
        except OverflowError:
            scaled = math.inf
        floors.append(min(max(scaled, info.tiny), 1.0))
    device = low.device
    factor = torch.tensor([math.ldexp(1.0, s) for s in shifts], dtype=torch.float64, device=device)
    return factor, torch.tensor(floors, dtype=dtype, device=device)


def _structured_without_rena(
    x: Tensor,
    level0_weights: Tensor,
    unstructured: str,
    hopkins_threshold: float,
    generator: torch.Generator | None,
) -> Tensor:
    """(C,) bool verdict of the rules that need no clustering."""
    n_channels = x.shape[1]
    if unstructured == "none":
        return torch.ones(n_channels, dtype=torch.bool, device=x.device)
    if level0_weights.shape[1] > 0:
        # Dead: every map of the channel is constant, so every neighbour pair is identical in
        # every sample; then no grid edge survives and nothing can be clustered.
        alive = (level0_weights != 0).any(dim=1)
    else:  # a one-site map has no edges; only a change of value across the batch counts
        values = x.detach()
        dims = _channel_reduction_dims(x)
        alive = values.amax(dim=dims) != values.amin(dim=dims)
    if unstructured == "dead":
        return alive
    from dropcluster.hopkins import spatial_hopkins

    per_channel = spatial_hopkins(x.detach(), generator=generator, reduction="mean")
    return alive & (per_channel >= hopkins_threshold)


def _level0_weights(x: Tensor, factor: Tensor | None = None) -> Tensor:
    """Level-0 edge weights, half the squared distance of neighbouring sites, in float64.

    Args:
        x: (N, C, *spatial) activations, 1 to 3 spatial dimensions.
        factor: (C,) float64 powers of two each channel is scaled by first, or None.

    Returns:
        (C, E) float64, edges in the order of :func:`grid_edges` (last axis first).
    """
    n_samples, n_channels, *spatial = x.shape
    # Blocks of about 2**20 values (8 MB in float64) bound the float64 temporaries.
    chunk = max(1, (1 << 20) // max(1, n_samples * math.prod(spatial)))
    factor_shape = (1, -1) + (1,) * len(spatial)
    parts = []
    for start in range(0, n_channels, chunk):
        block = x[:, start : start + chunk].to(torch.float64)
        if factor is not None:
            block = block * factor[start : start + chunk].view(factor_shape)
        axes = []
        for axis in reversed(range(2, x.dim())):
            length = x.shape[axis] - 1
            step = block.narrow(axis, 1, length) - block.narrow(axis, 0, length)
            axes.append(step.square_().sum(dim=0).flatten(1))
        parts.append(torch.cat(axes, dim=1))
    # The reference symmetrises a one-sided matrix by averaging it with its transpose: the 1/2.
    return torch.cat(parts, dim=0).mul_(0.5)


def _agglomerate(
    graphs: _ChannelGraphs,
    contract: Tensor | None,
    n_clusters: int,
    max_rounds: int,
    threshold: float,
) -> tuple[Tensor, Tensor, int]:
    """Run ReNA rounds on a stack of channels.

    Here and below a "pixel" is any site of the grid (1-D, 2-D or 3-D): after level 0 the
    rank no longer matters. Nodes of all channels live in one flat index space, sorted by
    (channel, smallest pixel), so that a node's rank inside its channel is its reference
    cluster number at every level. Each round links nearest neighbours
    (:func:`_nearest_neighbour_links`, cut by :func:`_overshoot_guard`), merges the connected
    components of the links, averages their features (:func:`_reduce_features`) and weights
    the edges between the new nodes (:func:`_reduced_edges`).

    Args:
        graphs: the level-0 graphs of the C channels.
        contract: (C,) bool or None. Channels where neighbours with weight 0 are contracted
            into one node before the first round (``identical_neighbours="merge"``); elsewhere
            such edges are deleted, as in the reference.

    Returns:
        labels (C, P) int64, n_found (C,) int64, number of rounds run.
    """
    n_samples, n_channels, n_pixels = graphs.samples.shape
    # Level-0 features are read straight from the sample-major input, (N, pixels), which spares
    # a transposed copy of it; the first reduction writes node-major features, (nodes, N).
    features = graphs.samples.reshape(n_samples, n_channels * n_pixels)
    node_pixel, node_channel, pixel_node, a, b, weights = _level0_nodes(graphs, contract)
    n_nodes = torch.bincount(node_channel, minlength=n_channels)
    n_rounds = 0
    for _ in range(max_rounds):
        edge_channel = node_channel[a]
        active = n_nodes > n_clusters
        keep = active[edge_channel]
        if not bool(keep.all()):
            a, b, weights, edge_channel = a[keep], b[keep], weights[keep], edge_channel[keep]
        if a.numel() == 0:
            break
        n_rounds += 1
        n_current = node_channel.numel()
        links = _nearest_neighbour_links(a, b, weights, n_current, threshold)
        links = links & _overshoot_guard(a, b, links, edge_channel, n_nodes, n_clusters)
        new_id, is_root = _component_ids(n_current, a[links], b[links])
        first = n_rounds == 1  # features are still the sample-major level-0 ones
        features = _reduce_features(
            features, new_id, int(is_root.sum()), first, node_pixel if first else None
        )
        node_channel = node_channel[is_root]
        pixel_node = new_id[pixel_node]
        n_nodes = torch.bincount(node_channel, minlength=n_channels)
        a, b, weights = _reduced_edges(
            features, new_id[a], new_id[b], node_channel, threshold, graphs.floor
        )

    node_offset = torch.cumsum(n_nodes, 0) - n_nodes
    labels = pixel_node - node_offset[node_channel[pixel_node]]
    return labels.view(n_channels, n_pixels), n_nodes, n_rounds


class _Level0Nodes(NamedTuple):
    """The level-0 nodes of all channels in one flat index space, and their edges.

    Attributes:
        node_pixel: (nodes,) int64 pixel column of each node in the flat (N, C * P) features,
            or None when the nodes are the pixels themselves (nothing was contracted).
        node_channel: (nodes,) int64 channel of each node.
        pixel_node: (C * P,) int64 node of each pixel.
        a, b, weights: (E,) edges between the nodes (int64) and their float64 weights.
    """

    node_pixel: Tensor | None
    node_channel: Tensor
    pixel_node: Tensor
    a: Tensor
    b: Tensor
    weights: Tensor


def _level0_nodes(graphs: _ChannelGraphs, contract: Tensor | None) -> _Level0Nodes:
    """The grid edges of every channel in the flat index space, edges of weight 0 deleted, or
    contracted in the ``contract`` channels (their two pixels become one node)."""
    n_channels, n_pixels = graphs.samples.shape[1:]
    device = graphs.samples.device
    channel_offset = torch.arange(n_channels, device=device).mul_(n_pixels).unsqueeze(1)
    all_a = (graphs.grid_u + channel_offset).reshape(-1)
    all_b = (graphs.grid_v + channel_offset).reshape(-1)
    all_w = graphs.weights.reshape(-1)
    node_channel = torch.arange(n_channels, device=device).repeat_interleave(n_pixels)
    pixel_node = torch.arange(n_channels * n_pixels, device=device)
    nonzero = all_w != 0
    a, b, weights = all_a[nonzero], all_b[nonzero], all_w[nonzero]
    if contract is None:
        return _Level0Nodes(None, node_channel, pixel_node, a, b, weights)
    identical = (~nonzero) & contract.repeat_interleave(graphs.grid_u.numel())
    if not bool(identical.any()):
        return _Level0Nodes(None, node_channel, pixel_node, a, b, weights)
    new_id, is_root = _component_ids(n_channels * n_pixels, all_a[identical], all_b[identical])
    # Contracted pixels are bit-identical, so the root's vector is every member's vector.
    node_pixel = is_root.nonzero().squeeze(1)
    a, b, weights = _merge_edges(new_id[a], new_id[b], weights, node_pixel.numel())
    return _Level0Nodes(node_pixel, node_channel[is_root], new_id, a, b, weights)


def _component_ids(n_nodes: int, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Merge the nodes joined by the edges (a, b): each node's new id, components numbered by
    their smallest node, and the (n_nodes,) bool mask of those smallest nodes."""
    root = connected_components(n_nodes, a, b)
    is_root = root == torch.arange(root.numel(), device=root.device)
    return torch.cumsum(is_root, 0).sub_(1)[root], is_root


def _reduce_features(
    features: Tensor,
    new_id: Tensor,
    n_new: int,
    sample_major: bool,
    node_pixel: Tensor | None,
) -> Tensor:
    """Features of the merged nodes: the mean of their children's features.

    Args:
        features: node-major (nodes, N), or in the first round the sample-major level-0
            features (N, C * P) (``sample_major``).
        new_id: (nodes,) int64 merged node of each node.
        n_new: number of merged nodes.
        node_pixel: in the first round, the pixel column of each level-0 node when pixels were
            contracted (see :class:`_Level0Nodes`); else None.

    Returns:
        (n_new, N) node-major features.
    """
    children = torch.bincount(new_id, minlength=n_new).to(features.dtype)
    if sample_major:
        n_samples, n_columns = features.shape
        column_target = new_id
        if node_pixel is not None:
            # Pixels that are not a node's root add into a spare column, dropped after.
            column_target = torch.full(
                (n_columns,), n_new, dtype=new_id.dtype, device=new_id.device
            )
            column_target[node_pixel] = new_id
        reduced = torch.zeros(n_samples, n_new + 1, dtype=features.dtype, device=features.device)
        reduced.index_add_(1, column_target, features)
        reduced = reduced[:, :n_new].t().contiguous()
    else:
        reduced = torch.zeros(
            n_new, features.shape[1], dtype=features.dtype, device=features.device
        )
        reduced.index_add_(0, new_id, features)
    # Mean of the children's means, not of their pixels: the reference's reduction.
    return reduced.div_(children.unsqueeze(1))


def _reduced_edges(
    features: Tensor,
    a: Tensor,
    b: Tensor,
    node_channel: Tensor,
    threshold: float,
    floor: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The edges between merged nodes, weighted by the full squared distance of their features.

    Args:
        features: (nodes, N) features of the merged nodes.
        a, b: (E,) int64 merged endpoints of the previous edges (duplicates and self-loops
            included).
        node_channel: (nodes,) int64 channel of each merged node.
        floor: (C,) per-channel floor of the weights, or None: ``threshold`` everywhere.

    Returns:
        (a, b, weights): deduplicated edges, ``a < b``, and their floored weights.
    """
    distinct = a != b
    a, b = _unique_edges(a[distinct], b[distinct], features.shape[0])
    difference = features.index_select(0, a).sub_(features.index_select(0, b))
    weights = difference.square_().sum(dim=1)
    if floor is None:
        weights.clamp_(min=threshold)
    else:
        weights = torch.maximum(weights, floor[node_channel[a]])
    return a, b, weights


def _nearest_neighbour_links(
    a: Tensor, b: Tensor, weights: Tensor, n_nodes: int, threshold: float
) -> Tensor:
    """(E,) bool: edges where one endpoint is a near-tied nearest neighbour of the other."""
    inverse = weights.reciprocal()
    largest = torch.zeros(n_nodes, dtype=weights.dtype, device=weights.device)
    largest.scatter_reduce_(0, a, inverse, "amax")
    largest.scatter_reduce_(0, b, inverse, "amax")
    scale = largest.reciprocal()
    # The reference's exact form: (1/w) * (1/max(1/w')) > 1 - threshold.
    cutoff = 1.0 - threshold
    return (inverse * scale[a] > cutoff) | (inverse * scale[b] > cutoff)


def _overshoot_guard(
    a: Tensor,
    b: Tensor,
    links: Tensor,
    edge_channel: Tensor,
    n_nodes: Tensor,
    n_clusters: int,
) -> Tensor:
    """(E,) bool: links allowed to merge, so that no channel drops below ``n_clusters``.

    A channel whose link graph would leave fewer than k components (estimated as
    ``n_nodes - n_links``) keeps only its ``n_nodes - k`` links with the largest node-index
    gap, ties broken by the smaller lower index (paper reference: nilearn's cut).
    """
    n_channels = n_nodes.numel()
    link_count = torch.bincount(edge_channel[links], minlength=n_channels)
    estimate = n_nodes - link_count
    cut = estimate < n_clusters
    allowed = torch.ones_like(links)
    if not bool(cut.any()):
        return allowed
    candidates = (links & cut[edge_channel]).nonzero().squeeze(1)
    channel = edge_channel[candidates]
    node_offset = torch.cumsum(n_nodes, 0) - n_nodes
    lower = a[candidates] - node_offset[channel]
    gap = b[candidates] - a[candidates]
    span = int(n_nodes.max()) + 1
    order = torch.argsort((channel * span + (span - gap)) * span + lower)
    sorted_channel = channel[order]
    starts = torch.cumsum(torch.bincount(channel, minlength=n_channels), 0)
    starts = starts - torch.bincount(channel, minlength=n_channels)
    rank = torch.arange(order.numel(), device=a.device) - starts[sorted_channel]
    keep_sorted = rank < (n_nodes - n_clusters)[sorted_channel]
    allowed[candidates[order]] = keep_sorted
    return allowed


def _unique_edges(a: Tensor, b: Tensor, n_nodes: int) -> tuple[Tensor, Tensor]:
    """Deduplicate undirected edges; returns (lower, upper) endpoints sorted by key."""
    lower = torch.minimum(a, b)
    upper = torch.maximum(a, b)
    key = torch.unique(lower * n_nodes + upper)
    return key // n_nodes, key % n_nodes


def _merge_edges(
    a: Tensor, b: Tensor, weights: Tensor, n_nodes: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Deduplicate edges whose duplicates carry identical weights (after a contraction)."""
    lower = torch.minimum(a, b)
    upper = torch.maximum(a, b)
    key, inverse = torch.unique(lower * n_nodes + upper, return_inverse=True)
    merged = torch.zeros(key.numel(), dtype=weights.dtype, device=weights.device)
    merged.scatter_(0, inverse, weights)
    return key // n_nodes, key % n_nodes, merged
