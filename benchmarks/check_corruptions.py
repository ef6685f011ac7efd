"""Check ``dropcluster.data.corruptions`` against the PyPI ``imagecorruptions``; time both.

``imagecorruptions`` (bethgelab, 1.1.2) is the usual stand-alone port of Hendrycks & Dietterich's
corruption code. It always uses the ImageNet-C severity table, so ours is called with
``family="imagenet"`` for the comparison. For each of our seven corruptions and each severity,
on the same clean images:

* noises (random, nothing to pair): the distribution of ``corrupted - clean`` per element;
  mean absolute value, and the total-variation distance between the two histograms
  (``TV(ours, ref)``) next to the one between two independent reference runs
  (``TV(ref, ref')``, the sampling floor);
* defocus and zoom blur (deterministic): pixel-wise ``|ours - ref|`` in uint8 levels (mean,
  p50/p90/p99/max) and the largest difference of the float outputs before quantisation;
* glass and motion blur (random): both ways. Pixel-wise with the reference's own random draws
  given to ours (the reference draws with the global NumPy generator; the script seeds it per
  image and replays the same calls to recover the shuffle offsets and the angle, then hands
  them to ``glass_shuffle`` / ``motion_blur_at`` through a temporary wrapper), and by
  distribution, ours drawing from its own generator (the mean and TV columns).

Then the speed: our ``corrupt`` on a (M, 3, 64, 64) uint8 batch at severity 3 (family
``"tiny-imagenet"``, and ``"imagenet"``: the reference's parameters) against the reference
looping image by image over a few hundred images, extrapolated per image to M.

The reference needs an environment of its own: 1.1.2 imports ``pkg_resources`` (gone from
setuptools >= 81) and passes ``multichannel=`` to scikit-image (removed in 0.21). This one
works on Python 3.11, from the repository root (opencv-python comes with imagecorruptions)::

    python3 -m venv /tmp/refc_env
    /tmp/refc_env/bin/pip install "setuptools>=77.0.3,<81" "numpy<2" "scipy<1.14" \\
        "scikit-image<0.20" "opencv-python-headless<4.11" imagecorruptions==1.1.2 torch==2.13.0
    /tmp/refc_env/bin/pip install -e . --no-deps
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 \\
        /tmp/refc_env/bin/python benchmarks/check_corruptions.py

    python benchmarks/check_corruptions.py [--images N] [--seed S] [--speed-images M]
        [--speed-reference-images K] [--repeats R] [--skip-speed] [--skip-compare]
"""

# The reference draws from NumPy's legacy global generator: seeding and replaying it is the point.
# ruff: noqa: NPY002

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from dropcluster.data import corruptions
from dropcluster.data.corruptions import CORRUPTIONS, corrupt

SIZE = 64
DETERMINISTIC = ("defocus_blur", "zoom_blur")
PAIRED_RANDOM = ("glass_blur", "motion_blur")
#: Images per call of ours in the paired runs: well under one chunk of ``corrupt`` (341 images
#: of 3x64x64), so each call makes exactly one pass through the patched function.
PAIRED_BATCH = 64
ALLOCATOR_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")

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


# ---------------------------------------------------------------------------------------------
# Clean images


def make_images(n_images: int, seed: int) -> tuple[torch.Tensor, str]:
    """(N, 3, 64, 64) uint8 colour images with real edges and textures, and what they are.

    Fashion-MNIST test images (when installed) upsampled bicubically to 64x64, the garment in
    a random colour over a smooth random colour background; else smooth random colour fields
    with a random straight edge and a random rectangle.
    """
    generator = torch.Generator().manual_seed(seed)
    try:
        from dropcluster.data.fashion_mnist import load_fashion_mnist

        grey_images, _ = load_fashion_mnist("test")
    except (FileNotFoundError, ValueError, ImportError):
        grey_images = None
    background = _smooth_field(n_images, 4, generator) * 0.5 + 0.1
    if grey_images is not None:
        index = torch.randint(len(grey_images), (n_images,), generator=generator)
        if n_images <= len(grey_images):
            index = torch.randperm(len(grey_images), generator=generator)[:n_images]
        grey = F.interpolate(
            grey_images[index].float() / 255, size=(SIZE, SIZE), mode="bicubic", align_corners=False
        ).clamp(0, 1)
        colour = 0.2 + 0.8 * torch.rand(n_images, 3, 1, 1, generator=generator)
        pixels = grey * colour + (1 - grey) * background
        source = "Fashion-MNIST test images, bicubic 28->64, random colour on a smooth background"
    else:
        coords = torch.linspace(-1, 1, SIZE)
        rows, cols = coords.view(1, 1, SIZE, 1), coords.view(1, 1, 1, SIZE)
        angle = torch.rand(n_images, 1, 1, 1, generator=generator) * 2 * torch.pi
        offset = torch.rand(n_images, 1, 1, 1, generator=generator) - 0.5
        half_plane = (rows * torch.sin(angle) + cols * torch.cos(angle) > offset).float()
        corner = torch.rand(n_images, 2, 1, 1, generator=generator) - 0.8
        rectangle = ((rows > corner[:, :1]) & (rows < corner[:, :1] + 0.6)).float() * (
            (cols > corner[:, 1:]) & (cols < corner[:, 1:] + 0.6)
        ).float()
        colours = torch.rand(n_images, 2, 3, 1, 1, generator=generator)
        pixels = background + 0.3 * _smooth_field(n_images, 16, generator) - 0.15
        pixels = torch.where(half_plane.bool(), colours[:, 0], pixels)
        pixels = torch.where(rectangle.bool(), colours[:, 1], pixels)
        source = "synthetic: smooth random colour fields with a straight edge and a rectangle"
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8), source


def _smooth_field(n_images: int, cells: int, generator: torch.Generator) -> torch.Tensor:
    coarse = torch.rand(n_images, 3, cells, cells, generator=generator)
    return F.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=False)


# ---------------------------------------------------------------------------------------------
# The reference, with its random draws recovered


def reference_float(reference, image_hwc: np.ndarray, name: str, severity: int) -> np.ndarray:
    """The reference's float output in [0, 255] before ``np.uint8`` (H, W, 3) float."""
    from PIL import Image

    function = reference.corruptions.__dict__[name]
    return np.asarray(function(Image.fromarray(image_hwc), severity), dtype=np.float64)


def replay_glass_offsets(severity: int, seed: int) -> np.ndarray:
    """The (iterations, R, Q, 2) ``(dx, dy)`` draws the reference's glass blur makes after
    ``np.random.seed(seed)``, reordered from its descending loop to ascending (h, w)."""
    _, max_shift, iterations = corruptions.SEVERITY_PARAMETERS["imagenet"]["glass_blur"][
        severity - 1
    ]
    n_rows = n_cols = SIZE - 2 * max_shift
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
def _ours_with_draws(name: str, draws: np.ndarray):
    """Temporarily make ours use the reference's draws for one batch (see the module doc)."""
    if name == "glass_blur":
        original = corruptions.glass_shuffle
        passes = iter(range(draws.shape[1]))

        def replacement(levels, max_shift, *, offsets=None, generator=None):
            if levels.shape[0] != draws.shape[0]:
                raise RuntimeError(f"expected one chunk of {draws.shape[0]} images")
            given = torch.from_numpy(draws[:, next(passes)])
            return original(levels, max_shift, offsets=given)

        attribute = "glass_shuffle"
    else:
        original = corruptions.motion_blur_at

        def replacement(pixels, radius, sigma, angles_degrees):
            if pixels.shape[0] != draws.shape[0]:
                raise RuntimeError(f"expected one chunk of {draws.shape[0]} images")
            return original(pixels, radius, sigma, torch.from_numpy(draws))

        attribute = "motion_blur_at"
    setattr(corruptions, attribute, replacement)
    try:
        yield
    finally:
        setattr(corruptions, attribute, original)


# ---------------------------------------------------------------------------------------------
# Comparison


def _signed_histogram(corrupted: np.ndarray, clean: np.ndarray) -> np.ndarray:
    difference = corrupted.astype(np.int64) - clean.astype(np.int64)
    return np.bincount((difference + 255).ravel(), minlength=511) / difference.size


def _total_variation(first: np.ndarray, second: np.ndarray) -> float:
    return 0.5 * float(np.abs(first - second).sum())


def compare_one(reference, clean_nchw, clean_nhwc, name, severity, seed):
    """One row of the table (a dict of figures) for one corruption and severity."""
    n_images = clean_nchw.shape[0]
    generator = torch.Generator().manual_seed(seed * 1000 + severity)
    ours_own = corrupt(clean_nchw, name, severity, family="imagenet", generator=generator)
    ours_own = ours_own.permute(0, 2, 3, 1).numpy()
    image_seeds = [seed * 1_000_003 + severity * 10_007 + index for index in range(n_images)]

    ref_float = np.empty(clean_nhwc.shape, dtype=np.float64)
    for index in range(n_images):
        np.random.seed(image_seeds[index])
        ref_float[index] = reference_float(reference, clean_nhwc[index], name, severity)
    ref_uint8 = ref_float.astype(np.uint8)  # what imagecorruptions.corrupt returns: np.uint8

    clean_int = clean_nhwc.astype(np.int64)
    ref_histogram = _signed_histogram(ref_uint8, clean_nhwc)
    row = {
        "ours_clean": float(np.abs(ours_own.astype(np.int64) - clean_int).mean()),
        "ref_clean": float(np.abs(ref_uint8.astype(np.int64) - clean_int).mean()),
        "tv": _total_variation(_signed_histogram(ours_own, clean_nhwc), ref_histogram),
    }
    if name not in DETERMINISTIC and name not in PAIRED_RANDOM:
        np.random.seed(seed + 7 + severity)
        second = np.stack(
            [reference_float(reference, image, name, severity) for image in clean_nhwc]
        ).astype(np.uint8)
        row["tv_floor"] = _total_variation(_signed_histogram(second, clean_nhwc), ref_histogram)
        return row

    ours_uint8 = np.empty_like(clean_nhwc)
    ours_float = np.empty(clean_nhwc.shape, dtype=np.float64)
    for start in range(0, n_images, PAIRED_BATCH):
        batch = clean_nchw[start : start + PAIRED_BATCH]
        seeds = image_seeds[start : start + PAIRED_BATCH]
        if name == "glass_blur":
            draws = np.stack([replay_glass_offsets(severity, s) for s in seeds])
        elif name == "motion_blur":
            draws = np.array([replay_motion_angle(s) for s in seeds])
        for target, images_in in ((ours_uint8, batch), (ours_float, batch.float() / 255)):
            context = (
                _ours_with_draws(name, draws) if name in PAIRED_RANDOM else contextlib.nullcontext()
            )
            with context:
                output = corrupt(images_in, name, severity, family="imagenet")
            output = output.permute(0, 2, 3, 1).double().numpy()
            # Float in gives float in [0, 1] out; the reference's float output is in [0, 255].
            scale = 255 if images_in.is_floating_point() else 1
            target[start : start + len(batch)] = output * scale
    absolute = np.abs(ours_uint8.astype(np.int64) - ref_uint8.astype(np.int64))
    row.update(
        pixel_mean=float(absolute.mean()),
        pixel_quantiles=np.percentile(absolute, [50, 90, 99]).tolist(),
        pixel_max=int(absolute.max()),
        float_max=float(np.abs(ours_float - ref_float).max()),
        float_mean=float(np.abs(ours_float - ref_float).mean()),
    )
    return row


def run_comparison(reference, n_images: int, seed: int) -> None:
    clean, source = make_images(n_images, seed)
    clean_nhwc = clean.permute(0, 2, 3, 1).contiguous().numpy()
    # imagecorruptions.corrupt is np.uint8(function(PIL image, severity)) for (H, W, 3) uint8
    # input; the table calls the function directly to see the float output too. Check that.
    np.random.seed(0)
    via_corrupt = reference.corrupt(clean_nhwc[0], corruption_name="zoom_blur", severity=3)
    direct = reference_float(reference, clean_nhwc[0], "zoom_blur", 3).astype(np.uint8)
    assert np.array_equal(via_corrupt, direct), "imagecorruptions.corrupt changed its contract"

    version = _version("imagecorruptions")
    print(f"\n== Comparison with imagecorruptions {version}, ImageNet table ==")
    print(f"images: {n_images} x (3, 64, 64) uint8, {source}; seed {seed}")
    print(
        "columns: mean |x - clean| in uint8 levels (ours drawn from its own generator); "
        "TV = total variation\n  distance between the histograms of (corrupted - clean); "
        "|ours - ref| = pixel-wise on uint8 outputs\n  (glass/motion: ours given the "
        "reference's draws); float = before quantisation, in levels."
    )
    header = (
        f"{'corruption':<15}{'sev':>3} {'ours-clean':>10} {'ref-clean':>9} {'TV':>6} "
        f"{'TV floor':>8} | {'|ours-ref|':>10} {'p50':>4} {'p90':>4} {'p99':>4} {'max':>4} "
        f"| {'float mean':>10} {'float max':>9}"
    )
    print(header)
    print("-" * len(header))
    for name in CORRUPTIONS:
        for severity in range(1, 6):
            started = time.perf_counter()
            row = compare_one(reference, clean, clean_nhwc, name, severity, seed)
            seconds = time.perf_counter() - started
            floor = f"{row['tv_floor']:8.4f}" if "tv_floor" in row else f"{'-':>8}"
            line = (
                f"{name:<15}{severity:>3} {row['ours_clean']:10.2f} {row['ref_clean']:9.2f} "
                f"{row['tv']:6.4f} {floor} | "
            )
            if "pixel_mean" in row:
                p50, p90, p99 = row["pixel_quantiles"]
                line += (
                    f"{row['pixel_mean']:10.3f} {p50:4.0f} {p90:4.0f} {p99:4.0f} "
                    f"{row['pixel_max']:4d} | {row['float_mean']:10.4f} {row['float_max']:9.3f}"
                )
            else:
                line += f"{'-':>10} {'-':>4} {'-':>4} {'-':>4} {'-':>4} | {'-':>10} {'-':>9}"
            print(line + f"   ({seconds:.1f} s)", flush=True)


# ---------------------------------------------------------------------------------------------
# Speed


def run_speed(reference, n_images: int, n_reference_images: int, repeats: int, seed: int) -> None:
    images, _ = make_images(n_images, seed)
    reference_images = images[:n_reference_images].permute(0, 2, 3, 1).contiguous().numpy()
    severity = 3
    print(f"\n== Speed: severity {severity}, (N, 3, 64, 64) uint8 on the CPU ==")
    print(
        f"ours: corrupt() on one batch of {n_images} images; reference: "
        f"imagecorruptions.corrupt() image by image on\n  {n_reference_images} images, the time "
        f"per image multiplied by {n_images} (EXTRAPOLATED, not measured). Best of {repeats}\n"
        f"  rounds, the three timings of a corruption taken round-robin, after a warm-up on 16 "
        f"images. The reference\n  always uses ImageNet parameters (also at 64x64): fine for "
        f"timing; ours is timed with both tables.\n  Load average before: {_load_average()}."
    )
    header = (
        f"{'corruption':<15} {'ours tiny-in (s)':>16} {'ours imagenet (s)':>17} "
        f"{'ref extrapolated (s)':>20} {'ratio tiny':>10} {'ratio imagenet':>14}"
    )
    print(header)
    print("-" * len(header))

    def time_ours(name: str, family: str) -> float:
        generator = torch.Generator().manual_seed(seed)
        started = time.perf_counter()
        corrupt(images, name, severity, family=family, generator=generator)
        return time.perf_counter() - started

    def time_reference(name: str) -> float:
        np.random.seed(seed)
        started = time.perf_counter()
        for image in reference_images:
            reference.corrupt(image, corruption_name=name, severity=severity)
        return (time.perf_counter() - started) / len(reference_images) * n_images

    totals = np.zeros(3)
    for name in CORRUPTIONS:
        for family in ("tiny-imagenet", "imagenet"):
            corrupt(images[:16], name, severity, family=family)
        best = np.full(3, np.inf)
        for _ in range(repeats):
            rounds = (
                time_ours(name, "tiny-imagenet"),
                time_ours(name, "imagenet"),
                time_reference(name),
            )
            best = np.minimum(best, rounds)
        totals += best
        print(
            f"{name:<15} {best[0]:16.2f} {best[1]:17.2f} {best[2]:20.1f} "
            f"{best[2] / best[0]:9.1f}x {best[2] / best[1]:13.1f}x",
            flush=True,
        )
    print("-" * len(header))
    print(
        f"{'all seven':<15} {totals[0]:16.2f} {totals[1]:17.2f} {totals[2]:20.1f} "
        f"{totals[2] / totals[0]:9.1f}x {totals[2] / totals[1]:13.1f}x   (target >= 10x)"
    )
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="images in the comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speed-images", type=int, default=10000, help="batch size timed")
    parser.add_argument(
        "--speed-reference-images", type=int, default=200, help="images the reference is timed on"
    )
    parser.add_argument("--repeats", type=int, default=3, help="speed: best of this many")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args(argv)
    for name, value in (
        ("--images", args.images),
        ("--speed-images", args.speed_images),
        ("--repeats", args.repeats),
    ):
        if value < 1:
            parser.error(f"{name} should be >= 1, but got {value}")
    if not 1 <= args.speed_reference_images <= args.speed_images:
        parser.error(
            f"--speed-reference-images should be in 1..{args.speed_images} (--speed-images), "
            f"but got {args.speed_reference_images}"
        )

    reference = _import_reference()
    warnings.filterwarnings("ignore", category=FutureWarning)  # skimage's multichannel= notice
    torch.set_num_threads(args.threads)
    allocator = {name: os.environ.get(name, "(unset)") for name in ALLOCATOR_VARIABLES}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, numpy {np.__version__}, "
        f"imagecorruptions {_version('imagecorruptions')}, scikit-image "
        f"{_version('scikit-image')}, scipy {_version('scipy')}, opencv "
        f"{_version('opencv-python-headless')}; python {platform.python_version()} on "
        f"{platform.machine()}, {os.cpu_count()} CPUs"
    )
    print("allocator env: " + ", ".join(f"{name}={value}" for name, value in allocator.items()))
    if not args.skip_compare:
        run_comparison(reference, args.images, args.seed)
    if not args.skip_speed:
        run_speed(
            reference, args.speed_images, args.speed_reference_images, args.repeats, args.seed
        )


if __name__ == "__main__":
    main()
