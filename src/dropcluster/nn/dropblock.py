"""DropBlock (Ghiasi et al., NeurIPS 2018, Algorithm 1) with the drop rate matched exactly, and
the PyPI ``dropblock`` 0.3.0 algorithm the DropCluster paper ran as its baseline; on 1-D, 2-D
and 3-D maps.

``p`` is the fraction of sites (pixels, voxels) to drop and ``b`` the block side, clamped per
axis to the map (:func:`effective_block`); block centres are drawn with rate gamma on the
positions where a whole block fits. The paper's gamma is the first-order solution of "expected
dropped fraction = p" and falls short of p; here that equation is solved exactly
(:func:`solve_gamma`), so the expected dropped fraction is p for every map and block size.
docs/design.md, "DropBlock's drop rate", works it through, with the reference algorithm
(:func:`drop_block2d_reference`) beside. On the CPU in eager mode the centres are drawn sparsely
(:mod:`dropcluster.nn.dropblock_sampler`); elsewhere densely, with no host synchronisation.

The paper is 2-D only. The 1-D and 3-D layers are our assumption: the same algorithm with
segments of ``b`` sites and cubes of ``b**3`` voxels, the same exact rule (a site's coverage is
the product over axes of its line coverages), and the same reference formulas with one or three
axes (PyPI ``dropblock`` 0.3.0 has a ``DropBlock3D``, matched bit for bit; it has no 1-D class).
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from dropcluster.compat import old_call_form, pickled_defaults
from dropcluster.nn.drop_rate import DropRateModule, check_drop_rate, uniform
from dropcluster.nn.dropblock_sampler import drop_block_sparse
from dropcluster.validation import check_choice, check_int, check_tensor

__all__ = [
    "MODES",
    "DropBlock1d",
    "DropBlock2d",
    "DropBlock3d",
    "coverage_histogram",
    "drop_block1d",
    "drop_block1d_reference",
    "drop_block2d",
    "drop_block2d_reference",
    "drop_block3d",
    "drop_block3d_reference",
    "effective_block",
    "expected_drop_fraction",
    "solve_gamma",
]


# Newton from the first-order gamma reaches f(gamma) = p to 1e-12 in at most 12 steps for every
# map up to 224 x 224, block up to 11 and p up to 0.999 (tests check a grid); 20 leave a margin.
_NEWTON_STEPS = 20

#: Values of ``mode``: ``"exact"`` (expected dropped fraction p, the default) or ``"reference"``
#: (PyPI ``dropblock`` 0.3.0, as the DropCluster paper ran its DropBlock baseline).
MODES = ("exact", "reference")

# The input layout of each number of spatial axes, as validation messages name it.
_LAYOUTS = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}
_MAX_POOLS = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
# The channels-last format of each input rank (a 3-D (N, C, L) tensor has none).
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def effective_block(block_size: int, *sizes: int) -> tuple[int, ...]:
    """Block extent actually used along each axis: ``block_size`` clamped to the map's size.

    ``effective_block(b, height, width)``; one size for a 1-D map, three for a volume. A block
    larger than the map would have no valid centre at all; clamped, it covers the whole map
    along that axis and has exactly one valid centre there.
    """
    return tuple(min(block_size, size) for size in sizes)


def _sizes_and_block(sizes_and_block: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """``(sizes, block_size)`` from the arguments ``*sizes, block_size`` (1 to 3 sizes)."""
    if not 2 <= len(sizes_and_block) <= 4:
        raise ValueError(
            "expected 1 to 3 map sizes then the block size, but got "
            f"{len(sizes_and_block)} numbers {sizes_and_block}"
        )
    return sizes_and_block[:-1], sizes_and_block[-1]


_HISTOGRAMS: dict[tuple[int, ...], tuple[tuple[int, int], ...]] = {}


def _line_coverage(size: int, block: int) -> list[int]:
    """For each position on a line, how many valid block starts cover it."""
    n_starts = size - block + 1
    return [min(i, n_starts - 1) - max(0, i - block + 1) + 1 for i in range(size)]


def _assume_constant_result(function):
    """``torch.compiler.assume_constant_result``, without importing torch._dynamo (0.9 s at
    every process start, for the decorator alone): the decorator only sets this attribute,
    which dynamo reads when it traces (the compiled DropBlock tests check that it still does)."""
    function._dynamo_marked_constant = True
    return function


# torch.compile runs it at trace time and keeps the result as a constant: traced, the cache's
# `key not in _HISTOGRAMS` would become a guard that fails on the next call (a recompile).
@_assume_constant_result
def coverage_histogram(*sizes_and_block: int) -> tuple[tuple[int, int], ...]:
    """``coverage_histogram(*sizes, block_size)``: distinct coverage counts ``n`` and how many
    sites have each, as ((n, sites), ...).

    ``coverage_histogram(height, width, b)``; ``(length, b)`` for a 1-D map, ``(depth, height,
    width, b)`` for a volume. ``n_j`` is the number of valid centres whose block covers site j:
    the product over axes of its line coverages, since blocks are boxes on a grid, so the
    histogram is the product of the per-axis histograms. Cached per shape.
    """
    key = sizes_and_block
    if key not in _HISTOGRAMS:
        sizes, block_size = _sizes_and_block(key)
        histogram = Counter({1: 1})
        for size, block in zip(sizes, effective_block(block_size, *sizes), strict=True):
            line = Counter(_line_coverage(size, block))
            product: Counter = Counter()
            for count, sites in histogram.items():
                for line_count, line_sites in line.items():
                    product[count * line_count] += sites * line_sites
            histogram = product
        _HISTOGRAMS[key] = tuple(sorted(histogram.items()))
    return _HISTOGRAMS[key]


def expected_drop_fraction(gamma: float, *sizes_and_block: int) -> float:
    """``expected_drop_fraction(gamma, *sizes, block_size)``: ``f(gamma) = 1 - mean_j (1 -
    gamma) ** n_j``, the expected fraction of dropped sites (sizes as :func:`coverage_histogram`).
    """
    histogram = coverage_histogram(*sizes_and_block)
    log_miss = math.log1p(-gamma) if gamma < 1.0 else -math.inf
    dropped = sum(-sites * math.expm1(n * log_miss) for n, sites in histogram)
    return dropped / math.prod(sizes_and_block[:-1])


def _solve_gamma_tensor(p: Tensor, *sizes_and_block: int) -> Tensor:
    """The centre rate gamma with ``f(gamma) = p``, in tensor operations on a 0-d ``p``;
    ``_solve_gamma_tensor(p, *sizes, block_size)``.

    Newton's method on ``f``, which is increasing and concave: from the first-order value
    ``p / mean_j n_j`` (below the root, since ``f(gamma) <= gamma * mean_j n_j``) every step
    stays below the root and converges to it. A fixed number of steps and no Python branch on
    ``p``: no host synchronisation, and torch.compile traces it once for every ``p``.

    Returns:
        0-d float64 tensor on p's device.
    """
    histogram = coverage_histogram(*sizes_and_block)
    # Built on the host and sent without a stream synchronisation (a 2 x n table).
    table = torch.tensor(histogram, dtype=torch.float64).to(p.device, non_blocking=True)
    counts, weights = table[:, 0], table[:, 1] / math.prod(sizes_and_block[:-1])
    target = p.to(torch.float64)
    gamma = target / (counts * weights).sum()
    for _ in range(_NEWTON_STEPS):
        # expm1/log1p: 1 - (1 - gamma) ** n loses all its digits to cancellation for small p.
        log_miss = torch.log1p(-gamma)
        dropped = -(weights * torch.expm1(counts * log_miss)).sum()
        slope = (weights * counts * torch.exp((counts - 1) * log_miss)).sum()
        gamma = (gamma + (target - dropped) / slope).clamp(max=1.0)
    return gamma


@lru_cache(maxsize=4096)
def solve_gamma(p: float, *sizes_and_block: int) -> float:
    """``solve_gamma(p, *sizes, block_size)``: the centre rate gamma whose expected dropped
    fraction is exactly ``p`` (cached); sizes as :func:`coverage_histogram`."""
    return float(_solve_gamma_tensor(torch.tensor(p, dtype=torch.float64), *sizes_and_block))


@old_call_form(
    4,
    frozenset({"eps", "gamma", "mode"}),
    "drop_block2d(x, p, block_size, training=True, *, per_channel, generator, return_mask, "
    "inplace); PyPI dropblock's algorithm is drop_block2d_reference(x, p, block_size, "
    "training=True, *, generator, return_mask)",
)
def drop_block2d(
    x: Tensor,
    p: float | Tensor,
    block_size: int,
    training: bool = True,
    *,
    per_channel: bool = True,
    generator: torch.Generator | None = None,
    return_mask: bool = False,
    inplace: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """DropBlock (Ghiasi et al. 2018, Algorithm 1) with the expected dropped fraction equal to p.

    Args:
        x: (N, C, H, W) floating tensor, any memory format and device.
        p: fraction of pixels to drop, in [0, 1): a float (checked) or a 0-d tensor.
        block_size: side of the square blocks, >= 1; clamped per dimension to the map
            (:func:`effective_block`); even sizes are exact.
        training: identity (``x`` itself is returned) when False.
        per_channel: independent masks per channel (the paper's Algorithm 1); False shares one
            mask across the channels of each image. Masks are always independent per sample.
        generator: random source on x's device (none under torch.compile).
        return_mask: also return the 0/1 keep mask, before rescaling.
        inplace: write the result into ``x`` and return ``x``.

    Returns:
        (N, C, H, W) tensor in x's dtype, ``x * mask * count(mask) / count_ones(mask)`` with
        the counts per sample; with ``return_mask``, also the mask, (N, C, H, W) or
        (N, 1, H, W) for a shared mask, in x's dtype.

    Example::

        out = drop_block2d(torch.randn(8, 64, 16, 16), 0.1, 5)
    """
    return _drop_block(x, p, block_size, training, 2, per_channel, generator, return_mask, inplace)


def drop_block1d(
    x: Tensor,
    p: float | Tensor,
    block_size: int,
    training: bool = True,
    *,
    per_channel: bool = True,
    generator: torch.Generator | None = None,
    return_mask: bool = False,
    inplace: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """DropBlock on sequences: segments of ``block_size`` positions, expected dropped fraction p.

    :func:`drop_block2d` with one spatial axis (our assumption; the paper is 2-D): centres are
    drawn on the ``L - b + 1`` positions where a whole segment fits, with the rate that makes
    the expected dropped fraction exactly p.

    Args:
        x: (N, C, L) floating tensor, any device.
        p: fraction of positions to drop, in [0, 1): a float (checked) or a 0-d tensor.
        block_size: segment length, >= 1; clamped to L.
        training, per_channel, generator, return_mask, inplace: as for :func:`drop_block2d`.

    Returns:
        (N, C, L) tensor in x's dtype, rescaled per sample by ``count(mask) /
        count_ones(mask)``; with ``return_mask``, also the 0/1 keep mask, (N, C, L) or (N, 1, L)
        for a shared mask, in x's dtype.

    Example::

        out = drop_block1d(torch.randn(8, 32, 28), 0.1, 5)
    """
    return _drop_block(x, p, block_size, training, 1, per_channel, generator, return_mask, inplace)


def drop_block3d(
    x: Tensor,
    p: float | Tensor,
    block_size: int,
    training: bool = True,
    *,
    per_channel: bool = True,
    generator: torch.Generator | None = None,
    return_mask: bool = False,
    inplace: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """DropBlock on volumes: cubes of ``block_size**3`` voxels, expected dropped fraction p.

    :func:`drop_block2d` with three spatial axes (our assumption; the paper is 2-D): a voxel's
    coverage is the product of its depth, row and column coverages, and gamma solves the exact
    equation over that histogram.

    Args:
        x: (N, C, D, H, W) floating tensor, any memory format (channels_last_3d included) and
            device.
        p: fraction of voxels to drop, in [0, 1): a float (checked) or a 0-d tensor.
        block_size: cube side, >= 1; clamped per axis to the map.
        training, per_channel, generator, return_mask, inplace: as for :func:`drop_block2d`.

    Returns:
        (N, C, D, H, W) tensor in x's dtype, rescaled per sample by ``count(mask) /
        count_ones(mask)``; with ``return_mask``, also the 0/1 keep mask, (N, C, D, H, W) or
        (N, 1, D, H, W) for a shared mask, in x's dtype.

    Example::

        out = drop_block3d(torch.randn(4, 16, 8, 12, 12), 0.1, 3)
    """
    return _drop_block(x, p, block_size, training, 3, per_channel, generator, return_mask, inplace)


def drop_block2d_reference(
    x: Tensor,
    p: float | Tensor,
    block_size: int,
    training: bool = True,
    *,
    generator: torch.Generator | None = None,
    return_mask: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """PyPI ``dropblock`` 0.3.0's ``DropBlock2D(p, block_size)``: the DropCluster paper's
    DropBlock baseline (its dropped fraction is below p).

    Centres drawn with rate ``p / block_size**2`` on every pixel, one mask per image shared by
    the channels, one rescaling for the whole batch; on the CPU with the same seed the output is
    the package's bit for bit, and zeros where it gives NaN (docs/design.md, "DropBlock").

    Args:
        x: (N, C, H, W) floating tensor.
        p: the package's drop probability, in [0, 1): a float or a 0-d tensor.
        block_size: block side, >= 1.
        training: identity when False.
        generator: random source on x's device (None: the global generator, as the package).
        return_mask: also return the (N, 1, H, W) 0/1 keep mask.

    Returns:
        (N, C, H, W) tensor in x's dtype; with ``return_mask``, also the mask.
    """
    p = _checked(x, p, block_size, 2)
    return _drop_block_reference_mode(x, p, block_size, training, generator, return_mask)


def drop_block1d_reference(
    x: Tensor,
    p: float | Tensor,
    block_size: int,
    training: bool = True,
    *,
    generator: torch.Generator | None = None,
    return_mask: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`drop_block2d_reference` with one axis. PyPI ``dropblock`` 0.3.0 has no 1-D class:
    this is our assumption, the package's formulas with one axis.

    Centres drawn with rate ``p / block_size`` on every position, one (L,) mask per sequence
    shared by the channels, segments ``i - (b - 1) // 2 .. i + b // 2`` around each centre
    clipped at the ends, one rescaling for the whole batch (so it drops less than p).

    Args:
        x: (N, C, L) floating tensor.
        p, block_size, training, generator: as for :func:`drop_block2d_reference`.
        return_mask: also return the (N, 1, L) 0/1 keep mask.

    Returns:
        (N, C, L) tensor in x's dtype; with ``return_mask``, also the mask.
    """
    p = _checked(x, p, block_size, 1)
    return _drop_block_reference_mode(x, p, block_size, training, generator, return_mask)


def drop_block3d_reference(
    x: Tensor,
    p: float | Tensor,
    block_size: int,
    training: bool = True,
    *,
    generator: torch.Generator | None = None,
    return_mask: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """PyPI ``dropblock`` 0.3.0's ``DropBlock3D(p, block_size)``: :func:`drop_block2d_reference`
    with three axes, bit for bit on the CPU with the same seed.

    Centres drawn with rate ``p / block_size**3`` on every voxel, one (D, H, W) mask per volume
    shared by the channels, one rescaling for the whole batch (so it drops less than p); zeros
    where the package gives NaN.

    Args:
        x: (N, C, D, H, W) floating tensor.
        p, block_size, training, generator: as for :func:`drop_block2d_reference`.
        return_mask: also return the (N, 1, D, H, W) 0/1 keep mask.

    Returns:
        (N, C, D, H, W) tensor in x's dtype; with ``return_mask``, also the mask.
    """
    p = _checked(x, p, block_size, 3)
    return _drop_block_reference_mode(x, p, block_size, training, generator, return_mask)


def _checked(x: Tensor, p: float | Tensor, block_size: int, n_axes: int) -> float | Tensor:
    check_tensor("input", x, n_axes + 2, _LAYOUTS[n_axes])
    check_int("block_size", block_size, minimum=1)
    return p if isinstance(p, Tensor) else check_drop_rate(p)


def _drop_block(x, p, block_size, training, n_axes, per_channel, generator, return_mask, inplace):
    """The exact-rate functional forms, with ``n_axes`` spatial axes."""
    p = _checked(x, p, block_size, n_axes)
    result = _drop_block_exact(x, p, block_size, training, per_channel, generator, return_mask)
    if not inplace or result is x or (return_mask and result[0] is x):
        return result
    x.copy_(result[0] if return_mask else result)
    return (x, result[1]) if return_mask else x


def _identity(x: Tensor, mask_channels: int, return_mask: bool):
    if not return_mask:
        return x
    mask_shape = (x.shape[0], mask_channels, *x.shape[2:])
    return x, x.new_ones((1,) * x.dim()).expand(mask_shape)


def _drop_block_exact(
    x: Tensor,
    p: float | Tensor,
    block_size: int,
    training: bool,
    per_channel: bool,
    generator: torch.Generator | None,
    return_mask: bool,
    gamma: float | Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The exact-rate forms on checked arguments, any number of spatial axes; ``gamma``: the
    centre rate for this ``p`` and map size when already solved (the module's cache on
    accelerators)."""
    # The map size fixes the coverage histogram and the block geometry: under torch.compile with
    # dynamic shapes, operator.index specialises it (a guard), while N and C can stay dynamic.
    sizes = tuple(operator.index(size) for size in x.shape[2:])
    mask_channels = x.shape[1] if per_channel else 1
    if not training or (not isinstance(p, Tensor) and p == 0.0) or x.numel() == 0:
        return _identity(x, mask_channels, return_mask)
    compiling = torch.compiler.is_compiling()
    if x.device.type == "cpu" and not compiling:
        rate = float(p)  # a CPU scalar: a memory read, not a synchronisation
        if rate == 0.0:
            return _identity(x, mask_channels, return_mask)
        gamma = solve_gamma(rate, *sizes, block_size)
        block = effective_block(block_size, *sizes)
        return drop_block_sparse(x, gamma, block, per_channel, generator, return_mask)
    if gamma is None and not isinstance(p, Tensor) and not compiling:
        gamma = solve_gamma(p, *sizes, block_size)  # a float: no copy to the device
    elif gamma is None:
        p_tensor = p if isinstance(p, Tensor) else torch.tensor(p, dtype=torch.float64)
        gamma = _solve_gamma_tensor(p_tensor.to(x.device), *sizes, block_size)
    return _drop_block_dense(x, gamma, block_size, per_channel, generator, return_mask)


def _drop_block_reference_mode(
    x: Tensor,
    p: float | Tensor,
    block_size: int,
    training: bool,
    generator: torch.Generator | None,
    return_mask: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """The reference forms on checked arguments, any number of spatial axes."""
    if not training or (not isinstance(p, Tensor) and p == 0.0) or x.numel() == 0:
        return _identity(x, 1, return_mask)
    if isinstance(p, Tensor) and p.device.type == "cpu" and not torch.compiler.is_compiling():
        # A memory read. As a float p, it gives the package's gamma bit for bit, and p = 0
        # returns x without drawing, as the package does.
        p = float(p)
        if p == 0.0:
            return _identity(x, 1, return_mask)
    return _drop_block_reference(x, p, block_size, generator, return_mask)


def _blocks_from_centres(centres: Tensor, *block: int) -> Tensor:
    """The 0/1 map of sites covered by a block around any centre (same shape, same dtype).

    Args:
        centres: (N, C, *sizes) 0/1 map of block centres, 1 to 3 spatial axes. A block centred
            on index i of an axis covers ``i - (b - 1) // 2 .. i + b // 2`` there; centres
            outside the valid region give blocks clipped at the border.
        block: the block's extent along each spatial axis.
    """
    # Output site r is covered iff a centre lies in r - b // 2 .. r + (b - 1) // 2 on every axis:
    # pad that many sites before and after (F.pad lists the last axis first), then a stride-1
    # max-pool.
    padding = []
    for extent in reversed(block):
        padding += (extent // 2, (extent - 1) // 2)
    return _MAX_POOLS[len(block)](F.pad(centres, padding), block, stride=1)


def _dense_keep(shape, gamma, block: tuple[int, ...], generator, dtype, device) -> Tensor:
    """(N, C, *sizes) 0/1 keep mask in ``dtype`` from one uniform draw per valid centre.

    No host synchronisation and no data-dependent shape: the sampler for accelerators and
    torch.compile. ``gamma`` is a float or a 0-d tensor on ``device``; ``block`` the clamped
    block extent per spatial axis.
    """
    n_samples, n_channels, *sizes = shape
    valid = tuple(size - extent + 1 for size, extent in zip(sizes, block, strict=True))
    # float32 draws: a float16 uniform would round gamma to a multiple of 2**-11.
    valid_centres = (uniform((n_samples, n_channels, *valid), generator, device) < gamma).to(dtype)
    # Place the valid region inside the full map: centres sit (b - 1) // 2 from the start.
    padding = []
    for extent in reversed(block):
        padding += ((extent - 1) // 2, extent // 2)
    return 1 - _blocks_from_centres(F.pad(valid_centres, padding), *block)


def _drop_block_dense(x, gamma, block_size, per_channel, generator, return_mask):
    """DropBlock with the dense sampler (:func:`_dense_keep`) and one multiplier."""
    n_samples, n_channels, *sizes = x.shape
    block = effective_block(block_size, *sizes)
    mask_channels = n_channels if per_channel else 1
    with torch.no_grad():
        mask_shape = (n_samples, mask_channels, *sizes)
        keep = _dense_keep(mask_shape, gamma, block, generator, x.dtype, x.device)
        per_sample = keep[0].numel()
        spatial = tuple(range(2, keep.dim()))
        kept = keep.sum(dim=(1, *spatial), dtype=torch.float32)
        scale = (per_sample / kept.clamp(min=1.0)).to(x.dtype)
        scale = scale.view(n_samples, 1, *(1 for _ in spatial))
        multiplier = keep * scale
        channels_last = _CHANNELS_LAST.get(x.dim())
        if per_channel and channels_last and x.is_contiguous(memory_format=channels_last):
            multiplier = multiplier.contiguous(memory_format=channels_last)
    out = x * multiplier
    return (out, keep) if return_mask else out


def _drop_block_reference(x, p, block_size, generator, return_mask):
    """PyPI ``dropblock`` 0.3.0's ``DropBlock2D(p, block_size)`` (``DropBlock3D`` for volumes;
    the same formulas with one axis for sequences, our assumption) in training, NaN-free.

    Centres are drawn with rate ``gamma = p / block_size**d`` (d spatial axes) on every site,
    one map per sample shared by all channels, and grown into ``block_size`` boxes clipped at
    the border (``i - (b - 1) // 2 .. i + b // 2`` around centre index i on each axis, as the
    package's padded max-pool and its crop for even sizes place them; no clamping is needed: a
    block larger than the map covers all of it). The kept values are rescaled by one factor for
    the whole batch, ``count(mask) / count_ones(mask)``, in the package's order of operations.

    The draw is ``torch.rand((N, *sizes))`` in float32 from ``generator`` (the global RNG when
    None), the package's only use of the RNG, so on the CPU with the same seed the output is the
    package's bit for bit. The package draws on the CPU and copies the mask to x's device; here
    it is drawn on x's device (no copy; a different stream off the CPU).

    Where the package divides by zero (every site of the batch dropped: NaN), this returns
    zeros.

    Args:
        x: (N, C, *sizes) floating tensor, 1 to 3 spatial axes.
        p: float, or 0-d tensor (used as a tensor: no host synchronisation).
        block_size: block side, >= 1.
        generator: random source on x's device, or None.
        return_mask: also return the 0/1 keep mask.

    Returns:
        (N, C, *sizes) tensor in x's dtype (computed in float32, or float64 for float64 input:
        the package's float32 mask promotes half inputs, and a half product with the batch's
        site count would overflow); with ``return_mask``, also the (N, 1, *sizes) mask in x's
        dtype.
    """
    n_samples, _, *sizes = x.shape
    n_axes = len(sizes)
    with torch.no_grad():
        if isinstance(p, Tensor):
            gamma = p.to(device=x.device, dtype=torch.float32) / block_size**n_axes
        else:
            gamma = p / block_size**n_axes  # Python floats: the package's rounding exactly
        draws = uniform((n_samples, *sizes), generator, x.device)
        centres = (draws < gamma).to(torch.float32)[:, None]
        keep = 1 - _blocks_from_centres(centres, *(block_size,) * n_axes)
        # float32 counts are exact up to 2**24 sites per batch (a 1024 x 128 x 128 batch); the
        # package counts in float32 too.
        kept = keep.sum().clamp(min=1.0)
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    # (x * mask) * count / count_ones, as the package computes it, so that rounding matches.
    out = (x.to(compute_dtype) * keep * keep.numel() / kept).to(x.dtype)
    return (out, keep.to(x.dtype)) if return_mask else out


class _DropBlockNd(DropRateModule):
    """What DropBlock1d, DropBlock2d and DropBlock3d share: all but the number of axes."""

    #: Spatial axes of the input.
    N_AXES = 2

    def __init__(
        self,
        p: float = 0.1,
        block_size: int = 7,
        *,
        per_channel: bool = True,
        generator: torch.Generator | None = None,
        mode: str = "exact",
    ) -> None:
        super().__init__(p)
        self.block_size = check_int("block_size", block_size, minimum=1)
        self.mode = check_choice("mode", mode, MODES)
        self.per_channel = per_channel
        self.generator = generator
        self._gamma_key: tuple | None = None
        self._gamma: Tensor | None = None

    def _cached_gamma(self, x: Tensor) -> Tensor | None:
        """gamma for the current p and map size on accelerators in eager mode, else None.

        Newton's 20 small steps cost ~150 kernel launches, so they run once per rate and map
        size. The key holds the buffer itself (so a replaced buffer is never mistaken for the old
        one) and its version counter, which every in-place write (set_p, load_state_dict) bumps.
        """
        if x.device.type == "cpu" or torch.compiler.is_compiling():
            return None
        key = (self.p._version, tuple(x.shape[2:]), x.device)
        cached = self._gamma_key
        if cached is None or cached[0] is not self.p or cached[1:] != key:
            self._gamma = _solve_gamma_tensor(self.p.to(x.device), *key[1], self.block_size)
            self._gamma_key = (self.p, *key)
        return self._gamma

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("input", x, self.N_AXES + 2, _LAYOUTS[self.N_AXES])
        if self.mode == "exact":
            gamma = self._cached_gamma(x) if self.training else None
            result = _drop_block_exact(
                x,
                self.p,
                self.block_size,
                self.training,
                self.per_channel,
                self.generator,
                self.record_mask,
                gamma,
            )
        else:
            result = _drop_block_reference_mode(
                x, self.p, self.block_size, self.training, self.generator, self.record_mask
            )
        if self.record_mask:
            result, mask = result
            self._remember(mask)
        return result

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        pickled_defaults(self, {"mode": "exact"})

    def extra_repr(self) -> str:
        settings = f"p={float(self.p):g}, block_size={self.block_size}"
        if self.mode == "exact":
            return f"{settings}, per_channel={self.per_channel}"
        # The reference mode shares one mask across channels: per_channel does not apply.
        return f"{settings}, mode={self.mode!r}"


class DropBlock2d(_DropBlockNd):
    """DropBlock as a layer, with the exact drop rate; see :func:`drop_block2d`.

    ``forward`` passes the rate buffer ``p`` as a tensor. On accelerators it solves gamma in
    tensor operations once per rate and map size (no host synchronisation); under torch.compile
    the solve is part of the graph, so ``set_p`` needs no recompilation; on the CPU in eager mode
    the sparse sampler reads p and the number of centres on the host (a memory read there).

    Args:
        p: fraction of pixels dropped in training, in [0, 1); stored in the buffer ``p``.
        block_size: block side (the DropBlock paper: 7 on ImageNet; the DropCluster paper: 5 on
            CIFAR-100); clamped per dimension to the map size.
        per_channel: independent masks per channel (default), or one per image.
        generator: random source on the input's device.
        mode: ``"exact"`` (default): the expected dropped fraction is p. ``"reference"``: PyPI
            ``dropblock`` 0.3.0's ``DropBlock2D(p, block_size)``, the DropCluster paper's
            DropBlock baseline (one mask per image whatever ``per_channel`` says, gamma
            ``p / block_size**2``, one rescaling per batch; zeros where the package gives NaN).
            A constructor setting, not state: state dicts are the same in both modes.

    Shape:
        input (N, C, H, W) -> output (N, C, H, W), same dtype.
    """

    N_AXES = 2


class DropBlock1d(_DropBlockNd):
    """DropBlock on sequences, with the exact drop rate; see :func:`drop_block1d`.

    :class:`DropBlock2d` with one spatial axis: the same options, rate buffer, schedules,
    caching and torch.compile behaviour (``set_p`` needs no recompilation). The paper is 2-D
    only: dropping segments of ``block_size`` positions is our assumption.

    Args:
        p: fraction of positions dropped in training, in [0, 1); stored in the buffer ``p``.
        block_size: segment length; clamped to the sequence length.
        per_channel: independent masks per channel (default), or one per sequence.
        generator: random source on the input's device.
        mode: ``"exact"`` (default): the expected dropped fraction is p. ``"reference"``: PyPI
            ``dropblock`` 0.3.0's formulas with one axis (the package has no 1-D class; our
            assumption, :func:`drop_block1d_reference`): one mask per sequence whatever
            ``per_channel`` says, gamma ``p / block_size``, one rescaling per batch.

    Shape:
        input (N, C, L) -> output (N, C, L), same dtype.
    """

    N_AXES = 1


class DropBlock3d(_DropBlockNd):
    """DropBlock on volumes, with the exact drop rate; see :func:`drop_block3d`.

    :class:`DropBlock2d` with three spatial axes: the same options, rate buffer, schedules,
    caching and torch.compile behaviour (``set_p`` needs no recompilation). The paper is 2-D
    only: dropping ``block_size`` cubes is our assumption.

    Args:
        p: fraction of voxels dropped in training, in [0, 1); stored in the buffer ``p``.
        block_size: cube side; clamped per axis to the map size.
        per_channel: independent masks per channel (default), or one per volume.
        generator: random source on the input's device.
        mode: ``"exact"`` (default): the expected dropped fraction is p. ``"reference"``: PyPI
            ``dropblock`` 0.3.0's ``DropBlock3D(p, block_size)``, bit for bit on the CPU with the
            same seed (:func:`drop_block3d_reference`): one mask per volume whatever
            ``per_channel`` says, gamma ``p / block_size**3``, one rescaling per batch; zeros
            where the package gives NaN.

    Shape:
        input (N, C, D, H, W) -> output (N, C, D, H, W), same dtype.
    """

    N_AXES = 3
