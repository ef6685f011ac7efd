"""Snow, frost, fog and spatter, batched, on any device.

Each corruption as in the reference scripts of Hendrycks & Dietterich (2019):

* fog: ``x max(x) / (max(x) + s)`` after adding ``s`` times a plasma fractal
  (:func:`plasma_fractal`, the scripts' diamond-square ``plasma_fractal``) to every channel;
  ``max(x)`` is the image's brightest value over all channels. Each image gets its own map of
  side the next power of two >= its larger side (the scripts' fixed 32, 64 and 256 for their
  32, 64 and 224 pixel images), cropped to H x W.
* frost: ``clip(a x + b F)`` on the 0-255 scale, F an H x W crop of one of the frost
  photographs (:mod:`dropcluster.data.frost_images`): the image index is drawn from the first
  five (the scripts' ``np.random.randint(5)``: ``frost6.jpg`` is never used), the photograph
  is resized as the family's script does (OpenCV's ``INTER_LINEAR`` by 0.2 for CIFAR, 0.3 for
  Tiny ImageNet, not at all for ImageNet; :func:`opencv_resize_linear`) and the crop's top-left
  corner is drawn uniformly from ``[0, h_F - H) x [0, w_F - W)`` (the last row and column are
  never a corner, as with ``np.random.randint``).
* snow: a snow layer per image (shared by the channels): normal noise, the reference's
  ``clipped_zoom``, values below a threshold set to 0, stored as an 8-bit image (truncating),
  ImageMagick's motion blur (:func:`~dropcluster.data.corruptions.filters.motion_blur_at`) at
  an angle uniform in [-135, -45] degrees, read back from an 8-bit PNG (rounding); then
  ``x <- k x + (1 - k) max(x, 1.5 grey(x) + 0.5)`` and ``clip(x + L + rot180(L))``, grey being
  ``cv2.COLOR_RGB2GRAY`` (0.299 R + 0.587 G + 0.114 B).
* spatter: a liquid layer (normal noise, scikit-image's Gaussian blur, values below a threshold
  set to 0), then one of two branches. Water (severities with ``c[5] == 0``): the layer as
  uint8 levels, its Canny edges (:func:`canny`), the distance to the nearest edge
  (:func:`chamfer_distance`) truncated at 20, a 3x3 box blur truncated to uint8, histogram
  equalisation (:func:`equalize_histogram`), a 3x3 emboss filter saturated to uint8 and a 3x3
  box blur (:func:`water_texture`); the product with the layer's levels, divided by its
  maximum and scaled by ``c[4]``, adds that much pale turquoise (175, 238, 238) / 255. The
  scripts do this with ``cv2.cvtColor(x, COLOR_BGR2BGRA)`` on an RGB image; that only appends
  an alpha channel (dropped again at the end), so the colour lands in RGB order and the
  arithmetic is the one above. Mud (``c[5] == 1``): the mask ``layer > c[3]``, blurred with
  scikit-image's Gaussian of std ``c[4]``, values below 0.8 set to 0, gives ``m``; the result
  is ``x (1 - m) + m (63, 42, 20) / 255``.

Re-implemented from OpenCV, ImageMagick and scikit-image (checked against them on the same
random draws; "exact" means identical uint8 outputs):

* ``cv2.resize`` (``INTER_LINEAR``, uint8): OpenCV's fixed-point bilinear with half-pixel
  centres (11-bit weights, its vectorised rounding): identical to ``cv2.resize`` on all five
  frost photographs at factors 0.2 and 0.3 (factor 0.2 samples every fifth pixel exactly).
* ``cv2.Canny(.., 50, 150)`` (3x3 Sobel with replicated borders, L1 magnitude, OpenCV's
  fixed-point four-direction non-maximum suppression with its tie rules, hysteresis by
  repeated 8-neighbour growth): identical edge maps.
* ``cv2.distanceTransform(.., DIST_L2, 5)``: the 5x5 chamfer distance OpenCV uses (steps 1,
  1.4 and 2.1969), as shortest paths of those steps, summed in float32. Builds with Intel IPP
  (the pip wheels) sum the float32 steps too: they agree to 2e-6 (round-off ties between
  paths); OpenCV's own code sums 16-bit fixed-point steps, up to 6e-5 away. Either way it is
  not the exact Euclidean distance: at distances <= 20 the two differ by up to 0.37 (1.9%),
  either way (offset (19, 4): chamfer 19.79, Euclidean 19.42).
* ``cv2.blur`` (float sums in float64, reflect-101 borders), ``cv2.equalizeHist`` (float32
  scale, round half to even) and ``cv2.filter2D(.., CV_8U, ..)`` (saturating): exact.
* ImageMagick's motion blur: float arithmetic with ImageMagick's offsets and weights (as in
  noise_blur). The 8-bit PNG it writes is read back rounded: ImageMagick 6 Q16 rounds the
  blur to a 16-bit quantum and ``ScaleQuantumToChar`` scales that to 8 bits, which together
  round to the nearest level, halves up (checked on 10^7 values; a Q16 HDRI build would
  round once, the same but for exact halves).
* scikit-image's ``gaussian`` (spatter's liquid layer and mud mask): as
  :func:`~dropcluster.data.corruptions.filters.skimage_gaussian`; on the CPU its convolution
  runs in float32, so a liquid value within ~1e-7 of the threshold or of a uint8 level can land
  on the other side and move that pixel's water by a fraction of a level (a few pixels in
  10^5).
* ``np.uint8`` of the liquid levels: float64 -> uint8 wraps modulo 256 on x86 for a value of
  256 or more (a layer value above 1.004, never seen with the scripts' parameters), as here.

Against numpy/OpenCV/scikit-image re-runs of the scripts' formulas on the same draws (all
severities of the three families, 32, 64 and 224 pixel images): float outputs agree to 5e-5
grey levels (on the 0-255 scale) but for those spatter pixels; uint8 outputs differ by one
level in 0.1% of the values (the 1e-3 slack, and float32 here against float64 there), except
frost at ImageNet severity 3, where ``0.7 x + 0.7 F`` is an exact integer for 10% of the
pixels and the reference's float64 sum often lands a hair below it, truncating one level lower
than here (2% of the values).

Where this differs from the scripts:

* The scripts hard-code the image size (32, 64 or 224); here it is the input's, for every
  corruption. For other sizes fog's map is the next power of two (as in ``imagecorruptions``),
  and frost needs an image smaller than every resized photograph (:data:`CHECKS`).
* spatter (water): an image whose liquid layer is all zero makes the reference divide 0 by 0
  (NaN, stored as an undefined uint8); here it gets no water.
* Grey images (C = 1) are treated as the RGB image (x, x, x). Fog and snow keep it grey and
  return it; frost and spatter colour it, and return the grey value 0.299 R + 0.587 G + 0.114 B
  of the coloured result (what saving it as an 8-bit grey image with PIL or OpenCV computes).
  Snow and spatter need C = 1 or 3, frost too; fog works on any C.
* The PyPI package ``imagecorruptions`` (ImageNet parameters only) rescales the frost
  photograph to fit any image (bicubic, 1.1 times), never truncates the snow layer before its
  motion blur, uses ``0.2989 R + 0.587 G + 0.114 B`` for grey inputs, and draws its random
  numbers with numpy; none of that is followed here.

Random draws (from ``generator``, in this order, per chunk of N images; float64 uniform draws
are ``torch.rand(.., dtype=torch.float64)``):

* fog: :func:`plasma_fractal`'s draws.
* frost: the photograph indices ``randint(0, 5, (N,))``, then ``rand(N, 2)`` float64 for the
  crop's row and column (``floor(u (h_F - H))``, ``floor(u (w_F - W))``).
* snow: ``randn(N, 1, H, W)`` float64 (the layer is ``loc + scale z``), then ``rand(N)``
  float64 for the angles (``-135 + 90 u``).
* spatter: ``randn(N, 1, H, W)`` float64 (the layer is ``loc + scale z``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dropcluster.data.corruptions.filters import (
    clipped_zoom,
    motion_blur_at,
    pad,
    skimage_gaussian,
)
from dropcluster.data.frost_images import find_frost_folder, load_frost_images

__all__ = [
    "CHECKS",
    "FUNCTIONS",
    "PARAMETERS",
    "UINT8_SLACK",
    "canny",
    "chamfer_distance",
    "emboss",
    "equalize_histogram",
    "opencv_resize_linear",
    "plasma_fractal",
    "rgb_to_grey",
    "water_texture",
]


#: family -> corruption -> the parameters of severities 1 to 5, as in the reference scripts:
#: snow: (loc, scale, zoom, threshold, blur radius, blur sigma, k) (see the module docstring);
#: frost: (a, b, resize factor) in ``clip(a x + b F)``, the factor being the one each script
#: resizes the photographs by (ImageNet: 1, no resize); fog: (strength s, the fractal's decay);
#: spatter: (loc, scale, liquid sigma, threshold, water intensity or mud sigma, 0 water /
#: 1 mud).
PARAMETERS: dict[str, dict[str, tuple]] = {
    "cifar": {
        "snow": (
            (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
            (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
            (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
        ),
        "frost": (
            (1, 0.2, 0.2),
            (1, 0.3, 0.2),
            (0.9, 0.4, 0.2),
            (0.85, 0.4, 0.2),
            (0.75, 0.45, 0.2),
        ),
        "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
        "spatter": (
            (0.62, 0.1, 0.7, 0.7, 0.5, 0),
            (0.65, 0.1, 0.8, 0.7, 0.5, 0),
            (0.65, 0.3, 1, 0.69, 0.5, 0),
            (0.65, 0.1, 0.7, 0.69, 0.6, 1),
            (0.65, 0.1, 0.5, 0.68, 0.6, 1),
        ),
    },
    "tiny-imagenet": {
        "snow": (
            (0.1, 0.2, 1, 0.6, 8, 3, 0.8),
            (0.1, 0.2, 1, 0.5, 10, 4, 0.8),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.7),
            (0.25, 0.3, 2.25, 0.6, 12, 6, 0.65),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.6),
        ),
        "frost": (
            (1, 0.3, 0.3),
            (0.9, 0.4, 0.3),
            (0.8, 0.45, 0.3),
            (0.75, 0.5, 0.3),
            (0.7, 0.55, 0.3),
        ),
        "fog": ((0.4, 3), (0.7, 3), (1, 2.5), (1.5, 2), (2, 1.75)),
        "spatter": (
            (0.62, 0.1, 0.7, 0.7, 0.6, 0),
            (0.65, 0.1, 0.8, 0.7, 0.6, 0),
            (0.65, 0.3, 1, 0.69, 0.6, 0),
            (0.65, 0.1, 0.7, 0.68, 0.6, 1),
            (0.65, 0.1, 0.5, 0.67, 0.6, 1),
        ),
    },
    "imagenet": {
        "snow": (
            (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
            (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
            (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
            (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
            (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
        ),
        "frost": ((1, 0.4, 1), (0.8, 0.6, 1), (0.7, 0.7, 1), (0.65, 0.7, 1), (0.6, 0.75, 1)),
        "fog": ((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)),
        "spatter": (
            (0.65, 0.3, 4, 0.69, 0.6, 0),
            (0.65, 0.3, 3, 0.68, 0.6, 0),
            (0.65, 0.3, 2, 0.68, 0.5, 0),
            (0.65, 0.3, 1, 0.65, 1.5, 1),
            (0.67, 0.4, 1, 0.65, 1.5, 1),
        ),
    },
}

#: ITU-R 601 luma weights of R, G, B (``cv2.COLOR_RGB2GRAY``, PIL's ``convert("L")``).
_LUMA = (0.299, 0.587, 0.114)
#: The colours the spatter adds, in RGB order.
_WATER = (175 / 255, 238 / 255, 238 / 255)
_MUD = (63 / 255, 42 / 255, 20 / 255)
#: The emboss kernel of the water branch (correlation, as ``cv2.filter2D``); it sums to 1.
_EMBOSS = ((-2, -1, 0), (-1, 1, 1), (0, 1, 2))
#: Canny's hysteresis thresholds and the cap on the distance to an edge.
_CANNY_LOW, _CANNY_HIGH, _DISTANCE_CAP = 50, 150, 20.0
#: tan(22.5 deg) in OpenCV's 15-bit fixed point (Canny's direction test).
_TAN22_FIXED = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)
#: OpenCV's 5x5 chamfer steps for DIST_L2: (row, column, length), lengths as float32.
_CHAMFER_STEPS = (
    *((dy, dx, 1.0) for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))),
    *((dy, dx, 1.4) for dy in (-1, 1) for dx in (-1, 1)),
    *((dy, dx, 2.1969) for dy, dx in ((-2, -1), (-2, 1), (2, -1), (2, 1))),
    *((dy, dx, 2.1969) for dy, dx in ((-1, -2), (1, -2), (-1, 2), (1, 2))),
)


# --------------------------------------------------------------------------------------------
# fog


def plasma_fractal(
    count: int,
    size: int,
    decay: float,
    *,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
) -> Tensor:
    """The scripts' diamond-square heightmaps, one per image, each rescaled to [0, 1].

    As ``plasma_fractal(mapsize=size, wibbledecay=decay)``: the map starts at 0 in its corner;
    for step = size, size/2, .., 2 (with ``wibble`` = 100, then divided by ``decay`` after each
    step) the square centres get the mean of their four corners plus ``wibble u`` and then the
    diamond centres (first those on the corner rows, then those on the corner columns) the
    mean of their four neighbours plus ``wibble u``, neighbours wrapping around the map, with
    ``u`` uniform in [-wibble, wibble). Finally each map is shifted and scaled so its minimum is
    0 and its maximum 1.

    Random draws, per step: three ``rand(count, m, m)`` float64 with m = size / step (squares,
    row diamonds, column diamonds), ``u = -wibble + 2 wibble rand``.

    Args:
        count: number of maps.
        size: the side, a power of two >= 2.
        decay: the ``wibbledecay`` (> 0).
        generator: source of the draws (on ``device``).
        device: where the maps are made.

    Returns:
        Tensor[count, size, size] float64 with values in [0, 1], each map's minimum 0 and
        maximum 1.
    """
    if size < 2 or size & (size - 1):
        raise ValueError(f"plasma_fractal needs a power of two >= 2 as size, but got {size}")
    maps = torch.zeros(count, size, size, dtype=torch.float64, device=device)
    step, wibble = size, 100.0

    def wibbled_mean(total: Tensor) -> Tensor:
        uniform = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=device)
        return total / 4 + wibble * (-wibble + 2 * wibble * uniform)

    while step >= 2:
        half = step // 2
        corners = maps[:, ::step, ::step]
        # Squares: the four corners of each square, the lattice wrapping around.
        total = corners + corners.roll(-1, dims=1)
        total = total + total.roll(-1, dims=2)
        maps[:, half::step, half::step] = wibbled_mean(total)
        centres = maps[:, half::step, half::step]
        corners = maps[:, ::step, ::step]
        # Diamonds on the corner rows: centres above and below, corners left and right.
        total = (centres + centres.roll(1, dims=1)) + (corners + corners.roll(-1, dims=2))
        maps[:, ::step, half::step] = wibbled_mean(total)
        # Diamonds on the corner columns: centres left and right, corners above and below.
        total = (centres + centres.roll(1, dims=2)) + (corners + corners.roll(-1, dims=1))
        maps[:, half::step, ::step] = wibbled_mean(total)
        step = half
        wibble /= decay
    maps -= maps.amin(dim=(1, 2), keepdim=True)
    return maps / maps.amax(dim=(1, 2), keepdim=True)


def _fog(
    pixels: Tensor, strength: float, decay: float, generator: torch.Generator | None
) -> Tensor:
    n, _, h, w = pixels.shape
    size = max(2, 1 << (max(h, w) - 1).bit_length())
    fractal = plasma_fractal(n, size, decay, generator=generator, device=pixels.device)
    fractal = fractal[:, None, :h, :w].to(pixels.dtype)
    peak = pixels.amax(dim=(1, 2, 3), keepdim=True)
    return (pixels + strength * fractal) * peak / (peak + strength)


# --------------------------------------------------------------------------------------------
# frost


def opencv_resize_linear(levels: Tensor, factor: float) -> Tensor:
    """``cv2.resize(image, (0, 0), fx=factor, fy=factor)`` (``INTER_LINEAR``) on uint8 levels.

    The output has ``round(H factor) x round(W factor)`` pixels (halves to even). Output pixel
    d samples the input at ``(d + 0.5) / factor - 0.5`` (half-pixel centres; clamped to the
    edge pixels), with OpenCV's arithmetic: float32 positions, weights rounded to 11 bits
    (``(1 - t) 2048`` and ``t 2048``), exact integer sums along W, then along H the products
    ``(S >> 4) b >> 16`` of each row and ``(sum + 2) >> 2`` (its vectorised rounding), saturated
    to uint8. Positions beyond the edge take the edge pixel (along H keeping the fractional
    weights on the repeated row, whose rounding then differs, as OpenCV does). No
    anti-aliasing: a factor of 0.2 takes every fifth pixel, from pixel 2 on. (For a factor of
    exactly 0.5 OpenCV switches to ``INTER_AREA``; that is not reproduced.)

    Args:
        levels (Tensor[..., H, W]): uint8 (or integer-valued) images.
        factor: the scale factor (> 0); 1 returns a copy.

    Returns:
        Tensor[..., round(H factor), round(W factor)] uint8.
    """
    if factor == 1:
        return levels.to(torch.uint8, copy=True)
    h, w = levels.shape[-2:]
    rows0, rows1, row_weights0, row_weights1 = _linear_taps(h, factor, levels.device, False)
    cols0, cols1, col_weights0, col_weights1 = _linear_taps(w, factor, levels.device, True)
    values = levels.long()
    along_w = (
        values.index_select(-1, cols0) * col_weights0
        + values.index_select(-1, cols1) * col_weights1
    )
    top = along_w.index_select(-2, rows0) >> 4
    bottom = along_w.index_select(-2, rows1) >> 4
    out = ((top * row_weights0[:, None]) >> 16) + ((bottom * row_weights1[:, None]) >> 16)
    return ((out + 2) >> 2).clamp(0, 255).to(torch.uint8)


def _linear_taps(
    size: int, factor: float, device, clamp_weights: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Source indices and 11-bit weights of OpenCV's bilinear resize along one axis.

    Along W, OpenCV moves a position outside ``[0, size - 1]`` onto the edge pixel with weight
    1 (``clamp_weights``); along H it keeps the fractional weights and only clamps the rows.
    """
    out_size = round(size * factor)
    scale = 1.0 / factor
    # OpenCV computes the position in double and stores it as float.
    position = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5).float()
    first = torch.floor(position)
    fraction = position - first
    first = first.long()
    if clamp_weights:
        outside = (first < 0) | (first >= size - 1)
        fraction = torch.where(outside, 0.0, fraction)
        first = first.clamp(0, size - 1)
    weight0 = torch.round((1 - fraction) * 2048).long()
    weight1 = torch.round(fraction * 2048).long()
    second = (first + 1).clamp(0, size - 1)
    first = first.clamp(0, size - 1)
    return tuple(t.to(device) for t in (first, second, weight0, weight1))


#: (frost folder, device, factor) -> (stack[5, 3, Hmax, Wmax] uint8, heights[5], widths[5]).
_RESIZED: dict[tuple[str, torch.device, float], tuple[Tensor, Tensor, Tensor]] = {}


def _frost_stack(factor: float, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The first five photographs resized by ``factor``, zero-padded into one stack."""
    key = (str(find_frost_folder().resolve()), device, factor)
    if key not in _RESIZED:
        resized = [opencv_resize_linear(image, factor) for image in load_frost_images(None, device)]
        resized = resized[:5]
        heights = torch.tensor([image.shape[1] for image in resized], device=device)
        widths = torch.tensor([image.shape[2] for image in resized], device=device)
        stack = torch.zeros(
            5, 3, int(heights.max()), int(widths.max()), dtype=torch.uint8, device=device
        )
        for index, image in enumerate(resized):
            stack[index, :, : image.shape[1], : image.shape[2]] = image
        _RESIZED[key] = (stack, heights, widths)
    return _RESIZED[key]


def _frost(
    pixels: Tensor,
    blend: float,
    frost_blend: float,
    factor: float,
    generator: torch.Generator | None,
) -> Tensor:
    n, c, h, w = pixels.shape
    device = pixels.device
    stack, heights, widths = _frost_stack(factor, device)
    index = torch.randint(0, 5, (n,), generator=generator, device=device)
    uniform = torch.rand((n, 2), generator=generator, dtype=torch.float64, device=device)
    top = torch.floor(uniform[:, 0] * (heights[index] - h)).long()
    left = torch.floor(uniform[:, 1] * (widths[index] - w)).long()
    rows = top[:, None] + torch.arange(h, device=device)
    cols = left[:, None] + torch.arange(w, device=device)
    crops = stack[
        index[:, None, None, None],
        torch.arange(3, device=device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    rgb = pixels.expand(n, 3, h, w)
    frosted = (blend * rgb + frost_blend * (crops.to(pixels.dtype) / 255)).clamp(0, 1)
    return frosted if c == 3 else rgb_to_grey(frosted)


# --------------------------------------------------------------------------------------------
# snow


def rgb_to_grey(pixels: Tensor) -> Tensor:
    """``cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)``: ``0.299 R + 0.587 G + 0.114 B``.

    Args:
        pixels (Tensor[N, 3, H, W]): floating RGB.

    Returns:
        Tensor[N, 1, H, W] of the dtype of ``pixels``.
    """
    red, green, blue = pixels[:, 0:1], pixels[:, 1:2], pixels[:, 2:3]
    return red * _LUMA[0] + green * _LUMA[1] + blue * _LUMA[2]


def _snow(pixels: Tensor, parameter: tuple, generator: torch.Generator | None) -> Tensor:
    loc, scale, zoom, threshold, radius, sigma, keep = parameter
    n, c, h, w = pixels.shape
    device = pixels.device
    layer = torch.randn((n, 1, h, w), generator=generator, dtype=torch.float64, device=device)
    layer = clipped_zoom(layer * scale + loc, zoom)
    layer = torch.where(layer < threshold, 0.0, layer)
    # Stored with PIL as an 8-bit image (np.uint8 truncates), blurred by ImageMagick.
    levels = torch.floor(layer.clamp(0, 1) * 255)
    angles = torch.rand(n, generator=generator, dtype=torch.float64, device=device) * 90 - 135
    blurred = motion_blur_at(levels, radius, sigma, angles)
    # ImageMagick 6 Q16 rounds the blur to a 16-bit quantum (257 per level) and its 8-bit PNG
    # scales that down (ScaleQuantumToChar): together, rounding halves up.
    layer = (torch.floor(blurred + 0.5) / 255).to(pixels.dtype)
    grey = pixels if c == 1 else rgb_to_grey(pixels)
    whitened = keep * pixels + (1 - keep) * torch.maximum(pixels, grey * 1.5 + 0.5)
    return whitened + layer + layer.flip(-2, -1)


# --------------------------------------------------------------------------------------------
# spatter


def _neighbours(padded: Tensor, border: int, h: int, w: int) -> Callable[[int, int], Tensor]:
    """``at(dy, dx)``: the H x W window of ``padded`` shifted by (dy, dx)."""

    def at(dy: int, dx: int) -> Tensor:
        return padded[..., border + dy : border + dy + h, border + dx : border + dx + w]

    return at


def canny(levels: Tensor, low: float = _CANNY_LOW, high: float = _CANNY_HIGH) -> Tensor:
    """``cv2.Canny(image, low, high)`` (aperture 3, L1 gradient) of each image.

    3x3 Sobel derivatives with replicated borders; magnitude ``|dx| + |dy|``; a pixel with
    magnitude > ``low`` survives non-maximum suppression when it beats its two neighbours
    across the edge, the direction chosen with OpenCV's fixed-point tan(22.5 deg) test:
    horizontal (``|dy| 2^15 < |dx| T``, T = 13573): left strictly, right or equal; vertical
    (``|dy| 2^15 > |dx| (T + 2^16)``): above strictly, below or equal; otherwise the diagonal
    along the gradient, both strictly; neighbours outside the image count as 0. Survivors
    with magnitude > ``high`` are edges, and edges grow into 8-neighbouring survivors until
    nothing changes (hysteresis).

    Args:
        levels (Tensor[N, H, W]): uint8 levels (any integer-valued dtype).
        low, high: the hysteresis thresholds.

    Returns:
        Tensor[N, H, W] bool, True on edges (where OpenCV's output is 255).
    """
    n, h, w = levels.shape
    values = pad(levels[:, None].to(torch.float32), 1, 1, "nearest")
    at = _neighbours(values, 1, h, w)
    dx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    dy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    magnitude = dx.abs() + dy.abs()
    # The direction test needs more than float32's 24 bits.
    dx_int, dy_int = dx.long(), dy.long()
    scaled_x = dx_int.abs() * _TAN22_FIXED
    scaled_y = dy_int.abs() << 15
    horizontal = scaled_y < scaled_x
    vertical = ~horizontal & (scaled_y > scaled_x + (dx_int.abs() << 16))
    same_sign = (dx_int ^ dy_int) >= 0
    near = _neighbours(F.pad(magnitude, (1, 1, 1, 1)), 1, h, w)
    beats_horizontal = (magnitude > near(0, -1)) & (magnitude >= near(0, 1))
    beats_vertical = (magnitude > near(-1, 0)) & (magnitude >= near(1, 0))
    beats_diagonal = torch.where(
        same_sign,
        (magnitude > near(-1, -1)) & (magnitude > near(1, 1)),
        (magnitude > near(-1, 1)) & (magnitude > near(1, -1)),
    )
    survives = torch.where(
        horizontal, beats_horizontal, torch.where(vertical, beats_vertical, beats_diagonal)
    )
    survives &= magnitude > low
    candidates = survives[:, 0]
    edges = candidates & (magnitude[:, 0] > high)
    # Grow the strong edges through 8-connected survivors; check for change every 8 steps.
    # The 3x3 dilation is an OR of shifted views (rows, then columns) of a copy with a border
    # of False, which is much cheaper than a max pool.
    padded = torch.zeros((n, h + 2, w + 2), dtype=torch.bool, device=levels.device)
    inner = padded[:, 1 : 1 + h, 1 : 1 + w]
    while True:
        before = edges
        for _ in range(8):
            inner.copy_(edges)
            across = padded[:, :, :w] | padded[:, :, 1 : 1 + w]
            across |= padded[:, :, 2 : 2 + w]
            grown = across[:, :h] | across[:, 1 : 1 + h]
            grown |= across[:, 2 : 2 + h]
            edges = grown.logical_and_(candidates)
        if torch.equal(edges, before):
            return edges


def chamfer_distance(zeros: Tensor, limit: float = _DISTANCE_CAP) -> Tensor:
    """``cv2.distanceTransform(mask, DIST_L2, 5)`` capped at ``limit``.

    The distance of each pixel to the nearest zero pixel, as the shortest path of OpenCV's
    5x5 chamfer steps (1 to the 4 neighbours, 1.4 to the 4 diagonal ones, 2.1969 to the 8
    knight's moves) that stays inside the image, summed in float32 along the path; then
    ``min(d, limit)`` (as ``cv2.threshold(.., THRESH_TRUNC)``). Each step is at least 1 long,
    so ``ceil(limit)`` rounds of relaxation give every distance up to ``limit`` exactly; an
    image without zero pixels gets ``limit`` everywhere (OpenCV returns about 32768 there).

    Args:
        zeros (Tensor[N, H, W]): bool, True at the zero pixels.
        limit: the cap (> 0).

    Returns:
        Tensor[N, H, W] float32.
    """
    n, h, w = zeros.shape
    inf = float("inf")
    distance = torch.where(zeros, 0.0, inf).to(torch.float32)
    steps = {
        length: torch.tensor(length, dtype=torch.float32, device=zeros.device)
        for length in sorted({step for _, _, step in _CHAMFER_STEPS})
    }
    straight, diagonal, knight = steps.values()
    for _ in range(math.ceil(limit)):
        padded = F.pad(distance, (2, 2, 2, 2), value=inf)
        # Float addition is monotone, so min(a + s, b + s) = min(a, b) + s exactly: take the
        # minimum of each family of steps first and add its length once. Pairs of rows one
        # and two above/below the pixel, over the whole padded width, serve all three.
        rows1 = torch.minimum(padded[:, 1 : 1 + h], padded[:, 3 : 3 + h])
        rows2 = torch.minimum(padded[:, :h], padded[:, 4 : 4 + h])
        centre_row = padded[:, 2 : 2 + h]
        near = torch.minimum(rows1[..., 2 : 2 + w], centre_row[..., 1 : 1 + w])
        near = torch.minimum(near, centre_row[..., 3 : 3 + w]).add_(straight)
        corners = torch.minimum(rows1[..., 1 : 1 + w], rows1[..., 3 : 3 + w]).add_(diagonal)
        jumps = torch.minimum(rows1[..., :w], rows1[..., 4 : 4 + w])
        jumps = torch.minimum(jumps, rows2[..., 1 : 1 + w])
        jumps = torch.minimum(jumps, rows2[..., 3 : 3 + w]).add_(knight)
        best = torch.minimum(torch.minimum(distance, near), torch.minimum(corners, jumps))
        # Relaxation only ever lowers distances; once a round changes nothing, none will.
        if torch.equal(best, distance):
            break
        distance = best
    return distance.clamp(max=limit)


def _box3(values: Tensor) -> Tensor:
    """Sum of each 3x3 neighbourhood, reflect-101 borders (``cv2.blur`` times 9)."""
    h, w = values.shape[-2:]
    at = _neighbours(pad(values[:, None], 1, 1, "reflect101"), 1, h, w)
    return sum(at(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))[:, 0]


def equalize_histogram(levels: Tensor) -> Tensor:
    """``cv2.equalizeHist`` of each image.

    With ``v0`` the image's smallest level, ``n0`` its count and T the number of pixels, level
    v maps to ``round(cumcount(v) - n0) s)`` with ``s = 255 / (T - n0)`` in float32 (rounded
    half to even); ``v0`` maps to 0, and an image of one level keeps it.

    Args:
        levels (Tensor[N, H, W]): uint8 levels (any integer-valued dtype).

    Returns:
        Tensor[N, H, W] of the dtype of ``levels``.
    """
    n = levels.shape[0]
    flat = levels.reshape(n, -1).long()
    total = flat.shape[1]
    # One bincount over image-offset levels (deterministic on CUDA, unlike scatter_add_).
    offsets = 256 * torch.arange(n, device=levels.device)[:, None]
    counts = torch.bincount((flat + offsets).reshape(-1), minlength=256 * n).reshape(n, 256)
    lowest = (counts > 0).long().argmax(dim=1, keepdim=True)
    lowest_count = counts.gather(1, lowest)
    # As OpenCV, 255 / count in float32 (``scalar / tensor`` would multiply by a reciprocal).
    numerator = torch.tensor(255.0, dtype=torch.float32, device=levels.device)
    scale = numerator / (total - lowest_count).clamp(min=1).to(torch.float32)
    table = torch.round((counts.cumsum(1) - lowest_count).to(torch.float32) * scale)
    table = torch.where(torch.arange(256, device=levels.device) <= lowest, 0.0, table.clamp(0, 255))
    table = torch.where(lowest_count == total, lowest.to(table.dtype), table)
    return table.gather(1, flat).reshape(levels.shape).to(levels.dtype)


def emboss(levels: Tensor) -> Tensor:
    """``cv2.filter2D(levels, cv2.CV_8U, [[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])``.

    Correlation (not convolution) with reflect-101 borders; the integer sums are saturated to
    [0, 255].

    Args:
        levels (Tensor[N, H, W]): uint8 levels (any integer-valued dtype).

    Returns:
        Tensor[N, H, W] float32, integers in [0, 255].
    """
    h, w = levels.shape[-2:]
    at = _neighbours(pad(levels[:, None].to(torch.float32), 1, 1, "reflect101"), 1, h, w)
    total = sum(_EMBOSS[row][col] * at(row - 1, col - 1) for row in range(3) for col in range(3))
    return total[:, 0].clamp(0, 255)


def water_texture(levels: Tensor) -> Tensor:
    """The water branch's texture: the scripts' chain of OpenCV calls on the liquid's levels.

    ``dist = distanceTransform(255 - Canny(levels, 50, 150))`` capped at 20, ``blur`` 3x3
    truncated to uint8, ``equalizeHist``, ``filter2D`` with the kernel
    ``[[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]`` saturated to uint8, ``blur`` 3x3 rounded to uint8.

    Args:
        levels (Tensor[N, H, W]): the liquid layer's uint8 levels (any integer-valued dtype).

    Returns:
        Tensor[N, H, W] float32, integers in [0, 255].
    """
    distance = chamfer_distance(canny(levels))
    # cv2.blur of float32 sums in float64 and scales by 1/9 before storing float32.
    blurred = (_box3(distance.to(torch.float64)) * (1 / 9)).to(torch.float32)
    embossed = emboss(equalize_histogram(torch.floor(blurred).long()))
    # The uint8 box filter rounds (a sum of nine is never a half-integer multiple of 9).
    return torch.round(_box3(embossed) / 9)


def _spatter(pixels: Tensor, parameter: tuple, generator: torch.Generator | None) -> Tensor:
    loc, scale, sigma, threshold, strength, mud = parameter
    n, c, h, w = pixels.shape
    device = pixels.device
    liquid = torch.randn((n, 1, h, w), generator=generator, dtype=torch.float64, device=device)
    liquid = skimage_gaussian(liquid * scale + loc, sigma)
    liquid = torch.where(liquid < threshold, 0.0, liquid)
    rgb = pixels.expand(n, 3, h, w)
    if mud:
        mask = skimage_gaussian((liquid > threshold).to(pixels.dtype), strength)
        mask = torch.where(mask < 0.8, 0.0, mask)
        colour = torch.tensor(_MUD, dtype=pixels.dtype, device=device)[None, :, None, None]
        spattered = rgb * (1 - mask) + colour * mask
    else:
        # np.uint8 truncates (and wraps values of 256 or more modulo 256, as on x86).
        levels = torch.floor(liquid[:, 0] * 255).remainder(256)
        weight = levels.to(torch.float32) * water_texture(levels)
        peak = weight.amax(dim=(1, 2), keepdim=True)
        # An all-zero layer makes the reference divide 0 by 0; here it adds no water.
        weight = torch.where(peak > 0, weight / peak.clamp(min=1), 0.0) * strength
        colour = torch.tensor(_WATER, dtype=pixels.dtype, device=device)[None, :, None, None]
        spattered = rgb + weight[:, None].to(pixels.dtype) * colour
    spattered = spattered.clamp(0, 1)
    return spattered if c == 3 else rgb_to_grey(spattered)


# --------------------------------------------------------------------------------------------
# registry


def _check_colour(name: str, channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(
            f"{name} needs RGB images (C = 3) or grey ones (C = 1), but got C = {channels}"
        )


def _resized_size(size: int, factor: float) -> int:
    # cv2.resize's output size: saturate_cast<int>(size * factor), rounding halves to even.
    return size if factor == 1 else round(size * factor)


def _check_frost(parameter: tuple, channels: int, height: int, width: int) -> None:
    _check_colour("frost", channels)
    factor = parameter[2]
    images = load_frost_images()[:5]
    min_height = min(_resized_size(image.shape[1], factor) for image in images)
    min_width = min(_resized_size(image.shape[2], factor) for image in images)
    if height >= min_height or width >= min_width:
        raise ValueError(
            f"frost crops the image from frost photographs resized by {factor} (the smallest "
            f"{min_height} x {min_width}) and needs images smaller than that, but got "
            f"{height} x {width}"
        )


#: name -> ``f(pixels, parameter, generator)`` on float pixels in [0, 1] (N, C, H, W).
FUNCTIONS: dict[str, Callable[[Tensor, Any, torch.Generator | None], Tensor]] = {
    "snow": _snow,
    "frost": lambda pixels, parameter, generator: _frost(pixels, *parameter, generator),
    "fog": lambda pixels, parameter, generator: _fog(pixels, *parameter, generator),
    "spatter": _spatter,
}

#: All four end as the reference's float result truncated by ``np.uint8``: the default slack.
UINT8_SLACK: dict[str, float] = {}

#: name -> ``check(parameter, channels, height, width)``, raising before any work.
CHECKS: dict[str, Callable[[Any, int, int, int], None]] = {
    "snow": lambda parameter, channels, height, width: _check_colour("snow", channels),
    "spatter": lambda parameter, channels, height, width: _check_colour("spatter", channels),
    "frost": _check_frost,
}
