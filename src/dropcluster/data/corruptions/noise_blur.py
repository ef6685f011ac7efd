"""The paper's seven corruptions: three noises and four blurs, batched, on any device.

Each corruption as in the reference scripts of Hendrycks & Dietterich (2019):

* gaussian_noise: ``clip(x + N(0, s^2))`` on pixels x in [0, 1].
* shot_noise: ``clip(Poisson(x c) / c)``.
* impulse_noise: scikit-image's ``random_noise(mode="s&p")``: every element of the (H, W, C)
  array is replaced independently with probability ``amount``, by 1 or 0 with probability 1/2
  each (so a colour pixel can get salt in one channel and keep the others).
* defocus_blur: the scripts' disk kernel (a disk on a fixed 17x17 grid, anti-aliased with a
  small Gaussian), correlated with each channel with OpenCV's default border
  (``BORDER_REFLECT_101``, folded as often as needed when the kernel is wider than the image).
* glass_blur: Gaussian blur (scikit-image, ``mode="nearest"``, ``truncate=4``), truncation to
  uint8, a local pixel shuffle repeated ``iterations`` times, Gaussian blur again. See
  :func:`glass_shuffle` for the shuffle, which reproduces the scripts' sequential loop exactly.
* motion_blur: ImageMagick's ``MotionBlurImage`` (what the scripts call through Wand): a
  one-sided Gaussian line kernel of ``2 radius + 1`` taps along an angle drawn uniformly from
  [-45, 45] degrees per image, taps at integer offsets rounded as ImageMagick rounds them,
  edge pixels repeated outside the image.
* zoom_blur: the mean of the image and its zooms by each factor of ``np.arange(1, stop, step)``
  (scipy's order-1 ``zoom`` of a centred crop, cropped back to H x W).

Where this differs from the scripts (checked against scipy, scikit-image and OpenCV
re-runs of their formulas: float outputs agree to about 1e-4 grey levels unless said otherwise):

* glass_blur: with the same draws the shuffle is identical to the scripts' loop. The scripts'
  loops hard-code the image size (32, 64 or 224); here it is the input's.
* defocus_blur: the kernel is renormalised to sum 1 (the ImageNet severities 4 and 5 of the
  reference are 1.3% and 1.1% brighter). The reference's float32 kernel sums to a hair under 1,
  so where its exact output is an integer (flat regions; 10% of the pixels of a random image at
  CIFAR severity 4, 3.5% at Tiny ImageNet severity 5) it truncates one level lower than here.
* motion_blur: ImageMagick's arithmetic is replaced by float arithmetic with the same integer
  offsets and weights (identical to the numpy re-implementation in ``imagecorruptions``).
* uint8 outputs: the 1e-3 slack (see the package docstring) changes about 0.1% of the pixels
  by one level.
* The PyPI package ``imagecorruptions`` always uses ImageNet-sized parameters (its tables
  differ from all three scripts), so it cannot reproduce CIFAR or Tiny ImageNet severities;
  the functions here take the family from the image size or from ``family``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from dropcluster.data.corruptions.filters import (
    NEGLIGIBLE_WEIGHT,
    TRUNCATION_SLACK,
    border_indices,
    clipped_zoom,
    filter2d,
    motion_blur_at,
    skimage_gaussian,
)

__all__ = [
    "FUNCTIONS",
    "PARAMETERS",
    "UINT8_SLACK",
    "defocus_kernel",
    "glass_shuffle",
    "zoom_factors",
]


#: family -> corruption -> the parameters of severities 1 to 5, as in the reference scripts:
#: gaussian_noise: noise std on [0, 1]; shot_noise: c in Poisson(x c) / c; impulse_noise:
#: salt-and-pepper amount; defocus_blur: (disk radius, anti-alias sigma); glass_blur:
#: (Gaussian sigma, max shift, shuffle iterations); motion_blur: (radius, sigma);
#: zoom_blur: (stop, step) of the zoom factors ``np.arange(1, stop, step)``.
PARAMETERS: dict[str, dict[str, tuple]] = {
    "cifar": {
        "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
        "shot_noise": (500, 250, 100, 75, 50),
        "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
        "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
        "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
        "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
        "zoom_blur": ((1.06, 0.01), (1.11, 0.01), (1.16, 0.01), (1.21, 0.01), (1.26, 0.01)),
    },
    "tiny-imagenet": {
        "gaussian_noise": (0.04, 0.08, 0.12, 0.15, 0.18),
        "shot_noise": (250, 100, 50, 30, 15),
        "impulse_noise": (0.01, 0.02, 0.05, 0.08, 0.14),
        "defocus_blur": ((0.5, 0.6), (1, 0.1), (1.5, 0.1), (2.5, 0.01), (3, 0.1)),
        "glass_blur": ((0.1, 1, 1), (0.5, 1, 1), (0.6, 1, 2), (0.7, 2, 1), (0.9, 2, 2)),
        "motion_blur": ((10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)),
        "zoom_blur": ((1.06, 0.01), (1.11, 0.01), (1.16, 0.01), (1.21, 0.01), (1.26, 0.01)),
    },
    "imagenet": {
        "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
        "shot_noise": (60, 25, 12, 5, 3),
        "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
        "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
        "glass_blur": ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
        "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
        "zoom_blur": ((1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03)),
    },
}


def defocus_kernel(radius: float, alias_sigma: float) -> Tensor:
    """The reference's anti-aliased disk kernel, normalised to sum 1, cropped to its support.

    As the scripts' ``disk``: on the grid ``-8..8`` (``-radius..radius`` when radius > 8), the
    indicator of ``x^2 + y^2 <= radius^2`` divided by its sum, then ``cv2.GaussianBlur`` with
    a 3x3 (5x5 when radius > 8) Gaussian of std ``alias_sigma`` and OpenCV's default border
    (reflect-101). Where the disk touches the grid's edge (ImageNet radii 8 and 10) that
    border adds or removes a little mass, so the reference kernel sums to slightly more or less
    than 1 (1.013 and 1.011); this one is renormalised to 1. Weights below 1e-12 of the largest
    are set to 0 and the all-zero border is cropped, so the kernel is at most
    2 ceil(radius) + 3 wide.

    Args:
        radius: disk radius in pixels (> 0).
        alias_sigma: std of the anti-aliasing Gaussian (> 0).

    Returns:
        Tensor[K, K] float64, symmetric, K odd, summing to 1.
    """
    if radius <= 8:
        grid = torch.arange(-8, 9, dtype=torch.float64)
        alias_size = 3
    else:
        grid = torch.arange(-radius, radius + 1, dtype=torch.float64)
        alias_size = 5
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    disk = (rows**2 + cols**2 <= radius**2).to(torch.float64)
    disk = disk / disk.sum()
    taps = torch.arange(alias_size, dtype=torch.float64) - (alias_size - 1) / 2
    alias = torch.exp(-(taps**2) / (2 * alias_sigma**2))
    alias = alias / alias.sum()
    # The 1-D blur with reflect-101 borders as a matrix, so the 2-D blur is M @ disk @ M.T,
    # in float64 (the CPU convolutions run in float32).
    size = grid.numel()
    sources = border_indices(size, alias_size // 2, alias_size // 2, "reflect101", "cpu")
    blur_matrix = torch.zeros(size, size, dtype=torch.float64)
    for tap in range(alias_size):
        blur_matrix.index_put_(
            (torch.arange(size), sources[tap : tap + size]),
            alias[tap].expand(size),
            accumulate=True,
        )
    blurred = blur_matrix @ disk @ blur_matrix.T
    # Drop the anti-aliasing Gaussian's far tails (exp(-50) and below for sigma 0.1), which
    # change no output by more than 1e-12 and would make the kernel two pixels wider.
    blurred = torch.where(blurred < NEGLIGIBLE_WEIGHT * blurred.max(), 0.0, blurred)
    blurred = blurred / blurred.sum()
    centre = grid.numel() // 2
    half = int((blurred.nonzero() - centre).abs().max())
    return blurred[centre - half : centre + half + 1, centre - half : centre + half + 1]


def zoom_factors(stop: float, step: float) -> tuple[float, ...]:
    """The zoom factors ``np.arange(1, stop, step)`` exactly as numpy computes them.

    numpy takes ``ceil((stop - 1) / step)`` values ``1 + i * ((1 + step) - 1)``, so a stop
    that is a whole number of steps can be included: ``(1.06, 0.01)`` gives 1.00 .. 1.06
    (7 factors) and ``(1.11, 0.01)`` 1.00 .. 1.11, while ``(1.16, 0.01)`` stops at 1.15.
    """
    count = math.ceil((stop - 1.0) / step)
    delta = (1.0 + step) - 1.0
    return tuple(1.0 + index * delta for index in range(count))


def glass_shuffle(
    levels: Tensor,
    max_shift: int,
    *,
    offsets: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One pass of the reference's local pixel shuffle, vectorised, with its exact result.

    The scripts visit the interior rows ``h = H - d, ..., d + 1`` (descending) and in each the
    columns ``w = W - d, ..., d + 1`` (descending), draw ``dx, dy = randint(-d, d, size=2)``
    (so each in ``-d .. d - 1``: the high end is exclusive) and run
    ``x[h, w], x[h + dy, w + dx] = x[h + dy, w + dx], x[h, w]`` on the (H, W, 3) uint8 array.
    For an RGB array both sides are views, so this is not a swap: the pixel at (h, w) becomes
    a copy of the pixel at the source, and the source keeps its value. The value (h, w)
    receives is the source's value at that moment: its final value if the source was visited
    earlier (a later row, or a later column of the same row), else its original value. This
    function resolves those chains of copies for all pixels at once by pointer jumping (a few
    gathers), so with the same draws it returns exactly what the sequential loop returns.
    With d = 1 the source is never visited earlier (offsets are -1 or 0), so a pass is a
    single gather. As in the reference, the result is a copy-shuffle: values can be
    duplicated or lost, and with d >= 2 chains can move a value further than d.

    Args:
        levels (Tensor[N, C, H, W]): the images (any dtype).
        max_shift: d >= 1.
        offsets (Tensor[N, R, Q, 2] int64, optional): the draws ``(dx, dy)`` for the R x Q
            visited positions in row-major order of (h, w) ascending, each in ``-d .. d-1``;
            None draws them from ``generator``.
        generator: used only when ``offsets`` is None.

    Returns:
        Tensor[N, C, H, W] of the dtype of ``levels``.
    """
    n, c, h, w = levels.shape
    device = levels.device
    rows = torch.arange(max_shift + 1, h - max_shift + 1, device=device)
    cols = torch.arange(max_shift + 1, w - max_shift + 1, device=device)
    if rows.numel() == 0 or cols.numel() == 0:
        return levels.clone()
    if offsets is None:
        offsets = torch.randint(
            -max_shift,
            max_shift,
            (n, rows.numel(), cols.numel(), 2),
            generator=generator,
            device=device,
        )
    dx, dy = offsets[..., 0], offsets[..., 1]
    source_rows = rows[:, None] + dy
    source_cols = cols[None, :] + dx
    # Each position's source index; positions never visited point at themselves.
    target = torch.arange(h * w, device=device).expand(n, h * w).clone()
    visited_flat = (rows[:, None] * w + cols[None, :]).reshape(-1)
    target[:, visited_flat] = (source_rows * w + source_cols).reshape(n, -1)
    if max_shift > 1:
        source_visited = (
            (source_rows >= max_shift + 1)
            & (source_rows <= h - max_shift)
            & (source_cols >= max_shift + 1)
            & (source_cols <= w - max_shift)
        )
        visited_before = source_visited & (
            (source_rows > rows[:, None])
            | ((source_rows == rows[:, None]) & (source_cols > cols[None, :]))
        )
        linked = torch.zeros((n, h * w), dtype=torch.bool, device=device)
        linked[:, visited_flat] = visited_before.reshape(n, -1)
        # Pointer jumping: a linked position takes its source's final value, so it inherits
        # the source's own pointer; chains strictly go back in visiting order, so this ends.
        while bool(linked.any()):
            target, linked = (
                torch.where(linked, target.gather(1, target), target),
                linked & linked.gather(1, target),
            )
    flat = levels.reshape(n, c, h * w)
    return flat.gather(2, target[:, None, :].expand(n, c, h * w)).reshape(n, c, h, w)


def _gaussian_noise(pixels: Tensor, std: float, generator: torch.Generator | None) -> Tensor:
    noise = torch.randn(pixels.shape, generator=generator, device=pixels.device, dtype=pixels.dtype)
    return pixels + std * noise


def _shot_noise(pixels: Tensor, photons: float, generator: torch.Generator | None) -> Tensor:
    return torch.poisson(pixels * photons, generator=generator) / photons


def _impulse_noise(pixels: Tensor, amount: float, generator: torch.Generator | None) -> Tensor:
    # skimage draws "flipped" for every element, then "salted" for every element.
    flipped = torch.rand(pixels.shape, generator=generator, device=pixels.device) < amount
    salted = torch.rand(pixels.shape, generator=generator, device=pixels.device) < 0.5
    return torch.where(flipped, salted.to(pixels.dtype), pixels)


def _defocus_blur(pixels: Tensor, radius: float, alias_sigma: float) -> Tensor:
    return filter2d(pixels, defocus_kernel(radius, alias_sigma), "reflect101")


def _glass_blur(
    pixels: Tensor,
    sigma: float,
    max_shift: int,
    iterations: int,
    generator: torch.Generator | None,
) -> Tensor:
    # The reference stores the first blur as uint8 (truncating) before shuffling.
    levels = torch.floor(skimage_gaussian(pixels, sigma) * 255 + TRUNCATION_SLACK)
    for _ in range(iterations):
        levels = glass_shuffle(levels, max_shift, generator=generator)
    return skimage_gaussian(levels / 255, sigma)


def _motion_blur(
    pixels: Tensor, radius: float, sigma: float, generator: torch.Generator | None
) -> Tensor:
    angles = torch.rand(pixels.shape[0], generator=generator, device=pixels.device) * 90 - 45
    return motion_blur_at(pixels, radius, sigma, angles)


def _zoom_blur(pixels: Tensor, factors: Sequence[float]) -> Tensor:
    """(x + sum over factors of clipped_zoom(x, z)) / (len(factors) + 1), as the reference."""
    total = pixels.clone()
    for factor in factors:
        total += clipped_zoom(pixels, factor)
    return total / (len(factors) + 1)


#: name -> ``f(pixels, parameter, generator)`` on float pixels in [0, 1] (N, C, H, W).
FUNCTIONS: dict[str, Callable[[Tensor, Any, torch.Generator | None], Tensor]] = {
    "gaussian_noise": lambda pixels, std, generator: _gaussian_noise(pixels, std, generator),
    "shot_noise": lambda pixels, photons, generator: _shot_noise(pixels, photons, generator),
    "impulse_noise": lambda pixels, amount, generator: _impulse_noise(pixels, amount, generator),
    "defocus_blur": lambda pixels, parameter, generator: _defocus_blur(pixels, *parameter),
    "glass_blur": lambda pixels, parameter, generator: _glass_blur(pixels, *parameter, generator),
    "motion_blur": lambda pixels, parameter, generator: _motion_blur(pixels, *parameter, generator),
    "zoom_blur": lambda pixels, parameter, generator: _zoom_blur(pixels, zoom_factors(*parameter)),
}

#: name -> the slack of its uint8 quantisation, where it is not TRUNCATION_SLACK: the reference
#: gets motion blur back from ImageMagick as an 8-bit PNG, which rounds.
UINT8_SLACK: dict[str, float] = {"motion_blur": 0.5}
