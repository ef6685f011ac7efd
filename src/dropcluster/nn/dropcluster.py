"""DropCluster: drop random clusters of correlated pixels in each channel (paper, Algorithms 1-2).

Clusters are fitted offline from a minibatch of the layer's input activations with
:func:`dropcluster.rena.rena` (Algorithm 1) and kept in buffers. Every training step then drops
``floor(p * n)`` randomly chosen clusters in each structured channel (``n`` clusters in that
channel, 15 in the paper), zeroes the unstructured channels, and rescales by
``count(M) / count_ones(M)`` (Algorithm 2). In evaluation only the unstructured channels are
zeroed, with the same rescaling rule.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

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
    tables = _ClusterTables(labels.to(x.device), counts, structured, cluster_sizes.to(x.device))
    return _apply_clusters(x, tables, p, training, per_sample, generator, return_mask)


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


class _ClusterTables:
    """What a step needs of the fitted clusters, computed once per fit (not once per step).

    Attributes:
        labels: (C, H, W) int64 cluster of each pixel.
        keepable: (C, K) bool, the clusters that exist in structured channels.
        drawn: (C,) bool, the channels with a keepable cluster.
        missing: (C, K) float64, 0 for clusters that exist and 2 for the others (added to the
            random scores of the sorting sampler so that missing clusters sort last).
        sizes: (C, K) float32 pixels per cluster.
        counts: (C,) int64 clusters per channel.
        packable: K <= :data:`_MAX_PACKED_CLUSTERS`: a channel's clusters fit the bits of one
            int64.
        keepable_bits: (C,) int64, bit k set when cluster k is keepable (packable tables).
        kept_total: () float32, the pixels kept when nothing is dropped.
        onehots: dtype -> (C, K, H * W) one-hot of the labels in that dtype; built on first use
            by the CPU's matrix-product expansion (see :func:`_expand_clusters`).
    """

    def __init__(self, labels: Tensor, counts: Tensor, structured: Tensor, cluster_sizes: Tensor):
        device = cluster_sizes.device
        n_columns = cluster_sizes.shape[1]
        column = torch.arange(n_columns, device=device)
        self.counts = counts.to(device=device, dtype=torch.int64)
        exists = column < self.counts.unsqueeze(1)  # (C, K)
        self.keepable = exists & structured.to(device).unsqueeze(1)
        self.drawn = self.keepable.any(dim=1)  # (C,) channels whose clusters are drawn from
        self.missing = (~exists).to(torch.float64) * 2.0
        self.sizes = cluster_sizes.to(torch.float32)
        self.kept_total = (self.keepable * self.sizes).sum()
        self.packable = n_columns <= _MAX_PACKED_CLUSTERS
        self.keepable_bits = (self.keepable.long() << column).sum(dim=1) if self.packable else None
        self.labels = labels
        self.onehots: dict[torch.dtype, Tensor] = {}

    def onehot_of_labels(self, dtype: torch.dtype) -> Tensor:
        """(C, K, H * W) one-hot of the labels in ``dtype``, built once per dtype (3.75 MiB in
        float32 for C = 64, K = 15, 32 x 32 maps: 7.5 times the labels)."""
        if dtype not in self.onehots:
            n_channels, n_columns = self.sizes.shape
            flat = self.labels.reshape(n_channels, 1, -1)
            column = torch.arange(n_columns, device=flat.device).view(1, -1, 1)
            self.onehots[dtype] = (flat == column).to(dtype)
        return self.onehots[dtype]


#: Up to this many clusters per channel, a draw is packed as bits (one int64 per image and
#: channel): the sampler draws only the dropped clusters, and under torch.compile the expansion
#: is a shift and a mask, no gather.
_MAX_PACKED_CLUSTERS = 62


@dataclass
class _Draw:
    """The kept clusters of B draws (B = N, or 1 for a shared mask or in evaluation).

    Attributes:
        bits: (B, C) int64, bit k set when cluster k is kept; None when not packed.
        keep: (B or 1, C, K) bool kept clusters; None when packed (see :meth:`keep_flags`).
        scale: (B,) float32 count(M) / count_ones(M) per draw.
    """

    bits: Tensor | None
    keep: Tensor | None
    scale: Tensor

    def keep_flags(self, n_columns: int) -> Tensor:
        """(B, C, K) bool kept clusters."""
        if self.keep is not None:
            return self.keep
        column = torch.arange(n_columns, device=self.bits.device)
        return ((self.bits.unsqueeze(2) >> column) & 1).bool()


def _drop_counts(p: float | Tensor, tables: _ClusterTables) -> Tensor:
    """(C,) int64 clusters dropped per channel: floor(p * n) in structured channels, else 0."""
    p_value = p if isinstance(p, Tensor) else torch.tensor(p)
    p_value = p_value.to(device=tables.counts.device, dtype=torch.float64)
    n_drop = torch.floor(p_value * tables.counts.double() * (1 + _FLOOR_SLACK)).long()
    return n_drop * tables.drawn


def _draw_clusters(
    shape: torch.Size,
    tables: _ClusterTables,
    p: float | Tensor,
    training: bool,
    per_sample: bool,
    generator: torch.Generator | None,
) -> _Draw:
    """Which clusters each image keeps, and its scale (Algorithm 2, lines 12-16)."""
    n_samples, n_channels, height, width = shape
    total = float(n_channels * height * width)
    if not training:  # nothing drawn: every image keeps the same clusters
        bits = tables.keepable_bits.unsqueeze(0) if tables.packable else None
        keep = None if tables.packable else tables.keepable.unsqueeze(0)
        kept = tables.kept_total.view(1)
    else:
        draws = n_samples if per_sample else 1
        n_drop = _drop_counts(p, tables)
        device = tables.sizes.device
        compiling = _compiling()
        if tables.packable and (compiling or device.type == "cpu"):
            # Under compile the loop has a fixed length, enough for any p (p is a buffer: a
            # length read from it would recompile at every new rate), and fuses into one
            # kernel; eagerly on the CPU its length is read from memory, no synchronisation.
            steps = tables.sizes.shape[1] if compiling else int(n_drop.max())
            dropped, dropped_pixels = _dropped_by_floyd(draws, tables, n_drop, steps, generator)
            bits, keep = tables.keepable_bits & ~dropped, None
            kept = tables.kept_total - dropped_pixels.sum(dim=1)
        else:
            dropped = _dropped_by_sorting(draws, tables, n_drop, generator)
            bits, keep = None, tables.keepable & ~dropped
            kept = (keep * tables.sizes).sum(dim=(1, 2))
    # All-dropped masks give zero output, not 0/0 (nor C * H * W, which overflows float16).
    return _Draw(bits, keep, torch.where(kept > 0, total / kept.clamp(min=1.0), 0.0))


def _dropped_by_floyd(
    draws: int,
    tables: _ClusterTables,
    n_drop: Tensor,
    steps: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """``n_drop[c]`` distinct clusters of the ``counts[c]`` of each channel, uniformly.

    Floyd's algorithm, one row per (draw, channel): for j = n - m, ..., n - 1 draw t uniformly
    in [0, j] and take t, or j when t is taken already; every m-subset is equally likely. It
    takes ``steps`` >= max(m) steps of one random number per row (steps past a row's m change
    nothing), where sorting draws K per row.

    Returns:
        (B, C) int64 with bit k set when cluster k is dropped, and (B, C) float32 pixels dropped.
    """
    n_channels, n_columns = tables.sizes.shape
    device = tables.sizes.device
    counts = tables.counts.unsqueeze(0)
    n_drop = n_drop.unsqueeze(0)
    dropped = torch.zeros(draws, n_channels, dtype=torch.int64, device=device)
    dropped_pixels = torch.zeros(draws, n_channels, dtype=torch.float32, device=device)
    sizes = tables.sizes.unsqueeze(0).expand(draws, -1, -1)
    for step in range(steps):
        active = step < n_drop  # (1, C)
        last = (counts - n_drop + step).clamp(0, n_columns - 1)  # j
        # float64: u * (j + 1) stays below j + 1 (float32 could round up to it).
        candidate = uniform((draws, n_channels), generator, device, torch.float64) * (last + 1)
        candidate = candidate.long().clamp(max=last)  # t
        taken = ((dropped >> candidate) & 1).bool()
        chosen = torch.where(taken, last, candidate)
        dropped = dropped | torch.where(active, 1 << chosen, 0)
        chosen_pixels = sizes.gather(2, chosen.unsqueeze(2)).squeeze(2)
        dropped_pixels = dropped_pixels + torch.where(active, chosen_pixels, 0.0)
    return dropped, dropped_pixels


def _dropped_by_sorting(
    draws: int, tables: _ClusterTables, n_drop: Tensor, generator: torch.Generator | None
) -> Tensor:
    """(B, C, K) bool: the ``n_drop[c]`` clusters with the smallest random scores per channel.

    The sampler of eager accelerators (a fixed handful of kernels, no host synchronisation) and
    of tables too wide to pack.
    """
    n_channels, n_columns = tables.sizes.shape
    # float64 scores: a tie between two clusters (which could drop one cluster too many) has
    # probability ~1e-14 per draw, against ~1e-5 with float32's 24-bit grid.
    scores = uniform((draws, n_channels, n_columns), generator, tables.sizes.device,
                     torch.float64)  # fmt: skip
    scores = scores + tables.missing  # clusters that do not exist sort last
    last_dropped = (n_drop - 1).clamp(min=0).view(1, n_channels, 1).expand(draws, -1, 1)
    threshold = scores.sort(dim=2).values.gather(2, last_dropped)
    return (scores <= threshold) & (n_drop > 0).view(1, n_channels, 1)


def _apply_clusters(
    x: Tensor,
    tables: _ClusterTables,
    p: float | Tensor,
    training: bool,
    per_sample: bool,
    generator: torch.Generator | None,
    return_mask: bool,
    fitted: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """x * M * count(M) / count_ones(M) for the clusters in ``tables`` (checked inputs).

    ``fitted``: a 0-d bool tensor; where False the output is x itself (every bit kept, scale
    1), for the compiled path of a layer not fitted yet. Packed tables only.
    """
    n_columns = tables.sizes.shape[1]
    with torch.no_grad():
        draw = _draw_clusters(x.shape, tables, p, training, per_sample, generator)
        scale = draw.scale.to(x.dtype)
        if fitted is not None:
            draw = replace(draw, bits=torch.where(fitted, draw.bits, -1))  # -1: every bit set
            scale = torch.where(fitted, scale, 1.0)
    if _compiling() and draw.bits is not None:
        out = _PackedMultiply.apply(x, draw.bits, scale, tables.labels)
    else:
        with torch.no_grad():
            table = draw.keep_flags(n_columns).to(x.dtype) * scale.view(-1, 1, 1)
        onehot = tables.onehot_of_labels(table.dtype) if _use_product(x, table) else None
        out = _ClusterMultiply.apply(x, table, tables.labels, onehot)
    if return_mask:
        keep = draw.keep_flags(n_columns).to(x.dtype)
        return out, _expand_clusters(keep, tables.labels, None, x)
    return out


class _ClusterMultiply(torch.autograd.Function):
    """``x * expand(table)`` that saves only the (B, C, K) table for backward.

    The (B, C, H, W) multiplier is rebuilt from the table and the labels in backward instead of
    being kept: the layer then holds no activation-sized tensor between forward and backward
    (like ``nn.Dropout2d``, whose mask is (N, C, 1, 1)). The path of eager mode, and of
    ``torch.compile`` for tables too wide to pack (:class:`_PackedMultiply` otherwise).
    """

    @staticmethod
    def forward(ctx, x: Tensor, table: Tensor, labels: Tensor, onehot: Tensor | None) -> Tensor:
        ctx.save_for_backward(table)
        # The labels (a buffer) and the one-hot (a per-fit cache) are kept as attributes, not
        # saved tensors: DistributedDataParallel rewrites the buffers in place at every forward
        # (the same values), which would fail a backward after two forwards (two views of a
        # batch) on autograd's version check.
        ctx.labels, ctx.onehot = labels, onehot
        return _multiply(x, table, labels, onehot)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (table,) = ctx.saved_tensors
        return _multiply(grad_out, table, ctx.labels, ctx.onehot), None, None, None


class _PackedMultiply(torch.autograd.Function):
    """``x * bit(bits, labels) * scale``, saving the (B, C) bits and (B,) scales for backward.

    The path under ``torch.compile``: inductor fuses the shift, the mask and both products
    into one vectorised loop that reads x and the labels and writes the output, one pass each
    way, where a gather from a per-cluster table is a scalar loop.
    """

    @staticmethod
    def forward(ctx, x: Tensor, bits: Tensor, scale: Tensor, labels: Tensor) -> Tensor:
        ctx.save_for_backward(bits, scale)
        ctx.labels = labels  # not a saved tensor: see _ClusterMultiply
        return _packed_multiply(x, bits, scale, labels)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        bits, scale = ctx.saved_tensors
        return _packed_multiply(grad_out, bits, scale, ctx.labels), None, None, None


def _packed_multiply(x: Tensor, bits: Tensor, scale: Tensor, labels: Tensor) -> Tensor:
    """x (N, C, H, W) times bit ``labels[c, h, w]`` of ``bits[n, c]`` times ``scale[n]``."""
    draws, n_channels = bits.shape
    kept = (bits.view(draws, n_channels, 1, 1) >> labels) & 1
    return x * (kept.to(x.dtype) * scale.view(draws, 1, 1, 1))


def _multiply(x: Tensor, table: Tensor, labels: Tensor, onehot: Tensor | None) -> Tensor:
    multiplier = _expand_clusters(table, labels, onehot, x)
    if multiplier.shape == x.shape and multiplier.stride() == x.stride():
        return multiplier.mul_(x)  # the multiplier is a fresh tensor: reuse its memory
    return x * multiplier


def _use_product(x: Tensor, table: Tensor) -> bool:
    """Whether to expand the table by a matrix product (see :func:`_expand_clusters`)."""
    return (
        table.shape[0] > 1
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.is_contiguous()
        and not _compiling()
    )


def _expand_clusters(table: Tensor, labels: Tensor, onehot: Tensor | None, like: Tensor) -> Tensor:
    """(B, C, K) per-cluster values -> (B, C, H, W) per-pixel values, in ``like``'s layout.

    ``onehot`` ((C, K, H*W) in the table's dtype, or None) selects the CPU's matrix-product
    expansion.
    """
    draws, n_channels, _ = table.shape
    height, width = labels.shape[1:]
    if onehot is not None:
        # On the CPU a batched product with the one-hot labels, C products of (B, K) x
        # (K, H*W), takes a third of a gather's time (whose scalar index loop bounds it).
        # Exact, in bfloat16 too: every output is one table value times 1 plus zeros (the
        # product accumulates in float32). The product comes out as
        # (C, B, H*W); the multiply reads it through a transposed view (rows of H*W stay
        # contiguous), which costs less than writing it in (B, C) order.
        values = torch.bmm(table.transpose(0, 1), onehot)
        return values.transpose(0, 1).unflatten(2, (height, width))
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and n_channels > 1
    if channels_last:
        # Gather straight into (B, H, W, C) order so the product with x stays channels_last.
        index = labels.reshape(n_channels, -1).t().unsqueeze(0).expand(draws, -1, -1)
        values = table.transpose(1, 2).gather(1, index)  # (B, H*W, C)
        return values.view(draws, height, width, n_channels).permute(0, 3, 1, 2)
    index = labels.reshape(1, n_channels, -1).expand(draws, -1, -1)
    return table.gather(2, index).view(draws, n_channels, height, width)


class DropCluster2d(DropRateModule):
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
    optimizer's state) stay valid and every process holds the same shapes. A channel that ReNA
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

    Shape:
        input (N, C, H, W) -> output (N, C, H, W), any float dtype and memory format.
    """

    labels: Tensor
    structured: Tensor
    cluster_counts: Tensor
    cluster_sizes: Tensor
    is_fitted: Tensor

    #: The buffers that hold the fitted clusters (all persistent).
    STATE = ("labels", "structured", "cluster_counts", "cluster_sizes", "is_fitted")

    def __init__(
        self,
        p: float = 0.1,
        n_clusters: int = 15,
        *,
        input_shape: tuple[int, int, int] | None = None,
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
        self._fitted = False
        self._tables: _ClusterTables | None = None
        self._tables_key: tuple | None = None
        device = self.p.device
        self.register_buffer("labels", torch.zeros(0, 0, 0, dtype=torch.int64, device=device))
        self.register_buffer("structured", torch.zeros(0, dtype=torch.bool, device=device))
        self.register_buffer("cluster_counts", torch.zeros(0, dtype=torch.int64, device=device))
        self.register_buffer(
            "cluster_sizes", torch.zeros(0, self.n_clusters, dtype=torch.int64, device=device)
        )
        self.register_buffer("is_fitted", torch.zeros((), dtype=torch.bool, device=device))
        if input_shape is not None:
            self.materialize(_check_shape(input_shape))

    @property
    def fitted(self) -> bool:
        """True once clusters have been fitted or loaded."""
        return self._fitted

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) the buffers are shaped for; None before the layer has seen its input."""
        return tuple(self.labels.shape) if self.labels.numel() else None

    @torch.no_grad()
    def materialize(self, input_shape: tuple[int, int, int]) -> None:
        """Give the buffers their shapes for inputs of (C, H, W) = ``input_shape``, in place.

        Nothing happens when they have those shapes already. The tensors keep their identity
        (they are resized, not replaced), so references to them stay valid.

        Raises:
            ValueError: the layer holds clusters fitted for another shape.
        """
        channels, height, width = input_shape
        if self.input_shape == (channels, height, width):
            return
        if self._fitted:
            raise ValueError(
                f"DropCluster2d holds clusters for (C, H, W) = {self.input_shape}, not "
                f"{tuple(input_shape)}: call reset(input_shape={tuple(input_shape)}) to forget "
                f"them, then fit again"
            )
        self._forget_tables()
        self.labels.resize_(channels, height, width).zero_()
        self.structured.resize_(channels).zero_()
        self.cluster_counts.resize_(channels).zero_()
        self.cluster_sizes.resize_(channels, self.n_clusters).zero_()

    @torch.no_grad()
    def fit(self, activations: Tensor, *, generator: torch.Generator | None = None):
        """Fit the clusters on a minibatch of this layer's input activations (Algorithm 1).

        Args:
            activations: (N, C, H, W), N >= 2 images (use more than one training minibatch:
                the unstructured verdict of the paper's rule depends on the batch size).
            generator: random source for the ``"hopkins"`` rule.

        Returns:
            self. On invalid input (NaN, wrong rank, another (C, H, W) than the layer's, ...)
            a ``ValueError`` is raised and the previously fitted clusters are kept unchanged.
        """
        check_tensor("activations", activations, dims=4, layout="(N, C, H, W)")
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
                f"DropCluster2d found no structured channel among the {shape[0]} channels of "
                f"its input under the {self.unstructured!r} rule (all-zero or constant "
                f"activations have none): the layer now zeroes every channel, in training and "
                f"in evaluation; fit it on real activations of the layer's input",
                stacklevel=3,  # the caller of fit, past torch.no_grad's wrapper
            )
        return self

    @torch.no_grad()
    def load_clusters(self, labels: Tensor, structured: Tensor, counts: Tensor,
                      sizes: Tensor) -> None:  # fmt: skip
        """Write fitted tables (see :func:`fixed_tables`) into the buffers, in place.

        Raises:
            ValueError: tables that do not fit the layer's shapes or each other (see
                :func:`check_tables`); the layer keeps what it had.
        """
        check_tables(labels, structured, counts, sizes, self.n_clusters)
        self.materialize(tuple(labels.shape))  # raises when fitted on another shape
        self._write_tables(labels, structured, counts, sizes)

    def _write_tables(self, labels: Tensor, structured: Tensor, counts: Tensor,
                      sizes: Tensor) -> None:  # fmt: skip
        self.labels.copy_(labels)
        self.structured.copy_(structured)
        self.cluster_counts.copy_(counts)
        self.cluster_sizes.copy_(sizes)
        self.is_fitted.fill_(True)
        self._fitted = True
        self._forget_tables()

    @torch.no_grad()
    def reset(self, input_shape: tuple[int, int, int] | None = None) -> None:
        """Forget the fitted clusters: the layer becomes the identity again.

        The buffers keep their shapes (and identity), unless ``input_shape`` gives new ones.
        """
        for name in self.STATE:
            getattr(self, name).zero_()
        self._fitted = False
        self._forget_tables()
        if input_shape is not None:
            self.materialize(_check_shape(input_shape))

    def forward(self, x: Tensor) -> Tensor:
        # Under torch.compile a layer with its shapes goes one way whether fitted or not (the
        # is_fitted buffer decides inside the graph), so the first fit recompiles nothing.
        traced = (
            _compiling()
            and self.labels.numel() > 0
            and self.n_clusters <= _MAX_PACKED_CLUSTERS
            and not self.record_mask
        )
        if x.dim() != 4:
            raise ValueError(
                f"DropCluster2d takes (N, C, H, W) feature maps, but got input of shape "
                f"{tuple(x.shape)}: place it after a conv layer (or a module whose output is "
                f"a feature map)"
            )
        if not traced and not self._fitted:
            if self.labels.numel() == 0 and not _compiling():
                self.materialize(tuple(x.shape[1:]))
            self._remember(None)
            return x
        if tuple(x.shape[1:]) != tuple(self.labels.shape):
            raise ValueError(
                f"DropCluster2d holds clusters for (C, H, W) = {tuple(self.labels.shape)} maps, "
                f"but got input of shape {tuple(x.shape)}: refit it on activations of the new "
                f"size (reset(input_shape=...), then fit)"
            )
        sampling = self.training or self.sample_in_eval
        result = _apply_clusters(
            x, self._cluster_tables(), self.p, sampling, self.per_sample, self.generator,
            self.record_mask, fitted=self.is_fitted if traced else None,
        )  # fmt: skip
        return self._unpack(result)

    def _cluster_tables(self) -> _ClusterTables:
        """The per-fit tables, rebuilt only when a buffer changed (a fit, a load, a move)."""
        buffers = (self.labels, self.cluster_counts, self.structured, self.cluster_sizes)
        if _compiling():
            # Traced into the graph, where these few small ops fuse.
            return _ClusterTables(*buffers)
        if any(buffer.is_inference() for buffer in buffers):
            return _ClusterTables(*buffers)  # inference tensors have no version counter
        # The layer's own writes (fit, load, reset, a move, a broadcast) drop the cache; the
        # key catches writes from outside: an in-place write bumps a tensor's version, an
        # assignment gives a new tensor (held by the key, so its memory cannot be reused).
        key = (buffers, tuple(buffer._version for buffer in buffers))
        if self._tables is None or not _same_key(self._tables_key, key):
            self._tables = _ClusterTables(*buffers)
            self._tables_key = key
        return self._tables

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
            f"unstructured={self.unstructured!r}, {state}"
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # fmt: skip
        self._check_loaded_p(state_dict, prefix)  # before anything of the layer changes
        keys = {name: prefix + name for name in self.STATE}
        present = [name for name, key in keys.items() if key in state_dict]
        if present:
            if "is_fitted" not in present and "labels" in present:
                _convert_legacy_state(self, state_dict, keys)
            self._check_loaded_shapes(state_dict, keys)
            self._check_loaded_tables(state_dict, keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)  # fmt: skip
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
        if labels is None or labels.dim() != 3 or labels.numel() == 0:
            return
        incoming = tuple(labels.shape)
        if self._fitted and incoming != self.input_shape:
            raise ValueError(
                f"cannot load DropCluster2d clusters fitted on (C, H, W) = {incoming} into a "
                f"layer fitted on {self.input_shape}; call reset(input_shape={incoming}) first"
            )
        # An unfitted layer takes the stored shapes (resized in place).
        self.materialize(incoming)

    def _check_loaded_tables(self, state_dict, keys: dict[str, str]) -> None:
        """Refuse fitted tables that are not what a fit makes (a label past its channel's
        clusters would silently zero those pixels at every step), naming the key."""
        fitted = state_dict.get(keys["is_fitted"])
        if fitted is None or not bool(fitted) or any(keys[n] not in state_dict for n in
                                                     self.STATE):  # fmt: skip
            return
        tables = [state_dict[keys[name]] for name in ("labels", "structured", "cluster_counts",
                                                        "cluster_sizes")]  # fmt: skip
        try:
            check_tables(*tables, self.n_clusters, names={n: repr(keys[n]) for n in self.STATE})
        except ValueError as error:
            raise ValueError(f"cannot load DropCluster2d state: {error}") from None


def check_tables(labels: Tensor, structured: Tensor, counts: Tensor, sizes: Tensor,
                 n_clusters: int, names: dict[str, str] | None = None) -> None:  # fmt: skip
    """Raise ValueError unless the four tables are fitted clusters as :func:`fixed_tables`
    makes them: ``labels`` (C, H, W), ``structured`` (C,) bool, ``counts`` (C,) and ``sizes``
    (C, n_clusters) integers; a structured channel has 1 to ``n_clusters`` clusters, labels
    below its count and sizes that count its labels; an unstructured one has count and sizes 0.

    One pass over the labels (a scatter of ones): cheap beside any fit. ``names`` says how the
    message names each table (a state_dict key); the message names the first bad channel.
    """
    names = names or {}
    label_name, sizes_name = names.get("labels", "labels"), names.get("cluster_sizes", "sizes")
    counts_name = names.get("cluster_counts", "counts")
    n_channels = labels.shape[0] if labels.dim() == 3 else -1
    kinds = ((labels, 3, label_name), (counts, 1, counts_name), (sizes, 2, sizes_name))
    for table, dims, name in kinds:
        if table.dim() != dims or table.is_floating_point() or table.is_complex() or (
                table.dtype == torch.bool) or table.shape[0] != n_channels:  # fmt: skip
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
            raise ValueError(_table_problem(what, c, bool(structured[c]), int(counts[c]),
                                            n_clusters, names, labels, sizes, counted))  # fmt: skip


def _table_problem(what: str, c: int, structured: bool, count: int, n_clusters: int,
                   names: dict[str, str], labels: Tensor, sizes: Tensor,
                   counted: Tensor) -> str:  # fmt: skip
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


def fixed_tables(labels: Tensor, structured: Tensor, n_found: Tensor, sizes: Tensor,
                 n_clusters: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """A ReNA result as the layer stores it: tables ``n_clusters`` wide.

    A structured channel with more than ``n_clusters`` clusters (ReNA stopped before reaching
    k) becomes unstructured, as the paper treats channels where ReNA does not converge.
    Unstructured channels get label 0, count 0 and no sizes: they are masked whole.

    Args:
        labels: (C, H, W) int64; structured: (C,) bool; n_found: (C,) int64; sizes: (C, K)
            int64 (``ReNAResult``'s fields).

    Returns:
        labels (C, H, W), structured (C,), counts (C,), sizes (C, n_clusters), on the inputs'
        device.
    """
    structured = structured & (n_found <= n_clusters)
    counts = torch.where(structured, n_found, torch.zeros_like(n_found))
    labels = torch.where(structured.view(-1, 1, 1), labels, torch.zeros_like(labels))
    width = min(sizes.shape[1], n_clusters)
    table = torch.zeros(sizes.shape[0], n_clusters, dtype=torch.int64, device=sizes.device)
    table[:, :width] = sizes[:, :width]
    table *= structured.view(-1, 1)
    return labels, structured, counts, table


def _convert_legacy_state(layer: DropCluster2d, state_dict, keys: dict[str, str]) -> None:
    """State of dropcluster 0.1 (tables as wide as the largest cluster count, no ``is_fitted``)
    in today's form, in the (copied) state_dict torch passes to loading."""
    names = ("labels", "structured", "cluster_counts", "cluster_sizes")
    fitted = state_dict[keys["labels"]].numel() > 0
    if fitted:
        tables = fixed_tables(*(state_dict[keys[name]] for name in names), layer.n_clusters)
    else:  # an unfitted 0.1 layer: nothing to load, the layer keeps its (empty) tables
        tables = tuple(getattr(layer, name).clone() for name in names)
    for name, value in zip(names, tables, strict=True):
        state_dict[keys[name]] = value
    state_dict[keys["is_fitted"]] = torch.tensor(fitted)


def _same_key(cached: tuple | None, key: tuple) -> bool:
    """Whether two (buffers, versions) keys name the same tensors at the same versions."""
    if cached is None:
        return False
    buffers, versions = key
    return versions == cached[1] and all(a is b for a, b in zip(cached[0], buffers, strict=True))


def _check_shape(shape) -> tuple[int, int, int]:
    if not isinstance(shape, (tuple, list)) or len(shape) != 3:
        raise ValueError(f"input_shape should be (C, H, W), but got {shape!r}")
    return tuple(check_int("input_shape entries", size, minimum=1) for size in shape)


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())
