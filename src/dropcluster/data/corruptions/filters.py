"""Filters and kernels the corruptions share: scipy/skimage Gaussian blur, OpenCV-style
correlation with its borders, ImageMagick's motion blur, the reference's clipped zoom, and the
uint8 quantisation rule.

All functions take trusted (N, C, H, W) floating tensors on any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "NEGLIGIBLE_WEIGHT",
    "TRUNCATION_SLACK",
    "border_indices",
    "clipped_zoom",
    "filter2d",
    "filter_separable",
    "gaussian_kernel1d",
    "motion_blur_at",
    "motion_blur_kernel",
    "motion_blur_offsets",
    "pad",
    "quantise",
    "skimage_gaussian",
]

#: Kernel weights below this fraction of the largest are dropped (see :func:`defocus_kernel`
#: and :func:`motion_blur_at`).
NEGLIGIBLE_WEIGHT = 1e-12


#: Added to 255 y before truncating to uint8, so round-off cannot drop an exact integer a level.
TRUNCATION_SLACK = 1e-3


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> Tensor:
    """scipy's ``gaussian_filter`` weights: ``exp(-x^2 / (2 sigma^2))`` for
    ``|x| <= int(truncate sigma + 0.5)``, normalised to sum 1.

    Args:
        sigma: std in pixels (> 0).
        truncate: half-width in stds.

    Returns:
        Tensor[2 r + 1] float64 (``[1.]`` when r = 0, as for sigma < 0.125).
    """
    radius = int(truncate * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * taps**2 / sigma**2)
    return weights / weights.sum()


def motion_blur_kernel(radius: float, sigma: float) -> Tensor:
    """ImageMagick's motion-blur weights: ``exp(-j^2 / (2 sigma^2))`` for tap
    ``j = 0 .. 2 ceil(radius)``, normalised to sum 1 (one-sided: tap 0 is the pixel itself).

    Returns:
        Tensor[2 ceil(radius) + 1] float64.
    """
    width = 2 * math.ceil(radius) + 1
    taps = torch.arange(width, dtype=torch.float64)
    weights = torch.exp(-(taps**2) / (2 * sigma**2))
    return weights / weights.sum()


def motion_blur_offsets(width: int, angles_degrees: Tensor) -> tuple[Tensor, Tensor]:
    """Integer (row, column) offsets of the motion-blur taps, as ImageMagick computes them.

    Tap j samples the pixel at ``(y + ceil(j sin a - 0.5), x + ceil(j cos a - 0.5))``: the
    point j pixels along the angle a (clockwise from the +x axis, rows pointing down), rounded
    to the nearest pixel with halves rounded down.

    Args:
        width: number of taps.
        angles_degrees (Tensor[N]): one angle per image.

    Returns:
        (row_offsets, column_offsets), each Tensor[N, width] int64 on the angles' device.
    """
    radians = torch.deg2rad(angles_degrees.to(torch.float64))[:, None]
    taps = torch.arange(width, dtype=torch.float64, device=angles_degrees.device)
    row_offsets = torch.ceil(taps * torch.sin(radians) - 0.5).long()
    column_offsets = torch.ceil(taps * torch.cos(radians) - 0.5).long()
    return row_offsets, column_offsets


def motion_blur_at(pixels: Tensor, radius: float, sigma: float, angles_degrees: Tensor) -> Tensor:
    """ImageMagick's motion blur of each image along its own angle (deterministic core).

    ``out[y, x] = sum_j k_j in[clamp(y + dy_j), clamp(x + dx_j)]`` with the weights of
    :func:`motion_blur_kernel` and the offsets of :func:`motion_blur_offsets`; pixels outside
    the image repeat the nearest edge pixel (ImageMagick's default virtual-pixel method).
    Taps lighter than 1e-12 of tap 0 are skipped (with sigma 1 and radius 10, 13 of the 21
    taps weigh less than exp(-28)); they change no output by more than 1e-11.

    Args:
        pixels (Tensor[N, C, H, W]): floating.
        radius, sigma: the severity's parameters.
        angles_degrees (Tensor[N]): one angle per image.

    Returns:
        Tensor[N, C, H, W] of the dtype of ``pixels``.
    """
    n, c, h, w = pixels.shape
    device = pixels.device
    weights = motion_blur_kernel(radius, sigma)
    weights = weights[weights >= NEGLIGIBLE_WEIGHT * weights[0]].tolist()
    row_offsets, column_offsets = motion_blur_offsets(len(weights), angles_degrees.to(device))
    row_range = torch.arange(h, device=device)
    column_range = torch.arange(w, device=device)
    blurred = torch.zeros_like(pixels)
    for tap, weight in enumerate(weights):
        # Clamping the indices repeats the edge pixels (ImageMagick's virtual pixels); a row
        # gather then a column gather is cheaper than one gather with a (N, H W) index.
        rows = (row_range[None, :] + row_offsets[:, tap, None]).clamp_(0, h - 1)
        cols = (column_range[None, :] + column_offsets[:, tap, None]).clamp_(0, w - 1)
        shifted = pixels.gather(2, rows[:, None, :, None].expand(n, c, h, w))
        shifted = shifted.gather(3, cols[:, None, None, :].expand(n, c, h, w))
        blurred.add_(shifted, alpha=weight)
    return blurred


def skimage_gaussian(pixels: Tensor, sigma: float) -> Tensor:
    """skimage.filters.gaussian(multichannel=True): per channel, mode='nearest', truncate 4."""
    weights = gaussian_kernel1d(sigma)
    if weights.numel() == 1:
        return pixels
    return filter_separable(pixels, weights, weights, "nearest")


def border_indices(size: int, before: int, after: int, mode: str, device) -> Tensor:
    """Source index of each position of an axis padded by (before, after).

    ``nearest`` repeats the edge (scipy/skimage mode='nearest'); ``reflect101`` mirrors about
    the edge pixel without repeating it (OpenCV's default ``gfedcb|abcdefgh|gfedcba``), folding
    again as often as needed, as OpenCV does when the padding exceeds the axis.
    """
    positions = torch.arange(-before, size + after, device=device)
    if mode == "nearest" or size == 1:
        return positions.clamp(0, size - 1)
    period = 2 * (size - 1)
    folded = positions.remainder(period)
    return torch.where(folded >= size, period - folded, folded)


def pad(pixels: Tensor, pad_h: int, pad_w: int, mode: str) -> Tensor:
    h, w = pixels.shape[-2:]
    # F.pad is much faster than gathering, but reflects at most once (padding < size).
    if mode == "nearest" or (pad_h < h and pad_w < w):
        torch_mode = "replicate" if mode == "nearest" else "reflect"
        return F.pad(pixels, (pad_w, pad_w, pad_h, pad_h), mode=torch_mode)
    rows = border_indices(h, pad_h, pad_h, mode, pixels.device)
    cols = border_indices(w, pad_w, pad_w, mode, pixels.device)
    return pixels.index_select(-2, rows).index_select(-1, cols)


def filter2d(pixels: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """Correlate every channel with a (kh, kw) kernel (odd sides), padding with ``mode``.

    On the CPU the convolution runs in float32 (float64 convolution there is very slow); on
    other devices in float64, which keeps TF32 and cuDNN's algorithm choice from changing
    results by more than round-off (a uint8 output truncates, so that would show).
    """
    n, c, h, w = pixels.shape
    kh, kw = kernel.shape
    conv_dtype = torch.float32 if pixels.device.type == "cpu" else torch.float64
    padded = pad(pixels.to(conv_dtype), kh // 2, kw // 2, mode)
    weight = kernel.to(device=pixels.device, dtype=conv_dtype)[None, None]
    blurred = F.conv2d(padded.reshape(n * c, 1, h + kh - 1, w + kw - 1), weight)
    return blurred.reshape(n, c, h, w).to(pixels.dtype)


def filter_separable(pixels: Tensor, row_weights: Tensor, col_weights: Tensor, mode: str) -> Tensor:
    """Correlate every channel with ``row_weights`` along H, then ``col_weights`` along W."""
    blurred = filter2d(pixels, row_weights.reshape(-1, 1), mode)
    return filter2d(blurred, col_weights.reshape(1, -1), mode)


def quantise(pixels: Tensor, slack: float) -> Tensor:
    """uint8 levels ``floor(255 y + slack)`` of pixels y in [0, 1] (still floating)."""
    return torch.floor(pixels * 255 + slack).clamp_(0, 255)


def clipped_zoom(pixels: Tensor, factor: float) -> Tensor:
    """The reference's ``clipped_zoom``: zoom the centre of each image by ``factor``, keep H x W.

    It crops the centred ``ceil(H / z) x ceil(W / z)`` window (top = (H - ch) // 2), zooms it
    with scipy's order-1 spline to ``round(ch z)`` pixels (scipy maps output o to input
    ``o (in - 1) / (out - 1)``, i.e. bilinear with aligned corners) and keeps the centred
    H x W window (trim = (out - H) // 2). The reference uses H for both axes of its square
    images; here each axis uses its own size.

    Args:
        pixels (Tensor[N, C, H, W]): floating.
        factor: zoom factor >= 1.

    Returns:
        Tensor[N, C, H, W].
    """
    h, w = pixels.shape[-2:]
    crop_h, crop_w = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    zoomed_h, zoomed_w = round(crop_h * factor), round(crop_w * factor)
    crop = pixels[:, :, top : top + crop_h, left : left + crop_w]
    if (zoomed_h, zoomed_w) != (crop_h, crop_w):
        crop = F.interpolate(crop, size=(zoomed_h, zoomed_w), mode="bilinear", align_corners=True)
    trim_top, trim_left = (zoomed_h - h) // 2, (zoomed_w - w) // 2
    return crop[:, :, trim_top : trim_top + h, trim_left : trim_left + w]
