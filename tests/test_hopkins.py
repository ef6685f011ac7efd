"""Tests of `dropcluster.hopkins`: Spatial Hopkins (paper eqs. 3-5), classic Hopkins (eq. 2).

Thresholds on random data were measured with the fixed generators used here and carry a margin
of several standard deviations of the statistic, so they fail on a real change of behaviour, not
on noise.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import require_fashion_mnist

from dropcluster.data.fashion_mnist import load_fashion_mnist
from dropcluster.hopkins import (
    _hopkins_from_samples,
    _sample_sites,
    _sample_spatial_locations,
    _spatial_hopkins_at,
    default_n_points,
    hopkins,
    spatial_hopkins,
)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, C, H, W) -> same shape, separable Gaussian blur with reflected borders."""
    radius = int(3 * sigma)
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    n_channels = x.shape[1]
    rows = kernel.view(1, 1, 1, -1).expand(n_channels, 1, 1, -1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), rows, groups=n_channels)
    columns = kernel.view(1, 1, -1, 1).expand(n_channels, 1, -1, 1)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), columns, groups=n_channels)


def shuffle_pixels(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Permute the pixels of every map independently: same values, no spatial structure."""
    n_images, n_channels, height, width = x.shape
    keys = torch.rand(n_images, n_channels, height * width, generator=seeded(seed))
    flat = x.reshape(n_images, n_channels, height * width)
    return flat.gather(2, keys.argsort(dim=-1)).view_as(x)


def spatial_hopkins_loop(image: torch.Tensor, centres, others) -> float:
    """Eqs. 3-5 for one (H, W) image, written as in the paper, one point at a time."""
    sum_w = sum_z = 0.0
    for (row, col), (q, r) in zip(centres, others, strict=True):
        neighbours = [
            image[row + d_row, col + d_col].item()
            for d_row in (-1, 0, 1)
            for d_col in (-1, 0, 1)
            if (d_row, d_col) != (0, 0)
        ]
        sum_w += sum(abs(image[row, col].item() - value) for value in neighbours) / 8
        sum_z += sum(abs(image[q, r].item() - value) for value in neighbours) / 8
    return 0.5 if sum_z + sum_w == 0 else sum_z / (sum_z + sum_w)


# ---------------------------------------------------------------------------------------------
# Spatial Hopkins: values on known fields


def test_white_noise_is_near_one_half():
    # With the default m (90 points on 32x32) one image's S has a standard deviation of about
    # 0.012, so 0.06 is 5 sigma; the mean of 256 images has sigma ~0.001 and an expected bias
    # of only -1/(2HW) (q can be one of the neighbours), so 0.005 is a tight but safe bound.
    for noise in (
        torch.rand(64, 4, 32, 32, generator=seeded(1)),
        torch.randn(64, 4, 32, 32, generator=seeded(2)),
    ):
        statistic = spatial_hopkins(noise, generator=seeded(0))
        assert statistic.shape == (64, 4)
        assert (statistic - 0.5).abs().max() < 0.06
        assert abs(statistic.mean().item() - 0.5) < 0.005


def test_smooth_fields_are_near_one():
    # Measured: one-period sinusoids on 64x64 give S >= 0.93; noise blurred with sigma=4 on
    # 32x32 gives a mean of 0.865 (the same for every noise seed tried) and a minimum over 64
    # images of 0.80-0.83.
    size = 64
    rows, cols = torch.meshgrid(
        torch.arange(size, dtype=torch.float32),
        torch.arange(size, dtype=torch.float32),
        indexing="ij",
    )
    phase = torch.rand(16, 4, 1, 1, generator=seeded(3)) * 2 * math.pi
    sinusoids = torch.sin(2 * math.pi * cols / size + phase) + torch.sin(
        2 * math.pi * rows / size + 2 * phase
    )
    assert spatial_hopkins(sinusoids, generator=seeded(0)).min() > 0.9

    blurred = gaussian_blur(torch.randn(16, 4, 32, 32, generator=seeded(4)), sigma=4.0)
    statistic = spatial_hopkins(blurred, generator=seeded(0))
    assert statistic.min() > 0.75
    assert statistic.mean() > 0.84


def test_statistic_grows_with_smoothness():
    noise = torch.randn(16, 4, 32, 32, generator=seeded(5))
    means = [
        spatial_hopkins(gaussian_blur(noise, sigma), generator=seeded(0)).mean().item()
        for sigma in (1.0, 2.0, 4.0, 8.0)
    ]
    assert means == sorted(means)
    assert means[0] > 0.6  # sigma=1 is already clearly structured (measured 0.65)


def test_fashion_mnist_images_are_structured():
    require_fashion_mnist()
    images, _ = load_fashion_mnist("test")
    images = images[:128]  # uint8, as loaded: integers are converted to float32
    statistic = spatial_hopkins(images, generator=seeded(0))
    # Measured: mean 0.75, minimum 0.56. Large flat backgrounds pull raw images below
    # smooth synthetic fields, but every image stays above the 0.5 of no structure.
    assert statistic.min() > 0.5
    assert statistic.mean() > 0.7
    shuffled = spatial_hopkins(shuffle_pixels(images, seed=1), generator=seeded(0))
    assert abs(shuffled.mean().item() - 0.5) < 0.02  # same pixels, no structure (0.499)


def test_first_conv_activations_are_structured(fashion_mnist_activations):
    assert fashion_mnist_activations.shape == (128, 16, 28, 28)
    assert fashion_mnist_activations.dtype == torch.float32
    per_channel = spatial_hopkins(fashion_mnist_activations, generator=seeded(0), reduction="mean")
    assert per_channel.shape == (16,)
    # Measured: 0.52-0.81 per channel, mean 0.66; 13 of 16 channels above 0.55.
    assert per_channel.min() > 0.5
    assert int((per_channel > 0.55).sum()) >= 12
    assert per_channel.mean() > 0.62
    shuffled = spatial_hopkins(
        shuffle_pixels(fashion_mnist_activations, seed=1), generator=seeded(0), reduction="mean"
    )
    assert (shuffled - 0.5).abs().max() < 0.05  # measured within 0.013


# ---------------------------------------------------------------------------------------------
# Spatial Hopkins: exact values and definitions


def test_constant_map_is_exactly_one_half():
    constants = torch.tensor([0.0, 1.0, -3.5, 1e6]).view(1, 4, 1, 1).expand(3, 4, 9, 11)
    for n_points in (1, 7, 63):
        statistic = spatial_hopkins(constants, n_points, generator=seeded(0))
        assert torch.equal(statistic, torch.full((3, 4), 0.5))


def test_constant_map_beside_structured_maps_is_exactly_one_half():
    maps = torch.randn(8, 3, 16, 16, generator=seeded(6))
    maps[:, 1] = 0.0  # a dead ReLU channel
    statistic = spatial_hopkins(maps, generator=seeded(0))
    assert torch.equal(statistic[:, 1], torch.full((8,), 0.5))
    assert not torch.equal(statistic[:, 0], torch.full((8,), 0.5))


def test_flat_around_every_drawn_point_is_one_half():
    image = torch.zeros(1, 5 * 5)
    image[0, 0] = 1.0  # pixel (0, 0), not a neighbour of (2, 2)
    centre = torch.tensor([[2 * 5 + 2]])
    other = torch.tensor([[4 * 5 + 4]])
    assert _spatial_hopkins_at(image, 5, centre, other).item() == 0.5
    # the same centre, with (q, r) on the bright pixel: z = 1, w = 0, S = 1
    assert _spatial_hopkins_at(image, 5, centre, torch.tensor([[0]])).item() == 1.0


def test_hand_worked_three_by_three():
    # Image 0 1 2 / 3 4 5 / 6 7 8: the only interior pixel is the centre (value 4), so
    # w = (4+3+2+1+1+2+3+4)/8 = 5/2. (q, r) is any of the 9 pixels; with value v,
    # z = mean |v - neighbour|: v=0 or 8 -> 4, v=1 or 7 -> 13/4, v=2 or 6 -> 11/4,
    # v=3, 4, 5 -> 5/2, hence S = z / (z + 5/2) below, with probabilities 2/9, 2/9, 2/9, 3/9.
    expected = {
        Fraction(8, 13): Fraction(2, 9),
        Fraction(13, 23): Fraction(2, 9),
        Fraction(11, 21): Fraction(2, 9),
        Fraction(1, 2): Fraction(3, 9),
    }
    image = torch.arange(9, dtype=torch.float64).view(1, 1, 3, 3)
    n_images = 9000
    statistic = spatial_hopkins(image.expand(n_images, 1, 3, 3), 1, generator=seeded(7))
    values = torch.tensor([float(value) for value in expected], dtype=torch.float32)
    matches = statistic.view(-1, 1) == values  # float64 arithmetic: exact after rounding
    assert bool(matches.any(dim=1).all())
    # (q, r) is drawn from the whole image: drawn from the interior only, every S would be 1/2.
    frequencies = matches.double().mean(dim=0)
    for frequency, probability in zip(frequencies.tolist(), expected.values(), strict=True):
        assert abs(frequency - float(probability)) < 0.03  # sigma of a frequency: 0.005


def test_vectorised_statistic_matches_paper_loop():
    maps = torch.randn(6, 5, 7, generator=seeded(8))
    centre_index, other_index = _sample_spatial_locations(6, 5, 7, 4, seeded(9), maps.device)
    statistic = _spatial_hopkins_at(maps.view(6, 35), 7, centre_index, other_index)
    for image, centres, others, value in zip(
        maps, centre_index, other_index, statistic, strict=True
    ):
        centre_rc = [divmod(int(index), 7) for index in centres]
        other_rc = [divmod(int(index), 7) for index in others]
        assert value.item() == pytest.approx(spatial_hopkins_loop(image, centre_rc, other_rc))


def test_sampled_locations_cover_interior_and_whole_image():
    height, width = 5, 6
    centre_index, other_index = _sample_spatial_locations(
        400, height, width, 20, seeded(10), torch.device("cpu")
    )
    interior = {row * width + col for row in range(1, height - 1) for col in range(1, width - 1)}
    assert set(centre_index.unique().tolist()) == interior
    assert set(other_index.unique().tolist()) == set(range(height * width))
    # uniform: each of the 12 interior pixels gets 1/12 of the 8000 draws (sigma ~ 25)
    counts = centre_index.flatten().bincount(minlength=height * width)[sorted(interior)]
    assert (counts - 8000 / 12).abs().max() < 150


# ---------------------------------------------------------------------------------------------
# Spatial Hopkins: randomness, reductions, dtypes


def test_same_generator_seed_gives_identical_result():
    maps = torch.randn(4, 3, 12, 12, generator=seeded(11))
    first = spatial_hopkins(maps, generator=seeded(42))
    assert torch.equal(first, spatial_hopkins(maps, generator=seeded(42)))
    assert not torch.equal(first, spatial_hopkins(maps, generator=seeded(43)))


def test_global_rng_is_used_without_generator():
    maps = torch.randn(4, 3, 12, 12, generator=seeded(12))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        first = spatial_hopkins(maps)
        torch.manual_seed(5)
        second = spatial_hopkins(maps)
    assert torch.equal(first, second)


def test_mean_reduction_is_per_channel_batch_mean():
    maps = torch.randn(5, 3, 10, 10, generator=seeded(13))
    per_image = spatial_hopkins(maps, generator=seeded(0))
    per_channel = spatial_hopkins(maps, generator=seeded(0), reduction="mean")
    assert per_channel.shape == (3,)
    torch.testing.assert_close(per_channel, per_image.mean(dim=0))


def test_default_n_points_is_ten_percent_of_interior():
    assert default_n_points(26 * 26) == 67
    assert default_n_points(9) == 1
    assert default_n_points(1) == 1
    maps = torch.randn(2, 2, 28, 28, generator=seeded(14))
    torch.testing.assert_close(
        spatial_hopkins(maps, generator=seeded(0)),
        spatial_hopkins(maps, 67, generator=seeded(0)),
        rtol=0,
        atol=0,
    )


def test_output_is_float32_for_every_input_dtype():
    maps = torch.randint(0, 256, (3, 2, 8, 8), generator=seeded(15), dtype=torch.uint8)
    reference = spatial_hopkins(maps.to(torch.float32), generator=seeded(0))
    for dtype in (torch.uint8, torch.int64, torch.float16, torch.float64):
        statistic = spatial_hopkins(maps.to(dtype), generator=seeded(0))
        assert statistic.dtype == torch.float32
        # uint8 differences must not wrap around: integers give the float32 result
        torch.testing.assert_close(statistic, reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_input_with_cpu_generator_matches_cpu():
    maps = torch.randn(4, 3, 16, 16, generator=seeded(16))
    on_cpu = spatial_hopkins(maps, generator=seeded(0))
    on_gpu = spatial_hopkins(maps.cuda(), generator=seeded(0))
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu)


@pytest.mark.parametrize(
    ("x", "kwargs", "error", "match"),
    [
        ([[0.0]], {}, TypeError, "torch.Tensor"),
        (torch.zeros(8, 8), {}, ValueError, "3 or 4 or 5 dimensional"),
        (torch.zeros(1, 1, 3, 3, 3, 3), {}, ValueError, "3 or 4 or 5 dimensional"),
        (torch.zeros(0, 1, 8, 8), {}, ValueError, "N >= 1 and C >= 1"),
        (torch.zeros(1, 0, 8, 8), {}, ValueError, "N >= 1 and C >= 1"),
        (torch.zeros(1, 1, 2, 8), {}, ValueError, "at least 3x3"),
        (torch.zeros(1, 1, 8, 8, dtype=torch.complex64), {}, ValueError, "real numbers"),
        (torch.zeros(1, 1, 8, 8, dtype=torch.bool), {}, ValueError, "real numbers"),
        (torch.full((1, 1, 8, 8), float("nan")), {}, ValueError, "finite"),
        (torch.full((1, 1, 8, 8), float("inf")), {}, ValueError, "finite"),
        (torch.zeros(1, 1, 8, 8), {"n_points": 0}, ValueError, ">= 1 and <= 36, but got 0"),
        (torch.zeros(1, 1, 8, 8), {"n_points": 37}, ValueError, "but got 37"),
        (torch.zeros(1, 1, 8, 8), {"n_points": 2.5}, ValueError, "an integer, but got 2.5"),
        (torch.zeros(1, 1, 8, 8), {"n_points": True}, ValueError, "an integer, but got True"),
        (torch.zeros(1, 1, 8, 8), {"reduction": "sum"}, ValueError, "one of"),
        (torch.zeros(1, 1, 8, 8), {"generator": 0}, TypeError, "torch.Generator"),
    ],
)
def test_spatial_hopkins_rejects_bad_input(x, kwargs, error, match):
    with pytest.raises(error, match=match):
        spatial_hopkins(x, **kwargs)


# ---------------------------------------------------------------------------------------------
# Spatial Hopkins in 1-D and 3-D (our extension: the paper is 2-D)

SIZES_BY_DIMENSION = {1: (256,), 2: (32, 32), 3: (12, 12, 12)}

# The null table of docs/design.md ("Spatial Hopkins"): standard deviation of one map's S on
# white noise with the default m, measured on 20000 maps (uniform, Gaussian noise).
NULL_STANDARD_DEVIATION = {1: (0.0370, 0.0385), 2: (0.0121, 0.0153), 3: (0.0093, 0.0135)}


def gaussian_blur_nd(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, C, *spatial) -> same shape, a Gaussian blur along every spatial axis, reflected."""
    radius = int(3 * sigma)
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).view(1, 1, -1)
    for axis in range(2, x.dim()):
        moved = x.movedim(axis, -1)
        lines = moved.reshape(-1, 1, moved.shape[-1])
        lines = F.conv1d(F.pad(lines, (radius, radius), mode="reflect"), kernel)
        x = lines.view(moved.shape).movedim(-1, axis)
    return x


def shuffle_sites(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Permute the sites of every map of any rank independently: same values, no structure."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    keys = torch.rand(flat.shape, generator=seeded(seed))
    return flat.gather(2, keys.argsort(dim=-1)).view_as(x)


def spatial_hopkins_brute_force(maps: np.ndarray, centres: np.ndarray, others: np.ndarray):
    """Eqs. 3-5 generalised to d dimensions, one map and one site at a time, in NumPy.

    maps: (M, *spatial); centres, others: (M, m) row-major flat site indices. Returns (M,).
    """
    shape = maps.shape[1:]
    steps = [step for step in itertools.product((-1, 0, 1), repeat=len(shape)) if any(step)]
    result = []
    for image, centre_flat, other_flat in zip(maps, centres, others, strict=True):
        sum_w = sum_z = 0.0
        for centre, other in zip(centre_flat, other_flat, strict=True):
            site = np.unravel_index(int(centre), shape)
            assert all(
                1 <= coordinate <= size - 2 for coordinate, size in zip(site, shape, strict=True)
            )
            probe = image[np.unravel_index(int(other), shape)]
            neighbours = [
                image[tuple(c + s for c, s in zip(site, step, strict=True))] for step in steps
            ]
            sum_w += sum(abs(image[site] - value) for value in neighbours) / len(steps)
            sum_z += sum(abs(probe - value) for value in neighbours) / len(steps)
        result.append(0.5 if sum_z + sum_w == 0 else sum_z / (sum_z + sum_w))
    return np.array(result)


@pytest.mark.parametrize("sizes", [(9,), (6, 7), (5, 4, 6)])
@pytest.mark.parametrize("structured", [False, True])
def test_matches_brute_force_on_the_same_sites(sizes, structured):
    maps = torch.randn(3, 2, *sizes, generator=seeded(40), dtype=torch.float64)
    if structured:  # a smooth ramp along every axis plus a little noise, then shuffled or not
        ramp = sum(
            torch.arange(size, dtype=torch.float64).view(
                [size if axis == k else 1 for k in range(len(sizes))]
            )
            for axis, size in enumerate(sizes)
        )
        maps = ramp + 0.1 * maps
    n_points = 4
    statistic = spatial_hopkins(maps, n_points, generator=seeded(41))
    # The same generator state gives the same sites: the sampler is reproduced, not mocked.
    centres, others = _sample_sites(6, sizes, n_points, seeded(41), torch.device("cpu"))
    expected = spatial_hopkins_brute_force(
        maps.reshape(6, *sizes).numpy(), centres.numpy(), others.numpy()
    )
    np.testing.assert_allclose(statistic.view(6).numpy(), expected, rtol=1e-6, atol=0)
    if structured:
        assert statistic.min() > 0.5  # a ramp differs less from its neighbours than at random


def test_two_dimensional_results_are_those_of_the_2d_only_versions():
    # Pinned on version 0.6.0 (2-D only): same draws, same neighbour order, same float32 S.
    maps = torch.randn(2, 3, 9, 11, generator=seeded(31), dtype=torch.float64)
    statistic = spatial_hopkins(maps, 5, generator=seeded(32))
    assert statistic.tolist() == [
        [0.47353869676589966, 0.5194478631019592, 0.42754319310188293],
        [0.5420589447021484, 0.5530625581741333, 0.577185332775116],
    ]


@pytest.mark.parametrize("sizes", [(7,), (4, 5), (4, 3, 5)])
def test_sampled_sites_cover_interior_and_whole_map_in_every_dimension(sizes):
    centres, others = _sample_sites(300, sizes, 20, seeded(42), torch.device("cpu"))
    grid = list(itertools.product(*(range(size) for size in sizes)))
    flat = [int(np.ravel_multi_index(site, sizes)) for site in grid]
    interior = {
        index
        for index, site in zip(flat, grid, strict=True)
        if all(1 <= c <= size - 2 for c, size in zip(site, sizes, strict=True))
    }
    assert set(centres.unique().tolist()) == interior
    assert set(others.unique().tolist()) == set(flat)


def test_hand_worked_chain_of_three():
    # Chain 0 5 1: the interior site is the 5, w = (|5-0| + |5-1|)/2 = 9/2. The probe t is any
    # of the 3 sites: value 0 or 1 -> z = (0 + 1)/2 = 1/2, S = 1/10; value 5 -> z = w, S = 1/2.
    chain = torch.tensor([0.0, 5.0, 1.0], dtype=torch.float64).view(1, 1, 3)
    statistic = spatial_hopkins(chain.expand(6000, 1, 3), 1, generator=seeded(43)).flatten()
    tenth = statistic == torch.tensor(0.1, dtype=torch.float32)
    assert bool((tenth | (statistic == 0.5)).all())
    assert abs(tenth.double().mean().item() - 2 / 3) < 0.03  # sigma of a frequency: 0.006


def test_hand_worked_three_by_three_by_three():
    # Volume v(d, h, w) = d: the interior site (value 1) has 9 neighbours at d=0, 8 at d=1 and 9
    # at d=2, so w = 18/26 = 9/13; a probe of value 0 or 2 gives z = (8 + 18)/26 = 1 and
    # S = 13/22, a probe of value 1 gives z = w and S = 1/2. (Only the 6 face neighbours would
    # give S = 3/4: the test sees all 26.)
    volume = torch.arange(3, dtype=torch.float64).view(1, 1, 3, 1, 1).expand(1, 1, 3, 3, 3)
    statistic = spatial_hopkins(volume.expand(6000, 1, 3, 3, 3), 1, generator=seeded(44))
    statistic = statistic.flatten()
    off_plane = statistic == torch.tensor(13 / 22, dtype=torch.float32)
    assert bool((off_plane | (statistic == 0.5)).all())
    assert abs(off_plane.double().mean().item() - 2 / 3) < 0.03


@pytest.mark.parametrize("dimension", [1, 2, 3])
def test_null_distribution_matches_the_design_table(dimension):
    # 2000 maps per noise: the measured standard deviation has a relative error of ~1.6%, the
    # mean an error of ~0.001; the bounds are about 6 of those.
    sizes = SIZES_BY_DIMENSION[dimension]
    for noise, reference in zip(
        (torch.rand, torch.randn), NULL_STANDARD_DEVIATION[dimension], strict=True
    ):
        maps = noise(2000, 1, *sizes, generator=seeded(45 + dimension))
        statistic = spatial_hopkins(maps, generator=seeded(0)).double().flatten()
        assert abs(statistic.mean().item() - 0.5) < 0.005
        assert abs(statistic.std().item() / reference - 1) < 0.1
        above = (statistic > 0.55).double().mean().item()
        # One 256-site chain of noise exceeds 0.55 about 9% of the time; a 32x32 map or a
        # 12x12x12 volume almost never (docs/design.md, "What 0.55 means in each dimension").
        assert above > 0.05 if dimension == 1 else above < 0.01


@pytest.mark.parametrize(
    ("sizes", "null_sd"), [((256,), 0.0385), ((32, 32), 0.0153), ((16, 16, 16), 0.0080)]
)
def test_smooth_data_are_structured_and_shuffled_are_not_in_every_dimension(sizes, null_sd):
    # Measured with sigma=4 over three noise seeds: batch means 0.85-0.89, minimum 0.81;
    # shuffled, batch means within 0.01 of 0.5. null_sd is one Gaussian-noise map's spread.
    smooth = gaussian_blur_nd(torch.randn(16, 2, *sizes, generator=seeded(46)), sigma=4.0)
    statistic = spatial_hopkins(smooth, generator=seeded(0))
    assert statistic.shape == (16, 2)
    assert statistic.mean() > 0.8
    assert statistic.min() > 0.75
    shuffled = spatial_hopkins(shuffle_sites(smooth, seed=47), generator=seeded(0))
    assert abs(shuffled.mean().item() - 0.5) < 4 * null_sd / math.sqrt(shuffled.numel())
    assert (shuffled - 0.5).abs().max() < 5 * null_sd


def test_sine_chains_are_structured():
    # Measured: minimum 0.89 over 128 chains of 256 sites with a 64-site period.
    sites = torch.arange(256, dtype=torch.float32)
    phase = torch.rand(64, 2, 1, generator=seeded(48)) * 2 * math.pi
    chains = torch.sin(2 * math.pi * sites / 64 + phase)
    assert spatial_hopkins(chains, generator=seeded(0)).min() > 0.85
    shuffled = spatial_hopkins(shuffle_sites(chains, seed=49), generator=seeded(0))
    assert abs(shuffled.mean().item() - 0.5) < 4 * 0.0385 / math.sqrt(128)


@pytest.mark.parametrize("sizes", [(20,), (6, 7, 8)])
def test_shapes_reduction_and_default_n_points_in_1d_and_3d(sizes):
    maps = torch.randn(3, 4, *sizes, generator=seeded(50))
    per_map = spatial_hopkins(maps, generator=seeded(0))
    assert per_map.shape == (3, 4) and per_map.dtype == torch.float32
    per_channel = spatial_hopkins(maps, generator=seeded(0), reduction="mean")
    torch.testing.assert_close(per_channel, per_map.mean(dim=0))
    n_interior = math.prod(size - 2 for size in sizes)  # 18 and 120 -> m = 1 and 12
    assert torch.equal(
        per_map, spatial_hopkins(maps, default_n_points(n_interior), generator=seeded(0))
    )
    constant = torch.full((2, 3, *sizes), 7.0)
    assert torch.equal(spatial_hopkins(constant, generator=seeded(0)), torch.full((2, 3), 0.5))


@pytest.mark.parametrize(
    ("x", "kwargs", "match"),
    [
        (torch.zeros(1, 1, 2), {}, "at least 3 sites .* axis L is 2 long"),
        (torch.zeros(1, 1, 5, 2, 5), {}, "at least 3x3x3 sites .* axis H is 2 long"),
        (torch.zeros(1, 1, 1, 8, 8), {}, "at least 3x3x3 sites .* axis D is 1 long"),
        (torch.zeros(1, 1, 8, 2), {}, "at least 3x3 sites .* axis W is 2 long"),
        (torch.zeros(1, 1, 10), {"n_points": 9}, ">= 1 and <= 8, but got 9"),
        (torch.zeros(1, 1, 4, 5, 6), {"n_points": 25}, ">= 1 and <= 24, but got 25"),
        (torch.zeros(1, 0, 5, 5, 5), {}, "N >= 1 and C >= 1"),
    ],
)
def test_spatial_hopkins_rejects_bad_1d_and_3d_input(x, kwargs, match):
    with pytest.raises(ValueError, match=match):
        spatial_hopkins(x, **kwargs)


# ---------------------------------------------------------------------------------------------
# Classic Hopkins statistic


def three_tight_blobs(n_sets: int, n_data: int, seed: int) -> torch.Tensor:
    centres = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    which = torch.randint(3, (n_sets, n_data), generator=seeded(seed))
    return centres[which] + 0.01 * torch.randn(n_sets, n_data, 2, generator=seeded(seed + 1))


def test_uniform_points_are_near_one_half():
    # Measured: mean 0.498, per-set standard deviation 0.02 (m = 100 of 1000 points).
    statistic = hopkins(torch.rand(32, 1000, 2, generator=seeded(20)), generator=seeded(0))
    assert statistic.shape == (32,)
    assert abs(statistic.mean().item() - 0.5) < 0.02
    assert (statistic - 0.5).abs().max() < 0.1


def test_tight_blobs_are_near_one():
    statistic = hopkins(three_tight_blobs(8, 600, seed=21), generator=seeded(0))
    assert statistic.min() > 0.9  # measured 0.996


def test_regular_grid_is_below_one_half():
    axis = torch.arange(30, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    statistic = hopkins(grid.expand(8, -1, -1), generator=seeded(0))
    assert statistic.max() < 0.4  # measured 0.28-0.30: w is the grid step, u is smaller


def test_identical_points_are_exactly_one_half():
    same = torch.full((50, 3), 2.5)
    assert hopkins(same, generator=seeded(0)).item() == 0.5
    batch = torch.stack([same, torch.rand(50, 3, generator=seeded(22))])
    statistic = hopkins(batch, generator=seeded(0))
    assert statistic[0].item() == 0.5
    assert statistic[1].item() != 0.5


def test_unbatched_equals_batch_of_one():
    points = torch.rand(200, 4, generator=seeded(23))
    single = hopkins(points, 30, generator=seeded(1))
    assert single.shape == ()
    assert single.dtype == torch.float32
    assert torch.equal(hopkins(points.unsqueeze(0), 30, generator=seeded(1)), single.view(1))


def test_batched_sets_are_independent():
    uniform = torch.rand(2, 500, 2, generator=seeded(24))
    batch = torch.cat([uniform, three_tight_blobs(2, 500, seed=25)])
    statistic = hopkins(batch, generator=seeded(0))
    assert (statistic[:2] - 0.5).abs().max() < 0.1
    assert statistic[2:].min() > 0.9


def test_hopkins_reproducible_with_generator():
    points = torch.rand(300, 2, generator=seeded(26))
    first = hopkins(points, generator=seeded(3))
    assert torch.equal(first, hopkins(points, generator=seeded(3)))
    assert not torch.equal(first, hopkins(points, generator=seeded(4)))


def test_hopkins_matches_definition_loop():
    data = torch.rand(3, 12, 2, generator=seeded(27), dtype=torch.float64)
    data[0, 5] = data[0, 2]  # a duplicate: its nearest other point is at distance 0
    artificial = torch.rand(3, 4, 2, generator=seeded(28), dtype=torch.float64)
    sample_index = torch.tensor([[2, 0, 7, 11], [1, 3, 5, 9], [0, 4, 8, 10]])
    statistic = _hopkins_from_samples(data, artificial, sample_index)
    for points, probes, indices, value in zip(
        data, artificial, sample_index, statistic, strict=True
    ):
        u = [min(torch.dist(probe, point).item() for point in points) for probe in probes]
        w = [
            min(torch.dist(points[i], point).item() for j, point in enumerate(points) if j != i)
            for i in indices.tolist()
        ]
        assert value.item() == pytest.approx(sum(u) / (sum(u) + sum(w)))


@pytest.mark.parametrize(
    ("points", "kwargs", "error", "match"),
    [
        ("points", {}, TypeError, "torch.Tensor"),
        (torch.zeros(10), {}, ValueError, r"\(n, d\)"),
        (torch.zeros(1, 2, 10, 2), {}, ValueError, r"\(B, n, d\)"),
        (torch.zeros(1, 3), {}, ValueError, "n >= 2"),
        (torch.zeros(0, 5, 3), {}, ValueError, "B >= 1"),
        (torch.zeros(5, 0), {}, ValueError, "d >= 1"),
        (torch.tensor([[0.0], [float("nan")]]), {}, ValueError, "finite"),
        (torch.zeros(5, 2, dtype=torch.complex64), {}, ValueError, "real numbers"),
        (torch.zeros(5, 2), {"n_points": 6}, ValueError, ">= 1 and <= 5, but got 6"),
        (torch.zeros(5, 2), {"n_points": 0}, ValueError, "but got 0"),
        (torch.zeros(5, 2), {"generator": "seed"}, TypeError, "torch.Generator"),
    ],
)
def test_hopkins_rejects_bad_input(points, kwargs, error, match):
    with pytest.raises(error, match=match):
        hopkins(points, **kwargs)
