"""JPEG compression as libjpeg(-turbo) does it through Pillow, batched, on any device.

The reference (all three scripts) saves the PIL RGB image as a JPEG at quality q with Pillow's
defaults and opens it again. Pillow drives libjpeg(-turbo) with ``jpeg_set_defaults`` and
``jpeg_set_quality(q, force_baseline=TRUE)``: YCbCr with 4:2:0 chroma subsampling, the
standard (JPEG Annex K) luminance and chrominance tables scaled by quality, the integer
"islow" DCT, and on decoding the islow IDCT with "fancy" (triangle) upsampling of the chroma.
Entropy coding is lossless, so :func:`libjpeg_round_trip` runs every lossy step and skips it:

1. RGB -> YCbCr with libjpeg's fixed-point tables (16 fractional bits, ``rgb_ycc_convert``).
2. Partial blocks padded as libjpeg pads them: luminance repeats the last column/row up to a
   multiple of 8; for chrominance the full-resolution plane repeats its last column up to a
   multiple of 16 and its last row up to an even count, is downsampled 2x2 as
   ``h2v2_downsample`` does (sum of four plus a bias alternating 1, 2 along the row, shifted
   right by 2), and the downsampled plane repeats its last row up to a multiple of 8.
3. Level shift by -128 and the forward DCT as ``jpeg_fdct_islow`` computes it: the same
   Loeffler-Ligtenberg-Moschytz butterflies with the same 13-bit integer constants, shifts and
   roundings (rows, then columns). Between two roundings a pass is an integer linear map
   of 8 samples, so where the device has float64 each pass is one exact float64 matrix
   product then libjpeg's rounding shift; elsewhere (MPS) the butterflies run on int64.
4. Quantisation as libjpeg rounds: ``sign(c) floor((|c| + 4 Q) / (8 Q))`` (its DCT output is
   scaled by 8), with the quality-scaled tables of :func:`quality_tables`.
5. Dequantisation and ``jpeg_idct_islow`` (columns, then rows), the level shift back and
   libjpeg's range limiting (10-bit wrap, then clamp to 0..255).
6. Chroma upsampling as ``h2v2_fancy_upsample``: for each output row the sum
   ``s = 3 near + far`` of the nearest chroma row and the next one on the output row's side,
   then ``(3 s + s_left + 8) >> 4`` for even output columns and ``(3 s + s_right + 7) >> 4``
   for odd ones (weights 9/16, 3/16, 3/16, 1/16), with the edge samples repeated at the
   borders (of the real ``ceil(H/2) x ceil(W/2)`` samples, not the encoder's padding).
   Chroma planes at most two samples wide are upsampled by repeating each sample 2x2, as
   libjpeg-turbo does.
7. YCbCr -> RGB with libjpeg's fixed-point tables (``ycc_rgb_convert``), clamped to 0..255.

Where this differs from the reference (checked against Pillow 13 with libjpeg-turbo 3.2):

* Nowhere measured: on uint8 images (uniform noise, black/white noise, 8x8 blocks, smooth
  waves, three 224 x 224 photographs through ``imagecorruptions``) from 1 x 1 to 224 x 224,
  sizes that are not multiples of 16 included, at every quality of the three tables and at
  random qualities 1 to 100, the output equals Pillow's JPEG round trip pixel for pixel
  (640 836 pixels in the widest check, no mismatch). The integer arithmetic is libjpeg's C
  code path, which libjpeg-turbo's SIMD versions (what Pillow runs) reproduce bit for bit.
* Float images: the reference only ever hands PIL 8-bit images, so float pixels are first
  rounded to the nearest of the 256 levels (float and uint8 versions of an image give the
  same result) and the output is a multiple of 1/255.
* Grey images (C = 1): a grey image converted to RGB gives Y = the grey level and Cb = Cr = 128
  exactly in libjpeg's arithmetic, flat chroma survives the round trip unchanged and decodes
  to R = G = B = Y, so the output is the luminance path alone (the same as saving the image
  as a greyscale JPEG, which is what ``imagecorruptions`` gets after converting back to L).
  Other channel counts are refused (see ``CHECKS``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CHECKS",
    "FUNCTIONS",
    "LEVEL_FUNCTIONS",
    "PARAMETERS",
    "UINT8_SLACK",
    "libjpeg_round_trip",
    "quality_scale_factor",
    "quality_tables",
]

#: family -> corruption -> the parameters of severities 1 to 5, as in the reference scripts:
#: jpeg_compression: the JPEG quality given to PIL's ``save``.
PARAMETERS: dict[str, dict[str, tuple]] = {
    "cifar": {"jpeg_compression": (80, 65, 58, 50, 40)},
    "tiny-imagenet": {"jpeg_compression": (65, 58, 50, 40, 25)},
    "imagenet": {"jpeg_compression": (25, 18, 15, 10, 7)},
}

# JPEG Annex K.1 and K.2 (libjpeg's std_luminance_quant_tbl / std_chrominance_quant_tbl), in
# natural (row-major) order, not zigzag.
_LUMINANCE_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
_CHROMINANCE_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    *((99,) * 8 for _ in range(4)),
)

# libjpeg's 16-bit fixed-point colour constants, FIX(x) = int(x 2^16 + 0.5).
_SCALE_BITS = 16
_HALF = 1 << (_SCALE_BITS - 1)
_CHROMA_OFFSET = 128 << _SCALE_BITS

# jfdctint.c / jidctint.c: 13-bit constants FIX(x) = int(x 2^13 + 0.5), two extra bits
# between the passes.
_CONST_BITS = 13
_PASS1_BITS = 2
_FIX_0_298631336 = 2446
_FIX_0_390180644 = 3196
_FIX_0_541196100 = 4433
_FIX_0_765366865 = 6270
_FIX_0_899976223 = 7373
_FIX_1_175875602 = 9633
_FIX_1_501321110 = 12299
_FIX_1_847759065 = 15137
_FIX_1_961570560 = 16069
_FIX_2_053119869 = 16819
_FIX_2_562915447 = 20995
_FIX_3_072711026 = 25172


def quality_scale_factor(quality: int) -> int:
    """libjpeg's ``jpeg_quality_scaling``: the table scale in percent for a quality 1..100.

    Quality is clamped to 1..100; below 50 the scale is ``5000 // quality``, from 50 on
    ``200 - 2 quality`` (so 50 keeps the standard tables, 100 makes them all 1).
    """
    quality = min(max(int(quality), 1), 100)
    return 5000 // quality if quality < 50 else 200 - 2 * quality


def quality_tables(quality: int) -> Tensor:
    """The luminance and chrominance quantisation tables libjpeg uses at ``quality``.

    Each entry is ``(base * scale + 50) // 100`` with the scale of
    :func:`quality_scale_factor`, clamped to 1..255 (Pillow asks for baseline tables).

    Returns:
        Tensor[2, 8, 8] int64 in natural (row-major) order: [0] luminance, [1] chrominance.
    """
    base = torch.tensor((_LUMINANCE_TABLE, _CHROMINANCE_TABLE), dtype=torch.int64)
    return ((base * quality_scale_factor(quality) + 50) // 100).clamp(1, 255)


def libjpeg_round_trip(levels: Tensor, quality: int) -> Tensor:
    """Encode as a baseline 4:2:0 JPEG at ``quality`` and decode, as Pillow and libjpeg do.

    Every lossy step of libjpeg's default encoder and decoder in its own integer arithmetic
    (see the module docstring); the result equals ``Image.open(buffer)`` after
    ``image.save(buffer, "JPEG", quality=quality)``.

    Args:
        levels (Tensor[N, C, H, W]): integer grey levels 0..255 (uint8 or another integer
            dtype), C = 3 (RGB) or 1 (grey, encoded as a single luminance component).
        quality: 1 to 100.

    Returns:
        Tensor[N, C, H, W] uint8 on the device of ``levels``.
    """
    n, c, h, w = levels.shape
    tables = quality_tables(quality).to(levels.device)
    # The colour conversions and the chroma resampling stay below 2^25: int32 is exact (the
    # DCTs widen as they need, see _blocks_round_trip).
    levels = levels.to(torch.int32)
    if c == 1:
        return _luminance_round_trip(levels[:, 0], tables[0])[:, None].to(torch.uint8)
    red, green, blue = levels.unbind(1)
    # rgb_ycc_convert: the +HALF rounds Y; the chroma constant HALF - 1 rounds a hair below
    # one half so that Cb, Cr stay below 256.
    luma = (19595 * red + 38470 * green + 7471 * blue + _HALF) >> _SCALE_BITS
    blue_chroma = (
        -11059 * red - 21709 * green + 32768 * blue + _CHROMA_OFFSET + _HALF - 1
    ) >> _SCALE_BITS
    red_chroma = (
        32768 * red - 27439 * green - 5329 * blue + _CHROMA_OFFSET + _HALF - 1
    ) >> _SCALE_BITS
    luma = _luminance_round_trip(luma, tables[0])
    blue_chroma = _chroma_round_trip(blue_chroma, tables[1])
    red_chroma = _chroma_round_trip(red_chroma, tables[1])
    # ycc_rgb_convert: Cr_r_tab and Cb_b_tab round (+HALF, then shift); the green table adds
    # HALF once to the sum of both terms.
    blue_chroma = blue_chroma - 128
    red_chroma = red_chroma - 128
    red = luma + ((91881 * red_chroma + _HALF) >> _SCALE_BITS)
    green = luma + ((-22554 * blue_chroma - 46802 * red_chroma + _HALF) >> _SCALE_BITS)
    blue = luma + ((116130 * blue_chroma + _HALF) >> _SCALE_BITS)
    return torch.stack((red, green, blue), dim=1).clamp(0, 255).to(torch.uint8)


def _repeat_edges(plane: Tensor, height: int, width: int) -> Tensor:
    """``plane`` (M, h, w) extended to (M, height, width) by repeating its last row/column."""
    if height != plane.shape[-2]:
        rows = torch.arange(height, device=plane.device).clamp(max=plane.shape[-2] - 1)
        plane = plane.index_select(-2, rows)
    if width != plane.shape[-1]:
        cols = torch.arange(width, device=plane.device).clamp(max=plane.shape[-1] - 1)
        plane = plane.index_select(-1, cols)
    return plane


def _round_up(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def _luminance_round_trip(luma: Tensor, table: Tensor) -> Tensor:
    """A full-resolution component (M, H, W) int32 through DCT, quantisation and IDCT."""
    _, h, w = luma.shape
    padded = _repeat_edges(luma, _round_up(h, 8), _round_up(w, 8))
    return _blocks_round_trip(padded, table)[:, :h, :w]


def _chroma_round_trip(chroma: Tensor, table: Tensor) -> Tensor:
    """A full-resolution chroma plane (M, H, W) int32: downsampled 2x2, coded, upsampled."""
    m, h, w = chroma.shape
    sub_h, sub_w = -(-h // 2), -(-w // 2)
    # jcsample.c's expand_right_edge pads each row to twice the (block-rounded) output width,
    # jcprepct.c repeats the last row to complete the row pair before downsampling.
    padded = _repeat_edges(chroma, 2 * sub_h, 2 * _round_up(sub_w, 8))
    sums = padded.reshape(m, sub_h, 2, padded.shape[-1] // 2, 2).sum(dim=(2, 4))
    bias = 1 + torch.arange(sums.shape[-1], device=chroma.device) % 2
    downsampled = (sums + bias) >> 2
    # ... and after downsampling it repeats the last row up to a whole block row.
    downsampled = _repeat_edges(downsampled, _round_up(sub_h, 8), downsampled.shape[-1])
    decoded = _blocks_round_trip(downsampled, table)[:, :sub_h, :sub_w]
    return _upsample(decoded)[:, :h, :w]


def _upsample(chroma: Tensor) -> Tensor:
    """libjpeg-turbo's h2v2 upsampling of the decoded chroma (M, h, w) to (M, 2h, 2w)."""
    m, h, w = chroma.shape
    if w <= 2:
        # jdsample.c installs the fancy upsampler only for downsampled_width > 2.
        return chroma.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    # Column sums 3 near + far for output rows 2i (far = row above) and 2i + 1 (row below),
    # the edge rows repeated; built in place from slices (no gathered copies).
    sums = (3 * chroma)[:, :, None, :].repeat(1, 1, 2, 1)
    upper, lower = sums[:, :, 0], sums[:, :, 1]
    upper[:, 1:] += chroma[:, :-1]
    upper[:, :1] += chroma[:, :1]
    lower[:, :-1] += chroma[:, 1:]
    lower[:, -1:] += chroma[:, -1:]
    sums = sums.reshape(m, 2 * h, w)
    even = 3 * sums
    even[..., 1:] += sums[..., :-1]
    even[..., :1] += sums[..., :1]
    even += 8
    even >>= 4
    odd = 3 * sums
    odd[..., :-1] += sums[..., 1:]
    odd[..., -1:] += sums[..., -1:]
    odd += 7
    odd >>= 4
    return torch.stack((even, odd), dim=-1).reshape(m, 2 * h, 2 * w)


def _blocks_round_trip(plane: Tensor, table: Tensor) -> Tensor:
    """Level shift, islow DCT, quantise, dequantise, islow IDCT of a (M, 8 a, 8 b) plane."""
    if _has_float64(plane.device):
        return _blocks_round_trip_float64(plane, table)
    return _blocks_round_trip_integer(plane.to(torch.int64), table).to(plane.dtype)


def _has_float64(device: torch.device) -> bool:
    # float64 holds every integer of these passes exactly; MPS has no float64.
    return device.type != "mps"


def _pass_bits(first: bool, forward: bool) -> tuple[int, ...]:
    """The rounding shift of each of the 8 outputs of a DCT pass (0: exact, no rounding)."""
    if forward:
        even = 0 if first else _PASS1_BITS
        other = _CONST_BITS - _PASS1_BITS if first else _CONST_BITS + _PASS1_BITS
        return (even, other, other, other, even, other, other, other)
    bits = _CONST_BITS - _PASS1_BITS if first else _CONST_BITS + _PASS1_BITS + 3
    return (bits,) * 8


@functools.lru_cache(maxsize=8)
def _pass_matrices(first: bool, forward: bool) -> tuple[Tensor, Tensor, Tensor]:
    """A DCT pass as ``floor((matrix @ x + offset) * scale)``, float64, CPU.

    Between its roundings a pass of libjpeg's islow DCT is an integer linear map of its 8
    inputs (butterflies, integer constants, left shifts): its columns are the pass run with
    no rounding on the unit vectors. Each output then adds half its divisor 2^bits and drops
    the fraction (libjpeg's DESCALE, an arithmetic shift: a floor); outputs with bits 0 are
    exact. The forward first pass also takes the level shift -128 (on all 8 inputs) into the
    offsets.
    """
    run = _fdct_pass if forward else _idct_pass
    units = torch.eye(8, dtype=torch.int64)
    matrix = run(units, first, descale=lambda value, bits: value).T.to(torch.float64)
    bits = torch.tensor(_pass_bits(first, forward), dtype=torch.float64)
    offset = torch.where(bits > 0, torch.exp2(bits - 1), 0.0)
    if forward and first:
        offset = offset - 128 * matrix.sum(dim=1)
    return matrix, offset, torch.exp2(-bits)


def _blocks_round_trip_float64(plane: Tensor, table: Tensor) -> Tensor:
    """:func:`_blocks_round_trip` with each pass as one float64 matrix product per 8 samples.

    Every value on the way is an integer far below 2^53, so products and sums are exact in
    any order and ``floor`` after the power-of-two scale is libjpeg's shift: the same integers
    as the butterflies, in a fraction of the passes over memory. Rows and columns are taken
    in place in the plane (no block transposes): a row pass multiplies groups of 8 along W,
    a column pass groups of 8 along H.
    """
    m, h, w = plane.shape
    device = plane.device

    def along_rows(values: Tensor, first: bool, forward: bool) -> Tensor:
        matrix, offset, scale = (part.to(device) for part in _pass_matrices(first, forward))
        out = torch.matmul(values.reshape(m, h, w // 8, 8), matrix.T)
        return out.add_(offset).mul_(scale).floor_().reshape(m, h, w)

    def along_columns(values: Tensor, first: bool, forward: bool) -> Tensor:
        matrix, offset, scale = (part.to(device) for part in _pass_matrices(first, forward))
        out = torch.matmul(matrix, values.reshape(m, h // 8, 8, w))
        return out.add_(offset[:, None]).mul_(scale[:, None]).floor_().reshape(m, h, w)

    coefficients = along_columns(along_rows(plane.to(torch.float64), True, True), False, True)
    # Quantise as jcdctmgr.c: sign(c) floor((|c| + 4 Q) / (8 Q)), i.e. (c +- 4 Q) / (8 Q)
    # truncated; the division of exact integers is correctly rounded, so truncating it is exact.
    steps = table.to(device=device, dtype=torch.float64).repeat(h // 8, w // 8)
    quantised = torch.div(
        coefficients.addcmul_(torch.sign(coefficients), steps, value=4),
        8 * steps,
        rounding_mode="trunc",
    )
    samples = along_rows(along_columns(quantised.mul_(steps), True, False), False, False)
    # range_limit[x & 1023]: x as a 10-bit signed number, then + 128, clamped.
    low, high = torch.aminmax(samples)
    if float(low) < -512 or float(high) > 511:
        samples = samples - 1024 * torch.floor((samples + 512) * (1 / 1024))
    return samples.add_(128).clamp_(0, 255).to(plane.dtype)


def _blocks_round_trip_integer(plane: Tensor, table: Tensor) -> Tensor:
    """:func:`_blocks_round_trip` with the butterflies on int64 tensors (any device)."""
    m, h, w = plane.shape
    blocks = (plane - 128).reshape(m, h // 8, 8, w // 8, 8).transpose(2, 3)
    coefficients = _fdct_islow(blocks)
    # jcdctmgr.c divides the 8-times-scaled DCT by 8 Q, rounding halves away from zero.
    divisors = 8 * table
    quantised = torch.sign(coefficients) * ((coefficients.abs() + divisors // 2) // divisors)
    samples = _idct_islow(quantised * table)
    return samples.transpose(2, 3).reshape(m, h, w)


def _descale(value: Tensor, bits: int) -> Tensor:
    """libjpeg's DESCALE: divide by 2^bits, rounding halves up."""
    return (value + (1 << (bits - 1))) >> bits


_DESCALE = _descale


def _fdct_pass(
    data: Tensor, first: bool, descale: Callable[[Tensor, int], Tensor] = None
) -> Tensor:
    """One pass of ``jpeg_fdct_islow`` along the last axis (first: rows, else columns).

    ``descale`` (default :func:`_descale`) is the rounding shift; the identity gives the
    integer linear map that the pass rounds (see :func:`_pass_matrices`)."""
    _descale = _DESCALE if descale is None else descale
    d0, d1, d2, d3, d4, d5, d6, d7 = data.unbind(-1)
    tmp0, tmp7 = d0 + d7, d0 - d7
    tmp1, tmp6 = d1 + d6, d1 - d6
    tmp2, tmp5 = d2 + d5, d2 - d5
    tmp3, tmp4 = d3 + d4, d3 - d4
    tmp10, tmp13 = tmp0 + tmp3, tmp0 - tmp3
    tmp11, tmp12 = tmp1 + tmp2, tmp1 - tmp2
    if first:
        out0 = (tmp10 + tmp11) << _PASS1_BITS
        out4 = (tmp10 - tmp11) << _PASS1_BITS
        bits = _CONST_BITS - _PASS1_BITS
    else:
        out0 = _descale(tmp10 + tmp11, _PASS1_BITS)
        out4 = _descale(tmp10 - tmp11, _PASS1_BITS)
        bits = _CONST_BITS + _PASS1_BITS
    z1 = (tmp12 + tmp13) * _FIX_0_541196100
    out2 = _descale(z1 + tmp13 * _FIX_0_765366865, bits)
    out6 = _descale(z1 - tmp12 * _FIX_1_847759065, bits)
    # Odd part.
    z1, z2 = tmp4 + tmp7, tmp5 + tmp6
    z3, z4 = tmp4 + tmp6, tmp5 + tmp7
    z5 = (z3 + z4) * _FIX_1_175875602
    tmp4 = tmp4 * _FIX_0_298631336
    tmp5 = tmp5 * _FIX_2_053119869
    tmp6 = tmp6 * _FIX_3_072711026
    tmp7 = tmp7 * _FIX_1_501321110
    z1 = z1 * -_FIX_0_899976223
    z2 = z2 * -_FIX_2_562915447
    z3 = z3 * -_FIX_1_961570560 + z5
    z4 = z4 * -_FIX_0_390180644 + z5
    out7 = _descale(tmp4 + z1 + z3, bits)
    out5 = _descale(tmp5 + z2 + z4, bits)
    out3 = _descale(tmp6 + z2 + z3, bits)
    out1 = _descale(tmp7 + z1 + z4, bits)
    return torch.stack((out0, out1, out2, out3, out4, out5, out6, out7), dim=-1)


def _fdct_islow(blocks: Tensor) -> Tensor:
    """``jpeg_fdct_islow`` of level-shifted blocks (..., 8, 8): 8 times the DCT, as integers."""
    rows_done = _fdct_pass(blocks, first=True)
    return _fdct_pass(rows_done.transpose(-1, -2), first=False).transpose(-1, -2)


def _idct_pass(
    coefficients: Tensor, first: bool, descale: Callable[[Tensor, int], Tensor] = None
) -> Tensor:
    """One pass of ``jpeg_idct_islow`` along the last axis (first: columns, else rows);
    ``descale`` as in :func:`_fdct_pass`."""
    _descale = _DESCALE if descale is None else descale
    c0, c1, c2, c3, c4, c5, c6, c7 = coefficients.unbind(-1)
    # Even part.
    z1 = (c2 + c6) * _FIX_0_541196100
    tmp2 = z1 - c6 * _FIX_1_847759065
    tmp3 = z1 + c2 * _FIX_0_765366865
    tmp0 = (c0 + c4) << _CONST_BITS
    tmp1 = (c0 - c4) << _CONST_BITS
    tmp10, tmp13 = tmp0 + tmp3, tmp0 - tmp3
    tmp11, tmp12 = tmp1 + tmp2, tmp1 - tmp2
    # Odd part: inputs 7, 5, 3, 1.
    z1, z2 = c7 + c1, c5 + c3
    z3, z4 = c7 + c3, c5 + c1
    z5 = (z3 + z4) * _FIX_1_175875602
    z1 = z1 * -_FIX_0_899976223
    z2 = z2 * -_FIX_2_562915447
    z3 = z3 * -_FIX_1_961570560 + z5
    z4 = z4 * -_FIX_0_390180644 + z5
    tmp0 = c7 * _FIX_0_298631336 + z1 + z3
    tmp1 = c5 * _FIX_2_053119869 + z2 + z4
    tmp2 = c3 * _FIX_3_072711026 + z2 + z3
    tmp3 = c1 * _FIX_1_501321110 + z1 + z4
    # Pass 2 also removes the factor 8 of the two unnormalised 1-D passes.
    bits = _CONST_BITS - _PASS1_BITS if first else _CONST_BITS + _PASS1_BITS + 3
    outputs = (
        tmp10 + tmp3,
        tmp11 + tmp2,
        tmp12 + tmp1,
        tmp13 + tmp0,
        tmp13 - tmp0,
        tmp12 - tmp1,
        tmp11 - tmp2,
        tmp10 - tmp3,
    )
    return torch.stack([_descale(value, bits) for value in outputs], dim=-1)


def _idct_islow(dequantised: Tensor) -> Tensor:
    """``jpeg_idct_islow`` of dequantised blocks (..., 8, 8) to samples 0..255 (int64).

    The zero-AC shortcuts of the C code give the same numbers as the full butterflies, so
    there are none here. ``range_limit[x & 1023]`` reads x as a 10-bit signed number before
    adding 128 and clamping.
    """
    columns_done = _idct_pass(dequantised.transpose(-1, -2), first=True).transpose(-1, -2)
    samples = _idct_pass(columns_done, first=False)
    wrapped = ((samples + 512) & 1023) - 512
    return (wrapped + 128).clamp(0, 255)


def _jpeg_compression(pixels: Tensor, quality: int) -> Tensor:
    # The reference hands PIL 8-bit images: round float pixels to the nearest level.
    levels = torch.round(pixels * 255).clamp(0, 255).to(torch.uint8)
    return libjpeg_round_trip(levels, quality).to(pixels.dtype) / 255


def _check_jpeg(quality: int, channels: int, height: int, width: int) -> None:
    if channels not in (1, 3):
        raise ValueError(
            f"jpeg_compression needs RGB or grey images (C = 3 or 1), but got C = {channels}"
        )


#: name -> ``f(pixels, parameter, generator)`` on float pixels in [0, 1] (N, C, H, W).
FUNCTIONS: dict[str, Callable[[Tensor, Any, torch.Generator | None], Tensor]] = {
    "jpeg_compression": lambda pixels, quality, generator: _jpeg_compression(pixels, quality),
}

#: name -> ``f(levels, parameter, generator)`` on uint8 images, uint8 out (no float detour).
LEVEL_FUNCTIONS: dict[str, Callable[[Tensor, Any, torch.Generator | None], Tensor]] = {
    "jpeg_compression": lambda levels, quality, generator: libjpeg_round_trip(levels, quality),
}

#: The reference gets the JPEG back from PIL as 8-bit levels: the float output is a multiple
#: of 1/255 and the uint8 output rounds it.
UINT8_SLACK: dict[str, float] = {"jpeg_compression": 0.5}

#: name -> ``check(parameter, channels, height, width)``: JPEG needs RGB or grey.
CHECKS: dict[str, Callable[[Any, int, int, int], None]] = {"jpeg_compression": _check_jpeg}
