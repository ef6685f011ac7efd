"""Tests of the Hendrycks & Dietterich (2019) corruptions in ``dropcluster.data.corruptions``.

Noise levels are checked against their exact expectations (clipping included), blurs against
hand-worked values and independent scipy implementations of the reference formulas, the glass
shuffle against the reference's sequential loop run on the same random draws.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from dropcluster.data.corruptions import (
    BENCHMARK,
    CORRUPTION_SETS,
    CORRUPTIONS,
    EXTRA,
    FAMILIES,
    PAPER,
    SEVERITY_PARAMETERS,
    apply,
    corrupt,
    corruption_names,
    defocus_kernel,
    family_for_size,
    filters,
    gaussian_kernel1d,
    glass_shuffle,
    motion_blur_at,
    motion_blur_kernel,
    motion_blur_offsets,
    zoom_factors,
)

RANDOM_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur")
BLURS = ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur")
#: A side length that selects each family by default.
SIDE = {"cifar": 32, "tiny-imagenet": 64, "imagenet": 96}


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def structured_images(n: int, side: int, channels: int = 3) -> torch.Tensor:
    """(n, channels, side, side) float32 in [0, 1]: stripes, a ramp and a bright square.

    The stripes' periods are 6 to 13 pixels per 32, so the images look alike at every size.
    """
    coords = torch.arange(side, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    planes = []
    for index in range(n * channels):
        period = side / 32 * (6 + index % 8)
        stripes = 0.5 + 0.4 * torch.sin(2 * math.pi * (rows + 0.7 * cols) / period + index)
        ramp = cols / side
        square = ((rows - side / 3).abs() < side / 6) & ((cols - side / 2).abs() < side / 5)
        planes.append((0.6 * stripes + 0.3 * ramp + 0.3 * square).clamp(0, 1))
    return torch.stack(planes).reshape(n, channels, side, side)


# --------------------------------------------------------------------------- tables and API


def test_public_names_and_tables_follow_the_reference_scripts():
    assert PAPER == (
        "gaussian_noise",
        "shot_noise",
        "impulse_noise",
        "defocus_blur",
        "glass_blur",
        "motion_blur",
        "zoom_blur",
    )
    assert FAMILIES == ("cifar", "tiny-imagenet", "imagenet")
    assert len(BENCHMARK) == 15 and len(EXTRA) == 4 and CORRUPTIONS == BENCHMARK + EXTRA
    assert BENCHMARK[:7] == PAPER and set(CORRUPTION_SETS) == {"paper", "benchmark", "extra", "all"}
    for family in FAMILIES:
        assert set(SEVERITY_PARAMETERS[family]) == set(CORRUPTIONS)
        for corruption in CORRUPTIONS:
            assert len(SEVERITY_PARAMETERS[family][corruption]) == 5
    # Spot checks against the three scripts (one value per corruption and family).
    assert SEVERITY_PARAMETERS["cifar"]["gaussian_noise"][3] == 0.09
    assert SEVERITY_PARAMETERS["tiny-imagenet"]["shot_noise"][4] == 15
    assert SEVERITY_PARAMETERS["imagenet"]["impulse_noise"][3] == 0.17
    assert SEVERITY_PARAMETERS["tiny-imagenet"]["defocus_blur"][3] == (2.5, 0.01)
    assert SEVERITY_PARAMETERS["cifar"]["glass_blur"][3] == (0.25, 1, 2)
    assert SEVERITY_PARAMETERS["imagenet"]["motion_blur"][4] == (20, 15)
    assert SEVERITY_PARAMETERS["imagenet"]["zoom_blur"][4] == (1.31, 0.03)
    assert (
        SEVERITY_PARAMETERS["cifar"]["zoom_blur"]
        == SEVERITY_PARAMETERS["tiny-imagenet"]["zoom_blur"]
    )


@pytest.mark.parametrize(
    ("height", "width", "family"),
    [
        (28, 28, "cifar"),
        (32, 32, "cifar"),
        (32, 33, "tiny-imagenet"),
        (64, 64, "tiny-imagenet"),
        (65, 10, "imagenet"),
        (224, 224, "imagenet"),
    ],
)
def test_family_follows_the_larger_side(height, width, family):
    assert family_for_size(height, width) == family


def test_zoom_factors_are_numpy_arange_including_its_float_quirks():
    for family in FAMILIES:
        for stop, step in SEVERITY_PARAMETERS[family]["zoom_blur"]:
            expected = np.arange(1, stop, step)
            assert zoom_factors(stop, step) == tuple(expected.tolist())
    # arange(1, 1.06, 0.01) includes 1.06 because 0.06 / 0.01 rounds up to 7 steps.
    counts = [len(zoom_factors(*p)) for p in SEVERITY_PARAMETERS["cifar"]["zoom_blur"]]
    assert counts == [7, 12, 16, 21, 26]


# --------------------------------------------------------------------------- noise statistics


def _clipped_normal_std(std: float, half_width: float) -> float:
    """Exact std of clip(N(0, std^2), -half_width, half_width)."""
    t = half_width / std
    cdf = 0.5 * (1 + math.erf(t / math.sqrt(2)))
    pdf = math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    inside = (2 * cdf - 1) - 2 * t * pdf
    return math.sqrt(std**2 * inside + half_width**2 * 2 * (1 - cdf))


@pytest.mark.parametrize("family", FAMILIES)
def test_gaussian_noise_has_the_table_std(family):
    grey = torch.full((4, 3, 64, 64), 0.5)
    for severity, std in enumerate(SEVERITY_PARAMETERS[family]["gaussian_noise"], start=1):
        noise = corrupt(grey, "gaussian_noise", severity, family=family, generator=generator())
        noise = (noise - grey).double()
        expected = _clipped_normal_std(std, 0.5)
        assert abs(noise.std().item() - expected) < 0.02 * expected
        assert abs(noise.mean().item()) < 3 * expected / math.sqrt(noise.numel())


def _clipped_poisson_moments(rate: float, photons: float) -> tuple[float, float]:
    """Exact mean and variance of min(Poisson(rate) / photons, 1)."""
    mean = second = 0.0
    for count in range(int(rate + 20 * math.sqrt(rate) + 30)):
        probability = math.exp(count * math.log(rate) - rate - math.lgamma(count + 1))
        value = min(count / photons, 1.0)
        mean += probability * value
        second += probability * value**2
    return mean, second - mean**2


@pytest.mark.parametrize("family", FAMILIES)
def test_shot_noise_is_poisson_with_variance_x_over_c(family):
    level = 0.3
    images = torch.full((4, 3, 64, 64), level)
    for severity, photons in enumerate(SEVERITY_PARAMETERS[family]["shot_noise"], start=1):
        noisy = corrupt(images, "shot_noise", severity, family=family, generator=generator(1))
        counts = noisy.double() * photons
        # Every value is a photon count divided by c.
        assert torch.allclose(counts, counts.round(), atol=1e-4)
        mean, variance = _clipped_poisson_moments(level * photons, photons)
        if family != "imagenet":  # hardly any clipping there: the plain Poisson variance
            assert variance == pytest.approx(level / photons, rel=1e-3)
        assert abs(noisy.double().mean().item() - mean) < 4 * math.sqrt(variance / counts.numel())
        assert noisy.double().var().item() == pytest.approx(variance, rel=0.03)


@pytest.mark.parametrize("family", FAMILIES)
def test_impulse_noise_replaces_each_element_with_the_table_probability(family):
    grey = torch.full((8, 3, 64, 64), 0.5)
    total = grey.numel()
    for severity, amount in enumerate(SEVERITY_PARAMETERS[family]["impulse_noise"], start=1):
        noisy = corrupt(grey, "impulse_noise", severity, family=family, generator=generator(2))
        salt = (noisy == 1).double().mean().item()
        pepper = (noisy == 0).double().mean().item()
        assert bool(((noisy == 0) | (noisy == 1) | (noisy == 0.5)).all())
        tolerance = 4 * math.sqrt(amount / 2 / total)
        assert abs(salt - amount / 2) < tolerance
        assert abs(pepper - amount / 2) < tolerance
        # Channels are hit independently (skimage works on the (H, W, C) array element-wise):
        # a pixel has all three channels replaced with probability amount^3, not amount.
        all_channels = ((noisy != 0.5).all(dim=1)).double().mean().item()
        assert all_channels < amount**3 + 5 * math.sqrt(amount**3 / (total / 3)) + 1e-6


# --------------------------------------------------------------------------- kernels


def test_every_blur_kernel_sums_to_one():
    for family in FAMILIES:
        parameters = SEVERITY_PARAMETERS[family]
        for radius, alias_sigma in parameters["defocus_blur"]:
            kernel = defocus_kernel(radius, alias_sigma)
            assert kernel.shape[0] % 2 == 1 and kernel.shape[0] == kernel.shape[1]
            assert kernel.sum().item() == pytest.approx(1.0, abs=1e-12)
            assert torch.allclose(kernel, kernel.flip(0), rtol=0, atol=1e-16)
            assert torch.allclose(kernel, kernel.T, rtol=0, atol=1e-16)
        for sigma, _, _ in parameters["glass_blur"]:
            assert gaussian_kernel1d(sigma).sum().item() == pytest.approx(1.0, abs=1e-12)
        for radius, sigma in parameters["motion_blur"]:
            weights = motion_blur_kernel(radius, sigma)
            assert weights.numel() == 2 * radius + 1
            assert weights.sum().item() == pytest.approx(1.0, abs=1e-12)
            assert bool((weights[1:] <= weights[:-1]).all())


def test_defocus_kernel_by_hand_for_radius_one():
    # Radius 1: the disk is a plus of 5 pixels, 1/5 each; the 3x3 anti-aliasing Gaussian has
    # weights (e, 1, e) / (1 + 2e) with e = exp(-1 / (2 sigma^2)).
    sigma = 0.2
    e = math.exp(-1 / (2 * sigma**2))
    g0, g1 = e / (1 + 2 * e), 1 / (1 + 2 * e)
    kernel = defocus_kernel(1, sigma)
    assert kernel.shape == (5, 5)
    assert kernel[2, 2].item() == pytest.approx((g1 * g1 + 4 * g0 * g1) / 5, rel=1e-12)
    assert kernel[2, 3].item() == pytest.approx((g1 * g1 + g0 * g1 + 2 * g0 * g0) / 5, rel=1e-12)
    assert kernel[2, 4].item() == pytest.approx(g0 * g1 / 5, rel=1e-12)
    assert kernel[3, 3].item() == pytest.approx((2 * g0 * g1 + g0 * g0) / 5, rel=1e-12)
    assert kernel[4, 4].item() == 0.0


def test_defocus_kernel_matches_an_independent_scipy_build():
    for radius, alias_sigma in [(0.5, 0.6), (2.5, 0.01), (3, 0.1), (8, 0.5), (10, 0.5)]:
        half = 8 if radius <= 8 else radius
        size = 3 if radius <= 8 else 5
        grid = np.arange(-half, half + 1)
        disk = (grid[:, None] ** 2 + grid[None, :] ** 2 <= radius**2).astype(np.float64)
        taps = np.arange(size) - size // 2
        alias = np.exp(-(taps**2) / (2 * alias_sigma**2))
        # scipy's "mirror" mode is OpenCV's BORDER_REFLECT_101.
        expected = ndimage.correlate(disk / disk.sum(), np.outer(alias, alias), mode="mirror")
        expected /= expected.sum()
        kernel = defocus_kernel(radius, alias_sigma).numpy()
        k = kernel.shape[0] // 2
        centred = expected[half - k : half + k + 1, half - k : half + k + 1]
        assert np.abs(centred - kernel).max() < 1e-12
        assert expected.sum() - centred.sum() < 1e-11  # nothing but negligible tails cropped


# --------------------------------------------------------------------------- blurs


def test_a_bright_pixel_under_defocus_gives_the_kernel():
    image = torch.zeros(1, 1, 32, 32)
    image[0, 0, 16, 16] = 1.0
    blurred = corrupt(image, "defocus_blur", 4, family="cifar")
    kernel = defocus_kernel(1, 0.2).float()
    assert torch.allclose(blurred[0, 0, 14:19, 14:19], kernel, atol=1e-7)
    assert blurred[0, 0].sum().item() == pytest.approx(1.0, abs=1e-5)
    # uint8 stores the truncation of 255 y (np.uint8), not its rounding.
    bright = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    bright[0, 0, 16, 16] = 255
    stored = corrupt(bright, "defocus_blur", 3, family="cifar")  # radius 0.5, sigma 0.6
    kernel = defocus_kernel(0.5, 0.6).float()
    scaled = kernel * 255
    assert bool(((scaled - scaled.floor()) > 0.5).any())  # some entries would round up
    assert torch.equal(stored[0, 0, 15:18, 15:18], torch.floor(scaled + 1e-3).to(torch.uint8))


def test_defocus_border_is_reflect_101_even_when_the_kernel_is_wider_than_the_image():
    # reflect-101 of [a b c] continues ... b c b a [a b c] ... as c b | a b c | b a b c.
    indices = filters.border_indices(3, 5, 5, "reflect101", "cpu")
    assert indices.tolist() == [1, 0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1]
    assert filters.border_indices(3, 2, 2, "nearest", "cpu").tolist() == [0, 0, 0, 1, 2, 2, 2]
    images = structured_images(2, 6)
    for family, severity in (("cifar", 3), ("imagenet", 5)):  # 3x3 and 25x25 kernels
        blurred = corrupt(images.double(), "defocus_blur", severity, family=family)
        kernel = defocus_kernel(*SEVERITY_PARAMETERS[family]["defocus_blur"][severity - 1])
        expected = np.stack(
            [
                [ndimage.correlate(plane, kernel.numpy(), mode="mirror") for plane in image]
                for image in images.double().numpy()
            ]
        )
        assert np.abs(blurred.numpy() - expected).max() < 1e-6


def test_glass_blur_gaussian_is_skimage_nearest_truncate_4():
    images = structured_images(2, 20).double()
    for sigma in (0.25, 0.6, 0.9, 1.5):
        ours = filters.skimage_gaussian(images, sigma).numpy()
        expected = ndimage.gaussian_filter(
            images.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0
        )
        assert np.abs(ours - expected).max() < 1e-6
    assert gaussian_kernel1d(0.1).tolist() == [1.0]  # radius int(0.4 + 0.5) = 0: no blur


def _reference_glass_loop(image: np.ndarray, max_shift: int, offsets: np.ndarray) -> np.ndarray:
    """The reference's sequential loop on an (H, W, C) array, numpy view semantics included."""
    x = image.copy()
    h, w = x.shape[:2]
    for row in range(h - max_shift, max_shift, -1):
        for col in range(w - max_shift, max_shift, -1):
            dx, dy = offsets[row - max_shift - 1, col - max_shift - 1]
            x[row, col], x[row + dy, col + dx] = x[row + dy, col + dx], x[row, col]
    return x


@pytest.mark.parametrize("max_shift", [1, 2, 3, 4])
def test_glass_shuffle_equals_the_sequential_reference_loop(max_shift):
    side = 13
    levels = torch.randint(0, 256, (3, 3, side, side), generator=generator(max_shift)).double()
    visited = side - 2 * max_shift
    offsets = torch.randint(
        -max_shift, max_shift, (3, visited, visited, 2), generator=generator(10 + max_shift)
    )
    shuffled = glass_shuffle(levels, max_shift, offsets=offsets)
    for index in range(3):
        expected = _reference_glass_loop(
            levels[index].permute(1, 2, 0).numpy(), max_shift, offsets[index].numpy()
        )
        assert np.array_equal(shuffled[index].permute(1, 2, 0).numpy(), expected)


def test_glass_shuffle_with_shift_one_copies_from_up_or_left():
    # With max shift 1 each visited pixel copies the pixel at (dy, dx) in {-1, 0}^2 of the
    # input (never one already rewritten), so values are duplicated, not swapped.
    side = 10
    levels = torch.arange(side * side, dtype=torch.float64).reshape(1, 1, side, side)
    offsets = torch.randint(-1, 1, (1, side - 2, side - 2, 2), generator=generator(5))
    shuffled = glass_shuffle(levels, 1, offsets=offsets)[0, 0]
    for row in range(side):
        for col in range(side):
            if row >= 2 and col >= 2:
                dx, dy = offsets[0, row - 2, col - 2].tolist()
                assert shuffled[row, col] == levels[0, 0, row + dy, col + dx]
            else:
                assert shuffled[row, col] == levels[0, 0, row, col]
    assert shuffled.unique().numel() < side * side


def test_glass_blur_draws_independent_shuffles_per_image():
    image = structured_images(1, 32)
    pair = image.expand(2, -1, -1, -1)
    blurred = corrupt(pair, "glass_blur", 5, generator=generator())
    assert not torch.equal(blurred[0], blurred[1])


def test_motion_blur_of_an_impulse_at_angle_zero_is_a_line_of_gaussian_weights():
    radius, sigma = 6, 2.0
    weights = motion_blur_kernel(radius, sigma)
    image = torch.zeros(1, 1, 32, 32, dtype=torch.float64)
    image[0, 0, 20, 20] = 1.0
    line = motion_blur_at(image, radius, sigma, torch.tensor([0.0]))[0, 0]
    # Pixel x samples x + j, so the impulse at x = 20 lands on x = 20 - j with weight k_j.
    assert torch.allclose(line[20, 8:21].flip(0), weights)
    assert line[20].sum().item() == pytest.approx(1.0)
    assert line.sum().item() == pytest.approx(1.0)
    # 90 degrees: a vertical line above the impulse.
    column = motion_blur_at(image, radius, sigma, torch.tensor([90.0]))[0, 0]
    assert torch.allclose(column[8:21, 20].flip(0), weights)
    assert column[:, 20].sum().item() == pytest.approx(1.0)


def test_motion_blur_offsets_round_like_imagemagick_and_edges_repeat():
    rows, cols = motion_blur_offsets(4, torch.tensor([45.0, 30.0, -45.0]))
    # j sin 45 = 0, .707, 1.414, 2.121 -> 0, 1, 1, 2 (ceil(v - 0.5): halves round down).
    assert rows.tolist() == [[0, 1, 1, 2], [0, 0, 1, 1], [0, -1, -1, -2]]
    assert cols.tolist() == [[0, 1, 1, 2], [0, 1, 2, 3], [0, 1, 1, 2]]
    # An image bright only in its last column: every tap of the last column clamps onto it.
    image = torch.zeros(1, 1, 8, 16, dtype=torch.float64)
    image[..., -1] = 1.0
    blurred = motion_blur_at(image, 3, 1.5, torch.tensor([0.0]))[0, 0]
    weights = motion_blur_kernel(3, 1.5)
    tail_sums = weights.flip(0).cumsum(0).flip(0)  # sum of k_i for i >= j
    assert torch.allclose(blurred[:, -1], torch.ones(8, dtype=torch.float64))
    for j in range(1, 7):
        assert torch.allclose(blurred[:, -1 - j], tail_sums[j].expand(8))


def test_motion_blur_angles_are_uniform_in_plus_minus_45_degrees():
    # ImageNet severity 5 (41 taps, sigma 15): a long, nearly flat line whose centroid gives
    # the angle to within a degree despite the rounding of the offsets.
    n = 400
    impulses = torch.zeros(n, 1, 72, 72)
    impulses[:, :, 36, 60] = 1.0
    blurred = corrupt(impulses, "motion_blur", 5, family="imagenet", generator=generator(3))
    coords = torch.arange(72, dtype=torch.float32)
    # The response lies along -(cos a, sin a) from the impulse.
    cy = (blurred[:, 0].sum(2) * (coords - 36)).sum(1)
    cx = (blurred[:, 0].sum(1) * (coords - 60)).sum(1)
    angles = torch.rad2deg(torch.atan2(-cy, -cx))
    assert angles.min().item() > -46.5 and angles.max().item() < 46.5
    assert angles.min().item() < -43 and angles.max().item() > 43
    assert abs(angles.mean().item()) < 4  # std of the mean: 26 / sqrt(400) = 1.3
    assert (angles.abs() < 22.5).double().mean().item() == pytest.approx(0.5, abs=0.08)


def _scipy_clipped_zoom(plane: np.ndarray, factor: float) -> np.ndarray:
    """The reference's clipped_zoom on one (H, W) plane, with scipy.ndimage.zoom order 1."""
    h, w = plane.shape
    crop_h, crop_w = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    zoomed = ndimage.zoom(plane[top : top + crop_h, left : left + crop_w], factor, order=1)
    trim_top, trim_left = (zoomed.shape[0] - h) // 2, (zoomed.shape[1] - w) // 2
    return zoomed[trim_top : trim_top + h, trim_left : trim_left + w]


@pytest.mark.parametrize("side", [30, 32])
def test_zoom_blur_matches_scipy_zoom_of_centred_crops(side):
    images = structured_images(1, side, channels=2).double()
    for severity in (1, 5):
        factors = zoom_factors(*SEVERITY_PARAMETERS["cifar"]["zoom_blur"][severity - 1])
        ours = corrupt(images, "zoom_blur", severity, family="cifar")[0].numpy()
        for channel in range(2):
            plane = images[0, channel].numpy()
            zooms = [_scipy_clipped_zoom(plane, factor) for factor in factors]
            expected = (plane + sum(zooms)) / (len(factors) + 1)
            assert np.abs(ours[channel] - expected).max() < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_a_constant_image_stays_constant_under_every_blur(family):
    # Every grey level at once: the uint8 truncation must not lose a level to round-off.
    levels = torch.arange(256, dtype=torch.uint8)[:, None, None, None]
    images = levels.expand(256, 3, 20, 20).contiguous()
    for corruption in BLURS:
        for severity in (1, 3, 5):
            out = corrupt(images, corruption, severity, family=family, generator=generator())
            assert torch.equal(out, images), (corruption, severity)
    floats = torch.full((2, 1, 20, 20), 0.37)
    for corruption in BLURS:
        out = corrupt(floats, corruption, 5, family=family, generator=generator())
        if corruption == "glass_blur":  # stored once as uint8 by the reference
            expected = torch.full_like(floats, math.floor(0.37 * 255) / 255)
        else:
            expected = floats
        assert torch.allclose(out, expected, atol=1e-6), corruption


#: Neighbouring severities the reference tables make (almost) equally strong: CIFAR motion blur
#: 3 -> 4 goes from radius 6 to 8 at sigma 2, and the extra taps weigh exp(-13^2 / 8) < 1e-9.
NEAR_TIES = {("cifar", "motion_blur", 3)}


@pytest.mark.parametrize("family", FAMILIES)
def test_corruption_grows_with_severity(family):
    images = structured_images(4, SIDE[family])
    for corruption in PAPER:
        changes = []
        for severity in range(1, 6):
            change = 0.0
            for seed in range(3):
                out = corrupt(images, corruption, severity, generator=generator(seed))
                change += (out - images).abs().mean().item()
            changes.append(change / 3)
        if corruption == "glass_blur":
            # The glass tables trade sigma, shift and iterations against each other, so the mean
            # change is not monotone (e.g. Tiny ImageNet 3 -> 4: two passes of shift 1 move
            # more than one of shift 2); only the ends are ordered.
            assert changes[4] > 1.5 * changes[0], changes
            continue
        for severity, (weaker, stronger) in enumerate(itertools.pairwise(changes), start=1):
            if (family, corruption, severity) in NEAR_TIES:
                assert stronger == pytest.approx(weaker, rel=1e-3)
            else:
                assert weaker < stronger, (corruption, changes)


# --------------------------------------------------------------------------- contracts


@pytest.mark.parametrize("corruption", PAPER)
def test_same_seed_same_output_and_other_seeds_differ(corruption):
    images = (structured_images(3, 32) * 255).to(torch.uint8)
    first = corrupt(images, corruption, 3, generator=generator(7))
    again = corrupt(images, corruption, 3, generator=generator(7))
    assert torch.equal(first, again)
    other = corrupt(images, corruption, 3, generator=generator(8))
    assert torch.equal(first, other) == (corruption not in RANDOM_CORRUPTIONS)


def test_output_does_not_depend_on_the_thread_count():
    images = (structured_images(4, 32) * 255).to(torch.uint8)
    threads = torch.get_num_threads()
    outputs = {}
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            outputs[count] = [
                corrupt(images, corruption, 5, generator=generator(1)) for corruption in PAPER
            ]
    finally:
        torch.set_num_threads(threads)
    for single, double in zip(outputs[1], outputs[2], strict=True):
        assert torch.equal(single, double)


def test_chunked_batches_are_deterministic(monkeypatch):
    monkeypatch.setattr(apply, "CHUNK_ELEMENTS", 3 * 16 * 16 * 3)  # 3 images per chunk
    images = (structured_images(8, 16) * 255).to(torch.uint8)
    for corruption in PAPER:
        first = corrupt(images, corruption, 4, generator=generator(2))
        assert first.shape == images.shape
        assert torch.equal(first, corrupt(images, corruption, 4, generator=generator(2)))
        if corruption in BLURS and corruption not in RANDOM_CORRUPTIONS:
            assert torch.equal(first[5], corrupt(images[5:6], corruption, 4)[0])


@pytest.mark.parametrize("corruption", PAPER)
def test_uint8_output_is_the_float_output_quantised_as_the_reference_stores_it(corruption):
    images = (structured_images(3, 32) * 255).to(torch.uint8)
    stored = corrupt(images, corruption, 4, generator=generator(4))
    exact = corrupt(images.float() / 255, corruption, 4, generator=generator(4))
    assert stored.dtype == torch.uint8 and exact.dtype == torch.float32
    assert stored.shape == exact.shape == images.shape
    assert float(exact.min()) >= 0 and float(exact.max()) <= 1
    # np.uint8 truncates; motion blur comes back from ImageMagick as 8-bit PNG, rounded.
    slack = 0.5 if corruption == "motion_blur" else 1e-3
    assert torch.equal(stored, torch.floor(exact * 255 + slack).to(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_floating_dtypes_are_kept(dtype):
    images = structured_images(2, 32).to(dtype)
    for corruption in PAPER:
        out = corrupt(images, corruption, 2, generator=generator())
        assert out.dtype == dtype and out.shape == images.shape and out.device == images.device


@pytest.mark.parametrize("corruption", ["defocus_blur", "glass_blur", "motion_blur", "zoom_blur"])
def test_grey_images_behave_as_the_same_image_converted_to_rgb(corruption):
    grey = (structured_images(3, 28, channels=1) * 255).to(torch.uint8)
    rgb = grey.expand(-1, 3, -1, -1).contiguous()
    grey_out = corrupt(grey, corruption, 5, generator=generator(6))
    rgb_out = corrupt(rgb, corruption, 5, generator=generator(6))
    assert grey_out.shape == grey.shape
    assert torch.equal(rgb_out, grey_out.expand(-1, 3, -1, -1))


def test_grey_noise_keeps_one_channel():
    grey = structured_images(2, 28, channels=1)
    for corruption in ("gaussian_noise", "shot_noise", "impulse_noise"):
        out = corrupt(grey, corruption, 3, generator=generator())
        assert out.shape == grey.shape and not torch.equal(out, grey)


def test_empty_batch_returns_an_empty_batch():
    empty = torch.zeros(0, 3, 32, 32, dtype=torch.uint8)
    for corruption in PAPER:
        out = corrupt(empty, corruption, 1)
        assert out.shape == empty.shape and out.dtype == torch.uint8


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((torch.zeros(3, 32, 32), "gaussian_noise", 1), "4 dimensional"),
        ((torch.zeros(1, 3, 8, 8, dtype=torch.int32), "gaussian_noise", 1), "uint8 or floating"),
        ((torch.full((1, 3, 8, 8), 2.0), "gaussian_noise", 1), r"values in \[0, 1\]"),
        (
            (torch.zeros(1, 3, 8, 8), "gaussian_noise", 0),
            "severity should be an integer >= 1 and <= 5, but got 0",
        ),
        (
            (torch.zeros(1, 3, 8, 8), "gaussian_noise", 6),
            "severity should be an integer >= 1 and <= 5, but got 6",
        ),
        (
            (torch.zeros(1, 3, 8, 8), "gaussian_noise", 2.0),
            "severity should be an integer, but got 2.0",
        ),
        (
            (torch.zeros(1, 3, 8, 8), "gaussian_noise", True),
            "severity should be an integer, but got True",
        ),
        ((torch.zeros(1, 3, 8, 8), "fogg", 1), "corruption should be one of .*saturate"),
    ],
)
def test_bad_inputs_raise_clear_errors(arguments, message):
    with pytest.raises(ValueError, match=message):
        corrupt(*arguments)


def test_images_that_are_not_a_tensor_raise_a_type_error():
    with pytest.raises(TypeError, match=r"images should be a torch.Tensor \(N, C, H, W\)"):
        corrupt([[0.0]], "gaussian_noise", 1)


def test_unknown_family_lists_the_families():
    with pytest.raises(ValueError, match="family should be one of None, 'cifar', 'tiny-imagenet'"):
        corrupt(torch.zeros(1, 3, 8, 8), "zoom_blur", 1, family="mnist")
    with pytest.raises(ValueError, match="height should be an integer >= 1, but got 0"):
        family_for_size(0, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_outputs_stay_on_the_device_are_repeatable_and_keep_flat_images_flat():
    images = (structured_images(8, 64) * 255).to(torch.uint8).cuda()
    flat = torch.full((4, 3, 64, 64), 200, dtype=torch.uint8, device="cuda")
    for corruption in PAPER:
        first = corrupt(images, corruption, 3, generator=torch.Generator("cuda").manual_seed(0))
        again = corrupt(images, corruption, 3, generator=torch.Generator("cuda").manual_seed(0))
        assert first.device.type == "cuda" and torch.equal(first, again)
        cpu = corrupt(images.cpu(), corruption, 3, generator=generator())
        if corruption not in RANDOM_CORRUPTIONS:  # deterministic: CPU and CUDA agree
            assert (first.cpu().int() - cpu.int()).abs().max().item() <= 1
        if corruption in BLURS:
            flat_out = corrupt(flat, corruption, 5, generator=torch.Generator("cuda"))
            assert torch.equal(flat_out, flat)


def test_corruption_names_reads_sets_and_names_in_the_canonical_order():
    assert corruption_names("paper") == PAPER
    assert corruption_names("all") == CORRUPTIONS
    assert corruption_names("snow,paper") == (*PAPER, "snow")
    assert corruption_names(["saturate", "gaussian_noise", "saturate"]) == (
        "gaussian_noise",
        "saturate",
    )
    assert corruption_names("benchmark,extra") == CORRUPTIONS
    with pytest.raises(ValueError, match="unknown corruption 'sno'"):
        corruption_names("paper,sno")
    with pytest.raises(ValueError, match="unknown corruption ''"):
        corruption_names("")
    with pytest.raises(ValueError, match="should be a set name"):
        corruption_names(3)
