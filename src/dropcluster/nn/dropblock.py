"""DropBlock (Ghiasi et al., NeurIPS 2018, Algorithm 1) with the drop rate matched exactly, and
the PyPI ``dropblock`` 0.3.0 algorithm the DropCluster paper ran as its baseline.

``p`` is the fraction of pixels to drop and ``b`` the block side, clamped per dimension to the
map (:func:`effective_block`); block centres are drawn with rate gamma on the positions where a
whole block fits. The paper's gamma is the first-order solution of "expected dropped fraction =
p" and falls short of p; here that equation is solved exactly (:func:`solve_gamma`), so the
expected dropped fraction is p for every map and block size. docs/design.md, "DropBlock's drop
rate", works it through, with the reference algorithm (:func:`drop_block2d_reference`) beside.
On the CPU in eager mode the centres are drawn sparsely
(:mod:`dropcluster.nn.dropblock_sampler`); elsewhere densely, with no host synchronisation.
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
    "DropBlock2d",
    "coverage_histogram",
    "drop_block2d",
    "drop_block2d_reference",
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


def effective_block(block_size: int, height: int, width: int) -> tuple[int, int]:
    """Block height and width actually used: ``block_size`` clamped to the map's size.

    A block larger than the map would have no valid centre at all; clamped, it covers the whole
    map along that dimension and has exactly one valid centre there.
    """
    return min(block_size, height), min(block_size, width)


_HISTOGRAMS: dict[tuple[int, int, int], tuple[tuple[int, int], ...]] = {}


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
def coverage_histogram(height: int, width: int, block_size: int) -> tuple[tuple[int, int], ...]:
    """Distinct coverage counts ``n`` and how many pixels have each, as ((n, pixels), ...).

    ``n_j`` is the number of valid centres whose block covers pixel j: the product of the row and
    column counts, since blocks are rectangles on a grid. Cached per shape.
    """
    key = (height, width, block_size)
    if key not in _HISTOGRAMS:
        block_h, block_w = effective_block(block_size, height, width)
        rows, cols = _line_coverage(height, block_h), _line_coverage(width, block_w)
        products = Counter(r * c for r in rows for c in cols)
        _HISTOGRAMS[key] = tuple(sorted(products.items()))
    return _HISTOGRAMS[key]


def expected_drop_fraction(gamma: float, height: int, width: int, block_size: int) -> float:
    """``f(gamma) = 1 - mean_j (1 - gamma) ** n_j``: expected fraction of dropped pixels."""
    histogram = coverage_histogram(height, width, block_size)
    log_miss = math.log1p(-gamma) if gamma < 1.0 else -math.inf
    dropped = sum(-pixels * math.expm1(n * log_miss) for n, pixels in histogram)
    return dropped / (height * width)


def _solve_gamma_tensor(p: Tensor, height: int, width: int, block_size: int) -> Tensor:
    """The centre rate gamma with ``f(gamma) = p``, in tensor operations on a 0-d ``p``.

    Newton's method on ``f``, which is increasing and concave: from the first-order value
    ``p / mean_j n_j`` (below the root, since ``f(gamma) <= gamma * mean_j n_j``) every step
    stays below the root and converges to it. A fixed number of steps and no Python branch on
    ``p``: no host synchronisation, and torch.compile traces it once for every ``p``.

    Returns:
        0-d float64 tensor on p's device.
    """
    histogram = coverage_histogram(height, width, block_size)
    # Built on the host and sent without a stream synchronisation (a 2 x n table).
    table = torch.tensor(histogram, dtype=torch.float64).to(p.device, non_blocking=True)
    counts, weights = table[:, 0], table[:, 1] / (height * width)
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
def solve_gamma(p: float, height: int, width: int, block_size: int) -> float:
    """The centre rate gamma whose expected dropped fraction is exactly ``p`` (cached)."""
    return float(
        _solve_gamma_tensor(torch.tensor(p, dtype=torch.float64), height, width, block_size)
    )


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
    p = _checked(x, p, block_size)
    result = _drop_block_exact(x, p, block_size, training, per_channel, generator, return_mask)
    if not inplace or result is x or (return_mask and result[0] is x):
        return result
    x.copy_(result[0] if return_mask else result)
    return (x, result[1]) if return_mask else x


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
    p = _checked(x, p, block_size)
    return _drop_block_reference_mode(x, p, block_size, training, generator, return_mask)


def _checked(x: Tensor, p: float | Tensor, block_size: int) -> float | Tensor:
    check_tensor("input", x, 4, "(N, C, H, W)")
    check_int("block_size", block_size, minimum=1)
    return p if isinstance(p, Tensor) else check_drop_rate(p)


def _identity(x: Tensor, mask_channels: int, return_mask: bool):
    if not return_mask:
        return x
    mask_shape = (x.shape[0], mask_channels, *x.shape[2:])
    return x, x.new_ones(1, 1, 1, 1).expand(mask_shape)


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
    """:func:`drop_block2d` on checked arguments; ``gamma``: the centre rate for this ``p`` and
    map size when already solved (the module's cache on accelerators)."""
    # The map size fixes the coverage histogram and the block geometry: under torch.compile with
    # dynamic shapes, operator.index specialises it (a guard), while N and C can stay dynamic.
    height, width = operator.index(x.shape[2]), operator.index(x.shape[3])
    mask_channels = x.shape[1] if per_channel else 1
    if not training or (not isinstance(p, Tensor) and p == 0.0) or x.numel() == 0:
        return _identity(x, mask_channels, return_mask)
    compiling = torch.compiler.is_compiling()
    if x.device.type == "cpu" and not compiling:
        rate = float(p)  # a CPU scalar: a memory read, not a synchronisation
        if rate == 0.0:
            return _identity(x, mask_channels, return_mask)
        gamma = solve_gamma(rate, height, width, block_size)
        block = effective_block(block_size, height, width)
        return drop_block_sparse(x, gamma, block, per_channel, generator, return_mask)
    if gamma is None and not isinstance(p, Tensor) and not compiling:
        gamma = solve_gamma(p, height, width, block_size)  # a float: no copy to the device
    elif gamma is None:
        p_tensor = p if isinstance(p, Tensor) else torch.tensor(p, dtype=torch.float64)
        gamma = _solve_gamma_tensor(p_tensor.to(x.device), height, width, block_size)
    return _drop_block_dense(x, gamma, block_size, per_channel, generator, return_mask)


def _drop_block_reference_mode(
    x: Tensor,
    p: float | Tensor,
    block_size: int,
    training: bool,
    generator: torch.Generator | None,
    return_mask: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`drop_block2d_reference` on checked arguments."""
    if not training or (not isinstance(p, Tensor) and p == 0.0) or x.numel() == 0:
        return _identity(x, 1, return_mask)
    if isinstance(p, Tensor) and p.device.type == "cpu" and not torch.compiler.is_compiling():
        # A memory read. As a float p, it gives the package's gamma bit for bit, and p = 0
        # returns x without drawing, as the package does.
        p = float(p)
        if p == 0.0:
            return _identity(x, 1, return_mask)
    return _drop_block_reference(x, p, block_size, generator, return_mask)


def _blocks_from_centres(centres: Tensor, block_h: int, block_w: int) -> Tensor:
    """The 0/1 map of pixels covered by a block around any centre (same shape, same dtype).

    Args:
        centres: (N, C, H, W) 0/1 map of block centres. A block centred on (i, j) covers rows
            ``i - (block_h - 1) // 2 .. i + block_h // 2`` and likewise for columns; centres
            outside the valid region give blocks clipped at the border.
        block_h, block_w: block size.
    """
    # Output pixel r is covered iff a centre lies in rows r - block_h // 2 .. r + (block_h-1)//2:
    # pad that many rows before and after, then a stride-1 max-pool.
    padding = (block_w // 2, (block_w - 1) // 2, block_h // 2, (block_h - 1) // 2)
    return F.max_pool2d(F.pad(centres, padding), (block_h, block_w), stride=1)


def _dense_keep(shape, gamma, block_h: int, block_w: int, generator, dtype, device) -> Tensor:
    """(N, C, H, W) 0/1 keep mask in ``dtype`` from one uniform draw per valid centre.

    No host synchronisation and no data-dependent shape: the sampler for accelerators and
    torch.compile. ``gamma`` is a float or a 0-d tensor on ``device``.
    """
    n_samples, n_channels, height, width = shape
    valid_shape = (n_samples, n_channels, height - block_h + 1, width - block_w + 1)
    # float32 draws: a float16 uniform would round gamma to a multiple of 2**-11.
    valid_centres = (uniform(valid_shape, generator, device) < gamma).to(dtype)
    # Place the valid region inside the full map: centres sit (block - 1) // 2 from the edge.
    centres = F.pad(
        valid_centres, ((block_w - 1) // 2, block_w // 2, (block_h - 1) // 2, block_h // 2)
    )
    return 1 - _blocks_from_centres(centres, block_h, block_w)


def _drop_block_dense(x, gamma, block_size, per_channel, generator, return_mask):
    """DropBlock with the dense sampler (:func:`_dense_keep`) and one multiplier."""
    n_samples, n_channels, height, width = x.shape
    block = effective_block(block_size, height, width)
    mask_channels = n_channels if per_channel else 1
    with torch.no_grad():
        mask_shape = (n_samples, mask_channels, height, width)
        keep = _dense_keep(mask_shape, gamma, *block, generator, x.dtype, x.device)
        per_sample = mask_channels * height * width
        kept = keep.sum(dim=(1, 2, 3), dtype=torch.float32)
        scale = (per_sample / kept.clamp(min=1.0)).to(x.dtype).view(n_samples, 1, 1, 1)
        multiplier = keep * scale
        if per_channel and x.is_contiguous(memory_format=torch.channels_last):
            multiplier = multiplier.contiguous(memory_format=torch.channels_last)
    out = x * multiplier
    return (out, keep) if return_mask else out


def _drop_block_reference(x, p, block_size, generator, return_mask):
    """PyPI ``dropblock`` 0.3.0's ``DropBlock2D(p, block_size)`` in training, NaN-free.

    Centres are drawn with rate ``gamma = p / block_size**2`` on every pixel, one (H, W) map per
    image shared by all channels, and grown into ``block_size`` squares clipped at the border
    (rows ``i - (b - 1) // 2 .. i + b // 2`` around centre row i, as the package's padded
    max-pool and its crop for even sizes place them; no clamping is needed: a block larger than
    the map covers all of it). The kept values are rescaled by one factor for the whole batch,
    ``count(mask) / count_ones(mask)``, in the package's order of operations.

    The draw is ``torch.rand((N, H, W))`` in float32 from ``generator`` (the global RNG when
    None), the package's only use of the RNG, so on the CPU with the same seed the output is the
    package's bit for bit. The package draws on the CPU and copies the mask to x's device; here
    it is drawn on x's device (no copy; a different stream off the CPU).

    Where the package divides by zero (every pixel of the batch dropped: NaN), this returns
    zeros.

    Args:
        x: (N, C, H, W) floating tensor.
        p: float, or 0-d tensor (used as a tensor: no host synchronisation).
        block_size: block side, >= 1.
        generator: random source on x's device, or None.
        return_mask: also return the 0/1 keep mask.

    Returns:
        (N, C, H, W) tensor in x's dtype (computed in float32, or float64 for float64 input:
        the package's float32 mask promotes half inputs, and a half product with the batch's
        pixel count would overflow); with ``return_mask``, also the (N, 1, H, W) mask in x's
        dtype.
    """
    n_samples, _, height, width = x.shape
    with torch.no_grad():
        if isinstance(p, Tensor):
            gamma = p.to(device=x.device, dtype=torch.float32) / block_size**2
        else:
            gamma = p / block_size**2  # Python floats: the package's rounding exactly
        draws = uniform((n_samples, height, width), generator, x.device)
        centres = (draws < gamma).to(torch.float32)[:, None]
        keep = 1 - _blocks_from_centres(centres, block_size, block_size)
        # float32 counts are exact up to 2**24 pixels per batch (a 1024 x 128 x 128 batch).
        kept = keep.sum().clamp(min=1.0)
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    # (x * mask) * count / count_ones, as the package computes it, so that rounding matches.
    out = (x.to(compute_dtype) * keep * keep.numel() / kept).to(x.dtype)
    return (out, keep.to(x.dtype)) if return_mask else out


class DropBlock2d(DropRateModule):
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
        key = (self.p._version, tuple(x.shape[-2:]), x.device)
        cached = self._gamma_key
        if cached is None or cached[0] is not self.p or cached[1:] != key:
            self._gamma = _solve_gamma_tensor(self.p.to(x.device), *key[1], self.block_size)
            self._gamma_key = (self.p, *key)
        return self._gamma

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("input", x, 4, "(N, C, H, W)")
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
