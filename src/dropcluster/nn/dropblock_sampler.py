"""DropBlock's CPU sampler: the block centres drawn sparsely, the output written by index.

:func:`dropcluster.nn.dropblock.drop_block2d` (and its 1-D and 3-D forms) draws block centres
i.i.d. Bernoulli(gamma) on the valid region (symbols as in :mod:`dropcluster.nn.dropblock`). On
the CPU in eager mode it calls :func:`drop_block_sparse`, which draws the same process
differently from the dense sampler:

- the gaps between successive centres of a Bernoulli process are geometric
  (:func:`_bernoulli_positions`), so only the ~``gamma * N * C * Hv * Wv`` centres are drawn
  (about 1 % of the valid positions for p = 0.1, b = 3) instead of one uniform number per
  position;
- the dropped pixels are counted per sample from a 0/1 byte map summed as int64 words
  (:func:`count_ones`);
- the output is ``x * scale`` with the dropped pixels zeroed by index, forward and backward
  (:class:`_ScaleAndZero`), one cache-sized group of samples at a time, where a dense mask would
  cost a mask pass and a three-operand multiply each way.

It knows the number of centres on the host, which on the CPU is a memory read, not a
synchronisation. Masks have 1 to 3 spatial axes, (N, C, L), (N, C, H, W) or (N, C, D, H, W);
the docstrings below say (N, C, *sizes), and "pixel" for a site of any of them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "BYTES_PER_PARTIAL_SUM",
    "count_ones",
    "drop_block_sparse",
    "drop_blocks_at",
    "dropped_pixels",
    "sample_block_corners",
]


# Bytes of a 0/1 uint8 row summed as int64 words, 64 words at a time: see count_ones.
_WORDS_PER_PARTIAL_SUM = 64
BYTES_PER_PARTIAL_SUM = 8 * _WORDS_PER_PARTIAL_SUM

# Elements per group of samples multiplied and zeroed together (4 MB of float32, in L2/L3).
_GROUP_ELEMENTS = 1 << 20


def _bernoulli_positions(n_positions: int, gamma: float, generator) -> Tensor:
    """Sorted indices of the successes of i.i.d. Bernoulli(gamma) on ``range(n_positions)``.

    The gaps between successive successes are geometric, ``1 + floor(log(1 - U) / log(1 -
    gamma))`` for U uniform on [0, 1): one uniform number per success. U is drawn in float32
    (2**-24 steps, like the dense sampler's), the rest in float64.

    Returns:
        float64 tensor of exact integers (< 2**53), so that the index arithmetic that follows
        runs as vectorised float operations (integer division is not vectorised on the CPU).
    """
    if gamma >= 1.0:
        return torch.arange(n_positions, dtype=torch.float64)
    if gamma <= 0.0:
        return torch.empty(0, dtype=torch.float64)
    log_miss = math.log1p(-gamma)
    expected = n_positions * gamma
    # Enough gaps to pass the end with probability ~1 - 1e-9 in one round.
    chunk = int(expected + 6.0 * math.sqrt(expected) + 16)
    parts, last = [], -1.0
    while last < n_positions - 1:
        uniform = torch.rand(chunk, generator=generator).to(torch.float64)
        gaps = torch.log1p(uniform.neg_()).div_(log_miss).floor_().add_(1.0)
        positions = gaps.cumsum_(0).add_(last)
        parts.append(positions)
        last = float(positions[-1])
    positions = torch.cat(parts) if len(parts) > 1 else parts[0]
    return positions[: int(torch.searchsorted(positions, float(n_positions)))]


def _floor_div(a: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """(a // b, a % b) for float64 tensors of integers below 2**53: exact, since the correctly
    rounded a / b never reaches the next integer when a < 2**53."""
    quotient = torch.floor(a / b)
    return quotient, a - quotient * b


def sample_block_corners(shape, gamma: float, *block_and_generator):
    """``sample_block_corners(shape, gamma, *block, generator)``: the first corners of the
    dropped blocks of an (N, C, *sizes) mask, from sparse centres.

    ``block`` is the block's extent along each spatial axis (``block_h, block_w`` for an
    (N, C, H, W) mask). A valid centre at index (r, c) of the (H - bh + 1) x (W - bw + 1) valid
    region is pixel (r + (bh - 1) // 2, c + (bw - 1) // 2), and its block's top-left pixel is
    (r, c); likewise on each axis of a 1-D or 3-D mask.

    Returns:
        (sample, channel, *coordinates), e.g. (sample, channel, row, col): float64 tensors of
        integers, one entry per block.
    """
    *block, generator = block_and_generator
    n_samples, n_channels, *sizes = shape
    valid = [size - extent + 1 for size, extent in zip(sizes, block, strict=True)]
    per_plane = math.prod(valid)
    positions = _bernoulli_positions(n_samples * n_channels * per_plane, gamma, generator)
    plane, rest = _floor_div(positions, per_plane)
    # Row-major: peel the last axis first; what is left is the first axis' coordinate.
    coordinates = []
    for extent in reversed(valid[1:]):
        rest, coordinate = _floor_div(rest, extent)
        coordinates.append(coordinate)
    coordinates.append(rest)
    sample, channel = _floor_div(plane, n_channels)
    return sample, channel, *reversed(coordinates)


def _contiguous_strides(shape) -> tuple[int, ...]:
    """Element strides of a contiguous tensor of ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _block_pixel_indices(corners, block, strides) -> Tensor:
    """int64 flat memory indices of every pixel of every block, for a tensor with ``strides``."""
    sample, channel, *coordinates = corners
    first = sample * strides[0] + channel * strides[1]
    for coordinate, stride in zip(coordinates, strides[2:], strict=True):
        first = first + coordinate * stride
    first = first.to(torch.int64)
    # The offsets of a block's pixels from its first one, row-major.
    offsets = torch.arange(block[0]).mul_(strides[2])
    for extent, stride in zip(block[1:], strides[3:], strict=True):
        offsets = (offsets.view(-1, 1) + torch.arange(extent).mul_(stride)).view(-1)
    return (first.view(-1, 1) + offsets.view(1, -1)).view(-1)


def count_ones(flags: Tensor) -> Tensor:
    """Per-row count of a (R, L) contiguous 0/1 uint8 tensor, as int64 (R,).

    Summing the bytes as int64 words adds 8 bytes at once, each in its own lane; 64 words per
    partial sum keep every byte lane <= 64, so no carry crosses a lane and no partial sum
    reaches the sign bit; the bytes of the partial sums are then added.
    """
    n_rows, length = flags.shape
    if length % BYTES_PER_PARTIAL_SUM:
        return flags.sum(dim=1, dtype=torch.int64)
    words = flags.view(torch.int64).view(n_rows, -1, _WORDS_PER_PARTIAL_SUM)
    partial = words.sum(dim=2)
    return partial.view(torch.uint8).view(n_rows, -1).sum(dim=1, dtype=torch.int64)


def dropped_pixels(corners, mask_shape, block) -> tuple[Tensor, Tensor, Tensor]:
    """The pixels covered by the blocks at ``corners`` in an (N, C, *sizes) mask.

    Returns:
        (indices, dropped, n_dropped): int64 flat indices of the covered pixels in the
        contiguous layout (with repeats where blocks overlap); the (N, C * prod(sizes)) uint8
        0/1 map of dropped pixels; the number of dropped pixels per sample, int64 (N,).
    """
    strides = _contiguous_strides(mask_shape)
    n_samples, per_sample = mask_shape[0], strides[0]
    indices = _block_pixel_indices(corners, block, strides)
    dropped = torch.zeros(n_samples, per_sample, dtype=torch.uint8)
    dropped.view(-1).index_fill_(0, indices, 1)
    return indices, dropped, count_ones(dropped)


class _BlockPixels:
    """The pixels of sampled blocks, as flat indices for each memory layout they meet.

    Indices run corner by corner and corners are sorted by sample, so the indices of a group of
    samples are one slice; ``groups`` lists (sample slice, index slice) pairs of about
    ``_GROUP_ELEMENTS`` elements each.
    """

    def __init__(self, corners, block, indices: Tensor, strides, groups) -> None:
        self.corners, self.block, self.groups = corners, block, groups
        self._indices = {tuple(strides): indices}

    def indices(self, strides) -> Tensor:
        strides = tuple(strides)
        if strides not in self._indices:
            self._indices[strides] = _block_pixel_indices(self.corners, self.block, strides)
        return self._indices[strides]


def _sample_groups(sample: Tensor, n_samples: int, group_size: int, pixels_per_block: int):
    """(sample slice, index slice) per group of ``group_size`` samples; ``sample`` sorted."""
    starts = list(range(0, n_samples, group_size)) + [n_samples]
    bounds = torch.searchsorted(sample, torch.tensor(starts, dtype=sample.dtype))
    bounds = (bounds * pixels_per_block).tolist()
    return [
        (slice(starts[i], starts[i + 1]), slice(bounds[i], bounds[i + 1]))
        for i in range(len(starts) - 1)
    ]


def _scale_and_zero(t: Tensor, scale: Tensor, pixels: _BlockPixels) -> Tensor:
    """``t * scale`` with the blocks' pixels set to 0, one cache-sized group of samples at a time.

    Zeroing a group right after multiplying it finds its memory still in cache, where one
    multiply and one zeroing pass over the whole tensor would read it twice from memory.
    """
    out = torch.empty_like(t)  # dense, in t's layout when t is dense
    indices = pixels.indices(out.stride())
    flat = out.as_strided((out.numel(),), (1,))
    for samples, block_pixels in pixels.groups:
        torch.mul(t[samples], scale[samples], out=out[samples])
        flat.index_fill_(0, indices[block_pixels], 0)
    return out


class _ScaleAndZero(torch.autograd.Function):
    """``x * scale`` with the pixels of the dropped blocks set to 0; linear, so its own adjoint.

    A multiply and index writes of about p * x.numel() pixels, forward and backward, where a
    dense mask costs a mask pass and a three-operand multiply each way; autograd keeps the
    blocks' corners and indices, not an (N, C, H, W) mask.
    """

    @staticmethod
    def forward(ctx, x, scale, pixels):
        ctx.save_for_backward(scale)
        ctx.pixels = pixels
        return _scale_and_zero(x, scale, pixels)

    @staticmethod
    def backward(ctx, grad_out):
        (scale,) = ctx.saved_tensors
        return _ScaleAndZero.apply(grad_out, scale, ctx.pixels), None, None


def drop_block_sparse(
    x: Tensor,
    gamma: float,
    block: tuple[int, int],
    per_channel: bool,
    generator: torch.Generator | None,
    return_mask: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """DropBlock on the CPU from sparse centres: see the module docstring.

    Args:
        x: (N, C, *sizes) tensor on the CPU, 1 to 3 spatial axes.
        gamma: the centre rate, in [0, 1].
        block: the block's extent per spatial axis, e.g. (block_h, block_w), already clamped
            to the map.
        per_channel, generator, return_mask: as for
            :func:`~dropcluster.nn.dropblock.drop_block2d`.
    """
    n_samples, n_channels, *sizes = x.shape
    mask_shape = (n_samples, n_channels if per_channel else 1, *sizes)
    with torch.no_grad():
        corners = sample_block_corners(mask_shape, gamma, *block, generator)
    return drop_blocks_at(x, corners, block, per_channel, return_mask)


def drop_blocks_at(x, corners, block, per_channel: bool, return_mask: bool):
    """Drop the blocks with the given top-left ``corners`` and rescale each sample.

    Args:
        x: (N, C, *sizes) tensor on the CPU, 1 to 3 spatial axes.
        corners: (sample, channel, *coordinates) tensors of integers, as from
            :func:`sample_block_corners`; channel is 0 when ``per_channel`` is False.
        block: the block's extent per spatial axis, e.g. (block_h, block_w).
    """
    n_samples, n_channels, *sizes = x.shape
    mask_channels = n_channels if per_channel else 1
    mask_shape = (n_samples, mask_channels, *sizes)
    strides = _contiguous_strides(mask_shape)
    per_sample = strides[0]
    with torch.no_grad():
        mask_indices, dropped, n_dropped = dropped_pixels(corners, mask_shape, block)
        kept = (per_sample - n_dropped).to(torch.float32).clamp_(min=1.0)
        scale = (per_sample / kept).to(x.dtype).view(n_samples, *(1,) * (x.dim() - 1))
        keep = None
        if return_mask or not per_channel:
            keep = (1 - dropped).view(mask_shape).to(x.dtype)
    if per_channel:
        group_size = max(1, _GROUP_ELEMENTS // per_sample)
        groups = _sample_groups(corners[0], n_samples, group_size, math.prod(block))
        pixels = _BlockPixels(corners, block, mask_indices, strides, groups)
        out = _ScaleAndZero.apply(x, scale, pixels)
    else:
        # One (N, 1, *sizes) multiplier broadcast over the channels: a single pass over x.
        out = x * (keep * scale)
    return (out, keep) if return_mask else out
