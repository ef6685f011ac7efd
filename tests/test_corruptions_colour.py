"""Tests of brightness, contrast, saturate, speckle_noise, gaussian_blur and pixelate.

The deterministic five are checked against the reference scripts' formulas re-run with numpy,
scikit-image and Pillow on the same images (HSV and pixelate to the bit), against values
worked by hand, and for their grey-image, dtype and error behaviour; speckle noise against
the moments of its clipped normal distribution.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from dropcluster.data.corruptions import SEVERITY_PARAMETERS, corrupt
from dropcluster.data.corruptions.colour import (
    FUNCTIONS,
    PARAMETERS,
    UINT8_SLACK,
    hsv_to_rgb,
    pil_resize,
    rgb_to_hsv,
)

COLOUR = ("brightness", "contrast", "saturate", "speckle_noise", "gaussian_blur", "pixelate")
DETERMINISTIC = ("brightness", "contrast", "saturate", "gaussian_blur", "pixelate")
SIDE = {"cifar": 32, "tiny-imagenet": 64, "imagenet": 224}


def photo_like(n: int, side: int, seed: int = 0, height: int | None = None) -> np.ndarray:
    """(n, height, side, 3) uint8: smooth colour fields, a flat patch, saturated and grey areas,
    and some pixel noise, so every branch of the formulas (ties, clipping) is exercised."""
    height = side if height is None else height
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((n, 3, 5, 5)))
    smooth = torch.nn.functional.interpolate(
        coarse, size=(height, side), mode="bicubic", align_corners=False
    )
    images = smooth.permute(0, 2, 3, 1).numpy() * 300 - 20
    images += rng.normal(0, 6, images.shape)
    images[:, : height // 4, : side // 4] = rng.integers(0, 256, (n, 1, 1, 3))
    images[:, -height // 5 :, -side // 5 :] = rng.integers(0, 256, (n, 1, 1, 1))
    return np.clip(np.round(images), 0, 255).astype(np.uint8)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def to_numpy(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).numpy()


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- tables


def test_tables_have_five_severities_per_family_and_the_scripts_values():
    for family, table in PARAMETERS.items():
        assert set(table) == set(COLOUR)
        for name in COLOUR:
            assert len(table[name]) == 5
            assert SEVERITY_PARAMETERS[family][name] == table[name]
        assert list(table["brightness"]) == sorted(table["brightness"])
        assert list(table["contrast"]) == sorted(table["contrast"], reverse=True)
        assert list(table["speckle_noise"]) == sorted(table["speckle_noise"])
        assert list(table["gaussian_blur"]) == sorted(table["gaussian_blur"])
        assert list(table["pixelate"]) == sorted(table["pixelate"], reverse=True)
    # The values that tell the three scripts apart.
    assert PARAMETERS["cifar"]["saturate"][4] == (2.5, 0.2)
    assert PARAMETERS["tiny-imagenet"]["saturate"][4] == (30, 0.2)
    assert PARAMETERS["imagenet"]["saturate"][4] == (20, 0.2)
    assert PARAMETERS["cifar"]["pixelate"] == (0.95, 0.9, 0.85, 0.75, 0.65)
    assert PARAMETERS["tiny-imagenet"]["pixelate"] == (0.9, 0.8, 0.7, 0.6, 0.5)
    assert PARAMETERS["imagenet"]["pixelate"] == (0.6, 0.5, 0.4, 0.3, 0.25)
    assert PARAMETERS["tiny-imagenet"]["speckle_noise"] == (0.15, 0.2, 0.25, 0.3, 0.35)
    assert PARAMETERS["imagenet"]["speckle_noise"] == (0.15, 0.2, 0.35, 0.45, 0.6)
    assert PARAMETERS["cifar"]["gaussian_blur"] == (0.4, 0.6, 0.7, 0.8, 1)
    assert PARAMETERS["cifar"]["contrast"] == (0.75, 0.5, 0.4, 0.3, 0.15)
    assert PARAMETERS["cifar"]["brightness"] == (0.05, 0.1, 0.15, 0.2, 0.3)
    assert UINT8_SLACK["pixelate"] == 0.5


# --------------------------------------------------------------------------- HSV


def _edge_colours() -> np.ndarray:
    levels = np.array([0, 1, 2, 127, 128, 253, 254, 255]) / 255
    return np.array(list(itertools.product(levels, repeat=3)))


def test_rgb_to_hsv_and_back_equal_scikit_image_bit_for_bit():
    color = pytest.importorskip("skimage.color")
    rng = np.random.default_rng(1)
    colours = np.concatenate(
        [_edge_colours(), rng.random((2000, 3)), rng.integers(0, 256, (2000, 3)) / 255]
    )
    image = colours.reshape(1, -1, 3)
    ours = to_numpy(rgb_to_hsv(to_tensor(image[None])))[0]
    assert np.array_equal(ours, color.rgb2hsv(image))
    hsv = color.rgb2hsv(image)
    hsv[0, :600, 0] = rng.random(600)
    hsv[0, :4, 0] = [1.0, np.nextafter(1.0, 0.0), 0.0, 0.5]
    hsv[0, 600:700, 1] = 0.0
    hsv[0, 700:800, 2] = 0.0
    assert np.array_equal(to_numpy(hsv_to_rgb(to_tensor(hsv[None])))[0], color.hsv2rgb(hsv))


def test_hsv_worked_by_hand():
    colours = torch.tensor(
        [
            [0.5, 0.25, 0.0],  # red largest: h = (0.25 - 0) / 0.5 / 6
            [0.3, 0.3, 0.3],  # grey: h = s = 0
            [0.0, 0.0, 0.0],  # black
            [1.0, 1.0, 0.0],  # red and green tie: green's formula, 2 + (0 - 1) / 1
            [0.0, 1.0, 1.0],  # green and blue tie: blue's formula, 4 + (0 - 1) / 1
            [0.2, 0.0, 0.4],  # blue largest: 4 + 0.2 / 0.4, s = 1
            [0.5, 0.0, 0.25],  # red largest, g < b: (0 - 0.25) / 0.5 / 6 mod 1
        ],
        dtype=torch.float64,
    ).T.reshape(1, 3, 1, 7)
    hsv = rgb_to_hsv(colours)[0, :, 0].T
    expected = torch.tensor(
        [
            [1 / 12, 1.0, 0.5],
            [0.0, 0.0, 0.3],
            [0.0, 0.0, 0.0],
            [1 / 6, 1.0, 1.0],
            [0.5, 1.0, 1.0],
            [4.5 / 6, 1.0, 0.4],
            [11 / 12, 1.0, 0.5],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(hsv, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(colours)), colours, rtol=0, atol=1e-15)


def test_hsv_functions_refuse_other_channel_counts():
    with pytest.raises(ValueError, match=r"rgb should be a tensor \(\.\.\., 3, H, W\)"):
        rgb_to_hsv(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match=r"hsv should be a tensor .* got \(2, 2\)"):
        hsv_to_rgb(torch.zeros(2, 2))


# --------------------------------------------------------------------------- the scripts' formulas


def _script_formula(name: str, image: np.ndarray, parameter) -> np.ndarray:
    """What the scripts return (0..255 floats) for one (H, W, 3) uint8 image."""
    color = pytest.importorskip("skimage.color")
    x = image / 255.0
    if name == "brightness":
        hsv = color.rgb2hsv(x)
        hsv[..., 2] = np.clip(hsv[..., 2] + parameter, 0, 1)
        x = color.hsv2rgb(hsv)
    elif name == "saturate":
        hsv = color.rgb2hsv(x)
        hsv[..., 1] = np.clip(hsv[..., 1] * parameter[0] + parameter[1], 0, 1)
        x = color.hsv2rgb(hsv)
    elif name == "contrast":
        means = x.mean(axis=(0, 1), keepdims=True)
        x = (x - means) * parameter + means
    elif name == "gaussian_blur":
        filters = pytest.importorskip("skimage.filters")
        x = filters.gaussian(x, sigma=parameter, mode="nearest", truncate=4.0, channel_axis=-1)
    return np.clip(x, 0, 1) * 255


@pytest.mark.parametrize("family", list(SIDE))
@pytest.mark.parametrize("name", ["brightness", "saturate", "contrast"])
def test_hsv_and_contrast_equal_the_scripts_exactly(family, name):
    side = min(SIDE[family], 64)
    images = photo_like(3, side, seed=len(name))
    for severity, parameter in enumerate(PARAMETERS[family][name], start=1):
        reference = np.stack([_script_formula(name, image, parameter) for image in images])
        floats = to_numpy(corrupt(to_tensor(images).double() / 255, name, severity, family=family))
        if name == "contrast":  # only the means' summation order differs
            np.testing.assert_allclose(floats * 255, reference, rtol=0, atol=1e-9)
        else:  # the same float64 operations in the same order: the same bits
            assert np.array_equal(floats * 255, reference)
        stored = to_numpy(corrupt(to_tensor(images), name, severity, family=family))
        assert np.array_equal(stored, np.uint8(reference))


def test_brightness_keeps_the_scripts_round_off():
    # 193/255 + 0.2 is 244/255 in exact arithmetic, a hair under it in float64: the scripts
    # store 243 (and 227, 226 for the other two channels, scaled by the same V).
    pixel = torch.tensor([193, 180, 179], dtype=torch.uint8).reshape(1, 3, 1, 1)
    out = corrupt(pixel, "brightness", 2, family="imagenet")
    assert out.flatten().tolist() == [243, 227, 226]


def test_brightness_saturate_contrast_worked_by_hand():
    orange = torch.tensor([0.5, 0.25, 0.0], dtype=torch.float64).reshape(1, 3, 1, 1)
    # V + 0.1 with H and S kept scales the colour: (0.6, 0.3, 0).
    brighter = FUNCTIONS["brightness"](orange, 0.1, None).flatten()
    torch.testing.assert_close(brighter, torch.tensor([0.6, 0.3, 0.0], dtype=torch.float64))
    pink = torch.tensor([0.8, 0.4, 0.4], dtype=torch.float64).reshape(1, 3, 1, 1)
    # S = 0.5 becomes 0.15 (h = 0): the others are V (1 - S) = 0.68.
    paler = FUNCTIONS["saturate"](pink, (0.3, 0), None).flatten()
    torch.testing.assert_close(paler, torch.tensor([0.8, 0.68, 0.68], dtype=torch.float64))
    full = FUNCTIONS["saturate"](pink, (2, 0.1), None).flatten()
    torch.testing.assert_close(full, torch.tensor([0.8, 0.0, 0.0], dtype=torch.float64))
    # A grey pixel of a colour image gets S = b with hue 0: tinted red, as in the scripts.
    grey = torch.full((1, 3, 1, 1), 0.5, dtype=torch.float64)
    tinted = FUNCTIONS["saturate"](grey, (5, 0.1), None).flatten()
    torch.testing.assert_close(tinted, torch.tensor([0.5, 0.45, 0.45], dtype=torch.float64))
    ramp = torch.tensor([0.0, 0.2, 0.4, 0.6], dtype=torch.float64).reshape(1, 1, 2, 2)
    flatter = FUNCTIONS["contrast"](ramp, 0.5, None).flatten()
    torch.testing.assert_close(flatter, torch.tensor([0.15, 0.25, 0.35, 0.45], dtype=torch.float64))


def test_contrast_keeps_flat_images_flat():
    # numpy's round-off in the scripts' means drops about half of these a level; not here.
    images = torch.arange(0, 256, 5, dtype=torch.uint8).reshape(-1, 1, 1, 1).expand(-1, 3, 32, 32)
    for severity in range(1, 6):
        assert torch.equal(corrupt(images, "contrast", severity, family="cifar"), images)


@pytest.mark.parametrize("family", list(SIDE))
def test_gaussian_blur_matches_scikit_image(family):
    images = photo_like(2, min(SIDE[family], 64), seed=3)
    for severity, sigma in enumerate(PARAMETERS[family]["gaussian_blur"], start=1):
        reference = np.stack([_script_formula("gaussian_blur", image, sigma) for image in images])
        pixels = to_tensor(images).double() / 255
        floats = to_numpy(corrupt(pixels, "gaussian_blur", severity, family=family))
        np.testing.assert_allclose(floats * 255, reference, rtol=0, atol=3e-4)
        stored = to_numpy(corrupt(to_tensor(images), "gaussian_blur", severity, family=family))
        difference = stored.astype(int) - np.uint8(reference)
        # One level up where the scripts' value is in the last thousandth below an integer
        # (the truncation slack), nowhere else: mostly the flat patches (10% of these
        # images), where the scripts' weights sum to a hair under 1 for some levels.
        lifted = difference == 1
        assert set(np.unique(difference)) <= {0, 1}
        assert np.all(reference[lifted] % 1 > 0.998)
        assert lifted.mean() < 0.08


# --------------------------------------------------------------------------- pixelate and PIL


def _pil_pixelate(image: np.ndarray, factor: float, upsample) -> np.ndarray:
    from PIL import Image

    height, width = image.shape[:2]
    small = Image.fromarray(image).resize(
        (int(width * factor), int(height * factor)), Image.Resampling.BOX
    )
    return np.asarray(small.resize((width, height), upsample))


@pytest.mark.parametrize(
    ("family", "side"),
    [("cifar", 32), ("cifar", 33), ("tiny-imagenet", 64), ("tiny-imagenet", 47)]
    + [("imagenet", 224), ("imagenet", 97)],
)
def test_pixelate_equals_pil_box_down_and_box_up(family, side):
    pil = pytest.importorskip("PIL.Image")
    images = photo_like(2, side, seed=side)
    for severity, factor in enumerate(PARAMETERS[family]["pixelate"], start=1):
        ours = to_numpy(corrupt(to_tensor(images), "pixelate", severity, family=family))
        for image, result in zip(images, ours, strict=True):
            assert np.array_equal(result, _pil_pixelate(image, factor, pil.Resampling.BOX))
            if side == SIDE[family]:
                # imagecorruptions enlarges with NEAREST: at the scripts' sizes PIL picks the
                # same pixels (elsewhere a centre on a pixel edge can round the other way).
                nearest = _pil_pixelate(image, factor, pil.Resampling.NEAREST)
                assert np.array_equal(result, nearest)


@pytest.mark.parametrize(("height", "width"), [(5, 2), (40, 31), (31, 40), (100, 23)])
def test_pil_resize_runs_the_horizontal_pass_first_on_any_shape(height, width):
    pil = pytest.importorskip("PIL.Image")
    image = photo_like(1, width, seed=height, height=height)[0]
    levels = to_tensor(image[None])
    for out_height, out_width in [(height // 2, width - 1), (height - 1, max(width // 3, 1))]:
        ours = to_numpy(pil_resize(levels, out_height, out_width))[0]
        # PIL's two passes one at a time: Pillow up to 12 always ran them in this order.
        across = pil.fromarray(image).resize((out_width, height), pil.Resampling.BOX)
        expected = np.asarray(across.resize((out_width, out_height), pil.Resampling.BOX))
        assert np.array_equal(ours, expected)
        if height - out_height <= 2 * (width - out_width):  # same order in Pillow 13
            direct = pil.fromarray(image).resize((out_width, out_height), pil.Resampling.BOX)
            assert np.array_equal(ours, np.asarray(direct))
        nearest = pil.fromarray(image).resize((out_width, out_height), pil.Resampling.NEAREST)
        ours_nearest = pil_resize(levels, out_height, out_width, "nearest")
        assert np.array_equal(to_numpy(ours_nearest)[0], nearest)


def test_pixelate_uint8_route_equals_pils_passes_one_by_one():
    # corrupt runs pixelate on uint8 images as two matrix products and two roundings;
    # pil_resize runs PIL's four passes with gathers. Every side up to 80, every severity.
    generator = torch.Generator().manual_seed(5)
    for side in range(1, 81):
        images = torch.randint(0, 256, (2, 3, side, 81 - side), generator=generator)
        images = images.to(torch.uint8)
        for family, table in PARAMETERS.items():
            for severity, factor in enumerate(table["pixelate"], start=1):
                small_h, small_w = int(side * factor), int((81 - side) * factor)
                if min(small_h, small_w) < 1:
                    continue
                passes = pil_resize(pil_resize(images, small_h, small_w), side, 81 - side)
                ours = corrupt(images, "pixelate", severity, family=family)
                assert torch.equal(ours, passes), (side, factor)


def test_pil_box_counts_pixel_centres_and_rounds_each_pass():
    # 5 -> 2: the boxes are [0, 2.5) and [2.5, 5); pixel 2's centre, 2.5, is on the edge and
    # belongs to the first box (PIL's (-1/2, 1/2]): means of 3 and 2 pixels, not area weights
    # (which would give 18 and 30).
    row = torch.tensor([0, 0, 90, 10, 20], dtype=torch.uint8).reshape(1, 1, 1, 5)
    assert pil_resize(row, 1, 2).flatten().tolist() == [30, 15]
    # 2x2 -> 1x1: rows first, each rounded (0.5 -> 1, then (1 + 0) / 2 = 0.5 -> 1), where one
    # rounding of the mean 0.25 would give 0.
    block = torch.tensor([[0, 1], [0, 0]], dtype=torch.uint8).reshape(1, 1, 2, 2)
    assert pil_resize(block, 1, 1).item() == 1
    # Pixelate of a 4x4 image at 0.5: 2x2 block values, enlarged back.
    image = torch.tensor(
        [[10, 11, 0, 0], [12, 14, 0, 0], [0, 1, 255, 255], [0, 0, 255, 254]], dtype=torch.uint8
    ).reshape(1, 1, 4, 4)
    small = pil_resize(image, 2, 2)
    assert small.flatten().tolist() == [12, 0, 1, 255]  # (10.5 -> 11, 13) -> 12; (254.5 -> 255)
    expected = small.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert torch.equal(pil_resize(small, 4, 4), expected)
    assert torch.equal(pil_resize(small, 4, 4, "nearest"), expected)


def test_pixelate_rounds_float_images_to_levels():
    images = to_tensor(photo_like(2, 32, seed=5))
    stored = corrupt(images, "pixelate", 3, family="cifar")
    floats = corrupt(images.float() / 255, "pixelate", 3, family="cifar")
    assert torch.equal(torch.round(floats * 255).to(torch.uint8), stored)
    assert torch.allclose(floats * 255, torch.round(floats * 255), atol=1e-4)
    nudged = (images.double() + 0.4).clamp(max=255) / 255
    assert torch.equal(corrupt(nudged, "pixelate", 3, family="cifar"), stored.double() / 255)


# --------------------------------------------------------------------------- speckle noise


def _clipped_normal_moments(mean: float, std: float) -> tuple[float, float]:
    """Mean and std of clip(N(mean, std^2), 0, 1)."""

    def cdf(z):
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    def pdf(z):
        return math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)

    alpha, beta = (0 - mean) / std, (1 - mean) / std
    inside = cdf(beta) - cdf(alpha)
    first = (1 - cdf(beta)) + mean * inside + std * (pdf(alpha) - pdf(beta))
    second = (
        (1 - cdf(beta))
        + (mean**2 + std**2) * inside
        + 2 * mean * std * (pdf(alpha) - pdf(beta))
        + std**2 * (alpha * pdf(alpha) - beta * pdf(beta))
    )
    return first, math.sqrt(second - first**2)


@pytest.mark.parametrize(("level", "family", "severity"), [(0.2, "cifar", 2), (0.6, "imagenet", 5)])
def test_speckle_noise_is_multiplicative_normal_noise(level, family, severity):
    std = PARAMETERS[family]["speckle_noise"][severity - 1]
    images = torch.full((4, 3, 64, 64), level, dtype=torch.float64)
    images[:, :, :8] = 0.0
    out = corrupt(images, "speckle_noise", severity, family=family, generator=generator(7))
    assert torch.all(out[:, :, :8] == 0)  # x N: black stays black
    noisy = out[:, :, 8:]
    mean, spread = _clipped_normal_moments(level, level * std)
    count = noisy.numel()
    assert abs(noisy.mean().item() - mean) < 4 * spread / math.sqrt(count)
    assert abs(noisy.std().item() - spread) < 0.02 * spread
    if level == 0.6:  # N(0.6, 0.36^2) exceeds 1 with probability 13%: the mean drops
        clipped = 0.5 * math.erfc((1 - level) / (level * std) / math.sqrt(2))
        assert mean < level - 0.005
        assert abs((noisy == 1).double().mean().item() - clipped) < 0.01


def test_speckle_noise_is_repeatable_and_seeded():
    images = to_tensor(photo_like(2, 32, seed=9))
    first = corrupt(images, "speckle_noise", 3, generator=generator(1))
    assert torch.equal(first, corrupt(images, "speckle_noise", 3, generator=generator(1)))
    assert not torch.equal(first, corrupt(images, "speckle_noise", 3, generator=generator(2)))


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_corruptions_ignore_the_generator(name):
    images = to_tensor(photo_like(2, 32, seed=11))
    assert torch.equal(
        corrupt(images, name, 4, generator=generator(1)),
        corrupt(images, name, 4, generator=generator(2)),
    )


# --------------------------------------------------------------------------- grey, dtypes, errors


@pytest.mark.parametrize("name", COLOUR)
def test_grey_images_behave_as_the_same_image_converted_to_rgb(name):
    grey = to_tensor(photo_like(2, 32, seed=13))[:, :1]
    out = corrupt(grey, name, 4, family="cifar", generator=generator(3))
    assert out.shape == grey.shape
    rgb = corrupt(grey.expand(-1, 3, -1, -1), name, 4, family="cifar", generator=generator(3))
    if name == "speckle_noise":  # one draw per element: RGB draws three times as many
        assert not torch.equal(out, grey)
    else:
        assert torch.equal(out, rgb[:, :1])


def test_speckle_draws_one_normal_per_element_in_one_call():
    images = torch.rand(2, 3, 8, 8, generator=generator(5), dtype=torch.float64)
    out = corrupt(images, "speckle_noise", 2, family="cifar", generator=generator(6))
    noise = torch.randn(images.shape, generator=generator(6), dtype=torch.float64)
    expected = (images + images * (0.1 * noise)).clamp(0, 1)
    assert torch.equal(out, expected)


def test_grey_brightness_adds_and_grey_saturate_is_the_identity():
    grey = torch.linspace(0, 1, 64, dtype=torch.float64).reshape(1, 1, 8, 8)
    brighter = corrupt(grey, "brightness", 3, family="imagenet")
    torch.testing.assert_close(brighter, (grey + 0.3).clamp(0, 1), rtol=0, atol=1e-15)
    for severity in range(1, 6):
        assert torch.equal(corrupt(grey, "saturate", severity), grey)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", COLOUR)
def test_dtypes_and_shapes_are_kept(name, dtype):
    images = to_tensor(photo_like(2, 36, seed=2, height=30))
    if dtype != torch.uint8:
        images = (images.double() / 255).to(dtype)
    out = corrupt(images, name, 5, family="cifar", generator=generator(0))
    assert out.dtype == dtype
    assert out.shape == (2, 3, 30, 36)
    if dtype.is_floating_point:
        assert float(out.min()) >= 0 and float(out.max()) <= 1


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("brightness", (1, 4, 8, 8), r"^brightness needs RGB or grey .*, but got C = 4$"),
        ("saturate", (1, 2, 8, 8), r"^saturate needs RGB or grey images \(C = 3 or 1\), but"),
        ("pixelate", (1, 3, 3, 40), r"^pixelate at factor 0.25 needs H and W >= 4 .* 3 x 40$"),
    ],
)
def test_checks_raise_one_line_errors(name, shape, message):
    with pytest.raises(ValueError, match=message):
        corrupt(torch.zeros(shape), name, 5, family="imagenet")


def test_other_channel_counts_work_where_the_formula_allows():
    images = torch.rand(1, 4, 8, 8, generator=generator(4))
    for name in ("contrast", "speckle_noise", "gaussian_blur", "pixelate"):
        assert corrupt(images, name, 1, family="imagenet").shape == images.shape
    # pixelate's smallest images: int(4 * 0.25) = 1.
    assert corrupt(torch.zeros(1, 3, 4, 4), "pixelate", 5, family="imagenet").shape == (1, 3, 4, 4)
