"""Brightness, contrast, saturate, speckle noise, Gaussian blur, pixelate: batched, any device.

Each corruption as in the reference scripts of Hendrycks & Dietterich (2019):

* brightness: scikit-image's ``rgb2hsv``, ``V <- clip(V + c, 0, 1)``, ``hsv2rgb``.
* saturate: the same round trip with ``S <- clip(S a + b, 0, 1)``.
* contrast: ``(x - m) c + m`` with m the mean of each image's channel over H and W.
* speckle_noise: ``x + x N(0, c^2)``, one independent draw per element.
* gaussian_blur: scikit-image's ``gaussian`` (each channel, ``mode="nearest"``, ``truncate=4``).
* pixelate: PIL's ``Image.resize`` with the BOX filter down to ``int(side c)`` pixels per axis,
  then with BOX back up to the original size. All three scripts use BOX both ways. The PyPI
  package ``imagecorruptions`` enlarges with NEAREST; BOX enlarging takes the one input pixel
  under each output centre, which NEAREST also picks except where a centre falls exactly on
  a pixel edge and round-off decides (never at the scripts' sizes 32, 64 and 224, so there
  the two agree; at other sizes about one (size, factor) pair in five differs somewhere).

The tensor versions:

* HSV (:func:`rgb_to_hsv`, :func:`hsv_to_rgb`) is scikit-image's arithmetic re-done in float64,
  operation for operation: V is the largest channel, S = (V - min) / V, hue from the largest
  channel (blue over green over red on ties), ``(h / 6) mod 1``, and S = H = 0 where the
  channels are equal (greys, black, white); back to RGB by the sextant ``floor(6 h) mod 6``.
  On float64 input both are bit-for-bit equal to scikit-image.
* brightness, saturate and contrast work in float64 on the exact levels ``k / 255`` when
  given a uint8 image (float32 values that are the float32 rounding of a level are taken as
  that level), so they compute what the scripts compute.
* pixelate reproduces PIL's 8-bit resampling: PIL's BOX weights (1 for every input pixel
  whose centre falls in the output pixel's box, 0 otherwise: not fractional coverage),
  normalised, scaled to 2^22 and rounded to integers, the horizontal pass and then the
  vertical pass each rounded and clipped to 0..255 as PIL stores them. Each pass is a weighted
  sum of a few gathered copies of the image (``ceil(side / int(side c))`` taps down, one up),
  in int32, exact as PIL's own integer sums. :func:`pil_resize` also does PIL's NEAREST.
  The corruption itself runs each axis's down and up passes as one float32 matrix product of
  0/1 box memberships (exact integer sums) and PIL's rounding of ``w S`` as a checked float
  formula: the same integers, straight from uint8 to uint8 (see ``LEVEL_FUNCTIONS``).

How close to the scripts (each script's functions run on the same images, 12 photographs per
family at 32, 64 and 224 pixels, all severities):

* brightness, saturate, pixelate: uint8 outputs identical; float64 outputs of brightness and
  saturate bit-for-bit equal. brightness and saturate keep the scripts' own round-off: e.g.
  193/255 + 0.2 (244/255 in exact arithmetic) lands just under 244 and is stored as 243.
* contrast: uint8 outputs identical; float outputs within 4e-11 grey levels (the means'
  summation order). Except on images with a constant channel: there numpy's round-off in the
  scripts' mean puts the result a hair under the level in about half the cases (3144 of the
  6144 combinations of level, size and factor), which the scripts store one level lower;
  here a constant image stays constant.
* gaussian_blur: float outputs within 1.2e-4 grey levels (the shared float32
  :func:`~dropcluster.data.corruptions.filters.skimage_gaussian`); uint8 outputs one level
  higher on 0.1% of the values of photographs (0.7% at CIFAR severity 1): those the scripts
  leave in the last thousandth below an integer, which the 1e-3 truncation slack lifts. Most
  are flat or linear regions, where the scripts' float64 weights sum to a hair under 1 and
  drop some levels (13 to 79 of the 256, depending on sigma) by one; here they stay.
* speckle_noise: the same distribution, drawn from ``generator``: other numbers than numpy's.
* pixelate on float images: PIL only ever sees the scripts' 8-bit images, so float images are
  first rounded to the nearest of the 256 levels; float and uint8 versions of an image give
  the same result, and float outputs are multiples of 1/255. The scripts hard-code the
  family's side (32, 64 or 224) for both axes; here each axis uses its own size,
  ``int(H c)`` and ``int(W c)``, as ``imagecorruptions`` does. See :func:`pil_resize` for
  Pillow 13, which orders the passes differently on some tall images.
* Grey images (C = 1): brightness and saturate convert to RGB (three equal channels), apply,
  and keep channel 0, as ``imagecorruptions`` does. Brightness then is ``clip(x + c, 0, 1)``;
  saturate leaves a grey image unchanged (at severities 4 and 5, S = b > 0 with hue 0 tints
  the grey pixels of a colour image red, as in the reference, but channel 0 of that is V).
  Other channel counts are refused (see ``CHECKS``); the other four work with any C.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from dropcluster.data.corruptions.filters import skimage_gaussian

__all__ = [
    "CHECKS",
    "FUNCTIONS",
    "LEVEL_FUNCTIONS",
    "PARAMETERS",
    "UINT8_SLACK",
    "hsv_to_rgb",
    "pil_resize",
    "rgb_to_hsv",
]


#: family -> corruption -> the parameters of severities 1 to 5, as in the reference scripts:
#: brightness: c added to V; contrast: factor c on the deviation from the channel mean;
#: saturate: (a, b) in ``S a + b``; speckle_noise: std of the multiplicative noise;
#: gaussian_blur: sigma in pixels; pixelate: the factor c of the intermediate size ``int(side c)``
#: (all three scripts resize with BOX down and BOX up; nothing else varies per family).
PARAMETERS: dict[str, dict[str, tuple]] = {
    "cifar": {
        "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
        "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
        "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
        "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),
        "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1),
        "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    },
    "tiny-imagenet": {
        "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
        "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
        "saturate": ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (30, 0.2)),
        "speckle_noise": (0.15, 0.2, 0.25, 0.3, 0.35),
        "gaussian_blur": (0.5, 0.75, 1, 1.25, 1.5),
        "pixelate": (0.9, 0.8, 0.7, 0.6, 0.5),
    },
    "imagenet": {
        "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
        "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
        "saturate": ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)),
        "speckle_noise": (0.15, 0.2, 0.35, 0.45, 0.6),
        "gaussian_blur": (1, 2, 3, 4, 6),
        "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
    },
}

#: PIL's fixed point: 32 bits less 8 for the value and 2 for overflow of negative lobes.
_PRECISION_BITS = 22


def _check_three_channels(name: str, images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dim() < 3 or images.shape[-3] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} should be a tensor (..., 3, H, W), but got {shape}")


def rgb_to_hsv(rgb: Tensor) -> Tensor:
    """scikit-image's ``rgb2hsv`` on channel dimension -3, in float64.

    Args:
        rgb (Tensor[..., 3, H, W]): floating, values in [0, 1].

    Returns:
        Tensor[..., 3, H, W] float64: hue in [0, 1), saturation, value; hue and saturation are
        0 where the three channels are equal (greys, black, white).
    """
    _check_three_channels("rgb", rgb)
    rgb = rgb.to(torch.float64)
    red, green, blue = rgb.unbind(-3)
    value = rgb.amax(-3)
    delta = value - rgb.amin(-3)
    flat = delta == 0
    # Where delta is 0 the quotients are 0/0; the results there are replaced, so any
    # non-zero divisor will do.
    divisor = torch.where(flat, 1.0, delta)
    saturation = torch.where(flat, 0.0, delta / torch.where(flat, 1.0, value))
    # Later assignments win in scikit-image: blue over green over red when two channels tie.
    hue = (green - blue) / divisor
    hue = torch.where(green == value, 2.0 + (blue - red) / divisor, hue)
    hue = torch.where(blue == value, 4.0 + (red - green) / divisor, hue)
    hue = torch.where(flat, 0.0, torch.remainder(hue / 6.0, 1.0))
    return torch.stack((hue, saturation, value), dim=-3)


#: For each output channel (R, G, B) and hue sextant 0..5, which of (v, t, p, q) it takes.
_SEXTANT_CHOICE = ((0, 3, 2, 2, 1, 0), (1, 0, 0, 3, 2, 2), (2, 2, 1, 0, 0, 3))


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """scikit-image's ``hsv2rgb`` on channel dimension -3, in float64.

    Args:
        hsv (Tensor[..., 3, H, W]): floating; hue in [0, 1], saturation and value in [0, 1].

    Returns:
        Tensor[..., 3, H, W] float64 RGB.
    """
    _check_three_channels("hsv", hsv)
    hue, saturation, value = hsv.to(torch.float64).unbind(-3)
    sextant = torch.floor(hue * 6)
    fraction = hue * 6 - sextant
    p = value * (1 - saturation)
    q = value * (1 - fraction * saturation)
    t = value * (1 - (1 - fraction) * saturation)
    # Hue 1 (or a hue a hair under 1 that rounds up) is sextant 6, i.e. 0, as in skimage.
    index = sextant.long().remainder(6)
    table = torch.tensor(_SEXTANT_CHOICE, device=hsv.device)
    choice = table[:, index].movedim(0, -3)
    options = torch.stack((value, t, p, q), dim=-3)
    return options.gather(-3, choice)


@functools.lru_cache(maxsize=64)
def _box_taps(in_size: int, out_size: int) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """PIL's 8-bit BOX coefficients, as ``(sources, weights)`` per tap.

    As Pillow's ``precompute_coeffs``: scale = in / out, filterscale = max(scale, 1), support
    = filterscale / 2; output pixel xx has centre ``(xx + 0.5) scale`` and looks at input
    pixels ``int(centre - support + 0.5) .. int(centre + support + 0.5) - 1`` (clipped to the
    image); pixel x gets weight 1 if ``(x - centre + 0.5) / filterscale`` is in (-1/2, 1/2],
    else 0 (the centre of x lies in the box: not fractional coverage); weights are divided by
    their sum, then scaled to 2^22 and rounded half up. Python floats are C doubles, so this
    is PIL's arithmetic to the bit. Tap t of output pixel xx reads input ``sources[xx]`` with
    integer weight ``weights[xx]`` (0 past the pixel's last input).
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    inverse = 1.0 / filterscale
    rows = []
    for out_index in range(out_size):
        centre = (out_index + 0.5) * scale
        first = max(int(centre - support + 0.5), 0)
        stop = min(int(centre + support + 0.5), in_size)
        weights = [
            1.0 if -0.5 < (x - centre + 0.5) * inverse <= 0.5 else 0.0 for x in range(first, stop)
        ]
        total = sum(weights)
        if total != 0.0:
            weights = [weight / total for weight in weights]
        rows.append(
            [
                (first + offset, int(0.5 + weight * (1 << _PRECISION_BITS)))
                for offset, weight in enumerate(weights)
                if weight != 0.0
            ]
        )
    # A box at least one pixel wide always holds a pixel centre; guard the degenerate case
    # anyway (PIL's output there is its rounding constant alone, i.e. 0).
    rows = [row or [(0, 0)] for row in rows]
    taps = max(len(row) for row in rows)
    padded = [row + [(row[0][0], 0)] * (taps - len(row)) for row in rows]
    return tuple(
        (tuple(row[tap][0] for row in padded), tuple(row[tap][1] for row in padded))
        for tap in range(taps)
    )


@functools.lru_cache(maxsize=64)
def _nearest_sources(in_size: int, out_size: int) -> tuple[int, ...]:
    """PIL's NEAREST source index of each output pixel (``ImagingScaleAffine``).

    The source coordinate starts at s / 2 (s = in / out) and grows by s per pixel, summed
    as PIL sums it; its integer part is the source pixel.
    """
    step = in_size / out_size
    position = step * 0.5
    sources = []
    for _ in range(out_size):
        # PIL leaves a pixel whose source falls outside unwritten; round-off cannot get
        # there for these sizes, so clamping only guards the index.
        sources.append(min(max(int(position), 0), in_size - 1))
        position += step
    return tuple(sources)


def _box_pass(levels: Tensor, out_size: int, dim: int) -> Tensor:
    """One BOX pass along ``dim`` of int32 levels with PIL's fixed-point rounding and clipping.

    The sums stay below 2^31 (255 times weights summing to about 2^22, plus 2^21), as in
    PIL's own int accumulator, so int32 is exact on every device.
    """
    device = levels.device
    shape = [1] * levels.dim()
    shape[dim] = out_size
    sums = None
    for sources, weights in _box_taps(levels.shape[dim], out_size):
        source_index = torch.tensor(sources, device=device)
        weight = torch.tensor(weights, dtype=torch.int32, device=device).reshape(shape)
        term = levels.index_select(dim, source_index) * weight
        sums = term if sums is None else sums.add_(term)
    sums += 1 << (_PRECISION_BITS - 1)
    return (sums >> _PRECISION_BITS).clamp_(0, 255)


def pil_resize(levels: Tensor, height: int, width: int, resample: str = "box") -> Tensor:
    """PIL's ``Image.resize((width, height), resample)`` of 8-bit images, batched.

    BOX: the horizontal pass, then the vertical pass, each skipped where the size does not
    change, each with PIL's 2^22 fixed-point weights and its rounding and clipping to 0..255
    (see :func:`_box_taps`). NEAREST: PIL's source pixel for each output pixel. Enlarging
    with BOX takes one input pixel per output pixel (the one under its centre), so it equals
    NEAREST up to round-off in where the centres fall. The result is identical to PIL's on
    every 8-bit image, with one exception: Pillow 13 runs the vertical pass first when the
    height loses more than twice as many pixels as the width (``H - h > 2 (W - w)``, never
    for the square images of the reference scripts); like Pillow up to 12 (and the scripts'
    Pillow) this always runs the horizontal pass first, so on such images it can differ from
    Pillow 13 by a level where a pass rounds differently.

    Args:
        levels (Tensor[N, C, H, W]): 8-bit levels 0..255, uint8, integer or floating (floating
            values are rounded to the nearest integer); any C.
        height: output height >= 1.
        width: output width >= 1.
        resample: ``"box"`` or ``"nearest"``.

    Returns:
        Tensor[N, C, height, width] of levels 0..255, of the dtype of ``levels``.
    """
    if resample not in ("box", "nearest"):
        raise ValueError(f"resample should be 'box' or 'nearest', but got {resample!r}")
    if height < 1 or width < 1:
        raise ValueError(f"height and width should be >= 1, but got {height} x {width}")
    in_height, in_width = levels.shape[-2:]
    if resample == "nearest":
        if width != in_width:
            cols = torch.tensor(_nearest_sources(in_width, width), device=levels.device)
            levels = levels.index_select(-1, cols)
        if height != in_height:
            rows = torch.tensor(_nearest_sources(in_height, height), device=levels.device)
            levels = levels.index_select(-2, rows)
        return levels
    dtype = levels.dtype
    resized = torch.round(levels) if levels.is_floating_point() else levels
    resized = resized.to(torch.int32)
    if width != in_width:
        resized = _box_pass(resized, width, -1)
    if height != in_height:
        resized = _box_pass(resized, height, -2)
    return resized.to(dtype)


@functools.lru_cache(maxsize=64)
def _pixelate_axis(size: int, small: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """One axis of BOX down to ``small`` then BOX back up to ``size``, as a matrix product and
    a rounding: ``floor(sums * scale + bias)`` with ``sums = levels @ membership``.

    Enlarging with BOX gives each output pixel exactly one input pixel (weight 2^22, i.e. the
    level itself), so the up pass is a selection, and selecting commutes with the down pass's
    per-pixel rounding: output pixel j is the down pass's output ``up[j]``, whose integer sum
    of k input levels (all of weight w = round(2^22 / k), see :func:`_box_taps`) PIL rounds as
    ``(w S + 2^21) >> 22``. That is S / k rounded to the nearest integer, halves up where
    ``w k >= 2^22`` and down otherwise (the error of w moves S / k by less than 1 / (2 k) for
    k < 128); in float32, ``floor(S fl(1/k) + 1/2 +- 1/(4 k))`` gives the same integers, which
    is checked here for every possible sum S of every k met. The sums are integers below 2^24,
    exact in float32 in any order of summation (also in TF32, whose inputs hold 8-bit levels).

    Returns:
        (membership Tensor[size, size] float32 0/1, scale Tensor[size], bias Tensor[size]),
        CPU; None where the plan does not apply (PIL's passes are then run one by one).
    """
    down = _box_taps(size, small)
    up = _box_taps(small, size)
    if len(up) != 1 or any(weight != 1 << _PRECISION_BITS for weight in up[0][1]):
        return None
    boxes = []
    for out_index in range(small):
        taps = [(tap[0][out_index], tap[1][out_index]) for tap in down if tap[1][out_index] != 0]
        weights = {weight for _, weight in taps}
        if not taps or len(weights) != 1 or len(taps) >= 128:
            return None
        boxes.append(([source for source, _ in taps], weights.pop()))
    membership = torch.zeros(size, size, dtype=torch.float32)
    scale = torch.empty(size, dtype=torch.float32)
    bias = torch.empty(size, dtype=torch.float32)
    checked: set[tuple[int, int]] = set()
    for column, source in enumerate(up[0][0]):
        inputs, weight = boxes[source]
        count = len(inputs)
        membership[inputs, column] = 1.0
        halves_up = weight * count >= 1 << _PRECISION_BITS
        scale[column] = 1.0 / count
        bias[column] = 0.5 + (1.0 if halves_up else -1.0) / (4 * count)
        if (count, weight) not in checked:
            checked.add((count, weight))
            sums = torch.arange(255 * count + 1, dtype=torch.int64)
            exact = ((sums * weight + (1 << (_PRECISION_BITS - 1))) >> _PRECISION_BITS).clamp(
                0, 255
            )
            rounded = sums.to(torch.float32).mul(scale[column]).add(bias[column]).floor()
            if not torch.equal(rounded.to(torch.int64), exact):
                return None
    return membership, scale, bias


def _pixelate_levels(levels: Tensor, factor: float) -> Tensor:
    """pixelate of float32 levels 0..255 (N, C, H, W); float32 levels out.

    Two matrix products (each axis's down and up passes at once, see :func:`_pixelate_axis`)
    and two roundings instead of PIL's four passes of gathers: the same integers.
    """
    height, width = levels.shape[-2:]
    rows = _pixelate_axis(height, int(height * factor))
    cols = _pixelate_axis(width, int(width * factor))
    if rows is None or cols is None:
        small = pil_resize(levels, int(height * factor), int(width * factor), "box")
        return pil_resize(small, height, width, "box")
    device = levels.device
    membership, scale, bias = (part.to(device) for part in cols)
    # Horizontal pass first, as PIL: sums over each box along W, rounded as PIL rounds.
    across = torch.matmul(levels, membership).mul_(scale).add_(bias).floor_()
    membership, scale, bias = (part.to(device) for part in rows)
    down = torch.matmul(membership.T, across)
    return down.mul_(scale[:, None]).add_(bias[:, None]).floor_()


def _pixelate_uint8(levels: Tensor, factor: float) -> Tensor:
    """pixelate of uint8 images (N, C, H, W): uint8 out, no detour through [0, 1]."""
    return _pixelate_levels(levels.to(torch.float32), factor).to(torch.uint8)


def _pixelate(pixels: Tensor, factor: float) -> Tensor:
    # PIL only ever sees the reference's 8-bit images: take float input to the nearest level
    # (for a uint8 image divided by 255, that is the image itself).
    levels = torch.round(pixels * 255).to(torch.float32)
    return _pixelate_levels(levels, factor).to(pixels.dtype) / 255


def _as_rgb(pixels: Tensor) -> Tensor:
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


def _float64_levels(pixels: Tensor) -> Tensor:
    """``pixels`` in float64, with every float32 value that is the float32 rounding of a level
    ``k / 255`` (every value of a uint8 image after ``corrupt`` divides it by 255) replaced by
    the float64 ``k / 255``, the value the scripts compute with."""
    wide = pixels.to(torch.float64)
    if pixels.dtype == torch.float64:
        return wide
    levels = torch.round(wide * 255) / 255
    return torch.where(levels.to(pixels.dtype) == pixels, levels, wide)


def _hsv_round_trip(pixels: Tensor, channel: int, change: Callable[[Tensor], Tensor]) -> Tensor:
    """RGB -> HSV, ``change`` one of H, S, V, -> RGB; a grey image (C = 1) keeps channel 0.

    Float64 out (see ``UINT8_SLACK``)."""
    hsv = rgb_to_hsv(_as_rgb(_float64_levels(pixels)))
    hsv[:, channel] = change(hsv[:, channel])
    return hsv_to_rgb(hsv)[:, : pixels.shape[1]]


def _brightness(pixels: Tensor, shift: float) -> Tensor:
    return _hsv_round_trip(pixels, 2, lambda value: (value + shift).clamp_(0, 1))


def _saturate(pixels: Tensor, scale: float, offset: float) -> Tensor:
    return _hsv_round_trip(pixels, 1, lambda saturation: (saturation * scale + offset).clamp_(0, 1))


def _contrast(pixels: Tensor, factor: float) -> Tensor:
    """Float64 out (see ``UINT8_SLACK``)."""
    wide = _float64_levels(pixels)
    means = wide.mean(dim=(-2, -1), keepdim=True)
    return (wide - means) * factor + means


def _speckle_noise(pixels: Tensor, std: float, generator: torch.Generator | None) -> Tensor:
    noise = torch.randn(pixels.shape, generator=generator, device=pixels.device, dtype=pixels.dtype)
    return pixels + pixels * (std * noise)


#: name -> ``f(pixels, parameter, generator)`` on float pixels in [0, 1] (N, C, H, W).
FUNCTIONS: dict[str, Callable[[Tensor, Any, torch.Generator | None], Tensor]] = {
    "brightness": lambda pixels, shift, generator: _brightness(pixels, shift),
    "contrast": lambda pixels, factor, generator: _contrast(pixels, factor),
    "saturate": lambda pixels, parameter, generator: _saturate(pixels, *parameter),
    "speckle_noise": lambda pixels, std, generator: _speckle_noise(pixels, std, generator),
    "gaussian_blur": lambda pixels, sigma, generator: skimage_gaussian(pixels, sigma),
    "pixelate": lambda pixels, factor, generator: _pixelate(pixels, factor),
}


def _exact_levels_agree() -> bool:
    """Whether float32 ``k / 255`` is the float32 rounding of float64 ``k / 255`` for every
    level k (true with IEEE arithmetic): then :func:`_float64_levels` of a uint8 image that
    ``corrupt`` divided by 255 in float32 is the image divided by 255 in float64."""
    levels = torch.arange(256)
    wide = levels.to(torch.float64) / 255
    return torch.equal(wide.to(torch.float32), levels.to(torch.float32) / 255)


def _from_float64_levels(
    function: Callable[[Tensor, Any], Tensor], slack: float
) -> Callable[[Tensor, Any, torch.Generator | None], Tensor]:
    """uint8 -> uint8 version of a float64-out corruption that starts from
    :func:`_float64_levels`: the image divided by 255 in float64 goes in directly (what
    ``_float64_levels`` makes of ``corrupt``'s float32 pixels, see
    :func:`_exact_levels_agree`), the result is clamped and quantised in float64 as
    ``corrupt`` does, without the float32 round trip."""

    def level_function(levels: Tensor, parameter: Any, generator: torch.Generator | None) -> Tensor:
        pixels = levels.to(torch.float64).div_(255)
        corrupted = function(pixels, parameter).clamp_(0, 1)
        return corrupted.mul_(255).add_(slack).to(torch.uint8)

    return level_function


#: name -> ``f(levels, parameter, generator)`` on uint8 images (N, C, H, W), uint8 out: what
#: ``FUNCTIONS`` and the uint8 quantisation give, without the float round trip.
LEVEL_FUNCTIONS: dict[str, Callable[[Tensor, Any, torch.Generator | None], Tensor]] = {
    "pixelate": lambda levels, factor, generator: _pixelate_uint8(levels, factor),
}

#: name -> the slack of its uint8 quantisation, where it is not TRUNCATION_SLACK. pixelate's
#: result is PIL's 8-bit image (its levels divided by 255), so rounding gives them back.
#: brightness and saturate repeat the scripts' float64 arithmetic bit for bit from the exact
#: levels ``k / 255``, so plain truncation (slack 0) gives what ``np.uint8`` stored, including
#: the scripts' own round-off: 193/255 + 0.2 (= 244/255) lands just under 244 and is stored as
#: 243. contrast differs from the scripts only in the summation order of its means (last bits),
#: so it keeps a slack just big enough for those bits (1e-9 of a level); the default 1e-3 would
#: lift every value in the last thousandth below an integer, and contrast's outputs take only a
#: few fractional parts per image (c = 0.4 gives five), so that can be a fifth of the pixels.
UINT8_SLACK: dict[str, float] = {
    "pixelate": 0.5,
    "brightness": 0.0,
    "saturate": 0.0,
    "contrast": 1e-9,
}


if _exact_levels_agree():
    LEVEL_FUNCTIONS["brightness"] = _from_float64_levels(_brightness, UINT8_SLACK["brightness"])
    LEVEL_FUNCTIONS["saturate"] = _from_float64_levels(
        lambda pixels, parameter: _saturate(pixels, *parameter), UINT8_SLACK["saturate"]
    )
    LEVEL_FUNCTIONS["contrast"] = _from_float64_levels(_contrast, UINT8_SLACK["contrast"])


def _check_rgb_or_grey(name: str) -> Callable[[Any, int, int, int], None]:
    def check(parameter: Any, channels: int, height: int, width: int) -> None:
        if channels not in (1, 3):
            raise ValueError(
                f"{name} needs RGB or grey images (C = 3 or 1), but got C = {channels}"
            )

    return check


def _check_pixelate(factor: float, channels: int, height: int, width: int) -> None:
    if int(height * factor) < 1 or int(width * factor) < 1:
        minimum = 1
        while int(minimum * factor) < 1:
            minimum += 1
        raise ValueError(
            f"pixelate at factor {factor} needs H and W >= {minimum} (int(side * {factor}) >= 1), "
            f"but got {height} x {width}"
        )


#: name -> ``check(parameter, channels, height, width)``, raising ValueError before any work.
CHECKS: dict[str, Callable[[Any, int, int, int], None]] = {
    "brightness": _check_rgb_or_grey("brightness"),
    "saturate": _check_rgb_or_grey("saturate"),
    "pixelate": _check_pixelate,
}
