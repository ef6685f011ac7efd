"""Tests of jpeg_compression and elastic_transform (``dropcluster.data.corruptions``).

JPEG is checked pixel for pixel against Pillow's own JPEG round trip (the reference's code
path) and against hand-worked quantisation. The elastic transform is checked against a
numpy/OpenCV/scipy/scikit-image re-run of the scripts' formula fed the same random draws, and
its pieces against OpenCV and scipy one by one.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from scipy import ndimage

from dropcluster.data.corruptions import SEVERITY_PARAMETERS, corrupt, elastic, jpeg

SIDE = {"cifar": 32, "tiny-imagenet": 64, "imagenet": 224}


def random_levels(n: int, height: int, width: int, seed: int) -> np.ndarray:
    """(n, H, W, 3) uint8 noise: every DCT coefficient matters."""
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def smooth_levels(n: int, height: int, width: int, seed: int) -> np.ndarray:
    """(n, H, W, 3) uint8 waves with a little noise: most coefficients quantise to zero."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    images = []
    for index in range(n):
        planes = [
            127 + 110 * np.sin(cols / (4 + index) + k) * np.cos(rows / (3 + k) - index)
            for k in range(3)
        ]
        images.append(np.stack(planes, -1) + rng.normal(0, 3, (height, width, 3)))
    return np.clip(np.round(images), 0, 255).astype(np.uint8)


def pillow_round_trip(levels: np.ndarray, quality: int) -> tuple[np.ndarray, dict]:
    """What the scripts do: PIL ``save(..., "JPEG", quality=q)`` and ``Image.open``."""
    image_module = pytest.importorskip("PIL.Image")
    buffer = io.BytesIO()
    image_module.fromarray(levels).save(buffer, "JPEG", quality=quality)
    image = image_module.open(buffer)
    image.load()
    return np.asarray(image), image.quantization


def ours_jpeg(levels: np.ndarray, quality: int) -> np.ndarray:
    """:func:`jpeg.libjpeg_round_trip` on (N, H, W, 3) or (N, H, W) uint8 arrays."""
    tensor = torch.from_numpy(levels)
    tensor = tensor[:, None] if tensor.dim() == 3 else tensor.permute(0, 3, 1, 2)
    out = jpeg.libjpeg_round_trip(tensor, quality)
    return out[:, 0].numpy() if levels.ndim == 3 else out.permute(0, 2, 3, 1).numpy()


# --------------------------------------------------------------------------- JPEG


def test_jpeg_tables_follow_the_scripts():
    assert jpeg.PARAMETERS["cifar"]["jpeg_compression"] == (80, 65, 58, 50, 40)
    assert jpeg.PARAMETERS["tiny-imagenet"]["jpeg_compression"] == (65, 58, 50, 40, 25)
    assert jpeg.PARAMETERS["imagenet"]["jpeg_compression"] == (25, 18, 15, 10, 7)
    assert jpeg.UINT8_SLACK == {"jpeg_compression": 0.5}


def test_quality_scaling_by_hand():
    # Below 50: 5000 // q; from 50: 200 - 2 q; quality clamped to 1..100.
    expected = {1: 5000, 7: 714, 25: 200, 49: 102, 50: 100, 80: 40, 100: 0, 0: 5000, 150: 0}
    for quality, scale in expected.items():
        assert jpeg.quality_scale_factor(quality) == scale
    tables = jpeg.quality_tables(80)
    assert tables.shape == (2, 8, 8) and tables.dtype == torch.int64
    assert tables[0, 0, 0] == 6  # (16 * 40 + 50) // 100
    assert tables[1, 0, 0] == 7  # (17 * 40 + 50) // 100
    assert tables[0, 4, 5] == 44  # (109 * 40 + 50) // 100
    low = jpeg.quality_tables(7)
    assert low[0, 0, 0] == 114  # (16 * 714 + 50) // 100
    assert low[0, 7, 7] == 255 and low[1, 7, 7] == 255  # baseline clamps 707 to 255
    assert torch.equal(jpeg.quality_tables(100), torch.ones(2, 8, 8, dtype=torch.int64))
    assert torch.equal(jpeg.quality_tables(50)[1, 4:], torch.full((4, 8), 99))


@pytest.mark.parametrize(
    "quality", sorted({q for t in jpeg.PARAMETERS.values() for q in t["jpeg_compression"]})
)
def test_quality_tables_equal_the_ones_pillow_writes(quality):
    _, tables = pillow_round_trip(random_levels(1, 8, 8, 0)[0], quality)
    for index in (0, 1):
        assert np.array_equal(
            np.array(tables[index]).reshape(8, 8), jpeg.quality_tables(quality)[index]
        )


def test_a_flat_block_round_trips_exactly_and_halves_round_away_from_zero():
    # A flat grey block is Y = v, Cb = Cr = 128: only the luminance DC 8 (v - 128) is
    # non-zero. At quality 95 its quantiser is 2, which divides it: exact round trip.
    flat = np.full((1, 16, 16, 3), 0, dtype=np.uint8)
    for value in (0, 37, 128, 131, 200, 255):
        flat[:] = value
        assert np.array_equal(ours_jpeg(flat, 95), flat)
    # At quality 50 the quantiser is 16: 8 (131 - 128) / 16 = 1.5 rounds to 2 (-> 132) and
    # 8 (125 - 128) / 16 = -1.5 to -2 (-> 124); 8 (130 - 128) / 16 = 1 stays (-> 130).
    for value, decoded in ((131, 132), (125, 124), (130, 130)):
        flat[:] = value
        assert np.all(ours_jpeg(flat, 50) == decoded)
        assert np.all(pillow_round_trip(flat[0], 50)[0] == decoded)


@pytest.mark.parametrize("family", list(SIDE))
def test_jpeg_equals_pillow_pixel_for_pixel(family):
    side = SIDE[family]
    for height, width in ((33, 47), (side, side)):
        images = np.concatenate(
            [random_levels(2, height, width, side), smooth_levels(2, height, width, side)]
        )
        for quality in jpeg.PARAMETERS[family]["jpeg_compression"]:
            expected = np.stack([pillow_round_trip(image, quality)[0] for image in images])
            ours = ours_jpeg(images, quality)
            assert np.array_equal(ours, expected), (family, height, width, quality)
            assert np.abs(ours.astype(int) - images).mean() > 1  # the JPEG did something


@pytest.mark.parametrize(("height", "width"), [(1, 1), (2, 9), (5, 3), (9, 4), (17, 6), (16, 16)])
def test_jpeg_equals_pillow_on_tiny_images(height, width):
    # Widths up to 4 leave at most two chroma samples per row: libjpeg then repeats them
    # instead of fancy upsampling.
    images = random_levels(3, height, width, height * 100 + width)
    for quality in (7, 50, 90):
        expected = np.stack([pillow_round_trip(image, quality)[0] for image in images])
        assert np.array_equal(ours_jpeg(images, quality), expected)


def test_grey_jpeg_equals_pillow_grey_and_rgb_of_the_grey_image():
    grey = np.concatenate([random_levels(2, 33, 47, 3), smooth_levels(2, 33, 47, 3)])[..., 0]
    for quality in (80, 25, 7):
        ours = ours_jpeg(grey, quality)
        grey_jpeg = np.stack([pillow_round_trip(image, quality)[0] for image in grey])
        as_rgb = np.stack(
            [pillow_round_trip(np.repeat(image[..., None], 3, -1), quality)[0] for image in grey]
        )
        assert np.array_equal(ours, grey_jpeg)
        for channel in range(3):
            assert np.array_equal(ours, as_rgb[..., channel])


def test_jpeg_float64_products_equal_the_integer_butterflies(monkeypatch):
    # Devices with float64 run each DCT pass as a matrix product; others (MPS) the int64
    # butterflies. Both must give the same integers, also where the IDCT wraps (quality 1 on
    # black/white noise and checkerboards).
    generator = torch.Generator().manual_seed(3)
    noise = torch.randint(0, 256, (4, 3, 24, 40), generator=generator)
    binary = torch.randint(0, 2, (4, 3, 24, 40), generator=generator) * 255
    rows, cols = torch.meshgrid(torch.arange(24), torch.arange(40), indexing="ij")
    checker = (((rows + cols) % 2) * 255).expand(4, 3, 24, 40)
    images = torch.cat((noise, binary, checker)).to(torch.uint8)
    qualities = (1, 7, 25, 50, 80, 100)
    products = [jpeg.libjpeg_round_trip(images, quality) for quality in qualities]
    monkeypatch.setattr(jpeg, "_has_float64", lambda device: False)
    for quality, expected in zip(qualities, products, strict=True):
        assert torch.equal(jpeg.libjpeg_round_trip(images, quality), expected), quality


def test_corrupt_jpeg_uint8_and_float_inputs():
    images = smooth_levels(3, 32, 32, 7)
    uint8 = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    out = corrupt(uint8, "jpeg_compression", 5)  # CIFAR quality 40
    assert out.dtype == torch.uint8 and out.shape == uint8.shape
    expected = np.stack([pillow_round_trip(image, 40)[0] for image in images])
    assert np.array_equal(out.permute(0, 2, 3, 1).numpy(), expected)
    for dtype in (torch.float32, torch.float64):
        floats = corrupt(uint8.to(dtype) / 255, "jpeg_compression", 5)
        assert floats.dtype == dtype
        assert torch.equal(torch.round(floats * 255).to(torch.uint8), out)
    # Float pixels off the 256 levels are rounded to the nearest level first.
    nudged = (uint8.to(torch.float64) + 0.3).clamp(max=255) / 255
    assert torch.equal(
        torch.round(corrupt(nudged, "jpeg_compression", 5) * 255).to(torch.uint8), out
    )


@pytest.mark.parametrize("channels", [2, 4])
def test_jpeg_refuses_other_channel_counts(channels):
    with pytest.raises(ValueError, match=f"jpeg_compression needs RGB or grey.*C = {channels}"):
        corrupt(torch.zeros(1, channels, 8, 8), "jpeg_compression", 1)


# --------------------------------------------------------------------------- elastic: reference


def opencv():
    """OpenCV, needed only as the reference (the tests that use it skip without it)."""
    return pytest.importorskip("cv2")


def opencv4_warp_affine(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``cv2.warpAffine(image, M, (W, H), borderMode=BORDER_REFLECT_101)`` as OpenCV 2-4 do it.

    OpenCV 5 computes warpAffine in floating point; the data sets were made with the
    fixed-point version: the inverse map is evaluated with 10 fractional bits, cut to 1/32
    pixel, and handed to ``cv2.remap`` as integer positions plus a 5-bit fraction table index
    (OpenCV's own interpolation and borders). With OpenCV 4 this equals warpAffine exactly.
    """
    height, width = image.shape[:2]
    m = matrix.astype(np.float64).ravel()
    det = m[0] * m[4] - m[1] * m[3]
    inv_det = 1.0 / det if det != 0 else 0.0
    a, b, d, e = m[4] * inv_det, -m[1] * inv_det, -m[3] * inv_det, m[0] * inv_det
    c, f = -a * m[2] - b * m[5], -d * m[2] - e * m[5]
    xs, ys = np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64)
    x_fixed = (
        (np.rint((b * ys + c) * 1024).astype(np.int64) + 16)[:, None]
        + np.rint(a * xs * 1024).astype(np.int64)[None, :]
    ) >> 5
    y_fixed = (
        (np.rint((e * ys + f) * 1024).astype(np.int64) + 16)[:, None]
        + np.rint(d * xs * 1024).astype(np.int64)[None, :]
    ) >> 5
    positions = np.stack([x_fixed >> 5, y_fixed >> 5], -1).astype(np.int16)
    fractions = ((y_fixed & 31) * 32 + (x_fixed & 31)).astype(np.uint16)
    cv2 = opencv()
    return cv2.remap(
        image, positions, fractions, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )


def script_elastic(image, parameter, shifts, uniform_dx, uniform_dy, warp=opencv4_warp_affine):
    """The scripts' elastic_transform on (H, W, C) float32 pixels, with the draws given.

    Returns the float result in [0, 1] (the scripts return it times 255).
    """
    cv2 = opencv()
    gaussian = pytest.importorskip("skimage.filters").gaussian
    alpha, sigma, _ = parameter
    height, width, channels = image.shape
    centre = np.float32((height, width)) // 2
    side = min(height, width) // 3
    source = np.float32([centre + side, [centre[0] + side, centre[1] - side], centre - side])
    matrix = cv2.getAffineTransform(source, source + shifts.astype(np.float32))
    warped = warp(image, matrix).reshape(height, width, channels)
    fields = [
        (gaussian(u, sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
        for u in (uniform_dx, uniform_dy)
    ]
    grid_x, grid_y, grid_c = np.meshgrid(np.arange(width), np.arange(height), np.arange(channels))
    coordinates = (
        (grid_y + fields[1][..., None]).reshape(-1),
        (grid_x + fields[0][..., None]).reshape(-1),
        grid_c.reshape(-1),
    )
    sampled = ndimage.map_coordinates(warped, coordinates, order=1, mode="reflect")
    return np.clip(sampled.reshape(height, width, channels), 0, 1)


def elastic_draws(n, height, width, affine, seed):
    rng = np.random.default_rng(seed)
    return rng.uniform(-affine, affine, (n, 3, 2)), rng.uniform(-1, 1, (n, 2, height, width))


def test_elastic_tables_follow_the_scripts():
    tables = {family: elastic.PARAMETERS[family]["elastic_transform"] for family in SIDE}
    assert tables["cifar"][1] == (32 * 0.05, 32 * 0.2, 32 * 0.07)
    assert tables["cifar"][0] == (0, 0, 32 * 0.08)
    assert tables["tiny-imagenet"][4] == (64 * 0.16, 64 * 0.03, 64 * 0.02)
    assert tables["imagenet"][0] == (244 * 2, 244 * 0.7, 244 * 0.1)
    assert tables["imagenet"][3] == (244 * 0.07, 244 * 0.01, 244 * 0.02)
    assert elastic.UINT8_SLACK == {}  # the scripts truncate with np.uint8


@pytest.mark.parametrize("family", list(SIDE))
def test_elastic_equals_the_script_formula_with_the_same_draws(family):
    side = SIDE[family]
    rng = np.random.default_rng(side)
    sizes = [(side, side)] + ([(33, 47)] if family == "cifar" else [])
    for height, width in sizes:
        images = (rng.integers(0, 256, (2, height, width, 3)) / 255).astype(np.float32)
        images[1] = smooth_levels(1, height, width, 1)[0] / 255
        for severity, parameter in enumerate(elastic.PARAMETERS[family]["elastic_transform"]):
            shifts, uniform = elastic_draws(2, height, width, parameter[2], severity)
            expected = np.stack(
                [
                    script_elastic(images[i], parameter, shifts[i], uniform[i, 0], uniform[i, 1])
                    for i in range(2)
                ]
            )
            for dtype, tolerance in ((torch.float32, 2e-7), (torch.float64, 4e-7)):
                pixels = torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype)
                ours = elastic.elastic_transform(
                    pixels,
                    parameter,
                    shifts=torch.from_numpy(shifts),
                    uniform=torch.from_numpy(uniform),
                )
                assert ours.dtype == dtype
                ours = ours.permute(0, 2, 3, 1).to(torch.float64).numpy()
                # The reference warps in float32: float32 round-off is all that is left.
                assert np.abs(ours - expected).max() < tolerance, (family, severity, dtype)
                # uint8: corrupt's floor(255 y + 1e-3) against the same rule on the reference
                # (round-off only) and against the scripts' np.uint8, which differs where
                # 255 y is within 1e-3 below a level (about 0.1% of the pixels, by one level).
                levels = np.floor(ours * 255 + 1e-3)
                assert np.mean(levels != np.floor(expected * 255 + 1e-3)) < 2e-4
                truncated = (expected * np.float32(255)).astype(np.uint8)
                assert np.mean(levels != truncated) < 5e-3
                assert np.abs(levels - truncated).max() <= 1
            assert np.abs(expected - images).mean() > 0.02  # the transform did something


def test_warp_affine_is_opencv_fixed_point_and_within_1_64_pixel_of_the_installed_opencv():
    cv2 = opencv()
    rng = np.random.default_rng(0)
    image = rng.random((40, 52, 3)).astype(np.float32)
    source = elastic.affine_points(40, 52)
    for amplitude in (0.7, 9.0):
        target = source + torch.from_numpy(rng.uniform(-amplitude, amplitude, (3, 2))).float()
        matrix = cv2.getAffineTransform(source.numpy(), target.numpy())
        ours_matrix = elastic.affine_matrix(source[None], target[None])
        assert np.abs(ours_matrix[0].numpy() - matrix).max() < 1e-12
        ours = elastic.warp_affine(torch.from_numpy(image).permute(2, 0, 1)[None], ours_matrix)
        ours = ours[0].permute(1, 2, 0).numpy()
        assert np.array_equal(ours, opencv4_warp_affine(image, matrix))
        installed = cv2.warpAffine(image, matrix, (52, 40), borderMode=cv2.BORDER_REFLECT_101)
        # OpenCV <= 4 is the fixed point itself; OpenCV 5 samples at the exact position, at
        # most 1/64 pixel along each axis away: at most 2/64 of the largest step of [0, 1) noise.
        assert np.abs(ours - installed).max() <= 2 / 64
        if int(cv2.__version__.split(".")[0]) < 5:
            assert np.array_equal(ours, installed)


def test_smoothed_field_is_scipy_gaussian_reflect_truncate_3_even_for_long_kernels():
    uniform = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (2, 20, 31)))
    for sigma in (0.96, 2.44, 19.52, 170.8):  # 170.8: a kernel of 1025 taps on 20 x 31
        ours = elastic.smoothed_field(uniform, sigma)
        for index in range(2):
            expected = ndimage.gaussian_filter(
                uniform[index].numpy(), sigma, mode="reflect", truncate=3
            )
            assert np.abs(ours[index].numpy() - expected).max() < 1e-13
    assert torch.equal(elastic.smoothed_field(uniform, 0), uniform)


def test_map_coordinates_reflect_by_hand_and_against_scipy():
    row = torch.tensor([[[[0.0, 10.0, 20.0]]]], dtype=torch.float64)
    cols = torch.tensor([[[-0.25, 2.25, 0.5, -1.5, -3.5, 4.0, 7.5]]], dtype=torch.float64)
    # Half-sample symmetric, period 6: ... 10 0 | 0 10 20 | 20 10 0 | 0 10 20 ...
    expected = torch.tensor([0.0, 20.0, 5.0, 5.0, 20.0, 10.0, 15.0], dtype=torch.float64)
    sampled = elastic.map_coordinates_reflect(row, torch.zeros_like(cols), cols)
    assert torch.allclose(sampled[0, 0, 0], expected, atol=1e-12)
    rng = np.random.default_rng(2)
    image = rng.random((1, 2, 9, 13))
    rows = rng.uniform(-30, 40, (1, 9, 13))
    cols = rng.uniform(-30, 40, (1, 9, 13))
    ours = elastic.map_coordinates_reflect(
        torch.from_numpy(image), torch.from_numpy(rows), torch.from_numpy(cols)
    )
    for channel in range(2):
        expected = ndimage.map_coordinates(
            image[0, channel], (rows[0], cols[0]), order=1, mode="reflect"
        )
        assert np.abs(ours[0, channel].numpy() - expected).max() < 1e-12


# --------------------------------------------------------------------------- elastic: by hand


def test_no_shift_and_no_field_returns_the_image_exactly():
    pixels = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    out = elastic.elastic_transform(
        pixels, (0, 0, 1.0), shifts=torch.zeros(2, 3, 2), uniform=torch.zeros(2, 2, 20, 24)
    )
    assert torch.equal(out, pixels)


def test_half_pixel_translation_averages_neighbours_and_mirrors_at_the_border():
    pixels = torch.rand(1, 1, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # Every point moves by +0.5 in x: output x samples input x - 0.5 (on the 1/32 grid).
    shifts = torch.tensor([[[0.5, 0.0], [0.5, 0.0], [0.5, 0.0]]])
    out = elastic.elastic_transform(
        pixels, (0, 0, 1.0), shifts=shifts, uniform=torch.zeros(1, 2, 6, 7)
    )
    image = pixels[0, 0]
    assert torch.allclose(out[0, 0, :, 1:], (image[:, :-1] + image[:, 1:]) / 2, atol=1e-12)
    # Column -1 is column 1 under reflect-101.
    assert torch.allclose(out[0, 0, :, 0], (image[:, 1] + image[:, 0]) / 2, atol=1e-12)


def test_elastic_draws_shifts_then_fields_from_the_generator():
    pixels = torch.rand(3, 3, 16, 18, generator=torch.Generator().manual_seed(2))
    parameter = SEVERITY_PARAMETERS["cifar"]["elastic_transform"][2]
    drawn = elastic.elastic_transform(pixels, parameter, generator=torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    shifts = torch.rand((3, 3, 2), generator=replay, dtype=torch.float64) * 2 * parameter[2]
    uniform = torch.rand((3, 2, 16, 18), generator=replay, dtype=torch.float64) * 2 - 1
    given = elastic.elastic_transform(
        pixels, parameter, shifts=shifts - parameter[2], uniform=uniform
    )
    assert torch.equal(drawn, given)
    again = elastic.elastic_transform(pixels, parameter, generator=torch.Generator().manual_seed(5))
    other = elastic.elastic_transform(pixels, parameter, generator=torch.Generator().manual_seed(6))
    assert torch.equal(drawn, again) and not torch.equal(drawn, other)
    # Each image gets its own draws.
    same = pixels[:1].expand(3, -1, -1, -1)
    out = elastic.elastic_transform(same, parameter, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(out[0], out[1])


def test_corrupt_elastic_shapes_dtypes_and_channels():
    pixels = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    for severity in (1, 5):
        grey = corrupt(
            pixels, "elastic_transform", severity, generator=torch.Generator().manual_seed(9)
        )
        rgb = corrupt(
            pixels.expand(2, 3, 32, 32),
            "elastic_transform",
            severity,
            generator=torch.Generator().manual_seed(9),
        )
        assert grey.shape == (2, 1, 32, 32) and grey.dtype == torch.float32
        assert torch.equal(rgb, grey.expand(2, 3, 32, 32))  # every channel moves alike
    four = corrupt(torch.rand(1, 4, 12, 12, dtype=torch.float64), "elastic_transform", 3)
    assert four.shape == (1, 4, 12, 12) and four.dtype == torch.float64
    levels = corrupt(
        (pixels * 255).to(torch.uint8), "elastic_transform", 3, generator=torch.Generator()
    )
    assert levels.dtype == torch.uint8


def test_elastic_refuses_images_smaller_than_3():
    with pytest.raises(ValueError, match=r"elastic_transform needs H and W >= 3.*2 x 5"):
        corrupt(torch.zeros(1, 3, 2, 5), "elastic_transform", 1)
