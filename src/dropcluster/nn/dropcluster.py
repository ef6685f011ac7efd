"""DropCluster: drop random clusters of correlated pixels in each channel (paper, Algorithms 1-2).

Clusters are fitted offline from a minibatch of the layer's input activations with
:func:`dropcluster.rena.rena` (Algorithm 1) and kept in buffers. Every training step then drops
``floor(p * n)`` randomly chosen clusters in each structured channel (``n`` clusters in that
channel, 15 in the paper), zeroes the unstructured channels, and rescales by
``count(M) / count_ones(M)`` (Algorithm 2). In evaluation only the unstructured channels are
zeroed, with the same rescaling rule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dropcluster.nn._drop_rate import DropRateModule, check_drop_rate, uniform
from dropcluster.rena import check_modes, rena
from dropcluster.validation import check_int, check_tensor

# floor(p * n) with p stored in float32: 0.7 is 0.69999999 there and 0.7 * 10 would floor to
# 6. This relative slack restores the value intended in decimal for any n below 10**5.
_FLOOR_SLACK = 1e-6


def drop_cluster2d(
    x: Tensor,
    labels: Tensor,
    n_clusters: int | Tensor,
    p: float | Tensor,
    structured: Tensor,
    training: bool = True,
    per_sample: bool = True,
    generator: torch.Generator | None = None,
    *,
    cluster_sizes: Tensor | None = None,
    return_mask: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Apply DropCluster with given clusters (paper, Algorithm 2).

    Args:
        x: (N, C, H, W) activations, any float dtype, any memory format.
        labels: (C, H, W) integer (int64 best) cluster of each pixel, >= 0; in structured
            channels the labels lie in ``[0, n_clusters[c])``, and in every channel below the
            number of columns of ``cluster_sizes`` when it is given. Checked with one min/max
            pass (the module skips it: its labels come from its own fit).
        n_clusters: clusters per channel: an int for all channels, or a (C,) int64 tensor
            (``ReNAResult.n_found``). ``floor(p * n_clusters[c])`` clusters are dropped in
            channel c.
        p: drop rate in [0, 1), a float or a 0-d tensor (kept as a tensor: no host sync).
        structured: (C,) bool; the other channels are zeroed in training and evaluation.
        training: drop clusters (True) or only mask unstructured channels (False).
        per_sample: each image draws its own clusters (True), or one draw is shared by the
            whole batch, as in the paper (False).
        generator: random source; must live on x's device.
        cluster_sizes: (C, K) int64 pixels per cluster, K >= max cluster count (computed from
            ``labels`` when omitted; the module passes its stored sizes).
        return_mask: also return the applied 0/1 mask, before rescaling.

    Returns:
        (N, C, H, W) tensor in x's dtype: ``x * M * count(M) / count_ones(M)``, with M the
        (C, H, W) mask (per image when ``per_sample``). With ``return_mask``, also M as a
        (N or 1, C, H, W) tensor in x's dtype.

    Raises:
        ValueError: a shape, dtype or label value that does not fit the description above.
    """
    check_tensor("input", x, 4, "(N, C, H, W)")
    if labels.dim() != 3 or tuple(labels.shape) != tuple(x.shape[1:]):
        raise ValueError(
            f"labels should have shape (C, H, W) = {tuple(x.shape[1:])} to match the input, "
            f"but got {tuple(labels.shape)}"
        )
    if structured.shape != (x.shape[1],) or structured.dtype != torch.bool:
        raise ValueError(
            f"structured should be a ({x.shape[1]},) bool tensor, but got "
            f"{tuple(structured.shape)} {structured.dtype}"
        )
    if not isinstance(p, Tensor):
        check_drop_rate(p)
    n_channels = x.shape[1]
    counts = _cluster_counts(n_clusters, n_channels, x.device)
    if cluster_sizes is not None and (
        cluster_sizes.dim() != 2 or cluster_sizes.shape[0] != n_channels
    ):
        raise ValueError(
            f"cluster_sizes should have shape (C, K) with C = {n_channels}, but got "
            f"{tuple(cluster_sizes.shape)}"
        )
    labels = _checked_labels(labels, counts, structured, cluster_sizes)
    if cluster_sizes is None:
        cluster_sizes = _sizes_of_clusters(labels, counts, x.device)
    return _DropClusterFunction.apply(
        x, labels, counts, p, structured, cluster_sizes, training, per_sample, generator,
        return_mask,
    )  # fmt: skip


def _cluster_counts(n_clusters: int | Tensor, n_channels: int, device: torch.device) -> Tensor:
    """``n_clusters`` (an int >= 1 or a (C,) integer tensor) as (C,) int64 on ``device``."""
    if not isinstance(n_clusters, Tensor):
        check_int("n_clusters", n_clusters, minimum=1)
        return torch.full((n_channels,), n_clusters, dtype=torch.int64, device=device)
    integer = not (n_clusters.is_floating_point() or n_clusters.is_complex())
    if n_clusters.shape != (n_channels,) or not integer or n_clusters.dtype == torch.bool:
        raise ValueError(
            f"n_clusters should be an int or a ({n_channels},) integer tensor, but got "
            f"shape {tuple(n_clusters.shape)} {n_clusters.dtype}"
        )
    return n_clusters.to(device=device, dtype=torch.int64)


def _sizes_of_clusters(labels: Tensor, counts: Tensor, device: torch.device) -> Tensor:
    """(C, K) int64 pixels per cluster of the (C, H, W) int64 ``labels``, K >= every count."""
    n_channels = labels.shape[0]
    n_columns = max(int(counts.max()), int(labels.max()) + 1) if n_channels else 1
    sizes = torch.zeros(n_channels, n_columns, dtype=torch.int64, device=device)
    flat_labels = labels.reshape(n_channels, -1).to(device)
    return sizes.scatter_add_(1, flat_labels, torch.ones_like(flat_labels))


def _checked_labels(
    labels: Tensor, counts: Tensor, structured: Tensor, cluster_sizes: Tensor | None
) -> Tensor:
    """``labels`` as int64 after checking its values with one min/max pass (functional only).

    Every label must be >= 0; in a structured channel c it must be below ``counts[c]`` (a label
    past the channel's clusters would silently zero its pixels), and in every channel below the
    number of columns of ``cluster_sizes`` when given (an index error otherwise). Unstructured
    channels are zeroed, so their labels may exceed their count (``ReNAResult`` can give that).
    """
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels should hold integer cluster ids, but got dtype {labels.dtype}")
    labels = labels.long()
    n_channels = labels.shape[0]
    if labels.numel() == 0:
        return labels
    smallest, largest = torch.aminmax(labels.reshape(n_channels, -1), dim=1)
    smallest, largest = smallest.to(counts.device), largest.to(counts.device)
    no_limit = torch.iinfo(torch.int64).max
    limit = torch.where(structured.to(counts.device), counts, no_limit)
    if cluster_sizes is not None:
        limit = limit.clamp(max=cluster_sizes.shape[1])
    bad = (smallest < 0) | (largest >= limit)
    if bool(bad.any()):
        c = int(bad.nonzero()[0])
        bound = int(limit[c])
        if bound == no_limit:
            expected = "be >= 0"
        elif bool(structured[c]) and bound == int(counts[c]):
            expected = f"lie in [0, n_clusters[{c}]) = [0, {bound}) (a structured channel)"
        else:
            expected = f"lie in [0, {bound}), the columns of cluster_sizes"
        raise ValueError(
            f"labels of channel {c} should {expected}, but range from {int(smallest[c])} to "
            f"{int(largest[c])}"
        )
    return labels


def _cluster_multipliers(
    x: Tensor,
    counts: Tensor,
    p: float | Tensor,
    structured: Tensor,
    cluster_sizes: Tensor,
    training: bool,
    per_sample: bool,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Per-cluster keep flags (B, C, K) float32 and per-image scales (B, 1, 1), B = N or 1."""
    n_samples, n_channels, height, width = x.shape
    n_columns = cluster_sizes.shape[1]
    draws = n_samples if per_sample else 1
    device = x.device
    column = torch.arange(n_columns, device=device)
    exists = column < counts.unsqueeze(1)  # (C, K)
    keep = exists & structured.unsqueeze(1)
    keep = keep.unsqueeze(0).expand(draws, n_channels, n_columns)
    if training:
        p_value = p if isinstance(p, Tensor) else torch.tensor(p)
        p_value = p_value.to(device=device, dtype=torch.float64)
        n_drop = torch.floor(p_value * counts.double() * (1 + _FLOOR_SLACK)).long()  # (C,)
        # float64 scores: a tie between two clusters (which could drop one cluster too many)
        # has probability ~1e-14 per draw, against ~1e-5 with float32's 24-bit grid.
        scores = uniform((draws, n_channels, n_columns), generator, device, torch.float64)
        # Clusters that do not exist sort last and are never drawn.
        scores = scores.masked_fill_(~exists, 2.0)
        # The n_drop smallest scores of each channel are the dropped clusters.
        last_dropped = (n_drop - 1).clamp(min=0).view(1, n_channels, 1).expand(draws, -1, 1)
        threshold = scores.sort(dim=2).values.gather(2, last_dropped)
        dropped = (scores <= threshold) & (n_drop > 0).view(1, n_channels, 1)
        keep = keep & ~dropped
    keep = keep.to(torch.float32)
    kept_pixels = (keep * cluster_sizes.to(torch.float32)).sum(dim=(1, 2))
    total = float(n_channels * height * width)
    # All-dropped masks give zero output, not 0/0.
    scale = total / kept_pixels.clamp(min=1.0)
    return keep, scale.view(draws, 1, 1)


class _DropClusterFunction(torch.autograd.Function):
    """x * multiplier with the multiplier gathered from a per-cluster table in one pass."""

    @staticmethod
    def forward(
        ctx, x, labels, counts, p, structured, cluster_sizes, training, per_sample, generator,
        return_mask,
    ):  # fmt: skip
        with torch.no_grad():
            keep, scale = _cluster_multipliers(
                x, counts, p, structured, cluster_sizes, training, per_sample, generator
            )
            table = (keep * scale).to(x.dtype)
            multiplier = _expand_clusters(table, labels, x)
            out = x * multiplier
        ctx.save_for_backward(multiplier)
        if return_mask:
            mask = _expand_clusters(keep.to(x.dtype), labels, x)
            ctx.mark_non_differentiable(mask)
            return out, mask
        return out

    @staticmethod
    def backward(ctx, grad_out, *unused):
        (multiplier,) = ctx.saved_tensors
        return grad_out * multiplier, None, None, None, None, None, None, None, None, None


def _expand_clusters(table: Tensor, labels: Tensor, like: Tensor) -> Tensor:
    """(B, C, K) per-cluster values -> (B, C, H, W) per-pixel values, in ``like``'s layout."""
    draws, n_channels, _ = table.shape
    height, width = labels.shape[1:]
    labels = labels.to(like.device)
    if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last) and n_channels > 1:
        # Gather straight into (B, H, W, C) order so the product with x stays channels_last.
        index = labels.reshape(n_channels, -1).t().unsqueeze(0).expand(draws, -1, -1)
        values = table.transpose(1, 2).gather(1, index)  # (B, H*W, C)
        return values.view(draws, height, width, n_channels).permute(0, 3, 1, 2)
    index = labels.reshape(1, n_channels, -1).expand(draws, -1, -1)
    return table.gather(2, index).view(draws, n_channels, height, width)


class DropCluster2d(DropRateModule):
    """DropCluster as a layer: fit clusters with :meth:`fit`, then use it like a dropout layer.

    Before the first :meth:`fit` the layer is the identity (its repr says "not fitted"). The
    fitted clusters live in buffers (``labels``, ``structured``, ``cluster_counts``,
    ``cluster_sizes``), so ``state_dict()`` carries them and a loaded model predicts
    identically. The drop rate is the 0-d buffer ``p`` (see :mod:`dropcluster.nn.schedule`).

    Args:
        p: fraction of each structured channel's clusters dropped per step, in [0, 1)
            (``floor(p * n)`` clusters).
        n_clusters: clusters per channel fitted by ReNA (paper: 15).
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
        generator: random source for the cluster draws (on the input's device).

    Shape:
        input (N, C, H, W) -> output (N, C, H, W), any float dtype and memory format.
    """

    labels: Tensor
    structured: Tensor
    cluster_counts: Tensor
    cluster_sizes: Tensor

    def __init__(
        self,
        p: float = 0.1,
        n_clusters: int = 15,
        *,
        per_sample: bool = True,
        unstructured: str = "dead",
        identical_neighbours: str = "merge",
        max_rounds: int = 1000,
        sample_in_eval: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(p)
        check_modes(unstructured, identical_neighbours)
        self.n_clusters = check_int("n_clusters", n_clusters, minimum=1)
        self.per_sample = per_sample
        self.unstructured = unstructured
        self.identical_neighbours = identical_neighbours
        self.max_rounds = max_rounds
        self.sample_in_eval = sample_in_eval
        self.generator = generator
        self.reset()

    @property
    def fitted(self) -> bool:
        """True once clusters have been fitted or loaded."""
        return self.labels.numel() > 0

    @torch.no_grad()
    def fit(self, activations: Tensor, *, generator: torch.Generator | None = None):
        """Fit the clusters on a minibatch of this layer's input activations (Algorithm 1).

        Args:
            activations: (N, C, H, W), N >= 2 images (use more than one training minibatch:
                the unstructured verdict of the paper's rule depends on the batch size).
            generator: random source for the ``"hopkins"`` rule.

        Returns:
            self. On invalid input (NaN, wrong rank, ...) a ``ValueError`` is raised and the
            previously fitted clusters are kept unchanged.
        """
        result = rena(
            activations,
            self.n_clusters,
            max_rounds=self.max_rounds,
            unstructured=self.unstructured,
            identical_neighbours=self.identical_neighbours,
            generator=generator,
        )
        device = self.p.device
        self._set_clusters(
            result.labels.to(device),
            result.structured.to(device),
            result.n_found.to(device),
            result.sizes.to(device),
        )
        return self

    def reset(self) -> None:
        """Forget the fitted clusters: the layer becomes the identity again."""
        self._set_clusters(
            torch.zeros(0, 0, 0, dtype=torch.int64, device=self.p.device),
            torch.zeros(0, dtype=torch.bool, device=self.p.device),
            torch.zeros(0, dtype=torch.int64, device=self.p.device),
            torch.zeros(0, 0, dtype=torch.int64, device=self.p.device),
        )

    def forward(self, x: Tensor) -> Tensor:
        if not self.fitted:
            self._remember(None)
            return x
        if x.dim() != 4 or tuple(x.shape[1:]) != tuple(self.labels.shape):
            raise ValueError(
                f"DropCluster2d was fitted on (C, H, W) = {tuple(self.labels.shape)} maps, but "
                f"got input of shape {tuple(x.shape)}"
            )
        sampling = self.training or self.sample_in_eval
        result = _DropClusterFunction.apply(
            x, self.labels, self.cluster_counts, self.p, self.structured, self.cluster_sizes,
            sampling, self.per_sample, self.generator, self.record_mask,
        )  # fmt: skip
        return self._unpack(result)

    def extra_repr(self) -> str:
        state = (
            f"fitted on {tuple(self.labels.shape)}, {int(self.structured.sum())} structured"
            if self.fitted
            else "not fitted: identity"
        )
        return (
            f"p={float(self.p):g}, n_clusters={self.n_clusters}, per_sample={self.per_sample}, "
            f"unstructured={self.unstructured!r}, {state}"
        )

    def _set_clusters(self, labels, structured, counts, sizes) -> None:
        self.register_buffer("labels", labels)
        self.register_buffer("structured", structured)
        self.register_buffer("cluster_counts", counts)
        self.register_buffer("cluster_sizes", sizes)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, *args):
        # Before the cluster buffers are resized below, so a refused p leaves the layer intact.
        self._check_loaded_p(state_dict, prefix)
        incoming = state_dict.get(prefix + "labels")
        if incoming is not None:
            incoming_shape = tuple(incoming.shape)
            if self.fitted and incoming.numel() > 0 and incoming_shape != tuple(self.labels.shape):
                raise ValueError(
                    f"cannot load DropCluster2d clusters fitted on (C, H, W) = {incoming_shape} "
                    f"into a layer fitted on {tuple(self.labels.shape)}; call reset() first to "
                    f"replace them"
                )
            # An unfitted layer (or a matching one) takes the stored shapes as they are.
            for name in ("labels", "structured", "cluster_counts", "cluster_sizes"):
                stored = state_dict.get(prefix + name)
                if stored is not None:
                    setattr(self, name, torch.empty_like(stored, device=self.p.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, *args)
