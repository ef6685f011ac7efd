"""Elastic transform, batched, on any device.

The reference (the same function body in all three scripts, with each family's table):

1. A random affine warp: the three points ``pts1`` around the image centre
   (:func:`affine_points`) each move by ``uniform(-c2, c2)`` in x and y (float32), OpenCV's
   ``getAffineTransform`` solves for the 2x3 matrix and ``warpAffine`` applies it (bilinear,
   ``BORDER_REFLECT_101``) to the float32 image.
2. Two displacement fields ``dx, dy``: ``uniform(-1, 1)`` per pixel, smoothed with
   scikit-image's ``gaussian`` (``mode="reflect"``, ``truncate=3``, std c1), times c0,
   rounded to float32.
3. scipy's ``map_coordinates(order=1, mode="reflect")`` samples the warped image at
   ``(y + dy, x + dx)``; the result is clipped to [0, 1].

The tensor version does the same steps on whole batches:

* :func:`affine_matrix` solves the three-point systems in float64; :func:`warp_affine`
  inverts the matrix as ``warpAffine`` does and reproduces its fixed-point arithmetic
  (OpenCV 2.x to 4.x, which made the published data sets): source coordinates computed with
  10 fractional bits and cut to ``INTER_BITS = 5`` (a 1/32-pixel grid), bilinear weights
  taken from that grid, taps outside the image mirrored (reflect-101, folded as often as
  needed).
* :func:`smoothed_field` is scipy's ``gaussian_filter`` (which ``gaussian`` calls) as one
  matrix per axis, in float64: taps ``|k| <= int(3 sigma + 0.5)``, the line extended
  half-sample symmetrically (``dcba|abcd|dcba``) and periodically when the kernel is longer
  than the image (the ImageNet severities 1 and 2 have sigma 171 and 19.5 on 224 pixels).
* :func:`map_coordinates_reflect` is scipy's order-1 interpolation with its ``reflect`` mode.
* Random numbers, per chunk in this order: the affine shifts (N, 3, 2), then the fields
  (N, 2, H, W), ``dx`` before ``dy``, uniform in float64 like numpy's.

Where this differs from the scripts (checked against numpy/OpenCV/scipy/scikit-image re-runs
of their formula with the same draws, at every severity of the three tables):

* The warp is OpenCV 2.x-4.x's fixed-point ``warpAffine``, which made the published data sets:
  on float32 images it is bit for bit equal to OpenCV's own fixed-point interpolation
  (``cv2.remap`` with fixed-point maps; that in turn equals ``warpAffine`` of OpenCV 4.11).
  OpenCV 5 computes ``warpAffine`` in floating point without the 1/32 grid, so a script run
  with OpenCV 5 samples up to 1/64 pixel elsewhere per axis: on 224 x 224 photographs this
  warp differs from OpenCV 5.1's by 0.08 grey levels on average (at most 3.2).
* The whole transform, against the formula with OpenCV 4's warp: float32 pixels (what
  ``corrupt`` makes of uint8 images) agree to float32 round-off (at most 2e-5 grey levels,
  5e-8 on average); float64 pixels to 4e-5 (the reference warps in float32, this warps in the
  pixels' dtype). uint8 outputs equal the reference quantised the same way
  (``floor(255 y + 1e-3)``) on all but about 1e-5 of the pixels; the scripts' own ``np.uint8``
  truncation differs from that on about 0.1% of the pixels, by one level (the 1e-3 slack of
  the package docstring: 255 y within 1e-3 below a level).
* The scripts use their family's fixed numbers for any image size (ImageNet's table is built
  from 244, which the script's comment says should have been 224; its images are
  ``Resize(256)`` + ``CenterCrop(224)`` before the corruption); so does this version.
  ``imagecorruptions`` changed the function: no affine step, ``sigma = 0.01 (H, W)``,
  ``alpha = 250 (0.05, 0.065, 0.085, 0.1, 0.12)`` and fields ``uniform(-0.005 H, 0.005 H)``,
  so its severities are not ImageNet-C's (on 224 x 224 photographs its mean change grows from
  8 to 15 grey levels over the severities, the script's is about 38, 48, 17, 17, 18).
* ``pts1`` mixes the axes as the scripts do (``(H // 2 + s, W // 2 + s)`` read by OpenCV as
  (x, y)), which only matters for non-square images. Any channel count works (every channel
  moves the same way); H and W must be at least 3 (see ``CHECKS``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from dropcluster.data.corruptions.filters import gaussian_kernel1d

__all__ = [
    "CHECKS",
    "FUNCTIONS",
    "PARAMETERS",
    "UINT8_SLACK",
    "affine_matrix",
    "affine_points",
    "elastic_transform",
    "map_coordinates_reflect",
    "smoothed_field",
    "warp_affine",
]

#: family -> corruption -> the parameters of severities 1 to 5, as in the reference scripts:
#: elastic_transform: (alpha, sigma, affine): the displacement scale c0, the std c1 of the
#: fields' Gaussian smoothing and the largest shift c2 of the affine's points, in pixels.
PARAMETERS: dict[str, dict[str, tuple]] = {
    "cifar": {
        "elastic_transform": (
            (32 * 0, 32 * 0, 32 * 0.08),
            (32 * 0.05, 32 * 0.2, 32 * 0.07),
            (32 * 0.08, 32 * 0.06, 32 * 0.06),
            (32 * 0.1, 32 * 0.04, 32 * 0.05),
            (32 * 0.1, 32 * 0.03, 32 * 0.03),
        )
    },
    "tiny-imagenet": {
        "elastic_transform": (
            (64 * 0, 64 * 0, 64 * 0.08),
            (64 * 0.05, 64 * 0.3, 64 * 0.06),
            (64 * 0.1, 64 * 0.08, 64 * 0.06),
            (64 * 0.1, 64 * 0.03, 64 * 0.03),
            (64 * 0.16, 64 * 0.03, 64 * 0.02),
        )
    },
    "imagenet": {
        "elastic_transform": (
            (244 * 2, 244 * 0.7, 244 * 0.1),
            (244 * 2, 244 * 0.08, 244 * 0.2),
            (244 * 0.05, 244 * 0.01, 244 * 0.02),
            (244 * 0.07, 244 * 0.01, 244 * 0.02),
            (244 * 0.12, 244 * 0.01, 244 * 0.02),
        )
    },
}

# warpAffine's fixed point: coordinates with AB_BITS fractional bits, cut to INTER_BITS.
_AB_BITS = 10
_INTER_BITS = 5
_INTER_TAB_SIZE = 1 << _INTER_BITS
#: The fields' Gaussian is cut at this many stds (the scripts' ``truncate=3``).
_FIELD_TRUNCATE = 3.0


def affine_points(height: int, width: int) -> Tensor:
    """The scripts' ``pts1``: three corners of a square around the image centre.

    With ``c = (H // 2, W // 2)`` and ``s = min(H, W) // 3``: ``(c + s, (c0 + s, c1 - s),
    c - s)``, each read by OpenCV as (x, y) (so x comes from H: the scripts' axis mix-up).

    Returns:
        Tensor[3, 2] float32 (x, y) per point.
    """
    centre_h, centre_w = height // 2, width // 2
    side = min(height, width) // 3
    return torch.tensor(
        [
            [centre_h + side, centre_w + side],
            [centre_h + side, centre_w - side],
            [centre_h - side, centre_w - side],
        ],
        dtype=torch.float32,
    )


def affine_matrix(source: Tensor, target: Tensor) -> Tensor:
    """OpenCV's ``getAffineTransform``, batched: the M with ``target = M [source; 1]``.

    Args:
        source (Tensor[..., 3, 2]): three (x, y) points, not on one line.
        target (Tensor[..., 3, 2]): where they go.

    Returns:
        Tensor[..., 2, 3] float64.
    """
    source = source.to(torch.float64)
    target = target.to(torch.float64)
    ones = torch.ones(source.shape[:-1] + (1,), dtype=torch.float64, device=source.device)
    system = torch.cat((source, ones), dim=-1)
    return torch.linalg.solve(system, target).transpose(-1, -2)


def _reflect101(index: Tensor, size: int) -> Tensor:
    """OpenCV's BORDER_REFLECT_101 (``gfedcb|abcdefgh|gfedcba``) for any integer index."""
    if size == 1:
        return torch.zeros_like(index)
    last = size - 1
    low, high = torch.aminmax(index)
    if int(low) >= -last and int(high) <= 2 * last:
        # At most one reflection on either side (the usual case): fold without a division.
        return last - (last - index.abs()).abs()
    period = 2 * last
    folded = index.remainder(period)
    return torch.where(folded >= size, period - folded, folded)


def _reflect(index: Tensor, size: int) -> Tensor:
    """scipy's ``reflect`` (half-sample symmetric, ``dcba|abcd|dcba``) for any integer index."""
    low, high = torch.aminmax(index)
    if int(low) >= -size and int(high) <= 2 * size - 1:
        # At most one reflection on either side (the usual case): -1 - i before the start
        # (~i), 2 size - 1 - i past the end, whichever is in the image; no division.
        mirrored = torch.where(index < 0, ~index, index)
        return torch.minimum(mirrored, 2 * size - 1 - mirrored)
    folded = index.remainder(2 * size)
    return torch.where(folded >= size, 2 * size - 1 - folded, folded)


def _bilinear(pixels: Tensor, top: Tensor, left: Tensor, weights: Sequence[Tensor]) -> Tensor:
    """``sum w_ab pixels[top + a, left + b]`` over a, b in {0, 1}, per image.

    Args:
        pixels (Tensor[N, C, H, W]).
        top, left (Tensor[N, P] int64): already folded into the image: ``top[..., 0]`` and
            ``top[..., 1]`` stacked on a last axis of 2 (likewise ``left``).
        weights: the four (N, P) weights in the order (0, 0), (0, 1), (1, 0), (1, 1).

    Returns:
        Tensor[N, C, P] of the weights' dtype.
    """
    n, c, h, w = pixels.shape
    flat = pixels.reshape(n, c, h * w)
    row_starts = top * w
    total = None
    for (a, b), weight in zip(((0, 0), (0, 1), (1, 0), (1, 1)), weights, strict=True):
        index = (row_starts[..., a] + left[..., b])[:, None, :].expand(n, c, -1)
        # gather makes a new tensor: scale and sum in place (same operations, same order).
        term = flat.gather(2, index).to(weight.dtype).mul_(weight[:, None, :])
        total = term if total is None else total.add_(term)
    return total


def warp_affine(pixels: Tensor, matrix: Tensor) -> Tensor:
    """OpenCV's ``warpAffine(image, M, (W, H), borderMode=BORDER_REFLECT_101)``, bilinear.

    As OpenCV 2.x to 4.x compute it: M is inverted (in float64, as ``warpAffine`` does), the
    source position of output pixel (x, y) is ``round((M1 y + M2) 2^10) + round(M0 x 2^10)``
    plus half a 1/32 step (likewise for y), cut to 1/32 pixel; the four taps around it are
    mirrored into the image (reflect-101) and weighted ``(1 - a)(1 - b), ...`` with a, b
    multiples of 1/32, products taken in the pixels' dtype as OpenCV does for float images.

    Args:
        pixels (Tensor[N, C, H, W]): floating.
        matrix (Tensor[N, 2, 3]): the forward affine of each image (output = M input).

    Returns:
        Tensor[N, C, H, W] of the dtype of ``pixels``.
    """
    n, c, h, w = pixels.shape
    device = pixels.device
    m = matrix.to(device=device, dtype=torch.float64)
    m0, m1, m2 = m[:, 0].unbind(-1)
    m3, m4, m5 = m[:, 1].unbind(-1)
    determinant = m0 * m4 - m1 * m3
    scale = torch.where(determinant != 0, 1 / determinant, torch.zeros_like(determinant))
    i0, i1, i3, i4 = m4 * scale, -m1 * scale, -m3 * scale, m0 * scale
    i2 = -i0 * m2 - i1 * m5
    i5 = -i3 * m2 - i4 * m5
    xs = torch.arange(w, device=device, dtype=torch.float64)
    ys = torch.arange(h, device=device, dtype=torch.float64)
    ab_scale = float(1 << _AB_BITS)
    round_delta = (1 << _AB_BITS) // _INTER_TAB_SIZE // 2
    # torch.round rounds halves to even, as cvRound does.
    x_step = torch.round(i0[:, None] * xs * ab_scale).long()
    y_step = torch.round(i3[:, None] * xs * ab_scale).long()
    x_row = torch.round((i1[:, None] * ys + i2[:, None]) * ab_scale).long() + round_delta
    y_row = torch.round((i4[:, None] * ys + i5[:, None]) * ab_scale).long() + round_delta
    shift = _AB_BITS - _INTER_BITS
    x_fixed = ((x_row[:, :, None] + x_step[:, None, :]) >> shift).reshape(n, h * w)
    y_fixed = ((y_row[:, :, None] + y_step[:, None, :]) >> shift).reshape(n, h * w)
    left, x_frac = x_fixed >> _INTER_BITS, x_fixed & (_INTER_TAB_SIZE - 1)
    top, y_frac = y_fixed >> _INTER_BITS, y_fixed & (_INTER_TAB_SIZE - 1)
    offsets = torch.arange(2, device=device)
    left = _reflect101(left[..., None] + offsets, w)
    top = _reflect101(top[..., None] + offsets, h)
    # initInterTab2D: 1-D weights (1 - k/32, k/32) in the pixels' dtype, multiplied.
    x_weight = x_frac.to(pixels.dtype) * (1.0 / _INTER_TAB_SIZE)
    y_weight = y_frac.to(pixels.dtype) * (1.0 / _INTER_TAB_SIZE)
    weights = (
        (1 - y_weight) * (1 - x_weight),
        (1 - y_weight) * x_weight,
        y_weight * (1 - x_weight),
        y_weight * x_weight,
    )
    return _bilinear(pixels, top, left, weights).reshape(n, c, h, w)


def _smoothing_matrix(size: int, sigma: float, device: torch.device) -> Tensor:
    """The (size, size) float64 matrix of scipy's ``gaussian_filter1d`` with mode reflect."""
    weights = gaussian_kernel1d(sigma, _FIELD_TRUNCATE).to(device)
    radius = weights.numel() // 2
    rows = torch.arange(size, device=device)[:, None].expand(size, weights.numel())
    sources = _reflect(rows + torch.arange(-radius, radius + 1, device=device), size)
    matrix = torch.zeros(size, size, dtype=torch.float64, device=device)
    matrix.index_put_((rows, sources), weights.expand(size, -1), accumulate=True)
    return matrix


def smoothed_field(uniform: Tensor, sigma: float) -> Tensor:
    """scikit-image's ``gaussian(field, sigma, mode="reflect", truncate=3)`` of 2-D fields.

    scipy's ``gaussian_filter`` along H, then W, each a matrix product in float64; sigma
    below 1e-15 leaves the field as it is (scipy skips that axis).

    Args:
        uniform (Tensor[..., H, W]): the fields.
        sigma: std in pixels (>= 0).

    Returns:
        Tensor[..., H, W] float64.
    """
    field = uniform.to(torch.float64)
    if sigma <= 1e-15:
        return field
    h, w = field.shape[-2:]
    along_h = _smoothing_matrix(h, sigma, field.device)
    along_w = _smoothing_matrix(w, sigma, field.device)
    return along_h @ field @ along_w.T


def map_coordinates_reflect(pixels: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """scipy's ``map_coordinates(image, (rows, cols), order=1, mode="reflect")`` per channel.

    Linear interpolation of the image extended half-sample symmetrically (``dcba|abcd|dcba``),
    periodically for coordinates far outside; weights and sums in float64, as scipy.

    Args:
        pixels (Tensor[N, C, H, W]): floating.
        rows, cols (Tensor[N, H', W']): sampling positions, shared by the channels.

    Returns:
        Tensor[N, C, H', W'] of the dtype of ``pixels``.
    """
    n, c, h, w = pixels.shape
    out_h, out_w = rows.shape[-2:]
    rows = rows.to(torch.float64).reshape(n, -1)
    cols = cols.to(torch.float64).reshape(n, -1)
    top_float, left_float = torch.floor(rows), torch.floor(cols)
    y_weight, x_weight = rows - top_float, cols - left_float
    offsets = torch.arange(2, device=pixels.device)
    top = _reflect(top_float.long()[..., None] + offsets, h)
    left = _reflect(left_float.long()[..., None] + offsets, w)
    weights = (
        (1 - y_weight) * (1 - x_weight),
        (1 - y_weight) * x_weight,
        y_weight * (1 - x_weight),
        y_weight * x_weight,
    )
    sampled = _bilinear(pixels, top, left, weights)
    return sampled.reshape(n, c, out_h, out_w).to(pixels.dtype)


def elastic_transform(
    pixels: Tensor,
    parameter: Sequence[float],
    *,
    shifts: Tensor | None = None,
    uniform: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The scripts' elastic transform of each image (see the module docstring).

    Args:
        pixels (Tensor[N, C, H, W]): floating in [0, 1], H, W >= 3.
        parameter: (alpha, sigma, affine) = the table's (c0, c1, c2).
        shifts (Tensor[N, 3, 2], optional): the draws ``uniform(-c2, c2)`` added to the
            affine's points (rounded to float32 as the scripts do); None draws them.
        uniform (Tensor[N, 2, H, W], optional): the draws ``uniform(-1, 1)`` of the fields
            (``[:, 0]`` for dx, along W; ``[:, 1]`` for dy, along H); None draws them.
        generator: used for what is drawn: first the shifts, then the fields.

    Returns:
        Tensor[N, C, H, W] of the dtype of ``pixels``, clipped to [0, 1].
    """
    alpha, sigma, affine = parameter
    n, _, h, w = pixels.shape
    device = pixels.device
    if shifts is None:
        shifts = (
            torch.rand((n, 3, 2), generator=generator, device=device, dtype=torch.float64)
            * (2 * affine)
            - affine
        )
    if uniform is None:
        uniform = torch.rand((n, 2, h, w), generator=generator, device=device, dtype=torch.float64)
        uniform = uniform * 2 - 1
    source = affine_points(h, w).to(device)
    target = source + shifts.to(device=device, dtype=torch.float32)
    warped = warp_affine(pixels, affine_matrix(source.expand(n, 3, 2), target))
    # The scripts store dx, dy as float32 before adding the integer grid in float64.
    fields = (smoothed_field(uniform.to(device), sigma) * alpha).to(torch.float32)
    dx, dy = fields.to(torch.float64).unbind(1)
    ys = torch.arange(h, device=device, dtype=torch.float64)[:, None]
    xs = torch.arange(w, device=device, dtype=torch.float64)
    return map_coordinates_reflect(warped, ys + dy, xs + dx).clamp(0, 1)


def _check_elastic(parameter: Any, channels: int, height: int, width: int) -> None:
    if min(height, width) < 3:
        raise ValueError(
            "elastic_transform needs H and W >= 3 (its affine moves three points "
            f"min(H, W) // 3 from the centre), but got {height} x {width}"
        )


#: name -> ``f(pixels, parameter, generator)`` on float pixels in [0, 1] (N, C, H, W).
FUNCTIONS: dict[str, Callable[[Tensor, Any, torch.Generator | None], Tensor]] = {
    "elastic_transform": lambda pixels, parameter, generator: elastic_transform(
        pixels, parameter, generator=generator
    ),
}

#: The scripts truncate the float result (``np.uint8``): the default slack.
UINT8_SLACK: dict[str, float] = {}

#: name -> ``check(parameter, channels, height, width)``: the affine needs H, W >= 3.
CHECKS: dict[str, Callable[[Any, int, int, int], None]] = {"elastic_transform": _check_elastic}
