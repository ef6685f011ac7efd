"""DropBlock (Ghiasi et al., "DropBlock: A regularization method for convolutional networks",
NeurIPS 2018, Algorithm 1) with the drop rate matched exactly.

Block *origins* are sampled i.i.d. with rate gamma over the positions where a whole block fits
(the paper's valid region), and each origin drops the ``block_size x block_size`` square below
and to the right of it. The paper's gamma (and torchvision's, timm's) is a first-order formula
that ignores overlapping blocks, so the realised drop fraction misses p (by up to 40 % on small
maps). Here gamma solves the exact equation instead: pixel j is covered by ``n_j`` possible
blocks and is kept with probability ``(1 - gamma) ** n_j``, so the expected dropped fraction is

    f(gamma) = 1 - mean_j (1 - gamma) ** n_j,

which is increasing and concave in gamma; Newton's method from the first-order value converges
monotonically to ``f(gamma) = p``. Kept values are rescaled per sample by
``count(mask) / count_ones(mask)``.

Two samplers draw the same i.i.d. Bernoulli(gamma) origins: a dense one (one uniform number per
position, then a max-pool), used on accelerators and under ``torch.compile``, and a sparse one
for the CPU, which draws the gaps between origins (geometric variables) and writes the blocks
directly; with ``gamma`` around 0.01 it needs about 100x fewer random numbers.
"""

from __future__ import annotations

import math
from collections import Counter
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from dropcluster.nn._drop_rate import DropRateModule, check_drop_rate, check_positive_int

_NEWTON_STEPS = 30


def effective_block(block_size: int, height: int, width: int) -> tuple[int, int]:
    """Block height and width actually used: ``block_size`` clamped to the map's size."""
    return min(block_size, height), min(block_size, width)


# Filled by coverage_histogram; a plain dict, which torch.compile traces without warnings.
_HISTOGRAMS: dict[tuple[int, int, int], tuple[tuple[int, int], ...]] = {}


def coverage_histogram(height: int, width: int, block_size: int) -> tuple[tuple[int, int], ...]:
    """Distinct coverage counts ``n`` and how many pixels have each, as ((n, pixels), ...).

    ``n_j`` is the number of valid block origins whose block covers pixel j: the product of the
    row and column counts, since blocks are squares on a grid.
    """
    block_h, block_w = effective_block(block_size, height, width)

    def counts(size: int, block: int) -> list[int]:
        n_origins = size - block + 1
        return [min(i, n_origins - 1) - max(0, i - block + 1) + 1 for i in range(size)]

    key = (height, width, block_size)
    if key not in _HISTOGRAMS:
        products = Counter(r * c for r in counts(height, block_h) for c in counts(width, block_w))
        _HISTOGRAMS[key] = tuple(sorted(products.items()))
    return _HISTOGRAMS[key]


def expected_drop_fraction(gamma: float, height: int, width: int, block_size: int) -> float:
    """f(gamma): expected fraction of dropped pixels for origin rate ``gamma``."""
    histogram = coverage_histogram(height, width, block_size)
    total = height * width
    return 1.0 - sum(pixels * (1.0 - gamma) ** n for n, pixels in histogram) / total


@lru_cache(maxsize=4096)
def solve_gamma(p: float, height: int, width: int, block_size: int) -> float:
    """The origin rate gamma whose expected dropped fraction is exactly ``p``."""
    if p <= 0.0:
        return 0.0
    histogram = coverage_histogram(height, width, block_size)
    total = height * width
    gamma = p * total / sum(n * pixels for n, pixels in histogram)  # first order: below root
    for _ in range(_NEWTON_STEPS):
        value = 1.0 - sum(pixels * (1.0 - gamma) ** n for n, pixels in histogram) / total
        slope = sum(pixels * n * (1.0 - gamma) ** (n - 1) for n, pixels in histogram) / total
        step = (p - value) / slope
        gamma = min(gamma + step, 1.0)
        if abs(step) < 1e-15:
            break
    return gamma


def _solve_gamma_tensor(p: Tensor, height: int, width: int, block_size: int) -> Tensor:
    """:func:`solve_gamma` in tensor operations on a 0-d ``p`` (no host sync, compilable)."""
    histogram = coverage_histogram(height, width, block_size)
    n = torch.tensor([h[0] for h in histogram], dtype=torch.float64, device=p.device)
    weight = torch.tensor([h[1] for h in histogram], dtype=torch.float64, device=p.device)
    weight = weight / (height * width)
    target = p.to(torch.float64)
    gamma = target / (n * weight).sum()
    for _ in range(_NEWTON_STEPS):
        keep = (1.0 - gamma) ** (n - 1)
        value = 1.0 - (weight * keep * (1.0 - gamma)).sum()
        slope = (weight * n * keep).sum()
        gamma = (gamma + (target - value) / slope).clamp(max=1.0)
    return gamma


def drop_block2d(
    x: Tensor,
    p: float | Tensor,
    block_size: int,
    *,
    training: bool = True,
    per_channel: bool = True,
    generator: torch.Generator | None = None,
    return_mask: bool = False,
    gamma: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """DropBlock with the expected dropped fraction equal to ``p``.

    Args:
        x: (N, C, H, W) float tensor, any memory format and device.
        p: fraction of pixels to drop, in [0, 1); a float or a 0-d tensor.
        block_size: side of the square blocks; clamped to the map (a block never exceeds
            H x W). Even sizes are exact: a block covers ``block_size`` rows and columns.
        training: identity when False.
        per_channel: independent masks per channel (the paper's Algorithm 1); False shares
            one mask across the channels of each image.
        generator: random source on x's device.
        return_mask: also return the 0/1 keep mask (N, C or 1, H, W), before rescaling.
        gamma: the origin rate for this p and shape, if already solved (0-d float64 tensor on
            x's device; the module caches it between calls on accelerators).

    Returns:
        (N, C, H, W) in x's dtype: ``x * mask * count(mask) / count_ones(mask)`` per sample.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x)
        raise ValueError(f"input should be 4 dimensional (N, C, H, W), but got {shape}")
    check_positive_int("block_size", block_size)
    if not isinstance(p, Tensor):
        p = check_drop_rate(p)
    if not training or (not isinstance(p, Tensor) and p == 0.0) or x.numel() == 0:
        if return_mask:
            return x, torch.ones((1,) * 4, dtype=x.dtype, device=x.device).expand(x.shape)
        return x
    n_samples, n_channels, height, width = x.shape
    mask_channels = n_channels if per_channel else 1
    sparse = x.device.type == "cpu" and not torch.compiler.is_compiling()
    with torch.no_grad():
        mask_shape = (n_samples, mask_channels, height, width)
        if sparse:
            rate = float(p)  # free on the CPU
            gamma = solve_gamma(rate, height, width, block_size)
            keep = _sparse_keep(mask_shape, gamma, block_size, generator, x.dtype)
        else:
            if gamma is None:
                p_tensor = p if isinstance(p, Tensor) else torch.tensor(p, device=x.device)
                gamma = _solve_gamma_tensor(p_tensor.to(x.device), height, width, block_size)
            keep = _dense_keep(mask_shape, gamma, block_size, generator, x.dtype, x.device)
        per_sample = mask_channels * height * width
        kept = keep.reshape(n_samples, -1).sum(dim=1, dtype=torch.float32)
        scale = (per_sample / kept.clamp(min=1.0)).to(x.dtype).view(n_samples, 1, 1, 1)
        multiplier = keep * scale if return_mask else keep.mul_(scale)
        if x.is_contiguous(memory_format=torch.channels_last) and per_channel:
            multiplier = multiplier.contiguous(memory_format=torch.channels_last)
    out = x * multiplier
    return (out, keep) if return_mask else out


def _dense_keep(shape, gamma: Tensor, block_size: int, generator, dtype, device) -> Tensor:
    """(N, C', H, W) 0/1 keep mask in ``dtype``: one uniform number per valid origin."""
    n_samples, n_channels, height, width = shape
    block_h, block_w = effective_block(block_size, height, width)
    origins_shape = (n_samples, n_channels, height - block_h + 1, width - block_w + 1)
    uniform = torch.rand(origins_shape, generator=generator, device=device, dtype=torch.float64)
    origins = (uniform < gamma).to(dtype)
    # An origin at (i, j) drops rows i..i+bh-1 and columns j..j+bw-1.
    padded = F.pad(origins, (block_w - 1, block_w - 1, block_h - 1, block_h - 1))
    return 1 - F.max_pool2d(padded, (block_h, block_w), stride=1)


def _sparse_keep(shape, gamma: float, block_size: int, generator, dtype) -> Tensor:
    """(N, C', H, W) 0/1 keep mask in ``dtype`` from origins drawn as geometric gaps (CPU)."""
    n_samples, n_channels, height, width = shape
    block_h, block_w = effective_block(block_size, height, width)
    rows, cols = height - block_h + 1, width - block_w + 1
    n_origins = n_samples * n_channels * rows * cols
    keep = torch.ones(n_samples * n_channels * height * width, dtype=dtype)
    if gamma <= 0.0:
        return keep.view(shape)
    if gamma >= 1.0:
        positions = torch.arange(n_origins)
    else:
        positions = _bernoulli_positions(n_origins, gamma, generator)
    # Flat origin index -> (map, row, col) -> flat index of the block's top-left pixel.
    plane, rest = positions // (rows * cols), positions % (rows * cols)
    top_left = plane * (height * width) + (rest // cols) * width + rest % cols
    offsets = (torch.arange(block_h).view(-1, 1) * width + torch.arange(block_w).view(1, -1)).view(
        1, -1
    )
    keep.index_fill_(0, (top_left.view(-1, 1) + offsets).view(-1), 0)
    return keep.view(shape)


def _bernoulli_positions(n_positions: int, gamma: float, generator) -> Tensor:
    """Sorted indices of an i.i.d. Bernoulli(gamma) process on ``range(n_positions)``.

    The gaps between successive successes are geometric: ``1 + floor(log U / log(1 - gamma))``.
    """
    log_miss = math.log1p(-gamma)
    expected = n_positions * gamma
    chunk = int(expected + 6.0 * math.sqrt(expected) + 16)
    parts, end = [], -1
    while end < n_positions - 1:
        uniform = torch.rand(chunk, generator=generator, dtype=torch.float64)
        gaps = torch.floor(torch.log(uniform) / log_miss).add_(1).to(torch.int64)
        positions = torch.cumsum(gaps, 0).add_(end)
        parts.append(positions)
        end = int(positions[-1])
    positions = torch.cat(parts)
    return positions[positions < n_positions]


class DropBlock2d(DropRateModule):
    """DropBlock as a layer; see :func:`drop_block2d`.

    Args:
        p: fraction of pixels dropped in training, in [0, 1).
        block_size: block side (the paper: 7 on ImageNet; 5 on CIFAR-100 in the DropCluster
            paper); clamped to the map size.
        per_channel: independent masks per channel (default), or one per image.
        generator: random source on the input's device.

    Shape:
        input (N, C, H, W) -> output (N, C, H, W).
    """

    def __init__(
        self,
        p: float = 0.1,
        block_size: int = 7,
        *,
        per_channel: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(p)
        self.block_size = check_positive_int("block_size", block_size)
        self.per_channel = per_channel
        self.generator = generator
        self._gamma_key: tuple | None = None
        self._gamma: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        gamma = None
        if self.training and x.device.type != "cpu" and not torch.compiler.is_compiling():
            # Newton's 30 small steps cost ~100 kernel launches: solve once per rate and shape.
            # The buffer's version counter changes with every in-place write (set_p, loading).
            key = (self.p._version, self.p.data_ptr(), tuple(x.shape[-2:]), x.device)
            if self._gamma_key != key:
                self._gamma = _solve_gamma_tensor(self.p.to(x.device), *key[2], self.block_size)
                self._gamma_key = key
            gamma = self._gamma
        result = drop_block2d(
            x, self.p, self.block_size, training=self.training, per_channel=self.per_channel,
            generator=self.generator, return_mask=self.record_mask, gamma=gamma,
        )  # fmt: skip
        return self._unpack(result)

    def extra_repr(self) -> str:
        return f"p={float(self.p):g}, block_size={self.block_size}, per_channel={self.per_channel}"
