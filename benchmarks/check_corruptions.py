"""Check ``dropcluster.data.corruptions`` against the PyPI ``imagecorruptions``; time both.

``imagecorruptions`` (bethgelab, 1.1.2) is the usual stand-alone port of Hendrycks & Dietterich's
corruption code. It always uses the ImageNet-C severity table, so ours is called with
``family="imagenet"`` wherever the two are compared. The script is generic over the registry:
every corruption of ``--corruptions`` that ``corrupt`` implements is checked, and one that is
not implemented yet (KeyError / NotImplementedError, or frost without its photographs) is
skipped with a printed note. Four parts, each of which can be skipped:

1. Agreement, on 224x224 crops (seeded random positions) of scikit-image 0.19's colour
   photographs (astronaut, chelsea, coffee, rocket, immunohistochemistry, hubble_deep_field,
   retina), every corruption at every severity:

   * deterministic corruptions (the same output whatever the random state, in both
     implementations: defocus, zoom and Gaussian blur, brightness, contrast, saturate,
     pixelate, JPEG): pixel-wise on the uint8 outputs, mean, p99 and max of ``|ours - ref|``
     and the share of pixels more than one level apart, and the mean difference of the float
     outputs before quantisation; the script also checks that two runs with different seeds
     agree;
   * random corruptions: by their statistics, the mean of ``|corrupted - clean|`` and the std
     of ``corrupted - clean`` per element for ours and for the reference, and the
     total-variation distance between the histograms of ``corrupted - clean``
     (``TV(ours, ref)``) next to the one between two reference runs with different seeds
     (``TV(ref, ref')``, the sampling floor);
   * glass and motion blur also pixel-wise with the reference's own random draws given to ours
     (the reference draws with NumPy's global generator; the script seeds it per image and
     replays the same calls to recover the shuffle offsets and the angle, then hands them to
     ``glass_shuffle`` / ``motion_blur_at`` of ``noise_blur`` through a temporary wrapper).

   Where ``imagecorruptions`` departs from hendrycks/robustness' ``make_imagenet_c.py`` (which
   ours follows), the printed notes say so and the rows are labelled: a difference there is
   expected.
2. Accuracy a fixed model loses: a small CNN trained once (seeded) on Fashion-MNIST training
   images coloured and upsampled to 64x64; its top-1 accuracy on held-out test images corrupted
   by ours and by the reference (ImageNet table at 64 px, which ``imagecorruptions`` accepts).
   Skipped with a note when Fashion-MNIST is not installed.
3. Speed: our ``corrupt`` on one (M, 3, 64, 64) uint8 batch at severity 3 (tables
   ``"tiny-imagenet"`` and ``"imagenet"``) against ``imagecorruptions.corrupt`` image by image
   on K of the same images, extrapolated per image to M. ``--speed-size 224`` times photograph
   crops at 224 instead (ImageNet table only).

The reference needs an environment of its own: 1.1.2 imports ``pkg_resources`` (gone from
setuptools >= 81) and passes ``multichannel=`` to scikit-image (removed in 0.21). This one
works on Python 3.11, from the repository root (opencv-python comes with imagecorruptions;
scikit-image 0.19 bundles the photographs, so nothing is downloaded)::

    python3 -m venv /tmp/refc_env
    /tmp/refc_env/bin/pip install "setuptools>=77.0.3,<81" "numpy<2" "scipy<1.14" \\
        "scikit-image<0.20" "opencv-python-headless<4.11" imagecorruptions==1.1.2 torch==2.13.0
    /tmp/refc_env/bin/pip install -e . --no-deps
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 \\
        /tmp/refc_env/bin/python benchmarks/check_corruptions.py

    python benchmarks/check_corruptions.py [--corruptions SPEC] [--photos N]
        [--accuracy-images M] [--train-images T] [--train-epochs E] [--speed-images M]
        [--speed-reference-images K] [--speed-size {64,224}] [--repeats R] [--seed S]
        [--threads T] [--skip-compare] [--skip-accuracy] [--skip-speed]

A dry run that goes through every part in a few minutes: ``--photos 2 --accuracy-images 20
--train-images 500 --train-epochs 1 --speed-images 40 --speed-reference-images 4 --repeats 1``.
The script exits with status 1 when any corruption failed in any part (each failure is printed
where it happened and listed at the end).
"""

# The reference draws from NumPy's legacy global generator: seeding and replaying it is the point.
# ruff: noqa: NPY002

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dropcluster.data.corruptions import (
    CHUNK_ELEMENTS,
    CORRUPTIONS,
    SEVERITY_PARAMETERS,
    corrupt,
    corruption_names,
    noise_blur,
)

#: scikit-image 0.19's bundled colour photographs (``skimage.data.<name>()``), cropped in turn.
PHOTOGRAPHS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
)
CROP = 224
SMALL = 64
SEVERITIES = (1, 2, 3, 4, 5)
SPEED_SEVERITY = 3
#: Deterministic in both implementations (no random draw in either; checked at run time).
DETERMINISTIC = (
    "defocus_blur",
    "zoom_blur",
    "brightness",
    "contrast",
    "saturate",
    "gaussian_blur",
    "pixelate",
    "jpeg_compression",
)
#: Random corruptions whose draws the script can hand to ours (see the module doc).
PAIRED_RANDOM = ("glass_blur", "motion_blur")
#: The reference's glass blur is a Python loop per pixel (seconds per 224 image).
GLASS_PHOTOS = 4
GLASS_SPEED_REFERENCE_IMAGES = 20
#: A deterministic row agrees when the mean |ours - ref| is at most this many levels.
LEVEL_TOLERANCE = 1.0
#: A random row is flagged when TV(ours, ref) > TV_FACTOR x floor + TV_SLACK.
TV_FACTOR, TV_SLACK = 2.0, 0.005
ALLOCATOR_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")

#: Where ``imagecorruptions`` 1.1.2 (or this comparison) departs from ``make_imagenet_c.py`` of
#: hendrycks/robustness, which ours follows: a difference in these rows is expected.
REFERENCE_NOTES: dict[str, str] = {
    "defocus_blur": (
        "ours renormalises the disk kernel to sum 1; the reference's (imagecorruptions' and the "
        "script's) ImageNet kernels of severities 4 and 5 sum to 1.013 and 1.011, so there the "
        "reference is about 1% brighter (1-3 levels on bright pixels)."
    ),
    "motion_blur": (
        "the script runs ImageMagick and reads an 8-bit PNG back (rounding); imagecorruptions "
        "uses a numpy port with the same taps and truncates with np.uint8. Ours does the numpy "
        "port's float arithmetic and rounds as the PNG does, so paired uint8 outputs differ by "
        "up to one level on about half the pixels (the float columns show the arithmetic)."
    ),
    "snow": (
        "the script stores the snow layer as 8-bit (truncating) before ImageMagick's motion "
        "blur and reads it back from a PNG (rounding); imagecorruptions blurs the float layer "
        "with its numpy port and rounds once. Ours follows the script: small differences in "
        "the flake intensities are expected."
    ),
    "frost": (
        "imagecorruptions rescales every frost photograph by 1.1 (bicubic) before cropping; the "
        "ImageNet script (and ours) crop the photograph at its own size: slightly finer frost "
        "texture in ours."
    ),
    "elastic_transform": (
        "imagecorruptions replaced the function: no affine warp, sigma = 0.01 x side, alpha = "
        "250 x (0.05 .. 0.12), fields uniform(-0.005 H, 0.005 H). Ours is the script's "
        "(affine warp, then fields with its ImageNet table): the statistics differ by design, "
        "severity by severity."
    ),
    "pixelate": (
        "imagecorruptions upsamples with NEAREST where the script (and ours) use BOX. Enlarging, "
        "PIL's BOX takes the one input pixel under each output pixel, so the two agree except "
        "where a box edge falls exactly on a pixel centre: never at 32, 64 or 224 pixels with "
        "the scripts' factors (but e.g. at 100 pixels and factor 0.4). The 'pixelate NEAREST' "
        "row redoes the reference's own recipe with our PIL resampling (colour.pil_resize)."
    ),
    "glass_blur": (
        "the script's loops hard-code 224 pixels; at 224 that is the image size, as in "
        "imagecorruptions and ours."
    ),
    "zoom_blur": (
        "imagecorruptions keeps the top-left of each zoomed image where the script trims it "
        "centrally: the same at these factors (the zoom overshoots by at most one pixel)."
    ),
}
#: Names whose rows are expected to differ (the notes above say how).
EXPECTED_DIFFERENCES = {
    "defocus_blur": (4, 5),
    "motion_blur": SEVERITIES,
    "snow": SEVERITIES,
    "frost": SEVERITIES,
    "elastic_transform": SEVERITIES,
}

ENVIRONMENT_HINT = __doc__[
    __doc__.index("    python3 -m venv") : __doc__.index("\n\n    python benchmarks")
]


def _import_reference():
    """The ``imagecorruptions`` module, or exit with the commands that build an env for it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import imagecorruptions
            import imagecorruptions.corruptions  # noqa: F401
    except Exception as error:  # ImportError, or pkg_resources / scikit-image API breakage
        sys.exit(
            f"imagecorruptions does not import here ({type(error).__name__}: {error}).\n"
            f"It needs old setuptools/scikit-image/numpy; create a throwaway env with:\n\n"
            f"{ENVIRONMENT_HINT}\n"
        )
    return imagecorruptions


class Failures:
    """Errors met per corruption: printed where they happen, listed at the end."""

    def __init__(self) -> None:
        self.items: list[str] = []

    @contextlib.contextmanager
    def guard(self, part: str, label: str) -> Iterator[None]:
        """Run the body; on an exception print one line (error and where) and carry on."""
        try:
            yield
        except Exception as error:
            frame = traceback.extract_tb(error.__traceback__)[-1]
            where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
            message = f"{type(error).__name__}: {error}".splitlines()[0]
            self.items.append(f"{part}: {label}: {message} ({where})")
            print(f"{label:<20} FAILED: {message} ({where})")


# ---------------------------------------------------------------------------------------------
# Which corruptions exist


def available_corruptions(
    names: Sequence[str], corrupt_function: Callable = corrupt
) -> tuple[list[str], dict[str, str]]:
    """The corruptions of ``names`` that ``corrupt_function`` can run, and why the others cannot.

    Each is tried once, ImageNet table, severity 1, on a random 224x224 image. KeyError and
    NotImplementedError mean "not implemented yet"; FileNotFoundError (frost's photographs) and
    any other error are reported with their message.

    Returns:
        (available names in the order given, {skipped name: reason}).
    """
    probe = torch.randint(0, 256, (1, 3, CROP, CROP), dtype=torch.uint8, generator=_generator(0))
    available, skipped = [], {}
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                corrupt_function(probe, name, 1, family="imagenet", generator=_generator(0))
        except (KeyError, NotImplementedError) as error:
            skipped[name] = f"not implemented yet ({type(error).__name__}: {error})"
        except Exception as error:
            skipped[name] = f"fails ({type(error).__name__}: {error})".splitlines()[0]
        else:
            available.append(name)
    return available, skipped


# ---------------------------------------------------------------------------------------------
# Clean images


def photograph_crops(n_crops: int, seed: int, size: int = CROP) -> np.ndarray:
    """(N, size, size, 3) uint8 crops of scikit-image's photographs, each photo in turn, at
    seeded random positions (needs scikit-image, bundled with its 0.19 wheels)."""
    from skimage import data

    photos = [np.asarray(getattr(data, name)())[..., :3] for name in PHOTOGRAPHS]
    rng = np.random.default_rng(seed)
    crops = np.empty((n_crops, size, size, 3), dtype=np.uint8)
    for index in range(n_crops):
        photo = photos[index % len(photos)]
        top = int(rng.integers(0, photo.shape[0] - size + 1))
        left = int(rng.integers(0, photo.shape[1] - size + 1))
        crops[index] = photo[top : top + size, left : left + size]
    return crops


def make_images(
    n_images: int, seed: int, split: str = "test"
) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """(N, 3, 64, 64) uint8 colour images with real edges and textures, labels, and a summary.

    Fashion-MNIST images of ``split`` (when installed) upsampled bicubically to 64x64, the
    garment in a random colour over a smooth random colour background, with their labels; else
    smooth random colour fields with a random straight edge and a random rectangle (labels
    None). Made in chunks, so a few thousand images stay well under a GiB.
    """
    generator = _generator(seed)
    try:
        from dropcluster.data.fashion_mnist import load_fashion_mnist

        grey_images, all_labels = load_fashion_mnist(split)
    except (FileNotFoundError, ValueError, ImportError):
        grey_images = all_labels = None
    images = torch.empty((n_images, 3, SMALL, SMALL), dtype=torch.uint8)
    if grey_images is not None:
        if n_images <= len(grey_images):
            index = torch.randperm(len(grey_images), generator=generator)[:n_images]
        else:
            index = torch.randint(len(grey_images), (n_images,), generator=generator)
        coarse = torch.rand(n_images, 3, 4, 4, generator=generator)
        colour = 0.2 + 0.8 * torch.rand(n_images, 3, 1, 1, generator=generator)
        for start in range(0, n_images, 1024):
            part = slice(start, start + 1024)
            background = _upsample(coarse[part]) * 0.5 + 0.1
            grey = _upsample(grey_images[index[part]].float() / 255).clamp(0, 1)
            pixels = grey * colour[part] + (1 - grey) * background
            images[part] = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
        source = (
            f"Fashion-MNIST {split} images, bicubic 28->64, random colour on a smooth background"
        )
        return images, all_labels[index], source
    coarse = torch.rand(n_images, 3, 4, 4, generator=generator)
    fine = torch.rand(n_images, 3, 16, 16, generator=generator)
    angle = torch.rand(n_images, 1, 1, 1, generator=generator) * 2 * torch.pi
    offset = torch.rand(n_images, 1, 1, 1, generator=generator) - 0.5
    corner = torch.rand(n_images, 2, 1, 1, generator=generator) - 0.8
    colours = torch.rand(n_images, 2, 3, 1, 1, generator=generator)
    coords = torch.linspace(-1, 1, SMALL)
    rows, cols = coords.view(1, 1, SMALL, 1), coords.view(1, 1, 1, SMALL)
    for start in range(0, n_images, 1024):
        part = slice(start, start + 1024)
        half_plane = rows * torch.sin(angle[part]) + cols * torch.cos(angle[part]) > offset[part]
        top, left = corner[part, :1], corner[part, 1:]
        rectangle = (rows > top) & (rows < top + 0.6) & (cols > left) & (cols < left + 0.6)
        pixels = _upsample(coarse[part]) * 0.5 + 0.1 + 0.3 * _upsample(fine[part]) - 0.15
        pixels = torch.where(half_plane, colours[part, 0], pixels)
        pixels = torch.where(rectangle, colours[part, 1], pixels)
        images[part] = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    source = "synthetic: smooth random colour fields with a straight edge and a rectangle"
    return images, None, source


def _upsample(small: torch.Tensor) -> torch.Tensor:
    return F.interpolate(small, size=(SMALL, SMALL), mode="bicubic", align_corners=False)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _to_nchw(images_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous()


def _to_nhwc(images_nchw: torch.Tensor) -> np.ndarray:
    return images_nchw.permute(0, 2, 3, 1).contiguous().numpy()


# ---------------------------------------------------------------------------------------------
# The reference, with its random draws recovered


def reference_float(reference, image_hwc: np.ndarray, name: str, severity: int) -> np.ndarray:
    """The reference's output before ``np.uint8``: (H, W, 3) float64 in [0, 255] (a PIL image
    for pixelate and JPEG, converted)."""
    from PIL import Image

    function = reference.corruptions.__dict__[name]
    return np.asarray(function(Image.fromarray(image_hwc), severity), dtype=np.float64)


def reference_run(reference, images_nhwc: np.ndarray, name: str, severity: int, seeds) -> tuple:
    """The reference on each image after ``np.random.seed(seeds[i])``: (float, uint8) outputs.

    The uint8 one is what ``imagecorruptions.corrupt`` returns: ``np.uint8`` of the float."""
    outputs = np.empty(images_nhwc.shape, dtype=np.float64)
    for index, image in enumerate(images_nhwc):
        np.random.seed(seeds[index])
        outputs[index] = reference_float(reference, image, name, severity)
    return outputs, outputs.astype(np.uint8)


def reference_seeds(seed: int, name: str, severity: int, count: int, run: int = 0) -> list[int]:
    """One NumPy seed per image, distinct per corruption, severity and run."""
    base = seed * 1_000_003 + CORRUPTIONS.index(name) * 100_003 + severity * 10_007
    return [(base + run * 7_919_993 + index) % 2**32 for index in range(count)]


def ours_seed(seed: int, name: str, severity: int) -> int:
    return seed * 1000 + CORRUPTIONS.index(name) * 10 + severity


def replay_glass_offsets(parameter: tuple, height: int, width: int, seed: int) -> np.ndarray:
    """The (iterations, R, Q, 2) ``(dx, dy)`` draws the reference's glass blur makes on an
    H x W image after ``np.random.seed(seed)``, reordered from its descending loops to
    ascending (h, w) as ``glass_shuffle`` takes them."""
    _, max_shift, iterations = parameter
    n_rows, n_cols = height - 2 * max_shift, width - 2 * max_shift
    np.random.seed(seed)
    draws = np.empty((iterations, n_rows, n_cols, 2), dtype=np.int64)
    for iteration in range(iterations):
        for row in range(n_rows):
            for col in range(n_cols):
                # One call per pixel as the reference makes them: a bulk call draws differently.
                draws[iteration, row, col] = np.random.randint(-max_shift, max_shift, size=(2,))
    return draws[:, ::-1, ::-1].copy()


def replay_motion_angle(seed: int) -> float:
    np.random.seed(seed)
    return float(np.random.uniform(-45, 45))


@contextlib.contextmanager
def ours_with_draws(name: str, draws: np.ndarray) -> Iterator[None]:
    """Make ours use the reference's draws for one chunk of images.

    ``draws``: glass_blur (N, iterations, R, Q, 2) offsets; motion_blur (N,) angles. Patches
    the module-level name ``noise_blur`` calls, and checks on exit that it was called as often
    as the corruption should call it (else the patch missed and the comparison would be void).
    """
    calls = [0]
    if name == "glass_blur":
        attribute, expected = "glass_shuffle", draws.shape[1]
        original = noise_blur.glass_shuffle

        def replacement(levels, max_shift, *, offsets=None, generator=None):
            if levels.shape[0] != draws.shape[0] or calls[0] >= expected:
                raise RuntimeError(f"expected {expected} passes over {draws.shape[0]} images")
            given = torch.from_numpy(draws[:, calls[0]])
            calls[0] += 1
            return original(levels, max_shift, offsets=given)

    else:
        attribute, expected = "motion_blur_at", 1
        original = noise_blur.motion_blur_at

        def replacement(pixels, radius, sigma, angles_degrees):
            if pixels.shape[0] != draws.shape[0]:
                raise RuntimeError(f"expected one chunk of {draws.shape[0]} images")
            calls[0] += 1
            return original(pixels, radius, sigma, torch.from_numpy(draws))

    setattr(noise_blur, attribute, replacement)
    try:
        yield
    finally:
        setattr(noise_blur, attribute, original)
    if calls[0] != expected:
        raise RuntimeError(
            f"noise_blur.{attribute} was called {calls[0]} times, expected {expected}: the "
            f"paired comparison no longer reaches ours' {name}"
        )


# ---------------------------------------------------------------------------------------------
# Figures


def signed_histogram(corrupted: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """Frequencies of ``corrupted - clean`` over -255..255 (511 bins) for uint8 arrays."""
    difference = corrupted.astype(np.int64) - clean.astype(np.int64)
    return np.bincount((difference + 255).ravel(), minlength=511) / difference.size


def total_variation(first: np.ndarray, second: np.ndarray) -> float:
    return 0.5 * float(np.abs(first - second).sum())


def change_statistics(corrupted: np.ndarray, clean: np.ndarray) -> tuple[float, float]:
    """(mean of |corrupted - clean|, std of corrupted - clean), in uint8 levels."""
    difference = corrupted.astype(np.float64) - clean.astype(np.float64)
    return float(np.abs(difference).mean()), float(difference.std())


def pixel_agreement(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Pixel-wise ``|ours - ref|`` of two uint8 arrays: mean, p99, max, and the share (%) of
    elements more than one level apart."""
    absolute = np.abs(ours.astype(np.int64) - ref.astype(np.int64))
    return {
        "mean": float(absolute.mean()),
        "p99": float(np.percentile(absolute, 99)),
        "max": int(absolute.max()),
        "over1": 100.0 * float((absolute > 1).mean()),
    }


def _ours(images_nchw: torch.Tensor, name: str, severity: int, seed: int) -> np.ndarray:
    """Ours, ImageNet table, drawing from its own seeded generator: (N, H, W, 3) uint8."""
    output = corrupt(images_nchw, name, severity, family="imagenet", generator=_generator(seed))
    return _to_nhwc(output)


def _ours_float(images_nchw: torch.Tensor, name: str, severity: int, seed: int) -> np.ndarray:
    """Ours on float pixels: (N, H, W, 3) float64 in [0, 255] before quantisation."""
    pixels = images_nchw.to(torch.float64) / 255
    output = corrupt(pixels, name, severity, family="imagenet", generator=_generator(seed))
    return _to_nhwc(output) * 255


def compare_deterministic(reference, clean_nhwc, name, severity, seed) -> dict:
    clean = _to_nchw(clean_nhwc)
    seeds = reference_seeds(seed, name, severity, len(clean_nhwc))
    ref_float, ref_uint8 = reference_run(reference, clean_nhwc, name, severity, seeds)
    ours = _ours(clean, name, severity, ours_seed(seed, name, severity))
    ours_float = _ours_float(clean, name, severity, ours_seed(seed, name, severity))
    row = pixel_agreement(ours, ref_uint8)
    row["reference"] = ref_uint8
    row["float_mean"] = float(np.abs(ours_float - ref_float).mean())
    # Deterministic in both? Another seed must give the same output.
    other = reference_seeds(seed, name, severity, 1, run=1)
    ref_again = reference_run(reference, clean_nhwc[:1], name, severity, other)[1]
    ours_again = _ours(clean[:2], name, severity, ours_seed(seed, name, severity) + 1)
    row["deterministic"] = bool(
        np.array_equal(ref_again, ref_uint8[:1]) and np.array_equal(ours_again, ours[:2])
    )
    return row


def compare_random(reference, clean_nhwc, name, severity, seed) -> dict:
    clean = _to_nchw(clean_nhwc)
    count = len(clean_nhwc)
    seeds = reference_seeds(seed, name, severity, count)
    ref_float, ref_uint8 = reference_run(reference, clean_nhwc, name, severity, seeds)
    _, ref_second = reference_run(
        reference, clean_nhwc, name, severity, reference_seeds(seed, name, severity, count, 1)
    )
    ours = _ours(clean, name, severity, ours_seed(seed, name, severity))
    ref_histogram = signed_histogram(ref_uint8, clean_nhwc)
    row = {
        "ours": change_statistics(ours, clean_nhwc),
        "ref": change_statistics(ref_uint8, clean_nhwc),
        "tv": total_variation(signed_histogram(ours, clean_nhwc), ref_histogram),
        "tv_floor": total_variation(signed_histogram(ref_second, clean_nhwc), ref_histogram),
    }
    if name in PAIRED_RANDOM:
        ours_paired, ours_paired_float = paired_outputs(clean, name, severity, seeds)
        row["paired"] = pixel_agreement(ours_paired, ref_uint8)
        row["paired"]["float_mean"] = float(np.abs(ours_paired_float - ref_float).mean())
    return row


def paired_outputs(clean: torch.Tensor, name: str, severity: int, seeds: Sequence[int]):
    """Ours given the reference's draws (as made after ``np.random.seed(seeds[i])``):
    (uint8, float in [0, 255]) outputs, (N, H, W, 3)."""
    n, channels, height, width = clean.shape
    parameter = SEVERITY_PARAMETERS["imagenet"][name][severity - 1]
    # Each call must be one chunk of ``corrupt``, so the wrapper sees every image at once.
    batch = max(1, CHUNK_ELEMENTS // (channels * height * width))
    uint8_out = np.empty((n, height, width, channels), dtype=np.uint8)
    float_out = np.empty((n, height, width, channels), dtype=np.float64)
    for start in range(0, n, batch):
        images = clean[start : start + batch]
        part = seeds[start : start + batch]
        if name == "glass_blur":
            draws = np.stack([replay_glass_offsets(parameter, height, width, s) for s in part])
        else:
            draws = np.array([replay_motion_angle(s) for s in part])
        with ours_with_draws(name, draws):
            output = corrupt(images, name, severity, family="imagenet")
        uint8_out[start : start + len(images)] = _to_nhwc(output)
        with ours_with_draws(name, draws):
            output = corrupt(images.to(torch.float64) / 255, name, severity, family="imagenet")
        float_out[start : start + len(images)] = _to_nhwc(output) * 255
    return uint8_out, float_out


def pixelate_nearest_row(reference_uint8: np.ndarray, clean_nhwc: np.ndarray, severity: int):
    """The reference's pixelate recipe (BOX down, NEAREST up) with our PIL resampling, against
    the reference; None when ``colour.pil_resize`` is not there."""
    from dropcluster.data.corruptions import colour

    pil_resize = getattr(colour, "pil_resize", None)
    if pil_resize is None:
        return None
    factor = SEVERITY_PARAMETERS["imagenet"]["pixelate"][severity - 1]
    levels = _to_nchw(clean_nhwc).to(torch.float64)
    height, width = levels.shape[-2:]
    small = pil_resize(levels, int(height * factor), int(width * factor), "box")
    ours = pil_resize(small, height, width, "nearest").round().to(torch.uint8)
    return pixel_agreement(_to_nhwc(ours), reference_uint8)


# ---------------------------------------------------------------------------------------------
# Part 1: agreement


def run_comparison(reference, names, n_photos: int, seed: int, failures: Failures) -> None:
    started = time.perf_counter()
    photos = photograph_crops(n_photos, seed)
    glass_photos = photos[: min(n_photos, GLASS_PHOTOS)]
    # imagecorruptions.corrupt is np.uint8(function(PIL image, severity)) for (H, W, 3) uint8
    # input; the tables call the function directly to see the float output too. Check that.
    np.random.seed(0)
    via_corrupt = reference.corrupt(photos[0], corruption_name="zoom_blur", severity=3)
    direct = reference_float(reference, photos[0], "zoom_blur", 3).astype(np.uint8)
    assert np.array_equal(via_corrupt, direct), "imagecorruptions.corrupt changed its contract"

    print(
        f"\n== 1. Agreement with imagecorruptions {_version('imagecorruptions')}, ImageNet table =="
    )
    print(
        f"photographs: {n_photos} crops of {CROP}x{CROP} (uint8 RGB) at seeded random positions "
        f"of scikit-image's {', '.join(PHOTOGRAPHS)} (in turn); glass_blur on the first "
        f"{len(glass_photos)} only (the reference loops in Python over every pixel: seconds per "
        f"image); seed {seed}."
    )
    deterministic = [name for name in names if name in DETERMINISTIC]
    random_names = [name for name in names if name not in DETERMINISTIC]
    if deterministic:
        print(
            "\nDeterministic corruptions, pixel-wise on the uint8 outputs (levels): |ours - ref| "
            f"mean, p99, max, % of elements\n  more than 1 level apart; 'float' = mean |ours - "
            f"ref| before quantisation. ok: mean <= {LEVEL_TOLERANCE:g} level; 'expected': "
            "see the notes."
        )
        header = (
            f"{'corruption':<20}{'sev':>3} {'mean':>7} {'p99':>5} {'max':>5} {'>1 lvl %':>9} "
            f"{'float':>8}  verdict"
        )
        print(header + "\n" + "-" * (len(header) + 14))
        for name in deterministic:
            for severity in SEVERITIES:
                with failures.guard("agreement", f"{name} {severity}"):
                    tic = time.perf_counter()
                    row = compare_deterministic(reference, photos, name, severity, seed)
                    verdict = _verdict(name, severity, row["mean"] <= LEVEL_TOLERANCE)
                    if not row["deterministic"]:
                        verdict += "; NOT DETERMINISTIC (two seeds differ)"
                    print(
                        f"{name:<20}{severity:>3} {row['mean']:7.3f} {row['p99']:5.0f} "
                        f"{row['max']:5d} {row['over1']:9.3f} {row['float_mean']:8.3f}  "
                        f"{verdict}   ({time.perf_counter() - tic:.1f} s)"
                    )
                    if name == "pixelate":
                        nearest = pixelate_nearest_row(row["reference"], photos, severity)
                        if nearest is not None:
                            ok = nearest["mean"] <= LEVEL_TOLERANCE
                            print(
                                f"{'  pixelate NEAREST':<20}{severity:>3} {nearest['mean']:7.3f} "
                                f"{nearest['p99']:5.0f} {nearest['max']:5d} "
                                f"{nearest['over1']:9.3f} {'-':>8}  {'ok' if ok else 'DIFFERS'}"
                            )
    if random_names:
        print(
            "\nRandom corruptions, by the statistics of d = corrupted - clean per element (uint8 "
            "levels): mean |d| and std d,\n  ours (its own generator) and the reference's; TV = "
            "total-variation distance between the histograms of d,\n  ours vs ref, and floor = "
            "ref vs a second reference run with other seeds. Flag: TV > "
            f"{TV_FACTOR:g} x floor + {TV_SLACK:g}.\n  glass/motion 'paired': ours given the "
            "reference's own draws, pixel-wise as above."
        )
        header = (
            f"{'corruption':<20}{'sev':>3} {'ours |d|':>8} {'ref |d|':>8} {'ours std':>8} "
            f"{'ref std':>8} {'TV':>7} {'floor':>7}  verdict"
        )
        print(header + "\n" + "-" * (len(header) + 14))
        for name in random_names:
            images = glass_photos if name == "glass_blur" else photos
            for severity in SEVERITIES:
                with failures.guard("agreement", f"{name} {severity}"):
                    tic = time.perf_counter()
                    row = compare_random(reference, images, name, severity, seed)
                    ok = row["tv"] <= TV_FACTOR * row["tv_floor"] + TV_SLACK
                    (ours_mean, ours_std), (ref_mean, ref_std) = row["ours"], row["ref"]
                    print(
                        f"{name:<20}{severity:>3} {ours_mean:8.2f} {ref_mean:8.2f} "
                        f"{ours_std:8.2f} {ref_std:8.2f} {row['tv']:7.4f} "
                        f"{row['tv_floor']:7.4f}  {_verdict(name, severity, ok)}"
                        f"   ({time.perf_counter() - tic:.1f} s)"
                    )
                    if "paired" in row:
                        paired = row["paired"]
                        print(
                            f"{'  paired':<20}{severity:>3} |ours - ref| mean {paired['mean']:.3f}"
                            f", p99 {paired['p99']:.0f}, max {paired['max']}, "
                            f">1 level {paired['over1']:.3f}%, float mean "
                            f"{paired['float_mean']:.4f}"
                        )
    print_notes(names)
    print(
        "  all: the released ImageNet-C images were then saved as JPEG (quality 85); neither "
        "imagecorruptions nor corrupt() does that."
    )
    print(f"Part 1 took {time.perf_counter() - started:.0f} s.")


def print_notes(names: Sequence[str]) -> None:
    notes = [name for name in names if name in REFERENCE_NOTES]
    if notes:
        print("\nNotes (imagecorruptions 1.1.2 vs make_imagenet_c.py of hendrycks/robustness):")
        for name in notes:
            print(f"  {name}: {REFERENCE_NOTES[name]}")


def _verdict(name: str, severity: int, ok: bool) -> str:
    if ok:
        return "ok"
    if severity in EXPECTED_DIFFERENCES.get(name, ()):
        return "differs (expected: see the notes)"
    return "DIFFERS"


# ---------------------------------------------------------------------------------------------
# Part 2: accuracy a fixed model loses


def make_model() -> nn.Module:
    """A small CNN for (N, 3, 64, 64) inputs in [-0.5, 0.5], 10 classes: four stride-2 conv
    layers (batch norm, ReLU) down to 64 x 4 x 4, then a linear layer (the layout matters for
    Fashion-MNIST's classes, so no global pooling)."""
    layers: list[nn.Module] = []
    channels_in = 3
    for channels_out, kernel in ((16, 5), (32, 3), (64, 3), (64, 3)):
        layers += [
            nn.Conv2d(channels_in, channels_out, kernel, stride=2, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(channels_out),
            nn.ReLU(),
        ]
        channels_in = channels_out
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 4 * 4, 10))


def _model_input(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255 - 0.5


def train_model(images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    """``make_model`` trained with Adam on uint8 images (seeded: the same model every run)."""
    torch.manual_seed(seed)
    model = make_model()
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = _generator(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 128):
            index = order[start : start + 128]
            loss = F.cross_entropy(model(_model_input(images[index])), labels[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (%) of ``model`` on (N, 3, H, W) uint8 images."""
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), 500):
            logits = model(_model_input(images[start : start + 500]))
            correct += int((logits.argmax(1) == labels[start : start + 500]).sum())
    return 100.0 * correct / len(images)


def run_accuracy(
    reference, names, n_images: int, n_train: int, epochs: int, seed: int, failures: Failures
) -> None:
    started = time.perf_counter()
    print("\n== 2. Accuracy a fixed model loses (ImageNet table at 64x64) ==")
    train_images, train_labels, source = make_images(n_train, seed + 11, split="train")
    if train_labels is None:
        print("Fashion-MNIST is not installed: part 2 skipped (it needs labelled images).")
        return
    test_images, test_labels, _ = make_images(n_images, seed + 12, split="test")
    tic = time.perf_counter()
    model = train_model(train_images, train_labels, epochs, seed)
    train_seconds = time.perf_counter() - tic
    del train_images, train_labels
    clean_accuracy = accuracy(model, test_images, test_labels)
    test_nhwc = _to_nhwc(test_images)
    print(
        f"model: {sum(p.numel() for p in model.parameters())} parameters (4 conv with batch "
        f"norm, linear), "
        f"trained {epochs} epoch(s) on {n_train} {source} ({train_seconds:.0f} s), seed {seed}."
    )
    print(
        f"test: {n_images} held-out images of the Fashion-MNIST test split, made the same way; "
        f"clean top-1 {clean_accuracy:.1f}%."
    )
    spread = math.sqrt(2 * 0.5 * 0.5 / n_images) * 100
    print(
        f"Top-1 (%) on the images corrupted by ours / by imagecorruptions, per severity, and the "
        f"mean difference\n  ours - ref. One image is {100 / n_images:.2f} points; two "
        f"independent corruptions of the same images\n  differ by about {spread:.1f} points by "
        f"chance alone (1 std of the difference at 50% accuracy with independent errors)."
    )
    header = f"{'corruption':<20}" + "".join(f"{f'sev {s}':>13}" for s in SEVERITIES)
    header += f" {'mean ours/ref':>14} {'diff':>6}"
    print(header + "\n" + "-" * len(header))
    for name in names:
        with failures.guard("accuracy", name):
            tic = time.perf_counter()
            cells, ours_all, ref_all = [], [], []
            for severity in SEVERITIES:
                ours = corrupt(
                    test_images,
                    name,
                    severity,
                    family="imagenet",
                    generator=_generator(ours_seed(seed, name, severity)),
                )
                seeds = reference_seeds(seed, name, severity, n_images, run=2)
                _, ref = reference_run(reference, test_nhwc, name, severity, seeds)
                ours_all.append(accuracy(model, ours, test_labels))
                ref_all.append(accuracy(model, _to_nchw(ref), test_labels))
                cells.append(f"{ours_all[-1]:5.1f}/{ref_all[-1]:5.1f}")
            ours_mean, ref_mean = float(np.mean(ours_all)), float(np.mean(ref_all))
            label = (
                "  (implementations differ: see the notes)" if name in EXPECTED_DIFFERENCES else ""
            )
            print(
                f"{name:<20}"
                + "".join(f"{cell:>13}" for cell in cells)
                + f" {ours_mean:6.1f}/{ref_mean:6.1f} {ours_mean - ref_mean:+6.1f}"
                + f"   ({time.perf_counter() - tic:.1f} s){label}"
            )
    print_notes([name for name in names if name in EXPECTED_DIFFERENCES])
    print(f"Part 2 took {time.perf_counter() - started:.0f} s.")


# ---------------------------------------------------------------------------------------------
# Part 3: speed


def run_speed(
    reference,
    names,
    n_images: int,
    n_reference_images: int,
    size: int,
    repeats: int,
    seed: int,
    failures: Failures,
) -> None:
    severity = SPEED_SEVERITY
    if size == SMALL:
        images, _, source = make_images(n_images, seed + 13)
        families = ("tiny-imagenet", "imagenet")
    else:
        images = _to_nchw(photograph_crops(n_images, seed + 13, size))
        source = f"crops of scikit-image's photographs ({', '.join(PHOTOGRAPHS)})"
        families = ("imagenet",)
    print(f"\n== 3. Speed: severity {severity}, (N, 3, {size}, {size}) uint8 on the CPU ==")
    print(
        f"images: {source}.\nours: corrupt() on one batch of {n_images} images; reference: "
        f"imagecorruptions.corrupt() image by image on the first {n_reference_images} of them\n"
        f"  (glass_blur: {min(n_reference_images, GLASS_SPEED_REFERENCE_IMAGES)}), the time per "
        f"image multiplied by {n_images} (EXTRAPOLATED, not measured). Best of {repeats} rounds,\n"
        f"  the timings of a corruption taken round-robin, after a warm-up (ours on up to 16 "
        f"images, the reference on one).\n  The reference always uses ImageNet parameters; ours "
        f"is timed with the table(s) {', '.join(families)}.\n  Load average before: "
        f"{_load_average()}."
    )
    columns = "".join(f" {f'ours {family} (s)':>22}" for family in families)
    ratios = "".join(f" {f'ratio {family}':>19}" for family in families)
    header = f"{'corruption':<20}{columns} {'ref ms/image':>12} {'ref extrap. (s)':>15}{ratios}"
    print(header + "\n" + "-" * len(header))
    reference_images = _to_nhwc(images[:n_reference_images])

    def time_ours(name: str, family: str) -> float:
        generator = _generator(seed)
        tic = time.perf_counter()
        corrupt(images, name, severity, family=family, generator=generator)
        return time.perf_counter() - tic

    def time_reference(name: str, count: int) -> float:
        np.random.seed(seed)
        tic = time.perf_counter()
        for image in reference_images[:count]:
            reference.corrupt(image, corruption_name=name, severity=severity)
        return (time.perf_counter() - tic) / count

    totals = np.zeros(len(families) + 1)
    slow: list[str] = []
    for name in names:
        count = n_reference_images
        if name == "glass_blur":
            count = min(count, GLASS_SPEED_REFERENCE_IMAGES)
        with failures.guard("speed", name):
            for family in families:
                corrupt(images[:16], name, severity, family=family, generator=_generator(seed))
            reference.corrupt(reference_images[0], corruption_name=name, severity=severity)
            best = np.full(len(families) + 1, np.inf)
            for _ in range(repeats):
                rounds = [time_ours(name, family) for family in families]
                rounds.append(time_reference(name, count))
                best = np.minimum(best, rounds)
            extrapolated = best[-1] * n_images
            totals += [*best[:-1], extrapolated]
            cells, flag = "", ""
            for family, seconds in zip(families, best[:-1], strict=True):
                ratio = extrapolated / seconds
                cells += f" {ratio:18.1f}x"
                if ratio < 10:
                    slow.append(f"{name} ({family}: {ratio:.1f}x)")
                    flag = "   < 10x"
            print(
                f"{name:<20}"
                + "".join(f" {seconds:22.3f}" for seconds in best[:-1])
                + f" {best[-1] * 1000:12.2f} {extrapolated:15.1f}{cells}{flag}"
            )
    print("-" * len(header))
    ratio_cells = "".join(f" {totals[-1] / total:18.1f}x" for total in totals[:-1])
    print(
        f"{'all timed':<20}"
        + "".join(f" {total:22.3f}" for total in totals[:-1])
        + f" {'':>12} {totals[-1]:15.1f}{ratio_cells}   (target >= 10x for each)"
    )
    print("Under 10x: " + (", ".join(slow) if slow else "none"))
    print(f"Load average after: {_load_average()} (other processes on the machine inflate times).")


def _load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


# ---------------------------------------------------------------------------------------------


def _version(module_name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module_name)
    except PackageNotFoundError:
        return "?"


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--corruptions",
        default="all",
        help="a set (paper, benchmark, extra, all) or names, comma-separated (default all)",
    )
    parser.add_argument(
        "--photos", type=int, default=16, help="224x224 photograph crops in part 1 (default 16)"
    )
    parser.add_argument(
        "--accuracy-images", type=int, default=200, help="held-out images in part 2 (default 200)"
    )
    parser.add_argument(
        "--train-images", type=int, default=10000, help="training images in part 2 (default 10000)"
    )
    parser.add_argument("--train-epochs", type=int, default=3, help="part 2 (default 3)")
    parser.add_argument(
        "--speed-images", type=int, default=2000, help="batch size timed in part 3 (default 2000)"
    )
    parser.add_argument(
        "--speed-reference-images",
        type=int,
        default=100,
        help="images the reference is timed on (default 100; glass_blur at most 20)",
    )
    parser.add_argument(
        "--speed-size", type=int, default=SMALL, choices=(SMALL, CROP), help="part 3 image side"
    )
    parser.add_argument("--repeats", type=int, default=3, help="speed: best of this many")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch and OpenCV threads")
    parser.add_argument("--skip-compare", action="store_true", help="skip part 1")
    parser.add_argument("--skip-accuracy", action="store_true", help="skip part 2")
    parser.add_argument("--skip-speed", action="store_true", help="skip part 3")
    args = parser.parse_args(argv)
    for option in (
        "photos",
        "accuracy_images",
        "train_images",
        "train_epochs",
        "speed_images",
        "repeats",
        "threads",
    ):
        value = getattr(args, option)
        if value < 1:
            parser.error(f"--{option.replace('_', '-')} should be >= 1, but got {value}")
    if args.seed < 0:
        parser.error(f"--seed should be >= 0, but got {args.seed}")
    if not 1 <= args.speed_reference_images <= args.speed_images:
        parser.error(
            f"--speed-reference-images should be in 1..{args.speed_images} (--speed-images), "
            f"but got {args.speed_reference_images}"
        )
    try:
        args.corruptions = corruption_names(args.corruptions)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    reference = _import_reference()
    # skimage's multichannel= notice, scipy.ndimage.interpolation, pkg_resources.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    sys.stdout.reconfigure(line_buffering=True)  # every line out as soon as it is printed
    import cv2

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    allocator = {name: os.environ.get(name, "(unset)") for name in ALLOCATOR_VARIABLES}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, numpy {np.__version__}, "
        f"imagecorruptions {_version('imagecorruptions')}, scikit-image "
        f"{_version('scikit-image')}, scipy {_version('scipy')}, opencv {cv2.__version__} "
        f"({cv2.getNumThreads()} threads), Pillow {_version('pillow')}; python "
        f"{platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs"
    )
    print("allocator env: " + ", ".join(f"{name}={value}" for name, value in allocator.items()))
    print(f"load average at start: {_load_average()}")
    names, skipped = available_corruptions(args.corruptions)
    print(f"corruptions: {len(names)} of the {len(args.corruptions)} asked for: {', '.join(names)}")
    for name, reason in skipped.items():
        print(f"  skipped {name}: {reason}")
    failures = Failures()
    if names and not args.skip_compare:
        run_comparison(reference, names, args.photos, args.seed, failures)
    if names and not args.skip_accuracy:
        run_accuracy(
            reference,
            names,
            args.accuracy_images,
            args.train_images,
            args.train_epochs,
            args.seed,
            failures,
        )
    if names and not args.skip_speed:
        run_speed(
            reference,
            names,
            args.speed_images,
            args.speed_reference_images,
            args.speed_size,
            args.repeats,
            args.seed,
            failures,
        )
    if failures.items:
        print(f"\n{len(failures.items)} failure(s):")
        for item in failures.items:
            print(f"  {item}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
