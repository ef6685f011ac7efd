"""Tests of snow, frost, fog and spatter (``dropcluster.data.corruptions.weather``) and of the
frost photographs' lookup and download (``dropcluster.data.frost_images``).

The OpenCV re-implementations are checked against hand-worked cases and, where OpenCV is
installed, against ``cv2`` itself; the four corruptions against numpy/OpenCV/scikit-image
re-runs of the reference scripts' formulas fed with the same random draws. The real frost
photographs are not in the repository: the tests write synthetic ones with PIL.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import math
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from dropcluster.data.corruptions import SEVERITY_PARAMETERS, corrupt, weather
from dropcluster.data.corruptions.weather import (
    canny,
    chamfer_distance,
    emboss,
    equalize_histogram,
    opencv_resize_linear,
    plasma_fractal,
    rgb_to_grey,
    water_texture,
)
from dropcluster.data.frost_images import (
    FROST_FILES,
    FROST_SHA256,
    download_frost_images,
    find_frost_folder,
    load_frost_images,
)

PIL = pytest.importorskip("PIL.Image")

#: A side length of each family's own size (ImageNet's smaller than 224, to stay fast).
SIDE = {"cifar": 32, "tiny-imagenet": 64, "imagenet": 96}


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_images(n: int, side: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """(n, channels, side, side) uint8: upsampled noise, so edges and flat parts both occur."""
    base = torch.rand(n, channels, max(2, side // 4), max(2, side // 4), generator=seeded(seed))
    smooth = torch.nn.functional.interpolate(base, size=(side, side), mode="bilinear")
    return (smooth * 255).round().to(torch.uint8)


def blob_levels(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A spatter-like uint8 layer: thresholded blurred noise (blobs on a zero background)."""
    from scipy.ndimage import gaussian_filter

    layer = gaussian_filter(rng.normal(0.65, 0.3, (h, w)), rng.uniform(0.7, 3), mode="nearest")
    layer[layer < 0.68] = 0
    return (layer * 255).clip(0, 255).astype(np.uint8)


def write_frost_folder(folder: Path, sizes=None, *, coded: bool = False) -> Path:
    """Six synthetic frost photographs (PNG data, also under the .jpg names: lossless).

    ``coded``: red = row mod 256, green = column mod 256, blue = 40 (k + 1) for file k, so a
    crop tells which file and where; else smooth random colours.
    """
    folder.mkdir(parents=True, exist_ok=True)
    sizes = sizes or [(240, 300), (230, 320), (250, 290), (235, 310), (260, 330), (220, 300)]
    rng = np.random.default_rng(7)
    for k, (name, (h, w)) in enumerate(zip(FROST_FILES, sizes, strict=True)):
        if coded:
            rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
            array = np.stack([rows % 256, cols % 256, np.full((h, w), 40 * (k + 1))], axis=-1)
        else:
            small = rng.uniform(0, 255, (h // 10 + 2, w // 10 + 2, 3))
            array = np.asarray(
                PIL.fromarray(small.astype(np.uint8)).resize((w, h), PIL.BILINEAR)
            ).astype(np.int64)
        PIL.fromarray(array.astype(np.uint8)).save(folder / name, format="PNG")
    return folder


@pytest.fixture
def no_package(monkeypatch):
    """Hide any installed imagecorruptions package from the frost lookup."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "imagecorruptions" else real(name, *args),
    )


@pytest.fixture
def frost_root(tmp_path, monkeypatch, no_package):
    """A data root with synthetic frost photographs, made the default one."""
    write_frost_folder(tmp_path / "data" / "frost")
    monkeypatch.setenv("DROPCLUSTER_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


# --------------------------------------------------------------------------------------------
# numpy / OpenCV / scikit-image re-runs of the scripts' formulas, fed with given draws


def reference_plasma(size: int, decay: float, uniforms) -> np.ndarray:
    """The scripts' diamond-square map, the uniforms (in [0, 1)) taken from an iterator."""
    grid = np.zeros((size, size))
    step, wibble = size, 100.0

    def jitter() -> np.ndarray:
        return wibble * (-wibble + 2 * wibble * next(uniforms))

    while step >= 2:
        half = step // 2
        corner = grid[0:size:step, 0:size:step]
        total = corner + np.roll(corner, -1, axis=0)
        total += np.roll(total, -1, axis=1)
        grid[half:size:step, half:size:step] = total / 4 + jitter()
        centre = grid[half:size:step, half:size:step]
        corner = grid[0:size:step, 0:size:step]
        rows = (centre + np.roll(centre, 1, axis=0)) + (corner + np.roll(corner, -1, axis=1))
        grid[0:size:step, half:size:step] = rows / 4 + jitter()
        cols = (centre + np.roll(centre, 1, axis=1)) + (corner + np.roll(corner, -1, axis=0))
        grid[half:size:step, 0:size:step] = cols / 4 + jitter()
        step //= 2
        wibble /= decay
    grid -= grid.min()
    return grid / grid.max()


def reference_fog(image: np.ndarray, c, fractal: np.ndarray) -> np.ndarray:
    x = image / 255.0
    top = x.max()
    x = x + c[0] * fractal[: x.shape[0], : x.shape[1]][..., None]
    return np.clip(x * top / (top + c[0]), 0, 1) * 255


def reference_frost(image, c, photographs_bgr, index, uniform):
    import cv2

    photograph = photographs_bgr[index]
    if c[2] != 1:
        photograph = cv2.resize(photograph, (0, 0), fx=c[2], fy=c[2])
    h, w = image.shape[:2]
    top = int(uniform[0] * (photograph.shape[0] - h))
    left = int(uniform[1] * (photograph.shape[1] - w))
    crop = photograph[top : top + h, left : left + w][..., ::-1]
    return np.clip(c[0] * image + c[1] * crop, 0, 255)


def reference_clipped_zoom(layer: np.ndarray, factor: float) -> np.ndarray:
    from scipy.ndimage import zoom

    side = layer.shape[0]
    crop = int(np.ceil(side / factor))
    top = (side - crop) // 2
    zoomed = zoom(layer[top : top + crop, top : top + crop], (factor, factor, 1), order=1)
    trim = (zoomed.shape[0] - side) // 2
    return zoomed[trim : trim + side, trim : trim + side]


def reference_motion_blur(levels: np.ndarray, radius, sigma, angle) -> np.ndarray:
    """ImageMagick's motion blur: one-sided Gaussian taps along the angle, edges repeated."""
    taps = 2 * math.ceil(radius) + 1
    weights = np.exp(-(np.arange(taps) ** 2) / (2 * sigma**2))
    weights /= weights.sum()
    h, w = levels.shape
    out = np.zeros((h, w))
    for tap, weight in enumerate(weights):
        dy = math.ceil(tap * math.sin(math.radians(angle)) - 0.5)
        dx = math.ceil(tap * math.cos(math.radians(angle)) - 0.5)
        rows = np.clip(np.arange(h) + dy, 0, h - 1)
        cols = np.clip(np.arange(w) + dx, 0, w - 1)
        out += weight * levels[rows][:, cols]
    return out


def reference_snow(image, c, normal, angle):
    import cv2

    x = image.astype(np.float32) / 255.0
    layer = reference_clipped_zoom((c[0] + c[1] * normal)[..., None], c[2])
    layer[layer < c[3]] = 0
    levels = (np.clip(layer[..., 0], 0, 1) * 255).astype(np.uint8)
    blurred = reference_motion_blur(levels.astype(np.float64), c[4], c[5], angle)
    # The 8-bit PNG ImageMagick 6 Q16 writes: a 16-bit quantum, then ScaleQuantumToChar.
    quantum = np.floor(blurred * 257 + 0.5).astype(np.int64)
    layer = ((((quantum + 128) - ((quantum + 128) >> 8)) >> 8) / 255.0)[..., None]
    grey = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)[..., None]
    x = c[6] * x + (1 - c[6]) * np.maximum(x, grey * 1.5 + 0.5)
    return np.clip(x + layer + np.rot90(layer, k=2), 0, 1) * 255


def reference_spatter(image, c, normal):
    import cv2
    from skimage.filters import gaussian

    x = image.astype(np.float32) / 255.0
    liquid = gaussian(c[0] + c[1] * normal, sigma=c[2], mode="nearest", truncate=4.0)
    liquid[liquid < c[3]] = 0
    if c[5] == 0:
        levels = (liquid * 255).astype(np.uint8)
        distance = cv2.distanceTransform(255 - cv2.Canny(levels, 50, 150), cv2.DIST_L2, 5)
        _, distance = cv2.threshold(distance, 20, 20, cv2.THRESH_TRUNC)
        texture = cv2.equalizeHist(cv2.blur(distance, (3, 3)).astype(np.uint8))
        kernel = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
        texture = cv2.blur(cv2.filter2D(texture, cv2.CV_8U, kernel), (3, 3)).astype(np.float32)
        weight = levels * texture
        weight = weight / weight.max() * c[4]
        water = np.array([175, 238, 238], np.float32) / 255
        return np.clip(x + weight[..., None] * water, 0, 1) * 255
    mask = gaussian((liquid > c[3]).astype(np.float32), sigma=c[4], mode="nearest", truncate=4.0)
    mask[mask < 0.8] = 0
    mud = np.array([63, 42, 20], np.float32) / 255
    return np.clip(x * (1 - mask[..., None]) + mask[..., None] * mud, 0, 1) * 255


def reference_run(name: str, family: str, images: torch.Tensor, severity: int, seed: int):
    """The reference formula on each image, with the draws ``corrupt`` makes from ``seed``."""
    c = SEVERITY_PARAMETERS[family][name][severity - 1]
    g = seeded(seed)
    n, _, h, w = images.shape
    hwc = images.permute(0, 2, 3, 1).numpy()
    if name == "fog":
        size = 1 << (max(h, w) - 1).bit_length()
        draws, step = [], size
        while step >= 2:
            m = size // step
            draws += [torch.rand((n, m, m), generator=g, dtype=torch.float64) for _ in range(3)]
            step //= 2
        return [
            reference_fog(
                hwc[i], c, reference_plasma(size, c[1], iter(d[i].numpy() for d in draws))
            )
            for i in range(n)
        ]
    if name == "frost":
        import cv2

        folder = find_frost_folder()
        bgr = [cv2.imread(str(folder / file)) for file in FROST_FILES]
        index = torch.randint(0, 5, (n,), generator=g)
        uniform = torch.rand((n, 2), generator=g, dtype=torch.float64).numpy()
        return [reference_frost(hwc[i], c, bgr, int(index[i]), uniform[i]) for i in range(n)]
    normal = torch.randn((n, 1, h, w), generator=g, dtype=torch.float64).numpy()[:, 0]
    if name == "snow":
        angles = (torch.rand(n, generator=g, dtype=torch.float64) * 90 - 135).numpy()
        return [reference_snow(hwc[i], c, normal[i], angles[i]) for i in range(n)]
    return [reference_spatter(hwc[i], c, normal[i]) for i in range(n)]


# --------------------------------------------------------------------------------------------
# the tables


def test_parameter_tables_have_five_severities_per_family_and_frost_resizes_as_each_script():
    for family in ("cifar", "tiny-imagenet", "imagenet"):
        for name in ("snow", "frost", "fog", "spatter"):
            assert len(weather.PARAMETERS[family][name]) == 5
    assert {c[2] for c in weather.PARAMETERS["cifar"]["frost"]} == {0.2}
    assert {c[2] for c in weather.PARAMETERS["tiny-imagenet"]["frost"]} == {0.3}
    assert {c[2] for c in weather.PARAMETERS["imagenet"]["frost"]} == {1}
    # Spot checks against the scripts: the last CIFAR snow and ImageNet spatter rows.
    assert weather.PARAMETERS["cifar"]["snow"][4] == (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)
    assert weather.PARAMETERS["imagenet"]["spatter"][4] == (0.67, 0.4, 1, 0.65, 1.5, 1)
    assert weather.PARAMETERS["tiny-imagenet"]["fog"][0] == (0.4, 3)
    assert [c[5] for c in weather.PARAMETERS["cifar"]["spatter"]] == [0, 0, 0, 1, 1]


# --------------------------------------------------------------------------------------------
# fog's plasma fractal


def test_plasma_fractal_of_side_two_is_the_hand_worked_diamond_square_step():
    maps = plasma_fractal(1, 2, 3.0, generator=seeded(5))
    u = [float(torch.rand((1, 1, 1), generator=g, dtype=torch.float64)) for g in [seeded(5)] * 3]
    centre = 100 * (-100 + 200 * u[0])  # the corners are all the map's 0 corner
    row_diamond = (2 * centre + 0) / 4 + 100 * (-100 + 200 * u[1])
    col_diamond = (2 * centre + 0) / 4 + 100 * (-100 + 200 * u[2])
    raw = torch.tensor([[0.0, row_diamond], [col_diamond, centre]], dtype=torch.float64)
    expected = (raw - raw.min()) / (raw - raw.min()).max()
    torch.testing.assert_close(maps[0], expected, rtol=0, atol=1e-12)


def test_plasma_fractal_maps_span_zero_to_one_and_match_the_scripts_arithmetic():
    maps = plasma_fractal(3, 32, 2.5, generator=seeded(1))
    assert maps.shape == (3, 32, 32) and maps.dtype == torch.float64
    assert torch.all(maps.amin(dim=(1, 2)) == 0) and torch.all(maps.amax(dim=(1, 2)) == 1)
    g, draws, step = seeded(1), [], 32
    while step >= 2:
        m = 32 // step
        draws += [torch.rand((3, m, m), generator=g, dtype=torch.float64) for _ in range(3)]
        step //= 2
    for i in range(3):
        expected = reference_plasma(32, 2.5, iter(d[i].numpy() for d in draws))
        np.testing.assert_allclose(maps[i].numpy(), expected, rtol=0, atol=1e-12)
    # Each image its own map; the generator decides them.
    assert not torch.equal(maps[0], maps[1])
    assert torch.equal(plasma_fractal(3, 32, 2.5, generator=seeded(1)), maps)
    with pytest.raises(ValueError, match="power of two >= 2 as size, but got 24"):
        plasma_fractal(1, 24, 2.0)


def test_fog_uses_a_map_of_the_next_power_of_two_cropped_to_the_image():
    images = torch.full((2, 3, 20, 40), 0.5)
    fogged = corrupt(images, "fog", 2, family="imagenet", generator=seeded(3))
    strength = weather.PARAMETERS["imagenet"]["fog"][1][0]
    maps = plasma_fractal(2, 64, 2, generator=seeded(3))[:, None, :20, :40].float()
    expected = ((images + strength * maps) * 0.5 / (0.5 + strength)).clamp(0, 1)
    torch.testing.assert_close(fogged, expected.expand(2, 3, 20, 40))


# --------------------------------------------------------------------------------------------
# frost's resize


def test_opencv_resize_linear_hand_worked():
    # Factor 0.5: output pixel d samples 2 d + 0.5, weights 1024 / 1024 of 2048.
    row = torch.tensor([[0, 100, 200, 40]], dtype=torch.uint8).expand(2, 4)
    assert opencv_resize_linear(row, 0.5).tolist() == [[50, 120]]
    # Factor 0.2 samples exactly every fifth pixel from pixel 2 on.
    image = torch.randint(0, 256, (3, 25, 35), dtype=torch.uint8, generator=seeded())
    assert torch.equal(opencv_resize_linear(image, 0.2), image[:, 2::5, 2::5])
    # Output sizes round halves to even, as cv2.resize: 315 * 0.3 = 94.5 -> 94.
    assert opencv_resize_linear(torch.zeros(1, 315, 560, dtype=torch.uint8), 0.3).shape == (
        1,
        94,
        168,
    )
    assert torch.equal(opencv_resize_linear(image, 1), image)


def test_opencv_resize_linear_matches_cv2_resize():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for h, w, factor in [(97, 131, 0.3), (60, 45, 0.2), (33, 50, 0.7), (21, 17, 1.6)]:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = cv2.resize(image, (0, 0), fx=factor, fy=factor)
        ours = opencv_resize_linear(torch.from_numpy(image).permute(2, 0, 1), factor)
        np.testing.assert_array_equal(ours.permute(1, 2, 0).numpy(), expected)


# --------------------------------------------------------------------------------------------
# spatter's OpenCV pieces


def test_canny_hand_worked_step_edges_and_hysteresis():
    step = torch.zeros(1, 8, 8, dtype=torch.uint8)
    step[:, :, 4:] = 200
    # Sobel |dx| = 800 in columns 3 and 4; column 4 does not beat its left neighbour strictly.
    expected = torch.zeros(1, 8, 8, dtype=torch.bool)
    expected[:, :, 3] = True
    assert torch.equal(canny(step), expected)
    # A step of 20 (magnitude 80) is weak: no strong edge, so nothing survives hysteresis.
    assert not canny(step // 10).any()
    # Weak edge pixels joined to strong ones are kept (OpenCV's output for this image: the
    # lower half of column 3 has magnitude 80 only).
    joined = torch.zeros(1, 8, 8, dtype=torch.uint8)
    joined[:, :4, 4:] = 50
    joined[:, 4:, 4:] = 20
    edges = canny(joined)[0].int()
    assert edges[5:, 3].tolist() == [1, 1, 1] and edges[:3, 3].tolist() == [1, 1, 1]
    assert edges[3].tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and edges[4].tolist()[3:5] == [0, 1]
    assert int(edges.sum()) == 11


def test_canny_matches_cv2_canny():
    cv2 = pytest.importorskip("cv2")
    pytest.importorskip("scipy")
    rng = np.random.default_rng(1)
    for _ in range(20):
        levels = blob_levels(rng, *rng.integers(3, 40, size=2))
        expected = cv2.Canny(levels, 50, 150) > 0
        np.testing.assert_array_equal(canny(torch.from_numpy(levels)[None])[0].numpy(), expected)


def test_chamfer_distance_hand_worked():
    zeros = torch.zeros(1, 7, 9, dtype=torch.bool)
    zeros[0, 3, 4] = True
    distance = chamfer_distance(zeros)[0]
    f32 = np.float32
    assert distance[3].tolist() == [4, 3, 2, 1, 0, 1, 2, 3, 4]
    assert float(distance[2, 5]) == f32(1.4)
    assert float(distance[1, 5]) == f32(2.1969) and float(distance[2, 6]) == f32(2.1969)
    assert float(distance[1, 6]) == f32(1.4) + f32(1.4)
    # (-3, 4): a knight's move and two diagonals, whichever float32 order of the sum is least.
    sums = [(f32(2.1969) + f32(1.4)) + f32(1.4), (f32(1.4) + f32(1.4)) + f32(2.1969)]
    assert float(distance[0, 8]) == min(sums) == pytest.approx(4.9969)  # Euclidean: 5
    # Capped at the limit, and an image without zero pixels is all limit.
    assert float(chamfer_distance(zeros, limit=2)[0].max()) == 2
    assert torch.equal(
        chamfer_distance(torch.zeros(2, 4, 5, dtype=torch.bool)), torch.full((2, 4, 5), 20.0)
    )


def test_chamfer_distance_stops_early_only_where_full_relaxation_agrees():
    # chamfer_distance groups the steps by length and stops once a round changes nothing;
    # the definition is ceil(limit) rounds of relaxation over the 16 steps, one by one.
    def relaxed(zeros: torch.Tensor, limit: float) -> torch.Tensor:
        h, w = zeros.shape[-2:]
        distance = torch.where(zeros, 0.0, float("inf"))
        steps = [(dy, dx, 1.0) for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]
        steps += [(dy, dx, 1.4) for dy in (-1, 1) for dx in (-1, 1)]
        steps += [(dy, dx, 2.1969) for dy in (-2, 2) for dx in (-1, 1)]
        steps += [(dy, dx, 2.1969) for dy in (-1, 1) for dx in (-2, 2)]
        for _ in range(math.ceil(limit)):
            padded = torch.nn.functional.pad(distance, (2, 2, 2, 2), value=float("inf"))
            best = distance
            for dy, dx, step in steps:
                shifted = padded[:, 2 + dy : 2 + dy + h, 2 + dx : 2 + dx + w]
                best = torch.minimum(best, shifted + torch.tensor(step))
            distance = best
        return distance.clamp(max=limit)

    generator = torch.Generator().manual_seed(4)
    for density in (0.0005, 0.003, 0.02, 0.3):
        for shape in ((3, 60, 70), (2, 9, 5), (1, 1, 40)):
            zeros = torch.rand(shape, generator=generator) < density
            zeros[0, 0, 0] = True  # at least one zero: distances up to the cap and beyond
            for limit in (20.0, 3.5):
                expected = relaxed(zeros, limit)
                assert torch.equal(chamfer_distance(zeros, limit), expected), (shape, limit)


def test_chamfer_distance_matches_cv2_distance_transform_up_to_round_off():
    cv2 = pytest.importorskip("cv2")
    pytest.importorskip("scipy")
    rng = np.random.default_rng(2)
    for _ in range(20):
        edges = cv2.Canny(blob_levels(rng, *rng.integers(10, 50, size=2)), 50, 150)
        if not edges.any():
            continue
        expected = np.minimum(cv2.distanceTransform(255 - edges, cv2.DIST_L2, 5), 20)
        ours = chamfer_distance(torch.from_numpy(edges > 0)[None])[0].numpy()
        # Builds with IPP sum float32 steps (as here); plain OpenCV 16-bit fixed-point ones.
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


def test_equalize_histogram_hand_worked_and_against_cv2():
    levels = torch.tensor([[[3, 3, 5], [7, 7, 7]]], dtype=torch.uint8)
    # Lowest level 3 (2 pixels) -> 0; scale 255 / 4: level 5 -> round(63.75), 7 -> 255.
    assert equalize_histogram(levels).tolist() == [[[0, 0, 64], [255, 255, 255]]]
    flat = torch.full((1, 3, 4), 9, dtype=torch.uint8)
    assert torch.equal(equalize_histogram(flat), flat)  # one level: kept
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(3)
    for _ in range(10):
        image = rng.integers(0, rng.integers(2, 256), size=(13, 17), dtype=np.uint8)
        np.testing.assert_array_equal(
            equalize_histogram(torch.from_numpy(image)[None])[0].numpy(), cv2.equalizeHist(image)
        )


def test_emboss_saturates_as_filter2d_into_cv_8u():
    levels = torch.zeros(1, 5, 5, dtype=torch.uint8)
    levels[0, 2, 2] = 200
    # out[i, j] = sum k[a, b] x[i + a - 1, j + b - 1]: the centre pixel meets k mirrored.
    expected = torch.zeros(1, 5, 5)
    expected[0, 1, 1] = 255  # k[2, 2] 200 = 400, saturated
    expected[0, 1, 2] = expected[0, 2, 1] = expected[0, 2, 2] = 200
    assert torch.equal(emboss(levels), expected)  # -400, -200 saturate at 0
    cv2 = pytest.importorskip("cv2")
    image = np.random.default_rng(4).integers(0, 256, (9, 11), dtype=np.uint8)
    kernel = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
    np.testing.assert_array_equal(
        emboss(torch.from_numpy(image)[None])[0].numpy(), cv2.filter2D(image, cv2.CV_8U, kernel)
    )


def test_water_texture_of_a_layer_without_edges_is_flat_and_matches_cv2_elsewhere():
    # No edge: distance 20 everywhere; equalizing one level keeps it; the emboss sums to 1.
    assert torch.equal(water_texture(torch.full((1, 6, 7), 100)), torch.full((1, 6, 7), 20.0))
    cv2 = pytest.importorskip("cv2")
    pytest.importorskip("scipy")
    rng = np.random.default_rng(5)
    kernel = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
    for _ in range(10):
        levels = blob_levels(rng, *rng.integers(8, 40, size=2))
        distance = cv2.distanceTransform(255 - cv2.Canny(levels, 50, 150), cv2.DIST_L2, 5)
        _, distance = cv2.threshold(distance, 20, 20, cv2.THRESH_TRUNC)
        texture = cv2.equalizeHist(cv2.blur(distance, (3, 3)).astype(np.uint8))
        texture = cv2.blur(cv2.filter2D(texture, cv2.CV_8U, kernel), (3, 3))
        ours = water_texture(torch.from_numpy(levels)[None])[0].numpy()
        np.testing.assert_array_equal(ours, texture.astype(np.float32))


def test_rgb_to_grey_is_the_601_luma_as_cv2_computes_it():
    pixels = torch.eye(3).reshape(3, 3, 1, 1)
    assert rgb_to_grey(pixels).flatten().tolist() == pytest.approx([0.299, 0.587, 0.114])
    cv2 = pytest.importorskip("cv2")
    image = np.random.default_rng(6).random((5, 6, 3), dtype=np.float32)
    ours = rgb_to_grey(torch.from_numpy(image).permute(2, 0, 1)[None])[0, 0].numpy()
    np.testing.assert_allclose(ours, cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), atol=1e-6)


# --------------------------------------------------------------------------------------------
# the corruptions against the reference formulas, with the same draws


@pytest.mark.parametrize("name", ["fog", "frost", "snow", "spatter"])
@pytest.mark.parametrize("family", ["cifar", "tiny-imagenet", "imagenet"])
def test_corruption_matches_the_reference_formula_on_the_same_draws(name, family, frost_root):
    pytest.importorskip("cv2")
    pytest.importorskip("skimage")
    pytest.importorskip("scipy")
    images = smooth_images(2, SIDE[family], seed=1)
    for severity in range(1, 6):
        seed = 10 * severity
        expected = np.stack(reference_run(name, family, images, severity, seed))
        floats = corrupt(
            images.float() / 255, name, severity, family=family, generator=seeded(seed)
        )
        ours = floats.permute(0, 2, 3, 1).double().numpy() * 255
        # Float32 here against float64 (and skimage's float32 blur on the CPU) there; a liquid
        # value that lands on the other side of a level or the threshold moves a few pixels.
        far = np.abs(ours - expected) > 0.05
        assert far.mean() < 0.002, far.mean()
        assert np.abs(ours - expected).max() < 5
        levels = corrupt(images, name, severity, family=family, generator=seeded(seed))
        ours = levels.permute(0, 2, 3, 1).numpy().astype(int)
        differ = np.abs(ours - expected.astype(np.uint8))
        # The 1e-3 slack and float32 move about 0.1% of the levels by one; frost's exact
        # integers (0.7 (x + F) with x + F a multiple of 10) often come out a hair low in the
        # reference's float64 and truncate one level lower there.
        assert (differ > 0).mean() < (0.03 if name == "frost" else 0.01)
        assert differ.max() <= (1 if name != "spatter" else 5)


# --------------------------------------------------------------------------------------------
# behaviour


def test_frost_draws_from_the_first_five_photographs_and_crops_inside_them(
    tmp_path, monkeypatch, no_package
):
    sizes = [(20, 30), (21, 31), (22, 32), (23, 33), (24, 34), (25, 35)]
    write_frost_folder(tmp_path / "frost", sizes, coded=True)
    monkeypatch.setenv("DROPCLUSTER_DATA", str(tmp_path))
    black = torch.zeros(400, 3, 8, 8, dtype=torch.float64)
    frosted = corrupt(black, "frost", 1, family="imagenet", generator=seeded(2))  # 0.4 F
    photograph = torch.round(frosted * 255 / 0.4).long()
    files = photograph[:, 2, 0, 0] // 40 - 1
    assert set(files.tolist()) == {0, 1, 2, 3, 4}  # frost6 never used
    heights = torch.tensor([h for h, _ in sizes])[files]
    widths = torch.tensor([w for _, w in sizes])[files]
    top, left = photograph[:, 0, 0, 0], photograph[:, 1, 0, 0]
    assert torch.all(top <= heights - 8 - 1) and torch.all(left <= widths - 8 - 1)
    assert int(top.min()) == 0 and torch.any(top == heights - 9)  # the whole range is used
    # Each crop is a contiguous window.
    assert torch.equal(
        photograph[:, 0] - top[:, None, None], torch.arange(8)[None, :, None].expand(400, 8, 8)
    )
    assert torch.equal(
        photograph[:, 1] - left[:, None, None], torch.arange(8)[None, None, :].expand(400, 8, 8)
    )


def test_spatter_adds_turquoise_water_or_brown_mud():
    grey = torch.full((4, 3, 32, 32), 0.3)
    water = corrupt(grey, "spatter", 3, family="cifar", generator=seeded(1)) - grey
    assert torch.all(water >= 0) and water.amax() > 0.05
    torch.testing.assert_close(water[:, 0] * 238, water[:, 1] * 175)  # R : G = 175 : 238
    assert torch.equal(water[:, 1], water[:, 2])
    mud = corrupt(grey, "spatter", 5, family="cifar", generator=seeded(1))
    muddy = (mud - grey).abs().sum(1) > 0
    assert muddy.any()
    # Where mud lies, the colour moves towards (63, 42, 20) / 255: red above green above blue.
    assert torch.all(mud[:, 0][muddy] > mud[:, 1][muddy]) and torch.all(
        mud[:, 1][muddy] > mud[:, 2][muddy]
    )


def test_snow_brightens_and_fog_keeps_the_brightest_value_below_its_original():
    images = smooth_images(4, 32, seed=2)
    snowy = corrupt(images, "snow", 5, family="cifar", generator=seeded(1))
    assert snowy.float().mean() > images.float().mean() + 20
    pixels = images.float() / 255
    foggy = corrupt(pixels, "fog", 5, family="cifar", generator=seeded(1))
    # (x + s f) max / (max + s) <= max since x, f <= max and 1.
    assert torch.all(foggy.amax(dim=(1, 2, 3)) <= pixels.amax(dim=(1, 2, 3)) + 1e-6)


@pytest.mark.parametrize("name", ["fog", "frost", "snow", "spatter"])
def test_dtypes_shapes_determinism_and_grey_images(name, frost_root):
    images = smooth_images(3, 32, seed=3)
    for dtype in (torch.uint8, torch.float32, torch.float64):
        x = images if dtype == torch.uint8 else images.to(dtype) / 255
        out = corrupt(x, name, 4, generator=seeded(4))
        assert out.shape == x.shape and out.dtype == dtype
        if dtype != torch.uint8:
            assert float(out.min()) >= 0 and float(out.max()) <= 1
    first = corrupt(images, name, 2, generator=seeded(5))
    assert torch.equal(first, corrupt(images, name, 2, generator=seeded(5)))
    assert not torch.equal(first, corrupt(images, name, 2, generator=seeded(6)))
    # A grey image behaves as (x, x, x): the same result (grey), or its luma when coloured.
    grey = images[:, :1].float() / 255
    alone = corrupt(grey, name, 3, generator=seeded(7))
    as_rgb = corrupt(grey.expand(3, 3, 32, 32), name, 3, generator=seeded(7))
    if name in ("fog", "snow"):
        torch.testing.assert_close(alone, as_rgb[:, :1], rtol=0, atol=1e-5)
        torch.testing.assert_close(as_rgb[:, 1:], as_rgb[:, :2], rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close(alone, rgb_to_grey(as_rgb))


def test_fog_takes_any_number_of_channels():
    out = corrupt(torch.rand(2, 5, 16, 16, generator=seeded()), "fog", 1, generator=seeded())
    assert out.shape == (2, 5, 16, 16)


# --------------------------------------------------------------------------------------------
# checks


@pytest.mark.parametrize("name", ["snow", "spatter", "frost"])
def test_colour_corruptions_refuse_other_channel_counts(name, frost_root):
    with pytest.raises(
        ValueError,
        match=rf"^{name} needs RGB images \(C = 3\) or grey ones \(C = 1\), but got C = 4$",
    ):
        corrupt(torch.zeros(1, 4, 16, 16), name, 1)


def test_frost_refuses_images_as_large_as_the_smallest_resized_photograph(frost_root):
    # Synthetic photographs: the first five are at least 230 x 290 (frost6, 220 high, is never
    # used); resized by 0.2, at least 46 x 58.
    corrupt(torch.zeros(1, 3, 45, 45), "frost", 1, family="cifar")
    with pytest.raises(ValueError, match=r"by 0.2 \(the smallest 46 x 58\) .* got 46 x 46$"):
        corrupt(torch.zeros(1, 3, 46, 46), "frost", 1, family="cifar")
    with pytest.raises(ValueError, match=r"by 1 \(the smallest 230 x 290\) .* got 100 x 290$"):
        corrupt(torch.zeros(1, 3, 100, 290), "frost", 1, family="imagenet")


def test_frost_without_photographs_names_the_download(tmp_path, monkeypatch, no_package):
    monkeypatch.setenv("DROPCLUSTER_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"download_frost_images\(\)"):
        corrupt(torch.zeros(1, 3, 8, 8), "frost", 1)


# --------------------------------------------------------------------------------------------
# frost photographs: lookup and download


def test_lookup_prefers_the_data_root_then_the_imagecorruptions_package(tmp_path, monkeypatch):
    package = tmp_path / "site" / "imagecorruptions"
    write_frost_folder(package / "frost")
    # Importing the package would fail: the lookup must only locate it.
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "imagecorruptions", raising=False)
    importlib.invalidate_caches()
    monkeypatch.setenv("DROPCLUSTER_DATA", str(tmp_path / "data"))
    assert find_frost_folder() == package / "frost"
    (tmp_path / "data" / "frost").mkdir(parents=True)
    (tmp_path / "data" / "frost" / "frost1.png").write_bytes(b"")  # incomplete: skipped
    assert find_frost_folder() == package / "frost"
    write_frost_folder(tmp_path / "data" / "frost")
    assert find_frost_folder() == tmp_path / "data" / "frost"
    assert find_frost_folder(tmp_path / "elsewhere") == package / "frost"
    assert "imagecorruptions" not in sys.modules


def test_lookup_failure_is_one_line_naming_the_folder(tmp_path, no_package):
    with pytest.raises(FileNotFoundError) as caught:
        find_frost_folder(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "frost") in message
    assert "download_frost_images()" in message


def test_load_frost_images_decodes_rgb_and_caches(tmp_path, no_package):
    folder = write_frost_folder(tmp_path / "frost", coded=True)
    rgba = PIL.fromarray(np.full((20, 30, 4), (10, 20, 30, 7), np.uint8), "RGBA")
    rgba.save(folder / "frost1.png")  # the alpha channel is dropped, not composited
    images = load_frost_images(tmp_path)
    assert len(images) == 6 and images[0].shape == (3, 20, 30) and images[0].dtype == torch.uint8
    assert images[0][:, 0, 0].tolist() == [10, 20, 30]
    assert images[1][:, 5, 7].tolist() == [5, 7, 80]
    assert load_frost_images(tmp_path) is images


def serve(tmp_path: Path, contents: dict[str, bytes]) -> str:
    source = tmp_path / "source"
    source.mkdir()
    for name, data in contents.items():
        (source / name).write_bytes(data)
    return source.as_uri() + "/"


def fake_photographs() -> dict[str, bytes]:
    return {name: f"not really {name}".encode() for name in FROST_FILES}


def hashes(contents: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}


def test_download_writes_each_checked_file_and_keeps_good_ones(tmp_path, monkeypatch):
    contents = fake_photographs()
    url = serve(tmp_path, contents)
    monkeypatch.setenv("DROPCLUSTER_DATA", str(tmp_path / "data"))
    folder = download_frost_images(url=url, sha256=hashes(contents))
    assert folder == tmp_path / "data" / "frost"
    assert sorted(p.name for p in folder.iterdir()) == sorted(FROST_FILES)
    assert all((folder / n).read_bytes() == contents[n] for n in FROST_FILES)
    # A good file is not fetched again (its source is gone); a damaged one is.
    (tmp_path / "source" / "frost1.png").unlink()
    (folder / "frost2.png").write_bytes(b"damaged")
    download_frost_images(tmp_path / "data", url=url, sha256=hashes(contents))
    assert (folder / "frost2.png").read_bytes() == contents["frost2.png"]


def test_download_refuses_a_file_whose_hash_differs(tmp_path):
    contents = fake_photographs()
    url = serve(tmp_path, contents)
    with pytest.raises(ValueError, match=r"frost1\.png: SHA-256 .* differs from the expected"):
        download_frost_images(tmp_path / "data", url=url)  # the real hashes: none match
    assert list((tmp_path / "data" / "frost").iterdir()) == []
    assert FROST_SHA256["frost1.png"].startswith("ff9f9078")


def test_download_interrupted_leaves_no_partial_file(tmp_path, monkeypatch):
    contents = fake_photographs()
    url = serve(tmp_path, contents)

    class Broken(io.BytesIO):
        def read(self, size=-1):
            if self.tell() > 0:
                raise OSError("connection reset")
            return super().read(4)

    real = urllib.request.urlopen
    monkeypatch.setattr(
        urllib.request,
        "urlopen",
        lambda address: Broken(b"0123456789") if address.endswith("frost3.png") else real(address),
    )
    with pytest.raises(OSError, match="connection reset"):
        download_frost_images(tmp_path / "data", url=url, sha256=hashes(contents))
    names = sorted(p.name for p in (tmp_path / "data" / "frost").iterdir())
    assert names == ["frost1.png", "frost2.png"]  # written whole, one at a time; no temp left
