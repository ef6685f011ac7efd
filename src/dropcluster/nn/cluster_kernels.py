"""How DropCluster draws and applies its masks: the per-fit tables, the samplers (Floyd's and
sorting), and the multiplies that keep no activation-sized tensor for backward.

Internal to :mod:`dropcluster.nn`: :func:`~dropcluster.nn.drop_cluster2d` and
:class:`~dropcluster.nn.DropCluster2d` (and their 1-D and 3-D forms) check their inputs and call
:func:`apply_clusters`. The tables are per channel over the flattened sites, so every piece
works on any grid, (C, L), (C, H, W) or (C, D, H, W), unchanged; only the final views name the
grid's axes.
docs/design.md ("DropCluster's masks") says why each piece is as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from dropcluster.nn.drop_rate import uniform

__all__ = [
    "MAX_PACKED_CLUSTERS",
    "ClusterTables",
    "apply_clusters",
    "compiling",
    "expand_clusters",
]


# floor(p * n) with p stored in float32: 0.7 is 0.69999999 there and 0.7 * 10 would floor to
# 6. This relative slack restores the value intended in decimal for any n below 10**5.
_FLOOR_SLACK = 1e-6


class ClusterTables:
    """What a step needs of the fitted clusters, computed once per fit (not once per step).

    Attributes:
        labels: (C, H, W) int64 cluster of each pixel ((C, L) or (C, D, H, W) on other grids).
        keepable: (C, K) bool, the clusters that exist in structured channels.
        drawn: (C,) bool, the channels with a keepable cluster.
        missing: (C, K) float64, 0 for clusters that exist and 2 for the others (added to the
            random scores of the sorting sampler so that missing clusters sort last).
        sizes: (C, K) float32 pixels per cluster.
        counts: (C,) int64 clusters per channel.
        packable: K <= :data:`MAX_PACKED_CLUSTERS`: a channel's clusters fit the bits of one
            int64.
        keepable_bits: (C,) int64, bit k set when cluster k is keepable (packable tables).
        kept_total: () float32, the pixels kept when nothing is dropped.
        onehots: dtype -> (C, K, H * W) one-hot of the labels in that dtype; built on first use
            by the CPU's matrix-product expansion (see :func:`expand_clusters`).
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
        self.packable = n_columns <= MAX_PACKED_CLUSTERS
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
MAX_PACKED_CLUSTERS = 62


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


def _drop_counts(p: float | Tensor, tables: ClusterTables) -> Tensor:
    """(C,) int64 clusters dropped per channel: floor(p * n) in structured channels, else 0."""
    p_value = p if isinstance(p, Tensor) else torch.tensor(p)
    p_value = p_value.to(device=tables.counts.device, dtype=torch.float64)
    n_drop = torch.floor(p_value * tables.counts.double() * (1 + _FLOOR_SLACK)).long()
    return n_drop * tables.drawn


def _draw_clusters(
    shape: torch.Size,
    tables: ClusterTables,
    p: float | Tensor,
    training: bool,
    per_sample: bool,
    generator: torch.Generator | None,
) -> _Draw:
    """Which clusters each image keeps, and its scale (Algorithm 2, lines 12-16)."""
    n_samples = shape[0]
    total = float(math.prod(shape[1:]))  # C * H * W: every element of one image
    if not training:  # nothing drawn: every image keeps the same clusters
        bits = tables.keepable_bits.unsqueeze(0) if tables.packable else None
        keep = None if tables.packable else tables.keepable.unsqueeze(0)
        kept = tables.kept_total.view(1)
    else:
        draws = n_samples if per_sample else 1
        n_drop = _drop_counts(p, tables)
        device = tables.sizes.device
        traced = compiling()
        if tables.packable and (traced or device.type == "cpu"):
            # Under compile the loop has a fixed length, enough for any p (p is a buffer: a
            # length read from it would recompile at every new rate), and fuses into one
            # kernel; eagerly on the CPU its length is read from memory, no synchronisation.
            steps = tables.sizes.shape[1] if traced else int(n_drop.max())
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
    tables: ClusterTables,
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
    draws: int, tables: ClusterTables, n_drop: Tensor, generator: torch.Generator | None
) -> Tensor:
    """(B, C, K) bool: the ``n_drop[c]`` clusters with the smallest random scores per channel.

    The sampler of eager accelerators (a fixed handful of kernels, no host synchronisation) and
    of tables too wide to pack.
    """
    n_channels, n_columns = tables.sizes.shape
    # float64 scores: a tie between two clusters (which could drop one cluster too many) has
    # probability ~1e-14 per draw, against ~1e-5 with float32's 24-bit grid.
    scores = uniform((draws, n_channels, n_columns), generator, tables.sizes.device, torch.float64)
    scores = scores + tables.missing  # clusters that do not exist sort last
    last_dropped = (n_drop - 1).clamp(min=0).view(1, n_channels, 1).expand(draws, -1, 1)
    threshold = scores.sort(dim=2).values.gather(2, last_dropped)
    return (scores <= threshold) & (n_drop > 0).view(1, n_channels, 1)


def apply_clusters(
    x: Tensor,
    tables: ClusterTables,
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
    if compiling() and draw.bits is not None:
        out = _PackedMultiply.apply(x, draw.bits, scale, tables.labels)
    else:
        with torch.no_grad():
            table = draw.keep_flags(n_columns).to(x.dtype) * scale.view(-1, 1, 1)
        onehot = tables.onehot_of_labels(table.dtype) if _use_product(x, table) else None
        out = _ClusterMultiply.apply(x, table, tables.labels, onehot)
    if return_mask:
        keep = draw.keep_flags(n_columns).to(x.dtype)
        return out, expand_clusters(keep, tables.labels, None, x)
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
    """x (N, C, H, W) times bit ``labels[c, h, w]`` of ``bits[n, c]`` times ``scale[n]`` (any
    grid: (N, C, L) and (N, C, D, H, W) likewise)."""
    draws, n_channels = bits.shape
    grid = (1,) * (labels.dim() - 1)
    kept = (bits.view(draws, n_channels, *grid) >> labels) & 1
    return x * (kept.to(x.dtype) * scale.view(draws, 1, *grid))


def _multiply(x: Tensor, table: Tensor, labels: Tensor, onehot: Tensor | None) -> Tensor:
    multiplier = expand_clusters(table, labels, onehot, x)
    if multiplier.shape == x.shape and multiplier.stride() == x.stride():
        return multiplier.mul_(x)  # the multiplier is a fresh tensor: reuse its memory
    return x * multiplier


def _use_product(x: Tensor, table: Tensor) -> bool:
    """Whether to expand the table by a matrix product (see :func:`expand_clusters`)."""
    return (
        table.shape[0] > 1
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.is_contiguous()
        and not compiling()
    )


def expand_clusters(table: Tensor, labels: Tensor, onehot: Tensor | None, like: Tensor) -> Tensor:
    """(B, C, K) per-cluster values -> (B, C, H, W) per-pixel values, in ``like``'s layout
    ((B, C, L) or (B, C, D, H, W) for labels of those grids).

    ``onehot`` ((C, K, H*W) in the table's dtype, or None) selects the CPU's matrix-product
    expansion.
    """
    draws, n_channels, _ = table.shape
    grid = labels.shape[1:]
    if onehot is not None:
        # On the CPU a batched product with the one-hot labels, C products of (B, K) x
        # (K, H*W), takes a third of a gather's time (whose scalar index loop bounds it).
        # Exact, in bfloat16 too: every output is one table value times 1 plus zeros (the
        # product accumulates in float32). The product comes out as
        # (C, B, H*W); the multiply reads it through a transposed view (rows of H*W stay
        # contiguous), which costs less than writing it in (B, C) order.
        values = torch.bmm(table.transpose(0, 1), onehot)
        return values.transpose(0, 1).unflatten(2, grid)
    if n_channels > 1 and _channels_last(like):
        # Gather straight into (B, H, W, C) order so the product with x stays channels_last.
        index = labels.reshape(n_channels, -1).t().unsqueeze(0).expand(draws, -1, -1)
        values = table.transpose(1, 2).gather(1, index)  # (B, H*W, C)
        axes = len(grid)
        return values.view(draws, *grid, n_channels).permute(0, axes + 1, *range(1, axes + 1))
    index = labels.reshape(1, n_channels, -1).expand(draws, -1, -1)
    return table.gather(2, index).view(draws, n_channels, *grid)


def _channels_last(like: Tensor) -> bool:
    """Whether ``like`` is channels_last (4-d) or channels_last_3d (5-d); torch has no
    channels-last format for 3-d tensors."""
    if like.dim() == 4:
        return like.is_contiguous(memory_format=torch.channels_last)
    return like.dim() == 5 and like.is_contiguous(memory_format=torch.channels_last_3d)


def compiling() -> bool:
    """Whether torch.compile is tracing the caller."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())
