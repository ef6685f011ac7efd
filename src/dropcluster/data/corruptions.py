"""Seven common corruptions of Hendrycks & Dietterich (2019) as batched tensor operations.

"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations" (ICLR 2019)
builds CIFAR-10/100-C, Tiny-ImageNet-C and ImageNet-C with one script per family of data sets
(``make_cifar_c.py``, ``make_tinyimagenet_c.py``, ``make_imagenet_c.py`` in
hendrycks/robustness); each script has its own severity table. This module re-creates the noise
and blur corruptions of those scripts - gaussian_noise, shot_noise, impulse_noise, defocus_blur,
glass_blur, motion_blur, zoom_blur - on whole batches (N, C, H, W), on any device, with every
random number drawn from an explicit ``torch.Generator``:

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

Quantisation. Float images in give float images in [0, 1] out: the value the reference function
returns, divided by 255. uint8 images in give what the scripts store: CIFAR-C keeps
``np.uint8(x)`` and Tiny-ImageNet-C / ImageNet-C save ``Image.fromarray(np.uint8(x))``, and
``np.uint8`` of a float truncates, so uint8 outputs are ``floor(255 y + 1e-3)``. The 1e-3 (one
thousandth of a grey level) keeps a value that is an integer in exact arithmetic, such as a flat
region under a blur, from dropping a level through float32 round-off. Motion blur is the
exception: the reference gets it back from ImageMagick as an 8-bit PNG, which rounds, so its uint8
output is ``floor(255 y + 0.5)``. Tiny-ImageNet-C and ImageNet-C were then saved as JPEG
(quality 85); this module does not add JPEG artefacts.

Randomness. A batch is processed in chunks of ``max(1, 2**22 // (C H W))`` images (to bound
memory), chunk after chunk, each drawing its random numbers from ``generator`` in a fixed order;
the output therefore depends only on the inputs and the generator's state (not on threads), and
the same seed gives the same output. CPU and CUDA generators give different streams.

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
* uint8 outputs: the 1e-3 slack above changes about 0.1% of the pixels by one level.
* The PyPI package ``imagecorruptions`` always uses ImageNet-sized parameters (its tables
  differ from all three scripts), so it cannot reproduce CIFAR or Tiny ImageNet severities;
  the functions here take the family from the image size or from ``family``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dropcluster.validation import check_choice, check_int, check_tensor

__all__ = [
    "CORRUPTIONS",
    "FAMILIES",
    "SEVERITY_PARAMETERS",
    "corrupt",
    "defocus_kernel",
    "family_for_size",
    "gaussian_kernel1d",
    "glass_shuffle",
    "motion_blur_at",
    "motion_blur_kernel",
    "motion_blur_offsets",
    "zoom_factors",
]


#: The corruptions this module implements, in the order of the paper's tables.
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
)

#: One severity table per reference script: CIFAR-10/100-C (32 px), Tiny-ImageNet-C (64 px),
#: ImageNet-C (224 px).
FAMILIES: tuple[str, ...] = ("cifar", "tiny-imagenet", "imagenet")

#: family -> corruption -> the parameters of severities 1 to 5, as in the reference scripts:
#: gaussian_noise: noise std on [0, 1]; shot_noise: c in Poisson(x c) / c; impulse_noise:
#: salt-and-pepper amount; defocus_blur: (disk radius, anti-alias sigma); glass_blur:
#: (Gaussian sigma, max shift, shuffle iterations); motion_blur: (radius, sigma);
#: zoom_blur: (stop, step) of the zoom factors ``np.arange(1, stop, step)``.
SEVERITY_PARAMETERS: dict[str, dict[str, tuple]] = {
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

#: Images per chunk are ``max(1, _CHUNK_ELEMENTS // (C * H * W))``: 16 MiB of float32 pixels,
#: a few times that in temporaries. Fixed (not device-dependent) because it decides how the
#: random stream is split between images.
_CHUNK_ELEMENTS = 2**22

#: Kernel weights below this fraction of the largest are dropped (see :func:`defocus_kernel`
#: and :func:`motion_blur_at`).
_NEGLIGIBLE_WEIGHT = 1e-12

#: Added to 255 y before truncating to uint8, so round-off cannot drop an exact integer a level.
_TRUNCATION_SLACK = 1e-3


def family_for_size(height: int, width: int) -> str:
    """The severity table for images of this size: the reference script made for that size.

    Images of at most 32 pixels a side use the CIFAR table (so 28x28 Fashion-MNIST does too),
    at most 64 the Tiny ImageNet table, anything larger the ImageNet (224 px) table.

    Args:
        height, width: image size in pixels (>= 1).

    Returns:
        One of :data:`FAMILIES`.
    """
    side = max(check_int("height", height, minimum=1), check_int("width", width, minimum=1))
    if side <= 32:
        return "cifar"
    if side <= 64:
        return "tiny-imagenet"
    return "imagenet"


def corrupt(
    images: Tensor,
    corruption: str,
    severity: int,
    *,
    family: str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Apply one corruption at one severity to a batch of images.

    Args:
        images (Tensor[N, C, H, W]): uint8 in [0, 255] or floating in [0, 1], on any device.
            Any number of channels works (each corruption treats channels as the reference
            treats RGB; the reference scripts only ever see C = 3, and a grey image behaves as
            the reference would on that image converted to RGB).
        corruption: one of :data:`CORRUPTIONS`.
        severity: 1 to 5.
        family: which script's table to use, one of :data:`FAMILIES`; None picks it from the
            image size with :func:`family_for_size`.
        generator: source of every random number, on the device of ``images``; None uses the
            global generator of that device (then only ``torch.manual_seed`` makes it
            repeatable).

    Returns:
        Tensor[N, C, H, W] of the dtype and device of ``images``: uint8 quantised as the
        reference stores it (see the module docstring), floating in [0, 1].

    Raises:
        ValueError: for an unknown corruption or family, a severity outside 1..5, images that
            are not a 4-D uint8 or floating tensor (or floating values outside [0, 1]), or a
            generator on another device.
        TypeError: ``images`` is not a tensor.
    """
    check_choice("corruption", corruption, CORRUPTIONS)
    _check_images(images)
    severity = check_int("severity", severity, minimum=1, maximum=5)
    check_choice("family", family, (None, *FAMILIES))
    if generator is not None and generator.device.type != images.device.type:
        raise ValueError(
            f"generator should be on the images' device {images.device}, but is on "
            f"{generator.device}"
        )
    if family is None:
        family = family_for_size(images.shape[-2], images.shape[-1])
    if images.numel() == 0:
        return images.clone()
    apply = _corruption_function(corruption, SEVERITY_PARAMETERS[family][corruption][severity - 1])
    # The reference gets motion blur back from ImageMagick as a PNG, which rounds; the others
    # are truncated (see "Quantisation" in the module docstring).
    slack = 0.5 if corruption == "motion_blur" else _TRUNCATION_SLACK
    return _corrupt_in_chunks(images, apply, slack, generator)


def _corrupt_in_chunks(
    images: Tensor,
    apply: Callable[[Tensor, torch.Generator | None], Tensor],
    slack: float,
    generator: torch.Generator | None,
) -> Tensor:
    """``apply`` to pixels in [0, 1], chunk after chunk of images (see "Randomness").

    Args:
        images (Tensor[N, C, H, W]): uint8 or floating in [0, 1], N >= 1.
        apply: the corruption at one severity, as ``f(pixels, generator)``.
        slack: added to ``255 y`` before truncating a uint8 output.

    Returns:
        Tensor[N, C, H, W] of the dtype of ``images``.
    """
    work_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    n, c, h, w = images.shape
    images_per_chunk = max(1, _CHUNK_ELEMENTS // (c * h * w))
    corrupted_images = torch.empty_like(images)
    with torch.no_grad():
        for start in range(0, n, images_per_chunk):
            chunk = images[start : start + images_per_chunk]
            if images.dtype == torch.uint8:
                pixels = chunk.to(work_dtype) / 255
            else:
                pixels = chunk.to(work_dtype)
            corrupted = apply(pixels, generator).clamp(0, 1)
            if images.dtype == torch.uint8:
                corrupted = _quantise(corrupted, slack)
            corrupted_images[start : start + images_per_chunk] = corrupted
    return corrupted_images


# ---------------------------------------------------------------------------------------------
# Kernels and factors (data the corruptions use; public so tests and reports can inspect them)
# ---------------------------------------------------------------------------------------------


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
    sources = _border_indices(size, alias_size // 2, alias_size // 2, "reflect101", "cpu")
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
    blurred = torch.where(blurred < _NEGLIGIBLE_WEIGHT * blurred.max(), 0.0, blurred)
    blurred = blurred / blurred.sum()
    centre = grid.numel() // 2
    half = int((blurred.nonzero() - centre).abs().max())
    return blurred[centre - half : centre + half + 1, centre - half : centre + half + 1]


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


def zoom_factors(stop: float, step: float) -> tuple[float, ...]:
    """The zoom factors ``np.arange(1, stop, step)`` exactly as numpy computes them.

    numpy takes ``ceil((stop - 1) / step)`` values ``1 + i * ((1 + step) - 1)``, so a stop
    that is a whole number of steps can be included: ``(1.06, 0.01)`` gives 1.00 .. 1.06
    (7 factors) and ``(1.11, 0.01)`` 1.00 .. 1.11, while ``(1.16, 0.01)`` stops at 1.15.
    """
    count = math.ceil((stop - 1.0) / step)
    delta = (1.0 + step) - 1.0
    return tuple(1.0 + index * delta for index in range(count))


# ---------------------------------------------------------------------------------------------
# Corruptions on float pixels in [0, 1] (trusted inputs: (N, C, H, W), float32 or float64)
# ---------------------------------------------------------------------------------------------


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
    weights = weights[weights >= _NEGLIGIBLE_WEIGHT * weights[0]].tolist()
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
    return _filter2d(pixels, defocus_kernel(radius, alias_sigma), "reflect101")


def _skimage_gaussian(pixels: Tensor, sigma: float) -> Tensor:
    """skimage.filters.gaussian(multichannel=True): per channel, mode='nearest', truncate 4."""
    weights = gaussian_kernel1d(sigma)
    if weights.numel() == 1:
        return pixels
    return _filter_separable(pixels, weights, weights, "nearest")


def _glass_blur(
    pixels: Tensor,
    sigma: float,
    max_shift: int,
    iterations: int,
    generator: torch.Generator | None,
) -> Tensor:
    # The reference stores the first blur as uint8 (truncating) before shuffling.
    levels = torch.floor(_skimage_gaussian(pixels, sigma) * 255 + _TRUNCATION_SLACK)
    for _ in range(iterations):
        levels = glass_shuffle(levels, max_shift, generator=generator)
    return _skimage_gaussian(levels / 255, sigma)


def _motion_blur(
    pixels: Tensor, radius: float, sigma: float, generator: torch.Generator | None
) -> Tensor:
    angles = torch.rand(pixels.shape[0], generator=generator, device=pixels.device) * 90 - 45
    return motion_blur_at(pixels, radius, sigma, angles)


def _zoom_blur(pixels: Tensor, factors: Sequence[float]) -> Tensor:
    """(x + sum over factors of clipped_zoom(x, z)) / (len(factors) + 1), as the reference.

    clipped_zoom crops the centred ``ceil(H / z) x ceil(W / z)`` window (top = (H - ch) // 2),
    zooms it with scipy's order-1 spline to ``round(ch z)`` pixels (scipy maps output o to
    input ``o (in - 1) / (out - 1)``, i.e. bilinear with aligned corners) and keeps the centred
    H x W window (trim = (out - H) // 2). The reference uses H for both axes of its square
    images; here each axis uses its own size.
    """
    n, c, h, w = pixels.shape
    total = pixels.clone()
    for factor in factors:
        crop_h, crop_w = math.ceil(h / factor), math.ceil(w / factor)
        top, left = (h - crop_h) // 2, (w - crop_w) // 2
        zoomed_h, zoomed_w = round(crop_h * factor), round(crop_w * factor)
        crop = pixels[:, :, top : top + crop_h, left : left + crop_w]
        if (zoomed_h, zoomed_w) == (crop_h, crop_w):
            zoomed = crop
        else:
            zoomed = F.interpolate(
                crop, size=(zoomed_h, zoomed_w), mode="bilinear", align_corners=True
            )
        trim_top, trim_left = (zoomed_h - h) // 2, (zoomed_w - w) // 2
        total += zoomed[:, :, trim_top : trim_top + h, trim_left : trim_left + w]
    return total / (len(factors) + 1)


def _corruption_function(
    corruption: str, parameter
) -> Callable[[Tensor, torch.Generator | None], Tensor]:
    """The corruption at one severity's parameters, as ``f(pixels, generator)``."""
    if corruption == "gaussian_noise":
        return lambda pixels, generator: _gaussian_noise(pixels, parameter, generator)
    if corruption == "shot_noise":
        return lambda pixels, generator: _shot_noise(pixels, parameter, generator)
    if corruption == "impulse_noise":
        return lambda pixels, generator: _impulse_noise(pixels, parameter, generator)
    if corruption == "defocus_blur":
        return lambda pixels, generator: _defocus_blur(pixels, *parameter)
    if corruption == "glass_blur":
        return lambda pixels, generator: _glass_blur(pixels, *parameter, generator)
    if corruption == "motion_blur":
        return lambda pixels, generator: _motion_blur(pixels, *parameter, generator)
    factors = zoom_factors(*parameter)
    return lambda pixels, generator: _zoom_blur(pixels, factors)


# ---------------------------------------------------------------------------------------------
# Filtering helpers
# ---------------------------------------------------------------------------------------------


def _border_indices(size: int, before: int, after: int, mode: str, device) -> Tensor:
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


def _pad(pixels: Tensor, pad_h: int, pad_w: int, mode: str) -> Tensor:
    h, w = pixels.shape[-2:]
    # F.pad is much faster than gathering, but reflects at most once (padding < size).
    if mode == "nearest" or (pad_h < h and pad_w < w):
        torch_mode = "replicate" if mode == "nearest" else "reflect"
        return F.pad(pixels, (pad_w, pad_w, pad_h, pad_h), mode=torch_mode)
    rows = _border_indices(h, pad_h, pad_h, mode, pixels.device)
    cols = _border_indices(w, pad_w, pad_w, mode, pixels.device)
    return pixels.index_select(-2, rows).index_select(-1, cols)


def _filter2d(pixels: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """Correlate every channel with a (kh, kw) kernel (odd sides), padding with ``mode``.

    On the CPU the convolution runs in float32 (float64 convolution there is very slow); on
    other devices in float64, which keeps TF32 and cuDNN's algorithm choice from changing
    results by more than round-off (a uint8 output truncates, so that would show).
    """
    n, c, h, w = pixels.shape
    kh, kw = kernel.shape
    conv_dtype = torch.float32 if pixels.device.type == "cpu" else torch.float64
    padded = _pad(pixels.to(conv_dtype), kh // 2, kw // 2, mode)
    weight = kernel.to(device=pixels.device, dtype=conv_dtype)[None, None]
    blurred = F.conv2d(padded.reshape(n * c, 1, h + kh - 1, w + kw - 1), weight)
    return blurred.reshape(n, c, h, w).to(pixels.dtype)


def _filter_separable(
    pixels: Tensor, row_weights: Tensor, col_weights: Tensor, mode: str
) -> Tensor:
    """Correlate every channel with ``row_weights`` along H, then ``col_weights`` along W."""
    blurred = _filter2d(pixels, row_weights.reshape(-1, 1), mode)
    return _filter2d(blurred, col_weights.reshape(1, -1), mode)


def _quantise(pixels: Tensor, slack: float) -> Tensor:
    """uint8 levels ``floor(255 y + slack)`` of pixels y in [0, 1] (still floating)."""
    return torch.floor(pixels * 255 + slack).clamp_(0, 255)


def _check_images(images: Tensor) -> None:
    """The input rule of :func:`corrupt`: 4-D, uint8 or floating in [0, 1]."""
    check_tensor("images", images, 4, "(N, C, H, W)")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"images should be uint8 or floating, but got dtype {images.dtype}")
    if images.is_floating_point() and images.numel() > 0:
        low, high = torch.aminmax(images)
        if not (float(low) >= 0 and float(high) <= 1):
            raise ValueError(
                "floating images should have values in [0, 1], but got values in "
                f"[{float(low)}, {float(high)}]"
            )
