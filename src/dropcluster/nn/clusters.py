"""Fitted clusters as one object: what :meth:`DropCluster2d.fit` makes and
:func:`drop_cluster2d` takes (and their 1-D and 3-D forms, on (C, L) and (C, D, H, W) grids)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dropcluster.rena import ReNAResult, check_modes, rena
from dropcluster.validation import check_int, check_tensor

__all__ = [
    "LABEL_LAYOUTS",
    "Clusters",
    "check_tables",
    "cluster_sizes",
    "fixed_tables",
    "resample_labels",
]

#: The shapes cluster labels may have: one grid axis (1-D), two (the paper's) or three.
LABEL_LAYOUTS = "(C, L), (C, H, W) or (C, D, H, W)"


@dataclass(frozen=True)
class Clusters:
    """The fitted clusters of one layer input shape (C, H, W): what DropCluster drops from.

    The grid may also be 1-D, (C, L), or 3-D, (C, D, H, W), for
    :class:`~dropcluster.nn.DropCluster1d` and :class:`~dropcluster.nn.DropCluster3d` (this
    project's extension; the paper is 2-D): every table is per channel over the flattened
    sites, so only ``labels`` has the grid's shape.

    Make them with :meth:`fit` (ReNA on activations, the paper's Algorithm 1), :meth:`from_rena`
    or :meth:`from_labels`; a fitted :class:`~dropcluster.nn.DropCluster2d` gives its own as
    ``layer.clusters``. The tables are checked when the object is made (:func:`check_tables`).

    Attributes:
        labels: (C, H, W) int64 ((C, L) or (C, D, H, W) on other grids), the cluster of each
            pixel (0 in unstructured channels).
        structured: (C,) bool, the channels whose clusters are dropped; the others are zeroed.
        counts: (C,) int64 clusters per structured channel, 1 to ``n_clusters`` (0 otherwise).
        sizes: (C, n_clusters) int64 pixels per cluster (0 in unstructured channels).

    Example::

        clusters = Clusters.fit(activations, 15)   # activations: (N, C, H, W)
        out = drop_cluster2d(x, 0.1, clusters)     # x: (N', C, H, W)
    """

    labels: Tensor
    structured: Tensor
    counts: Tensor
    sizes: Tensor

    def __post_init__(self) -> None:
        for name in ("labels", "structured", "counts", "sizes"):
            check_tensor(
                name,
                getattr(self, name),
                {"labels": (2, 3, 4), "sizes": 2}.get(name, 1),
                {"labels": LABEL_LAYOUTS, "sizes": "(C, K)"}.get(name, "(C,)"),
            )
        check_tables(self.labels, self.structured, self.counts, self.sizes, self.sizes.shape[1])

    @property
    def n_clusters(self) -> int:
        """K, the width of the tables: at most this many clusters per channel."""
        return self.sizes.shape[1]

    @property
    def shape(self) -> tuple[int, ...]:
        """(C, H, W) of the inputs the clusters fit ((C, L) or (C, D, H, W) on other grids)."""
        return tuple(self.labels.shape)

    def to(self, device: torch.device | str) -> Clusters:
        """The same clusters on ``device``."""
        return Clusters(
            *(
                getattr(self, name).to(device)
                for name in ("labels", "structured", "counts", "sizes")
            )
        )

    def resample(self, *size: int) -> Clusters:
        """The same clusters on a grid of another ``size``, for inputs of another size.

        ``size`` gives one length per axis of the grid: ``resample(height, width)`` for (C, H,
        W) clusters, ``resample(length)`` for (C, L), ``resample(depth, height, width)`` for
        (C, D, H, W).

        Each channel's labels are resampled by nearest neighbour (:func:`resample_labels`);
        the counts stay the fitted ones, so ``floor(p * n)`` clusters are dropped as at the
        fitted size; the sizes are the pixels of each cluster on the new grid. A cluster that
        no pixel of the new grid lands on (a smaller grid) has size 0: drawing it drops
        nothing, and the rescaling ``count(M) / count_ones(M)`` counts the pixels actually
        kept, so it stays exact.

        Returns:
            Clusters of (C, *size); ``self`` when that is their shape already.

        Raises:
            ValueError: not one size per axis of the grid, or a size below 1.
        """
        if len(size) != len(self.shape) - 1:
            raise ValueError(
                f"resample takes one size per axis of the clusters' {len(self.shape) - 1}-d grid "
                f"(shape {self.shape}), but got {len(size)}: {size}"
            )
        size = tuple(check_int("size", length, minimum=1) for length in size)
        if self.shape[1:] == size:
            return self
        labels = resample_labels(self.labels, *size)
        sizes = cluster_sizes(labels, self.n_clusters) * self.structured.unsqueeze(1)
        return Clusters(labels, self.structured, self.counts, sizes)

    @classmethod
    def fit(
        cls,
        activations: Tensor,
        n_clusters: int = 15,
        *,
        unstructured: str = "dead",
        identical_neighbours: str = "merge",
        max_rounds: int = 1000,
        generator: torch.Generator | None = None,
    ) -> Clusters:
        """Cluster every channel of ``activations`` with ReNA (the paper's Algorithm 1).

        Args:
            activations: (N, C, H, W) float, N >= 2: the layer's input on a minibatch ((N, C,
                L) or (N, C, D, H, W) for 1-D or 3-D clusters).
            n_clusters: clusters per channel (paper: 15).
            unstructured, identical_neighbours, max_rounds, generator: as
                :func:`dropcluster.rena.rena`.

        Returns:
            The clusters, on the activations' device.
        """
        check_modes(unstructured, identical_neighbours)
        check_int("n_clusters", n_clusters, minimum=1)
        result = rena(
            activations,
            n_clusters,
            max_rounds=max_rounds,
            unstructured=unstructured,
            identical_neighbours=identical_neighbours,
            generator=generator,
        )
        return cls.from_rena(result, n_clusters)

    @classmethod
    def from_rena(cls, result: ReNAResult, n_clusters: int) -> Clusters:
        """A ReNA result as tables ``n_clusters`` wide: a structured channel with more than
        ``n_clusters`` clusters (ReNA stopped before reaching k) becomes unstructured, as the
        paper treats channels where ReNA does not converge."""
        return cls(
            *fixed_tables(
                result.labels, result.structured, result.n_found, result.sizes, n_clusters
            )
        )

    @classmethod
    def from_labels(
        cls, labels: Tensor, structured: Tensor | None = None, n_clusters: int | None = None
    ) -> Clusters:
        """Clusters from hand-made labels: channel c has clusters ``0 .. labels[c].max()``.

        Args:
            labels: (C, H, W) integer cluster ids ((C, L) or (C, D, H, W) on other grids), >= 0
                in structured channels.
            structured: (C,) bool (default: every channel).
            n_clusters: table width (default: the most clusters of a channel).
        """
        check_tensor("labels", labels, (2, 3, 4), LABEL_LAYOUTS)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels should hold integer cluster ids, but got {labels.dtype}")
        labels = labels.long()
        n_channels = labels.shape[0]
        if structured is None:
            structured = torch.ones(n_channels, dtype=torch.bool, device=labels.device)
        flat = labels.reshape(n_channels, -1)
        counts = torch.where(structured, flat.amax(dim=1) + 1, 0)
        width = n_clusters if n_clusters is not None else max(1, int(counts.max()))
        labels = torch.where(_per_channel(structured, labels), labels, 0)
        column = torch.arange(width, device=labels.device).view(1, -1, 1)
        sizes = (labels.reshape(n_channels, 1, -1) == column).sum(dim=2)
        return cls(labels, structured, counts, sizes * structured.view(-1, 1))


def check_tables(
    labels: Tensor,
    structured: Tensor,
    counts: Tensor,
    sizes: Tensor,
    n_clusters: int,
    names: dict[str, str] | None = None,
    grid_dims: int | None = None,
) -> None:
    """Raise ValueError unless the four tables are fitted clusters as :func:`fixed_tables`
    makes them: ``labels`` (C, H, W) (or (C, L), (C, D, H, W): a grid of ``grid_dims`` axes,
    any of 1 to 3 when None), ``structured`` (C,) bool, ``counts`` (C,) and ``sizes``
    (C, n_clusters) integers; a structured channel has 1 to ``n_clusters`` clusters, labels
    below its count and sizes that count its labels; an unstructured one has count and sizes 0.

    One pass over the labels (a scatter of ones): cheap beside any fit. ``names`` says how the
    message names each table (a state_dict key); the message names the first bad channel.
    """
    names = names or {}
    label_name, sizes_name = names.get("labels", "labels"), names.get("cluster_sizes", "sizes")
    counts_name = names.get("cluster_counts", "counts")
    if grid_dims is not None:
        label_dims = grid_dims + 1
    else:  # any grid of 1 to 3 axes; another rank is refused as a 3-d (C, H, W) table would be
        label_dims = labels.dim() if labels.dim() in (2, 3, 4) else 3
    n_channels = labels.shape[0] if labels.dim() == label_dims else -1
    kinds = ((labels, label_dims, label_name), (counts, 1, counts_name), (sizes, 2, sizes_name))
    for table, dims, name in kinds:
        if (
            table.dim() != dims
            or table.is_floating_point()
            or table.is_complex()
            or (table.dtype == torch.bool)
            or table.shape[0] != n_channels
        ):
            raise ValueError(
                f"{name} should be a {dims}-d integer tensor with {n_channels} channels, but got "
                f"{tuple(table.shape)} {table.dtype}"
            )
    if structured.shape != (n_channels,) or structured.dtype != torch.bool:
        raise ValueError(
            f"{names.get('structured', 'structured')} should be a ({n_channels},) bool tensor, "
            f"but got {tuple(structured.shape)} {structured.dtype}"
        )
    if sizes.shape[1] != n_clusters:
        raise ValueError(f"{sizes_name} should have {n_clusters} columns, not {sizes.shape[1]}")
    if n_channels == 0 or labels.numel() == 0:
        return
    device = labels.device
    labels, counts, sizes = labels.long(), counts.long().to(device), sizes.long().to(device)
    structured = structured.to(device)
    flat = labels.reshape(n_channels, -1)
    smallest, largest = torch.aminmax(flat, dim=1)
    bad_count = structured & ((counts < 1) | (counts > n_clusters)) | ~structured & (counts != 0)
    bad_label = structured & ((smallest < 0) | (largest >= counts))
    in_range = flat.clamp(0, n_clusters - 1)
    counted = torch.zeros_like(sizes).scatter_add_(1, in_range, torch.ones_like(in_range))
    counted *= structured.unsqueeze(1)
    bad_sizes = (counted != sizes).any(dim=1)
    for bad, what in ((bad_count, "count"), (bad_label, "labels"), (bad_sizes, "sizes")):
        if bool(bad.any()):
            c = int(bad.nonzero()[0])
            raise ValueError(
                _table_problem(
                    what,
                    c,
                    bool(structured[c]),
                    int(counts[c]),
                    n_clusters,
                    names,
                    labels,
                    sizes,
                    counted,
                )
            )


def _table_problem(
    what: str,
    c: int,
    structured: bool,
    count: int,
    n_clusters: int,
    names: dict[str, str],
    labels: Tensor,
    sizes: Tensor,
    counted: Tensor,
) -> str:
    """The message of :func:`check_tables` for channel ``c``'s first problem."""
    state = f"structured with {count} clusters" if structured else "unstructured"
    if what == "count":
        name = names.get("cluster_counts", "counts")
        if structured:
            return f"{name}: channel {c} is {state}, but a structured channel has 1 to {n_clusters}"
        return f"{name}: channel {c} is unstructured with count {count}, but such a channel has 0"
    if what == "labels":
        low, high = torch.aminmax(labels[c])
        return (
            f"{names.get('labels', 'labels')}: channel {c} is {state}, but its labels range from "
            f"{int(low)} to {int(high)} (expected 0 to {count - 1})"
        )
    expected = f"the pixels of each label: {counted[c].tolist()}" if structured else "zeros"
    return (
        f"{names.get('cluster_sizes', 'sizes')}: channel {c} is {state}, but its sizes are "
        f"{sizes[c].tolist()} (expected {expected})"
    )


def resample_labels(labels: Tensor, *size: int) -> Tensor:
    """(C, *grid) labels on a grid of ``size`` (one length per axis), by nearest neighbour.

    Positions map as ``F.interpolate(mode="nearest")`` maps them (torch's legacy nearest, not
    ``"nearest-exact"``), each axis on its own: output row ``i`` of an axis of length ``H``
    resampled to ``height`` takes input row ``floor(i * H / height)`` (the scale computed in
    float32, as torch does). Doubling repeats every label twice along each axis; halving keeps
    the even positions. Any grid of 1 to 3 axes: (C, L), (C, H, W) or (C, D, H, W).

    Returns:
        (C, *size) labels in ``labels``' dtype, on its device.
    """
    for axis, new_size in enumerate(size, start=1):
        labels = labels.index_select(axis, _nearest(labels.shape[axis], new_size, labels.device))
    return labels


def _nearest(size: int, new_size: int, device: torch.device) -> Tensor:
    """(new_size,) int64: the input position F.interpolate(mode="nearest") reads for each."""
    positions = torch.arange(size, dtype=torch.float32, device=device).view(1, 1, size)
    return F.interpolate(positions, size=new_size, mode="nearest").view(new_size).long()


def cluster_sizes(labels: Tensor, n_clusters: int) -> Tensor:
    """(C, n_clusters) int64 pixels of each label 0 .. n_clusters - 1 in each channel of the
    (C, H, W) ``labels`` (or (C, L), (C, D, H, W)); labels outside that range are not
    counted."""
    flat = labels.reshape(labels.shape[0], 1, -1)
    column = torch.arange(n_clusters, device=labels.device).view(1, -1, 1)
    return (flat == column).sum(dim=2)


def fixed_tables(
    labels: Tensor, structured: Tensor, n_found: Tensor, sizes: Tensor, n_clusters: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A ReNA result as the layer stores it: tables ``n_clusters`` wide.

    A structured channel with more than ``n_clusters`` clusters (ReNA stopped before reaching
    k) becomes unstructured, as the paper treats channels where ReNA does not converge.
    Unstructured channels get label 0, count 0 and no sizes: they are masked whole.

    Args:
        labels: (C, H, W) int64 (or (C, L), (C, D, H, W)); structured: (C,) bool; n_found:
            (C,) int64; sizes: (C, K) int64 (``ReNAResult``'s fields).

    Returns:
        labels (C, *grid), structured (C,), counts (C,), sizes (C, n_clusters), on the inputs'
        device.
    """
    structured = structured & (n_found <= n_clusters)
    counts = torch.where(structured, n_found, torch.zeros_like(n_found))
    labels = torch.where(_per_channel(structured, labels), labels, torch.zeros_like(labels))
    width = min(sizes.shape[1], n_clusters)
    table = torch.zeros(sizes.shape[0], n_clusters, dtype=torch.int64, device=sizes.device)
    table[:, :width] = sizes[:, :width]
    table *= structured.view(-1, 1)
    return labels, structured, counts, table


def _per_channel(values: Tensor, labels: Tensor) -> Tensor:
    """(C,) ``values`` viewed as (C, 1, ...) to broadcast over the grid of ``labels``."""
    return values.view((-1,) + (1,) * (labels.dim() - 1))
