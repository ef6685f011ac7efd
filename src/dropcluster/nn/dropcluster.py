"""DropCluster: drop random clusters of correlated pixels in each channel (paper, Algorithms 1-2).

Clusters are fitted offline from a minibatch of the layer's input activations
(:class:`~dropcluster.nn.Clusters`, ReNA: Algorithm 1). Every training step then drops
``floor(p * n)`` randomly chosen clusters in each structured channel (``n`` clusters in that
channel, 15 in the paper), zeroes the unstructured channels, and rescales by
``count(M) / count_ones(M)`` (Algorithm 2). In evaluation only the unstructured channels are
zeroed, with the same rescaling rule.

:class:`DropCluster1d` ((N, C, L) sequences) and :class:`DropCluster3d` ((N, C, D, H, W)
volumes) are this project's extension, not the paper's (which is 2-D): the same algorithm on a
grid of one or three axes, whose clusters ReNA grows along 2 neighbours per axis. The three
layers share one implementation, parameterised by the grid's number of axes.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from dropcluster.compat import legacy_dropcluster_state, old_call_form
from dropcluster.nn.cluster_kernels import (
    MAX_PACKED_CLUSTERS,
    ClusterTables,
    apply_clusters,
    compiling,
)
from dropcluster.nn.clusters import (
    Clusters,
    check_tables,
    cluster_sizes,
    fixed_tables,
    resample_labels,
)
from dropcluster.nn.drop_rate import DropRateModule, check_drop_rate
from dropcluster.rena import check_modes, rena
from dropcluster.validation import check_choice, check_int, check_tensor

__all__ = [
    "DROPCLUSTER_LAYERS",
    "OTHER_SIZES",
    "DropCluster1d",
    "DropCluster2d",
    "DropCluster3d",
    "drop_cluster1d",
    "drop_cluster2d",
    "drop_cluster3d",
]

#: What a fitted DropCluster layer does with an input of another (H, W) than its clusters'.
OTHER_SIZES = ("refuse", "resample")

#: The names of the grid axes of 1-, 2- and 3-D layers, as their messages write shapes.
_AXES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


def _layout(grid_dims: int, batch: bool) -> str:
    """``"(N, C, H, W)"`` (``batch``) or ``"(C, H, W)"`` for a grid of ``grid_dims`` axes."""
    return "(" + ", ".join((("N",) if batch else ()) + ("C",) + _AXES[grid_dims]) + ")"


@old_call_form(
    4,
    frozenset({"labels", "n_clusters", "structured", "cluster_sizes"}),
    "drop_cluster2d(x, p, clusters, training=True, *, per_sample, generator, return_mask), "
    "clusters = Clusters.fit(activations, n_clusters), Clusters.from_labels(labels, structured) "
    "or layer.clusters",
)
def drop_cluster2d(
    x: Tensor,
    p: float | Tensor,
    clusters: Clusters,
    training: bool = True,
    *,
    per_sample: bool = True,
    generator: torch.Generator | None = None,
    return_mask: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Apply DropCluster with fitted clusters (paper, Algorithm 2).

    Args:
        x: (N, C, H, W) activations, any float dtype and memory format.
        p: drop rate in [0, 1): ``floor(p * n)`` of the ``n`` clusters of each structured
            channel are dropped; a float, or a 0-d tensor (kept as a tensor: no host sync).
        clusters: :class:`~dropcluster.nn.Clusters` of (C, H, W) = x's; moved to x's device.
        training: drop clusters (True), or only zero the unstructured channels (False).
        per_sample: each image draws its own clusters (True), or the batch shares one draw,
            as in the paper (False).
        generator: random source on x's device.
        return_mask: also return the applied 0/1 mask, before rescaling.

    Returns:
        (N, C, H, W) tensor in x's dtype: ``x * M * count(M) / count_ones(M)``, with M the
        (C, H, W) mask (one per image when ``per_sample``); with ``return_mask``, also M as a
        (N or 1, C, H, W) tensor in x's dtype.

    Raises:
        TypeError: ``clusters`` is not a :class:`~dropcluster.nn.Clusters` (the form of 0.3,
            ``drop_cluster2d(x, labels, n_clusters, p, structured)``, says how to move).
        ValueError: x's shape does not fit the clusters, or p is out of range.

    Example::

        clusters = Clusters.fit(activations, 15)
        out = drop_cluster2d(x, 0.1, clusters)
    """
    if not isinstance(clusters, Clusters):
        raise TypeError(
            "drop_cluster2d takes (x, p, clusters, training=True, *, per_sample, generator, "
            "return_mask) since dropcluster 0.4: make the clusters with Clusters.fit(activations, "
            "n_clusters), Clusters.from_labels(labels, structured) or layer.clusters, not "
            f"loose tables (got {type(clusters).__name__} as clusters)"
        )
    return _drop_clusters(x, p, clusters, training, per_sample, generator, return_mask, 2)


def drop_cluster1d(
    x: Tensor,
    p: float | Tensor,
    clusters: Clusters,
    training: bool = True,
    *,
    per_sample: bool = True,
    generator: torch.Generator | None = None,
    return_mask: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Apply DropCluster to (N, C, L) sequences: :func:`drop_cluster2d` on a grid of one axis.

    The paper is 2-D; this 1-D form is this project's extension (the same Algorithm 2, with
    clusters fitted on (N, C, L) activations, whose sites ReNA joins to their 2 neighbours).

    Args:
        x: (N, C, L) activations, any float dtype.
        p, training, per_sample, generator, return_mask: as :func:`drop_cluster2d`.
        clusters: :class:`~dropcluster.nn.Clusters` of (C, L) = x's.

    Returns:
        (N, C, L) tensor in x's dtype (with ``return_mask``, also the (N or 1, C, L) mask).

    Example::

        clusters = Clusters.fit(activations, 15)   # activations: (N, C, L)
        out = drop_cluster1d(x, 0.1, clusters)
    """
    return _drop_clusters(x, p, clusters, training, per_sample, generator, return_mask, 1)


def drop_cluster3d(
    x: Tensor,
    p: float | Tensor,
    clusters: Clusters,
    training: bool = True,
    *,
    per_sample: bool = True,
    generator: torch.Generator | None = None,
    return_mask: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Apply DropCluster to (N, C, D, H, W) volumes: :func:`drop_cluster2d` on a grid of three
    axes.

    The paper is 2-D; this 3-D form is this project's extension (the same Algorithm 2, with
    clusters fitted on (N, C, D, H, W) activations, whose sites ReNA joins to their 6
    neighbours).

    Args:
        x: (N, C, D, H, W) activations, any float dtype and memory format.
        p, training, per_sample, generator, return_mask: as :func:`drop_cluster2d`.
        clusters: :class:`~dropcluster.nn.Clusters` of (C, D, H, W) = x's.

    Returns:
        (N, C, D, H, W) tensor in x's dtype (with ``return_mask``, also the (N or 1, C, D, H,
        W) mask).

    Example::

        clusters = Clusters.fit(activations, 15)   # activations: (N, C, D, H, W)
        out = drop_cluster3d(x, 0.1, clusters)
    """
    return _drop_clusters(x, p, clusters, training, per_sample, generator, return_mask, 3)


def _drop_clusters(
    x: Tensor,
    p: float | Tensor,
    clusters: Clusters,
    training: bool,
    per_sample: bool,
    generator: torch.Generator | None,
    return_mask: bool,
    grid_dims: int,
) -> Tensor | tuple[Tensor, Tensor]:
    """The functional forms on a grid of ``grid_dims`` axes: checks, then the kernels."""
    if not isinstance(clusters, Clusters):
        raise TypeError(
            f"drop_cluster{grid_dims}d takes a Clusters as clusters (Clusters.fit(activations, "
            f"n_clusters), Clusters.from_labels(labels) or layer.clusters), but got "
            f"{type(clusters).__name__}"
        )
    check_tensor("input", x, grid_dims + 2, _layout(grid_dims, batch=True))
    if tuple(x.shape[1:]) != clusters.shape:
        hint = (
            f": clusters.resample({', '.join(str(size) for size in x.shape[2:])}) puts them on "
            f"the input's grid"
            if x.shape[1] == clusters.shape[0] and len(clusters.shape) == grid_dims + 1
            else ""
        )
        raise ValueError(
            f"the clusters fit {_layout(len(clusters.shape) - 1, batch=False)} = "
            f"{clusters.shape}, but the input has shape {tuple(x.shape)}{hint}"
        )
    if not isinstance(p, Tensor):
        check_drop_rate(p)
    device = x.device
    tables = ClusterTables(
        clusters.labels.to(device),
        clusters.counts.to(device),
        clusters.structured.to(device),
        clusters.sizes.to(device),
    )
    return apply_clusters(x, tables, p, training, per_sample, generator, return_mask)


class _DropClusterNd(DropRateModule):
    """The DropCluster layer on a grid of ``GRID_DIMS`` axes: :class:`DropCluster2d`'s
    behaviour, state and guarantees, written once for 1-, 2- and 3-D inputs."""

    labels: Tensor
    structured: Tensor
    cluster_counts: Tensor
    cluster_sizes: Tensor
    is_fitted: Tensor

    #: The buffers that hold the fitted clusters (all persistent).
    STATE = ("labels", "structured", "cluster_counts", "cluster_sizes", "is_fitted")
    #: Axes of the grid: 1 (L), 2 (H, W) or 3 (D, H, W); set by each layer class.
    GRID_DIMS = 2

    def __init__(
        self,
        p: float = 0.1,
        n_clusters: int = 15,
        *,
        input_shape: tuple[int, ...] | None = None,
        per_sample: bool = True,
        unstructured: str = "dead",
        identical_neighbours: str = "merge",
        max_rounds: int = 1000,
        sample_in_eval: bool = False,
        generator: torch.Generator | None = None,
        other_sizes: str = "refuse",
    ) -> None:
        super().__init__(p)
        check_modes(unstructured, identical_neighbours)
        self.other_sizes = check_choice("other_sizes", other_sizes, OTHER_SIZES)
        self.n_clusters = check_int("n_clusters", n_clusters, minimum=1)
        self.per_sample = per_sample
        self.unstructured = unstructured
        self.identical_neighbours = identical_neighbours
        self.max_rounds = max_rounds
        self.sample_in_eval = sample_in_eval
        self.generator = generator
        self._fitted = False
        # ClusterTables per input grid size: the fitted size's, and resampled ones.
        self._tables: dict[tuple[int, ...], ClusterTables] | None = None
        self._tables_key: tuple | None = None
        device = self.p.device
        empty = (0,) * (self.GRID_DIMS + 1)
        self.register_buffer("labels", torch.zeros(empty, dtype=torch.int64, device=device))
        self.register_buffer("structured", torch.zeros(0, dtype=torch.bool, device=device))
        self.register_buffer("cluster_counts", torch.zeros(0, dtype=torch.int64, device=device))
        self.register_buffer(
            "cluster_sizes", torch.zeros(0, self.n_clusters, dtype=torch.int64, device=device)
        )
        self.register_buffer("is_fitted", torch.zeros((), dtype=torch.bool, device=device))
        if input_shape is not None:
            self.materialize(input_shape)

    @property
    def _kind(self) -> str:
        """The layer's name in messages: DropCluster1d, DropCluster2d or DropCluster3d."""
        return f"DropCluster{self.GRID_DIMS}d"

    @property
    def fitted(self) -> bool:
        """True once clusters have been fitted or loaded."""
        return self._fitted

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """(C, H, W) the buffers are shaped for ((C, L) in 1-D, (C, D, H, W) in 3-D); None
        before the layer has seen its input."""
        return tuple(self.labels.shape) if self.labels.numel() else None

    @torch.no_grad()
    def materialize(self, input_shape: tuple[int, ...]) -> None:
        """Give the buffers their shapes for inputs of (C, H, W) = ``input_shape`` ((C, L) in
        1-D, (C, D, H, W) in 3-D), in place.

        Nothing happens when they have those shapes already. The tensors keep their identity
        (they are resized, not replaced), so references to them stay valid.

        Raises:
            ValueError: a shape of another rank, or the layer holds clusters fitted for another
                shape.
        """
        input_shape = self._check_shape(input_shape)
        if self.input_shape == input_shape:
            return
        if self._fitted:
            raise ValueError(
                f"{self._kind} holds clusters for {self._layout(False)} = {self.input_shape}, "
                f"not {input_shape}: call reset(input_shape={input_shape}) to forget them, then "
                f"fit again"
            )
        channels = input_shape[0]
        self._forget_tables()
        self.labels.resize_(input_shape).zero_()
        self.structured.resize_(channels).zero_()
        self.cluster_counts.resize_(channels).zero_()
        self.cluster_sizes.resize_(channels, self.n_clusters).zero_()

    @torch.no_grad()
    def fit(self, activations: Tensor, *, generator: torch.Generator | None = None):
        """Fit the clusters on a minibatch of this layer's input activations (Algorithm 1).

        Args:
            activations: (N, C, H, W), N >= 2 images ((N, C, L) in 1-D, (N, C, D, H, W) in
                3-D; use more than one training minibatch: the unstructured verdict of the
                paper's rule depends on the batch size).
            generator: random source for the ``"hopkins"`` rule.

        Returns:
            self. On invalid input (NaN, wrong rank, another (C, H, W) than the layer's, ...)
            a ``ValueError`` is raised and the previously fitted clusters are kept unchanged.
        """
        check_tensor("activations", activations, self.GRID_DIMS + 2, self._layout(True))
        shape = tuple(activations.shape[1:])
        if self._fitted and shape != self.input_shape:
            self.materialize(shape)  # raises: says how to change the shape
        result = rena(
            activations,
            self.n_clusters,
            max_rounds=self.max_rounds,
            unstructured=self.unstructured,
            identical_neighbours=self.identical_neighbours,
            generator=generator,
        )
        self.materialize(shape)
        tables = fixed_tables(
            result.labels, result.structured, result.n_found, result.sizes, self.n_clusters
        )
        self._write_tables(*tables)
        if not bool(tables[1].any()):
            warnings.warn(
                f"{self._kind} found no structured channel among the {shape[0]} channels of "
                f"its input under the {self.unstructured!r} rule (all-zero or constant "
                f"activations have none): the layer now zeroes every channel, in training and "
                f"in evaluation; fit it on real activations of the layer's input",
                stacklevel=3,  # the caller of fit, past torch.no_grad's wrapper
            )
        else:
            self._warn_if_nothing_dropped(tables[1], tables[2])
        return self

    def _warn_if_nothing_dropped(self, structured: Tensor, counts: Tensor) -> None:
        """floor(p n) is 0 in every structured channel: training would drop no cluster."""
        rate = float(self.p)
        most = int(counts[structured].max()) if bool(structured.any()) else 0
        if rate > 0 and math.floor(rate * most) == 0:
            warnings.warn(
                f"{self._kind} with p={rate:g} drops floor(p * n) = 0 clusters in every "
                f"structured channel (at most n = {most} clusters per channel): training at this "
                f"p drops nothing but the unstructured channels; raise p to at least "
                f"{1 / most:.3g} or n_clusters (a drop-rate schedule that raises p later is fine)",
                stacklevel=4,
            )

    @old_call_form(
        2,
        frozenset({"labels", "structured", "counts", "sizes"}),
        "layer.load_clusters(Clusters(labels, structured, counts, sizes))",
    )
    @torch.no_grad()
    def load_clusters(self, clusters: Clusters) -> None:
        """Write fitted clusters into the buffers, in place (the layer is then fitted).

        Raises:
            TypeError: ``clusters`` is not a :class:`~dropcluster.nn.Clusters` (0.3 took four
                tables: pass ``Clusters(labels, structured, counts, sizes)``).
            ValueError: clusters of another width than ``n_clusters``, of another grid rank, or
                of another (C, H, W) than a fitted layer's; the layer keeps what it had.
        """
        if not isinstance(clusters, Clusters):
            raise TypeError(
                "load_clusters takes one Clusters since dropcluster 0.4: pass "
                "Clusters(labels, structured, counts, sizes), not the tables themselves"
            )
        if clusters.n_clusters != self.n_clusters:
            raise ValueError(
                f"the clusters are {clusters.n_clusters} wide, this layer has n_clusters="
                f"{self.n_clusters}"
            )
        if len(clusters.shape) != self.GRID_DIMS + 1:
            raise ValueError(
                f"{self._kind} takes clusters of {self._layout(False)}, but got clusters of shape "
                f"{clusters.shape}"
            )
        self.materialize(clusters.shape)  # raises when fitted on another shape
        self._write_tables(clusters.labels, clusters.structured, clusters.counts, clusters.sizes)

    @property
    def clusters(self) -> Clusters | None:
        """The fitted clusters (views of the buffers), or None before the first fit."""
        if not self._fitted:
            return None
        return Clusters(self.labels, self.structured, self.cluster_counts, self.cluster_sizes)

    def _write_tables(
        self, labels: Tensor, structured: Tensor, counts: Tensor, sizes: Tensor
    ) -> None:
        self.labels.copy_(labels)
        self.structured.copy_(structured)
        self.cluster_counts.copy_(counts)
        self.cluster_sizes.copy_(sizes)
        self.is_fitted.fill_(True)
        self._fitted = True
        self._forget_tables()

    @torch.no_grad()
    def reset(self, input_shape: tuple[int, ...] | None = None) -> None:
        """Forget the fitted clusters: the layer becomes the identity again.

        The buffers keep their shapes (and identity), unless ``input_shape`` gives new ones.
        """
        for name in self.STATE:
            getattr(self, name).zero_()
        self._fitted = False
        self._forget_tables()
        if input_shape is not None:
            self.materialize(input_shape)

    def forward(self, x: Tensor) -> Tensor:
        # Under torch.compile a layer with its shapes goes one way whether fitted or not (the
        # is_fitted buffer decides inside the graph), so the first fit recompiles nothing.
        traced = (
            compiling()
            and self.labels.numel() > 0
            and self.n_clusters <= MAX_PACKED_CLUSTERS
            and not self.record_mask
        )
        if x.dim() != self.GRID_DIMS + 2:
            raise ValueError(
                f"{self._kind} takes {self._layout(True)} feature maps, but got input of shape "
                f"{tuple(x.shape)}: place it after a conv layer (or a module whose output is "
                f"a feature map)"
            )
        if not traced and not self._fitted:
            if self.labels.numel() == 0 and not compiling():
                self.materialize(tuple(x.shape[1:]))
            if self.sample_in_eval and not self.training and not compiling():
                self._warn_unfitted_sampling()
            self._remember(None)
            return x
        if tuple(x.shape[1:]) != tuple(self.labels.shape):
            self._check_other_size(x)
        sampling = self.training or self.sample_in_eval
        result = apply_clusters(
            x,
            self._cluster_tables(tuple(x.shape[2:])),
            self.p,
            sampling,
            self.per_sample,
            self.generator,
            self.record_mask,
            fitted=self.is_fitted if traced else None,
        )
        return self._unpack(result)

    def _warn_unfitted_sampling(self) -> None:
        # Unfitted, the layer is the identity. In evaluation that is what a fitted layer does
        # too, unless it samples in evaluation (Monte Carlo DropCluster): say it, once a layer.
        if not self.__dict__.get("_warned_unfitted", False):
            self._warned_unfitted = True
            warnings.warn(
                f"{self._kind}(sample_in_eval=True) is not fitted: in evaluation it returns its "
                "input unchanged instead of sampling masks; fit it first "
                "(dropcluster.nn.fit_clusters(model, data))",
                UserWarning,
                stacklevel=3,
            )

    def _check_other_size(self, x: Tensor) -> None:
        """Raise unless ``x``, whose (C, H, W) is not the clusters', may be resampled to."""
        fitted = tuple(self.labels.shape)
        problem = (
            f"{self._kind} holds clusters for {self._layout(False)} = {fitted} maps, but got "
            f"input of "
            f"shape {tuple(x.shape)}: refit it on activations of the new shape "
            f"(reset(input_shape=...), then fit)"
        )
        if x.shape[1] != fitted[0]:
            raise ValueError(problem)  # channels cannot be resampled
        if self.other_sizes == "refuse":
            raise ValueError(
                f"{problem}, or make the layer with other_sizes='resample' to resample its "
                f"labels to each input's ({', '.join(_AXES[self.GRID_DIMS])})"
            )

    def _cluster_tables(self, size: tuple[int, ...]) -> ClusterTables:
        """The tables for (H, W) = ``size`` inputs (any grid), rebuilt only when a buffer
        changed (a fit, a load, a move) or at a size not met since."""
        buffers = (self.labels, self.cluster_counts, self.structured, self.cluster_sizes)
        if compiling():
            # Traced into the graph, where these few small ops fuse.
            return _tables_at(buffers, size)
        if any(buffer.is_inference() for buffer in buffers):
            return _tables_at(buffers, size)  # inference tensors have no version counter
        # The layer's own writes (fit, load, reset, a move, a broadcast) drop the cache; the
        # key catches writes from outside: an in-place write bumps a tensor's version, an
        # assignment gives a new tensor (held by the key, so its memory cannot be reused).
        key = (buffers, tuple(buffer._version for buffer in buffers))
        if self._tables is None or not _same_key(self._tables_key, key):
            self._tables, self._tables_key = {}, key
        if size not in self._tables:
            if len(self._tables) >= _MAX_CACHED_SIZES:  # many sizes: keep memory bounded
                self._tables = {}
            self._tables[size] = _tables_at(buffers, size)
        return self._tables[size]

    def _forget_tables(self) -> None:
        self._tables, self._tables_key = None, None

    def _buffers_written(self) -> None:
        """The buffers were written from outside (a broadcast): re-read the fitted flag."""
        self._fitted = bool(self.is_fitted)
        self._forget_tables()

    def __getstate__(self):
        # Copies (deepcopy, pickling) rebuild the tables from their own buffers.
        return {**self.__dict__, "_tables": None, "_tables_key": None}

    def _apply(self, fn, recurse=True):
        self._forget_tables()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        if self._fitted:
            state = f"fitted on {self.input_shape}, {int(self.structured.sum())} structured"
        else:
            state = "not fitted: identity"
        return (
            f"p={float(self.p):g}, n_clusters={self.n_clusters}, per_sample={self.per_sample}, "
            f"unstructured={self.unstructured!r}, "
            + (f"other_sizes={self.other_sizes!r}, " if self.other_sizes != "refuse" else "")
            + state
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        self._check_loaded_p(state_dict, prefix)  # before anything of the layer changes
        keys = {name: prefix + name for name in self.STATE}
        present = [name for name, key in keys.items() if key in state_dict]
        if present:
            if "is_fitted" not in present and "labels" in present and self.GRID_DIMS == 2:
                # Only the 2-D layer existed in 0.1.
                own = tuple(getattr(self, name) for name in self.STATE[:4])
                legacy_dropcluster_state(state_dict, keys, own, self.n_clusters)
            self._check_loaded_shapes(state_dict, keys)
            self._check_loaded_tables(state_dict, keys)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if not present:
            # A state_dict without this layer (a pretrained backbone): nothing is missing, the
            # layer keeps what it has.
            for key in keys.values():
                if key in missing_keys:
                    missing_keys.remove(key)
        self._fitted = bool(self.is_fitted)
        self._forget_tables()

    def _check_loaded_shapes(self, state_dict, keys: dict[str, str]) -> None:
        labels = state_dict.get(keys["labels"])
        sizes = state_dict.get(keys["cluster_sizes"])
        if sizes is not None and sizes.dim() == 2 and sizes.shape[1] != self.n_clusters:
            raise ValueError(
                f"cannot load {keys['cluster_sizes']!r}: its clusters were fitted with "
                f"n_clusters={sizes.shape[1]}, this layer has n_clusters={self.n_clusters}"
            )
        if labels is None or labels.numel() == 0:
            return
        incoming = tuple(labels.shape)
        if labels.dim() != self.GRID_DIMS + 1:
            raise ValueError(
                f"cannot load {keys['labels']!r}: {self._kind} holds {self._layout(False)} "
                f"labels, but the state holds labels of shape {incoming}"
            )
        if self._fitted and incoming != self.input_shape:
            raise ValueError(
                f"cannot load {self._kind} clusters fitted on {self._layout(False)} = "
                f"{incoming} into a layer fitted on {self.input_shape}; call "
                f"reset(input_shape={incoming}) first"
            )
        # An unfitted layer takes the stored shapes (resized in place).
        self.materialize(incoming)

    def _check_loaded_tables(self, state_dict, keys: dict[str, str]) -> None:
        """Refuse fitted tables that are not what a fit makes (a label past its channel's
        clusters would silently zero those pixels at every step), naming the key."""
        fitted = state_dict.get(keys["is_fitted"])
        if fitted is None or not bool(fitted) or any(keys[n] not in state_dict for n in self.STATE):
            return
        tables = [
            state_dict[keys[name]]
            for name in ("labels", "structured", "cluster_counts", "cluster_sizes")
        ]
        try:
            check_tables(
                *tables,
                self.n_clusters,
                names={n: repr(keys[n]) for n in self.STATE},
                grid_dims=self.GRID_DIMS,
            )
        except ValueError as error:
            raise ValueError(f"cannot load {self._kind} state: {error}") from None

    def _layout(self, batch: bool) -> str:
        """``"(N, C, H, W)"`` (``batch``) or ``"(C, H, W)"`` for this layer's grid."""
        return _layout(self.GRID_DIMS, batch)

    def _check_shape(self, shape) -> tuple[int, ...]:
        layout = self._layout(False)
        if not isinstance(shape, (tuple, list)) or len(shape) != self.GRID_DIMS + 1:
            raise ValueError(f"input_shape should be {layout}, but got {shape!r}")
        return tuple(check_int("input_shape entries", size, minimum=1) for size in shape)


class DropCluster2d(_DropClusterNd):
    """DropCluster as a layer: fit clusters with :meth:`fit`, then use it like a dropout layer.

    Before the first :meth:`fit` the layer is the identity (its repr says "not fitted"). The
    fitted clusters live in buffers, so ``state_dict()`` carries them and a loaded model
    predicts identically:

    - ``labels`` (C, H, W) int64: the cluster of each pixel (0 in unstructured channels);
    - ``structured`` (C,) bool: the channels DropCluster clusters, the others are masked;
    - ``cluster_counts`` (C,) int64: clusters of each structured channel (0 for the others);
    - ``cluster_sizes`` (C, n_clusters) int64: pixels per cluster;
    - ``is_fitted`` () bool.

    The buffers get their final shapes once, when the layer learns its input's (C, H, W): from
    ``input_shape``, or at the first forward pass or fit. Every refit then writes them in place,
    so references to them (an EMA copy of the model, DistributedDataParallel's buffer list, an
    optimizer's state) stay valid and every process holds the same shapes. Input of another
    (H, W) than the fitted one is refused, unless ``other_sizes="resample"``. A channel that ReNA
    leaves with more than ``n_clusters`` clusters is unstructured (the paper's rule for
    channels where ReNA does not converge), so the tables are ``n_clusters`` wide whatever the
    rule. An unfitted layer loads a ``state_dict`` that lacks its keys (a pretrained model's)
    and stays the identity. The drop rate ``p`` is a non-persistent buffer: it is a setting
    (see :mod:`dropcluster.nn.schedule`), not state.

    Args:
        p: fraction of each structured channel's clusters dropped per step, in [0, 1)
            (``floor(p * n)`` clusters).
        n_clusters: clusters per channel fitted by ReNA (paper: 15).
        input_shape: (C, H, W) of the layer's input, to give the buffers their shapes now
            (before a model copy or a DDP wrapper is made); None: at the first forward or fit.
        per_sample: each image draws its own clusters (default), like every dropout layer in
            torch, so the images of a batch see different perturbations and the gradient
            averages over them; ``False`` shares one draw across the batch, as in the paper
            (Algorithm 2, line 12), which is also faster (one small mask instead of N).
        unstructured: rule for unstructured channels passed to :func:`dropcluster.rena.rena`
            (default ``"dead"``; the paper's rule is ``"rena"``).
        identical_neighbours: passed to :func:`dropcluster.rena.rena` (default ``"merge"``).
        max_rounds: ReNA rounds (paper: 1000).
        sample_in_eval: keep dropping clusters in evaluation (Monte Carlo DropCluster, for
            uncertainty estimates); default False.
        generator: random source for the cluster draws (on the input's device); None: torch's
            global generator, as ``nn.Dropout`` (each process of a DDP run draws its own).
        other_sizes: what a fitted layer does with input of another (H, W) than its clusters'
            (evaluation at another resolution, multi-scale training): ``"refuse"`` (default)
            raises; ``"resample"`` resamples each channel's labels to the input's grid by
            nearest neighbour, as ``F.interpolate(mode="nearest")`` maps positions, and keeps
            the fitted cluster counts (see :meth:`~dropcluster.nn.Clusters.resample`). The
            buffers stay at the fitted size (``state_dict`` is unchanged) and refits take
            activations of that size; another channel count is always refused.

    Shape:
        input (N, C, H, W) -> output (N, C, H, W), any float dtype and memory format; (H, W)
        that of the clusters, or any with ``other_sizes="resample"``.
    """

    GRID_DIMS = 2


class DropCluster1d(_DropClusterNd):
    """DropCluster for (N, C, L) sequences: :class:`DropCluster2d` on a grid of one axis.

    The paper is 2-D; this layer is this project's extension. It fits clusters with ReNA on
    (N, C, L) activations (each site joined to its 2 neighbours, so every cluster is a run of
    consecutive sites) and drops ``floor(p * n)`` of each structured channel's ``n`` clusters
    per step, zeroes the unstructured channels in training and in evaluation, and rescales by
    ``count(M) / count_ones(M)``, exactly as the 2-D layer. Arguments, buffers (``labels`` is
    (C, L)), state loading, refits, :func:`~dropcluster.nn.fit_clusters`, distributed fits and
    torch.compile behave as :class:`DropCluster2d`'s; ``input_shape`` is (C, L), and
    ``other_sizes="resample"`` resamples the labels to another L by nearest neighbour.

    Shape:
        input (N, C, L) -> output (N, C, L), any float dtype.
    """

    GRID_DIMS = 1


class DropCluster3d(_DropClusterNd):
    """DropCluster for (N, C, D, H, W) volumes: :class:`DropCluster2d` on a grid of three axes.

    The paper is 2-D; this layer is this project's extension. It fits clusters with ReNA on
    (N, C, D, H, W) activations (each voxel joined to its 6 face neighbours) and drops
    ``floor(p * n)`` of each structured channel's ``n`` clusters per step, zeroes the
    unstructured channels in training and in evaluation, and rescales by ``count(M) /
    count_ones(M)``, exactly as the 2-D layer. Arguments, buffers (``labels`` is (C, D, H, W)),
    state loading, refits, :func:`~dropcluster.nn.fit_clusters`, distributed fits and
    torch.compile behave as :class:`DropCluster2d`'s; ``input_shape`` is (C, D, H, W), and
    ``other_sizes="resample"`` resamples the labels to another (D, H, W) by nearest neighbour.

    Shape:
        input (N, C, D, H, W) -> output (N, C, D, H, W), any float dtype and memory format
        (channels_last_3d included).
    """

    GRID_DIMS = 3


#: The DropCluster layer classes, 1-, 2- and 3-D: what :func:`~dropcluster.nn.fit_clusters`
#: fits (``isinstance(module, DROPCLUSTER_LAYERS)``).
DROPCLUSTER_LAYERS = (DropCluster1d, DropCluster2d, DropCluster3d)


#: Input sizes whose tables a layer keeps at once (each holds, on the CPU, a one-hot of the
#: labels at that size).
_MAX_CACHED_SIZES = 8


def _tables_at(buffers: tuple[Tensor, Tensor, Tensor, Tensor], size) -> ClusterTables:
    """ClusterTables of the (labels, counts, structured, sizes) buffers for (H, W) = ``size``
    inputs: the buffers themselves at the fitted size, else the labels resampled to ``size``
    (nearest) with the fitted counts and the sizes counted on the new grid."""
    labels, counts, structured, sizes = buffers
    if tuple(labels.shape[1:]) != tuple(size):
        labels = resample_labels(labels, *size)
        sizes = cluster_sizes(labels, sizes.shape[1]) * structured.unsqueeze(1)
    return ClusterTables(labels, counts, structured, sizes)


def _same_key(cached: tuple | None, key: tuple) -> bool:
    """Whether two (buffers, versions) keys name the same tensors at the same versions."""
    if cached is None:
        return False
    buffers, versions = key
    return versions == cached[1] and all(a is b for a, b in zip(cached[0], buffers, strict=True))
