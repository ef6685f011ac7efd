"""nilearn's ReNA as the reference for `dropcluster.rena`, and the parity battery.

A test helper, not a test file: `tests/test_rena_parity.py` and `benchmarks/bench_rena.py`
import it. nilearn, nibabel, scipy and scikit-learn are imported here, never by the package.

The reference is `nilearn.regions.rena_clustering.recursive_neighbor_agglomeration` on one
channel at a time: X is (S, H*W) with feature j = pixel h*W + w, and the mask is a 3-D image of
ones of shape (H, W, 1), so the graph is the 4-neighbour grid (docs/design.md, "ReNA, exactly").
nilearn clusters 3-D masks natively, so the same call covers our extension beyond the paper:
a D x H x W volume is the mask (D, H, W) (6 neighbours, feature j = (d*H + h)*W + w) and a chain
of L sites the mask (L, 1, 1) (2 neighbours).
"""

from __future__ import annotations

import gzip
import math
import os
import warnings
from functools import cache
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

# Debian's package first, then where `dropcluster download fashion-mnist` puts the files (this
# script also runs in nilearn's own environment, so it does not import dropcluster).
FASHION_MNIST_TEST_IMAGES = next(
    (
        path
        for path in (
            Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"),
            Path(os.environ.get("DROPCLUSTER_DATA") or Path.home() / ".cache/dropcluster/data")
            / "fashion-mnist/t10k-images-idx3-ubyte.gz",
        )
        if path.is_file()
    ),
    Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"),
)

#: The paper ran ReNA with at most 1000 rounds (Algorithm 1).
PAPER_ROUNDS = 1000

#: Rounds given to nilearn on a channel that cannot converge (c0 > k, docs/design.md,
#: "Unstructured channels"). nilearn has no early exit, so such a channel pays for every round of
#: `n_iter`; it reaches its final state (one cluster per G0 component) within a few rounds, and
#: `reference_rena` checks that it did before trusting the shortcut.
STUCK_ROUNDS = 40


@cache
def grid_mask(*sizes: int):
    """A Nifti image of ones, the spatial shape padded with 1s to 3-D: (L, 1, 1), (H, W, 1) or
    (D, H, W). nilearn's grid over row-major sites: 2, 4 or 6 neighbours."""
    import nibabel

    shape = tuple(sizes) + (1,) * (3 - len(sizes))
    return nibabel.Nifti1Image(np.ones(shape, dtype=np.int8), np.eye(4))


class NilearnRun(NamedTuple):
    """One channel's result from nilearn."""

    n_found: int
    #: (*spatial) int64 in [0, n_found), numbered by each cluster's smallest row-major site index.
    labels: np.ndarray
    #: Some cut round (docs/design.md, "ReNA, exactly") had equal index gaps on both sides of its
    #: keep boundary, so which links it kept depends on how the sort breaks ties.
    ambiguous_cut: bool


class _RecordingNumpy:
    """numpy for nilearn's module, with an `argsort` that sees the overshoot guard ("cut").

    nilearn sorts the nearest-neighbour links by (row - col) with numpy's default argsort, which
    is unstable (a SIMD sort whose tie order depends on the CPU), and keeps the first |V| - k.
    With `stable=True` ties keep their row-major order instead, i.e. the largest index gap first,
    then the smallest lower index: the deterministic rule of `dropcluster.rena` with
    identical_neighbours="split". Either way it records whether a tie straddles the boundary.
    """

    def __init__(self, n_clusters: int, stable: bool):
        self.n_clusters = n_clusters
        self.stable = stable
        self.n_nodes = 0
        self.ambiguous_cut = False

    def __getattr__(self, name):
        return getattr(np, name)

    def argsort(self, keys, *args, **kwargs):
        order = np.argsort(keys, kind="stable") if self.stable else np.argsort(keys)
        n_kept = self.n_nodes - self.n_clusters
        if 0 < n_kept < keys.size and keys[order[n_kept - 1]] == keys[order[n_kept]]:
            self.ambiguous_cut = True
        return order


def _run_nilearn(x_channel, n_clusters: int, n_iter: int, stable_ties: bool) -> NilearnRun:
    from nilearn.regions import rena_clustering

    x_channel = np.asarray(x_channel)
    n_samples, *spatial = x_channel.shape
    n_clusters = min(int(n_clusters), math.prod(spatial))
    features = np.ascontiguousarray(x_channel.reshape(n_samples, -1))
    recorder = _RecordingNumpy(n_clusters, stable_ties)
    nn_connectivity = rena_clustering._nn_connectivity

    def nn_connectivity_counting_nodes(connectivity, threshold=1e-7):
        recorder.n_nodes = connectivity.shape[0]
        return nn_connectivity(connectivity, threshold)

    with (
        mock.patch.object(rena_clustering, "np", recorder),
        mock.patch.object(rena_clustering, "_nn_connectivity", nn_connectivity_counting_nodes),
        # A node with no edges left divides by zero in nilearn's 1-NN step; harmless there.
        np.errstate(divide="ignore", invalid="ignore"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        n_found, labels = rena_clustering.recursive_neighbor_agglomeration(
            features, grid_mask(*spatial), n_clusters, n_iter=n_iter, threshold=1e-7
        )
    labels = np.asarray(labels, dtype=np.int64).reshape(spatial)
    return NilearnRun(int(n_found), labels, recorder.ambiguous_cut)


def nilearn_rena(
    x_channel, n_clusters: int, n_iter: int, *, stable_ties: bool = False
) -> tuple[int, np.ndarray]:
    """Run nilearn's ReNA on one channel.

    Args:
        x_channel (ndarray[S, *spatial]): the channel's activations, one map per sample; the
            spatial shape is (L,), (H, W) or (D, H, W).
        n_clusters: requested number of clusters; clamped to the number of sites here (the raw
            nilearn function raises on k above it).
        n_iter: maximum number of rounds (nilearn's `n_iter`).
        stable_ties: break index-gap ties in the cut with a stable argsort (the deterministic
            rule) instead of numpy's default argsort, whose order is platform dependent.

    Returns:
        (n_found, labels): the number of clusters nilearn ended with, and labels
        (ndarray[*spatial], int64) in [0, n_found), numbered by each cluster's smallest row-major
        site index.
    """
    run = _run_nilearn(x_channel, n_clusters, n_iter, stable_ties)
    return run.n_found, run.labels


def level0_components(x_channel) -> int:
    """c0: connected components of the grid without the edges between identical sites.

    Two neighbouring sites whose values are equal in every sample have level-0 weight 0, and
    nilearn drops that edge for good (docs/design.md, "ReNA, exactly" and "Unstructured
    channels"). No cluster can span two of these components, so ReNA ends with at least
    max(c0, k) clusters, and exactly that many given enough rounds.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    x_channel = np.asarray(x_channel)
    spatial = x_channel.shape[1:]
    site = np.arange(math.prod(spatial)).reshape(spatial)
    rows, cols = [], []
    for axis in range(len(spatial)):
        head = (slice(None),) * axis + (slice(None, -1),)
        tail = (slice(None),) * axis + (slice(1, None),)
        differs = (x_channel[(slice(None), *tail)] != x_channel[(slice(None), *head)]).any(axis=0)
        rows.append(site[head][differs])
        cols.append(site[tail][differs])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(rows.size, dtype=np.int8), (rows, cols)), shape=(site.size,) * 2)
    return int(connected_components(graph, directed=False)[0])


def reference_rena(x_channel, n_clusters: int, *, stable_ties: bool = False) -> NilearnRun:
    """nilearn's result at the paper's 1000 rounds, without paying for rounds that do nothing.

    A channel with c0 <= k converges and nilearn stops by itself, so it runs with n_iter=1000.
    A channel with c0 > k cannot converge; nilearn would spend all 1000 rounds on it, but once
    it holds c0 clusters (one per G0 component) no edge is left and every later round is a
    no-op. So it runs with STUCK_ROUNDS, and the result is accepted only if n_found == c0, which
    certifies that it equals the n_iter=1000 result; otherwise it is rerun with 1000 rounds.

    Args: as `nilearn_rena`. Returns: a `NilearnRun`.
    """
    x_channel = np.asarray(x_channel)
    n_clusters = min(int(n_clusters), math.prod(x_channel.shape[1:]))
    c0 = level0_components(x_channel)
    if c0 > n_clusters:
        run = _run_nilearn(x_channel, n_clusters, STUCK_ROUNDS, stable_ties)
        if run.n_found == c0:
            return run
    return _run_nilearn(x_channel, n_clusters, PAPER_ROUNDS, stable_ties)


def adjusted_rand(a, b) -> float:
    """Adjusted Rand index of two labelings of the same pixels (any shapes, flattened)."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.asarray(a).ravel(), np.asarray(b).ravel()))


def reconstruction_error(x_channel, labels) -> float:
    """Sum of squared errors when each pixel is replaced by its cluster's mean, per sample.

    Args:
        x_channel (ndarray[S, *spatial]): activations.
        labels (ndarray[*spatial]): cluster of each site, values in [0, K).

    Returns:
        sum over samples and pixels of (x - mean of x over the pixel's cluster)², in float64.
    """
    x = np.asarray(x_channel, dtype=np.float64)
    n_samples = x.shape[0]
    x = x.reshape(n_samples, -1)
    labels = np.asarray(labels, dtype=np.int64).ravel()
    n_labels = int(labels.max()) + 1
    counts = np.bincount(labels, minlength=n_labels)
    slot = labels[None, :] + n_labels * np.arange(n_samples)[:, None]
    sums = np.bincount(slot.ravel(), weights=x.ravel(), minlength=n_samples * n_labels)
    means = sums.reshape(n_samples, n_labels) / np.maximum(counts, 1)
    return float(((x - means[:, labels]) ** 2).sum())


# ---------------------------------------------------------------------------------------------
# The parity battery


class ParityCase(NamedTuple):
    """One battery entry: activations x (Tensor[S, C, *spatial], float32) clustered into k;
    spatial is (H, W) in `parity_battery`, (L,) or (D, H, W) in `parity_battery_nd`."""

    name: str
    x: torch.Tensor
    k: int
    group: str
    #: Continuous values with no exact ties between pixel distances: nilearn's labels are
    #: expected to be reproduced exactly, whatever numpy's argsort does.
    tie_free: bool = False


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(2.5 * sigma)))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    n, c, h, w = x.shape
    flat = x.reshape(n * c, 1, h, w)
    # Reflect padding keeps the border as varied as the interior (no artificial constant frame).
    pad_w, pad_h = min(radius, w - 1), min(radius, h - 1)
    flat = F.pad(flat, (pad_w, pad_w, 0, 0), mode="reflect")
    flat = F.conv2d(flat, kernel.view(1, 1, 1, -1)[..., radius - pad_w : radius + pad_w + 1])
    flat = F.pad(flat, (0, 0, pad_h, pad_h), mode="reflect")
    flat = F.conv2d(flat, kernel.view(1, 1, -1, 1)[..., radius - pad_h : radius + pad_h + 1, :])
    return flat.reshape(n, c, h, w)


def _gaussian_blur_axes(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The blur of `_gaussian_blur` for any number of spatial axes, one 1-D pass per axis."""
    radius = max(1, int(math.ceil(2.5 * sigma)))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    for axis in range(2, x.dim()):
        moved = x.movedim(axis, -1)
        shape = moved.shape
        pad = min(radius, shape[-1] - 1)
        rows = F.pad(moved.reshape(-1, 1, shape[-1]), (pad, pad), mode="reflect")
        rows = F.conv1d(rows, kernel.view(1, 1, -1)[..., radius - pad : radius + pad + 1])
        x = rows.reshape(shape).movedim(-1, axis)
    return x


def smooth_fields(shape, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Blurred white noise, each channel scaled to unit standard deviation; shape (S, C,
    *spatial) with 1 to 3 spatial axes (2-D maps keep the battery's original blur)."""
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    x = _gaussian_blur(x, sigma) if x.dim() == 4 else _gaussian_blur_axes(x, sigma)
    x = x / x.std(dim=(0, *range(2, x.dim())), keepdim=True)
    return x.float()


def relu_fields(shape, sigma: float, offset: float, generator: torch.Generator) -> torch.Tensor:
    """Smooth fields minus an offset through a ReLU: zero regions that move between samples."""
    return torch.relu(smooth_fields(shape, sigma, generator) - offset)


def conv_activations(
    n_samples: int,
    n_channels: int,
    size: tuple[int, int],
    kernel: int,
    generator: torch.Generator,
    *,
    in_channels: int = 3,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """First-conv-like activations: smooth images through a random conv (zero padding) + ReLU."""
    images = smooth_fields((n_samples, in_channels, *size), 1.5, generator)
    weight = torch.randn(n_channels, in_channels, kernel, kernel, generator=generator)
    weight /= math.sqrt(in_channels * kernel * kernel)
    if bias is None:
        bias = 0.2 * torch.randn(n_channels, generator=generator)
    return torch.relu(F.conv2d(images, weight, bias, padding=kernel // 2))


def load_fashion_mnist_test_images(count: int) -> torch.Tensor:
    """The first `count` Fashion-MNIST test images as float32 in [0, 1], shape (count, 28, 28)."""
    if not FASHION_MNIST_TEST_IMAGES.is_file():
        raise FileNotFoundError(
            f"{FASHION_MNIST_TEST_IMAGES} is missing: run `make data` "
            "(Debian's dataset-fashion-mnist, else `dropcluster download fashion-mnist`)"
        )
    with gzip.open(FASHION_MNIST_TEST_IMAGES, "rb") as stream:
        raw = stream.read()
    # IDX: 16-byte header (magic, count, rows, cols), then uint8 pixels.
    pixels = np.frombuffer(raw, dtype=np.uint8, offset=16)[: count * 28 * 28]
    return torch.from_numpy(pixels.reshape(count, 28, 28).astype(np.float32) / 255.0)


def fashion_mnist_activations(generator: torch.Generator) -> torch.Tensor:
    """64 real images through a seeded 1->8 channel 5x5 conv (padding 2) + ReLU: (64, 8, 28, 28).

    Fashion-MNIST images have zero borders, so parts of the frame are the same in every sample.
    """
    images = load_fashion_mnist_test_images(64)[:, None]
    weight = torch.randn(8, 1, 5, 5, generator=generator) / 5.0
    bias = 0.1 * torch.randn(8, generator=generator)
    return torch.relu(F.conv2d(images, weight, bias, padding=2))


def parity_battery(seed: int = 0) -> list[ParityCase]:
    """Named cases covering the inputs ReNA meets, each (S, C, H, W) float32 with its k.

    Groups: smooth fields, ReLU fields, conv-like activations, white noise, quantised values
    (many exact ties), extreme k (1, H*W, above H*W), dead channels, constant borders, always-zero
    patches, tiny batches (S=2, 3), data scale, Fashion-MNIST, and 24 random small cases. Maps
    from 4x4 to 56x56, square and not; k in {1, 2, 5, 15, 40, H*W} plus random k up to 59.
    Deterministic for a given seed.
    """
    g = torch.Generator().manual_seed(seed)
    cases: list[ParityCase] = []

    def add(name, x, k, group, tie_free=False):
        cases.append(ParityCase(name, x.float().contiguous(), k, group, tie_free))

    # Smooth float fields: all pixel distances distinct.
    add("smooth_8x8_k5", smooth_fields((32, 6, 8, 8), 1.0, g), 5, "smooth", True)
    add("smooth_16x16_k15", smooth_fields((64, 6, 16, 16), 2.0, g), 15, "smooth", True)
    add("smooth_32x32_k15", smooth_fields((64, 6, 32, 32), 3.0, g), 15, "smooth", True)
    add("smooth_32x32_k40", smooth_fields((48, 4, 32, 32), 2.0, g), 40, "smooth", True)
    add("smooth_12x20_k15", smooth_fields((48, 6, 12, 20), 2.0, g), 15, "smooth", True)
    add("smooth_16x16_k2", smooth_fields((32, 4, 16, 16), 2.0, g), 2, "smooth", True)

    # ReLU fields: zero regions that differ between samples.
    add("relu_16x16_k15", relu_fields((64, 6, 16, 16), 2.0, 0.5, g), 15, "relu")
    add("relu_32x32_k15", relu_fields((64, 6, 32, 32), 3.0, 0.5, g), 15, "relu")
    add("relu_sparse_32x32_k15", relu_fields((64, 4, 32, 32), 3.0, 1.2, g), 15, "relu")
    add("relu_12x20_k5", relu_fields((48, 4, 12, 20), 2.0, 0.8, g), 5, "relu")

    # Conv-like activations (random 3x3 / 5x5 conv of smooth images + ReLU).
    add("conv3_32x32_k15", conv_activations(64, 8, (32, 32), 3, g), 15, "conv")
    add("conv5_16x16_k5", conv_activations(64, 8, (16, 16), 5, g), 5, "conv")
    add("conv5_12x20_k40", conv_activations(48, 6, (12, 20), 5, g), 40, "conv")
    add("conv3_56x56_k15", conv_activations(32, 3, (56, 56), 3, g), 15, "conv")

    # White noise: converges despite having no structure (docs/design.md, "Unstructured channels").
    add("noise_8x8_k2", torch.randn(16, 4, 8, 8, generator=g), 2, "noise", True)
    add("noise_16x16_k15", torch.randn(32, 6, 16, 16, generator=g), 15, "noise", True)
    add("noise_32x32_k40", torch.randn(32, 4, 32, 32, generator=g), 40, "noise", True)
    add("noise_12x20_k5", torch.randn(24, 4, 12, 20, generator=g), 5, "noise", True)

    # Quantised values: many exact ties between distances, and identical neighbours.
    add(
        "rounded_16x16_k15", torch.round(smooth_fields((64, 6, 16, 16), 2.0, g) * 4) / 4, 15, "ties"
    )
    add(
        "rounded_32x32_k40", torch.round(smooth_fields((32, 4, 32, 32), 3.0, g) * 4) / 4, 40, "ties"
    )
    add(
        "rounded_relu_16x16_k5",
        torch.round(relu_fields((32, 4, 16, 16), 2.0, 0.5, g) * 4) / 4,
        5,
        "ties",
    )
    add("levels_8x8_k5", torch.randint(0, 3, (8, 4, 8, 8), generator=g).float(), 5, "ties")

    # Extreme k.
    add("k1_16x16", smooth_fields((32, 4, 16, 16), 2.0, g), 1, "extreme_k")
    add("k_all_pixels_8x8", smooth_fields((16, 3, 8, 8), 1.0, g), 64, "extreme_k")
    add("k_above_pixels_8x8", smooth_fields((16, 3, 8, 8), 1.0, g), 100, "extreme_k")

    # Dead channels (all zero) beside live ones.
    x = conv_activations(32, 6, (16, 16), 3, g)
    x[:, [1, 4]] = 0
    add("dead_16x16_k15", x, 15, "dead")
    x = smooth_fields((32, 4, 32, 32), 2.0, g)
    x[:, 0] = 0
    x[:, 2] = 0.5  # constant, not zero: just as dead for ReNA
    add("dead_32x32_k40", x, 40, "dead")

    # Constant 3-px frame in every sample (a zero-bordered data set such as MNIST).
    x = smooth_fields((32, 4, 32, 32), 2.0, g)
    frame = torch.ones(32, 32, dtype=torch.bool)
    frame[3:-3, 3:-3] = False
    x[:, :, frame] = torch.tensor([0.0, 0.0, 0.3, -1.0]).view(1, 4, 1)
    add("constant_border_32x32_k15", x, 15, "border")
    x = smooth_fields((32, 4, 16, 16), 2.0, g)
    frame = torch.ones(16, 16, dtype=torch.bool)
    frame[3:-3, 3:-3] = False
    x[:, :, frame] = 0
    add("constant_border_16x16_k40", x, 40, "border")

    # Always-zero patches: 7x7 leaves c0 = 26 > 15 (stuck), 5x5 leaves c0 = 10 (converges).
    x = smooth_fields((48, 4, 32, 32), 2.0, g)
    x[:, :, 10:17, 12:19] = 0
    add("zero_patch7_32x32_k15", x, 15, "patch")
    x = smooth_fields((48, 4, 32, 32), 2.0, g)
    x[:, :, 20:25, 4:9] = 0
    add("zero_patch5_32x32_k15", x, 15, "patch")

    # Tiny batches: with S=2 a ReLU field has pixels that are zero in both samples.
    add("tiny_s2_smooth_16x16_k15", smooth_fields((2, 4, 16, 16), 2.0, g), 15, "tiny", True)
    add("tiny_s3_smooth_12x20_k5", smooth_fields((3, 4, 12, 20), 2.0, g), 5, "tiny", True)
    add("tiny_s2_relu_32x32_k15", relu_fields((2, 4, 32, 32), 3.0, 0.5, g), 15, "tiny")
    add("tiny_s3_relu_16x16_k40", relu_fields((3, 4, 16, 16), 2.0, 0.5, g), 40, "tiny")

    # Data scale: with squared differences below the threshold every later edge is floored to
    # it and all edges tie (docs/design.md, "ReNA, exactly"); large values stress float32 rounding.
    add("tiny_scale_16x16_k15", 1e-4 * smooth_fields((32, 4, 16, 16), 2.0, g), 15, "scale")
    add("large_scale_16x16_k15", 1e3 * conv_activations(32, 4, (16, 16), 3, g), 15, "scale")
    add(
        "repeated_image_16x16_k15",
        smooth_fields((1, 4, 16, 16), 2.0, g).expand(8, -1, -1, -1),
        15,
        "scale",
    )

    # Real data with zero image borders.
    add("fashion_mnist_28x28_k15", fashion_mnist_activations(g), 15, "fashion_mnist")

    # Random small cases: 4x4 to 32x32, 2 to 63 samples, k from 2 to 59, mixed kinds.
    for index in range(24):
        height, width = (int(v) for v in torch.randint(4, 33, (2,), generator=g))
        n_samples = int(torch.randint(2, 64, (1,), generator=g))
        k = int(torch.randint(2, min(59, height * width) + 1, (1,), generator=g))
        shape = (n_samples, 2, height, width)
        kind = ("noise", "smooth", "relu", "rounded", "part_dead")[index % 5]
        if kind == "noise":
            x = torch.randn(shape, generator=g)
        elif kind == "smooth":
            x = smooth_fields(shape, 1.5, g)
        elif kind == "relu":
            x = relu_fields(shape, 1.5, 0.7, g)
        elif kind == "rounded":
            x = torch.round(smooth_fields(shape, 1.5, g) * 3) / 3
        else:
            x = smooth_fields(shape, 1.5, g)
            x[:, :, : height // 3, : width // 2] = 0
        add(
            f"random{index:02d}_{kind}_{height}x{width}_s{n_samples}_k{k}",
            x,
            k,
            "random",
            kind in ("noise", "smooth"),
        )

    return cases


# ---------------------------------------------------------------------------------------------
# The 1-D and 3-D battery (our extension beyond the paper, which clusters 2-D maps)


def fashion_mnist_sequences(generator: torch.Generator) -> torch.Tensor:
    """Real 1-D data: 32 images, 2x2-averaged to 14x14 and read row by row as sequences of 196,
    through a seeded 1->3 channel conv of width 5 (padding 2) + ReLU: (32, 3, 196).

    The zero image borders become runs that are zero in every sample."""
    images = F.avg_pool2d(load_fashion_mnist_test_images(32)[:, None], 2)
    sequences = images.reshape(32, 1, 196)
    weight = torch.randn(3, 1, 5, generator=generator) / math.sqrt(5)
    bias = 0.1 * torch.randn(3, generator=generator)
    return torch.relu(F.conv1d(sequences, weight, bias, padding=2))


def fashion_mnist_volumes(generator: torch.Generator) -> torch.Tensor:
    """Real 3-D data: 64 images, 2x2-averaged to 14x14, stacked 4 consecutive images to a
    volume, through a seeded 1->3 channel 3x3x3 conv (padding 1) + ReLU: (16, 3, 4, 14, 14)."""
    images = F.avg_pool2d(load_fashion_mnist_test_images(64)[:, None], 2)
    volumes = images.reshape(16, 1, 4, 14, 14)
    weight = torch.randn(3, 1, 3, 3, 3, generator=generator) / math.sqrt(27)
    bias = 0.1 * torch.randn(3, generator=generator)
    return torch.relu(F.conv3d(volumes, weight, bias, padding=1))


def parity_battery_nd(seed: int = 1) -> list[ParityCase]:
    """Named 1-D (S, C, L) and 3-D (S, C, D, H, W) cases, float32, each with its k.

    Groups "chain" (chains of 64 to 200 sites) and "volume" (6x6x6, 8x8x4, 5x7x6 and 4x14x14
    volumes): smooth and ReLU fields, white noise, quantised values, dead channels and
    always-zero runs/blocks, a tiny batch, and Fashion-MNIST read as sequences and as stacks of
    images. Small on purpose: nilearn runs every channel twice. Deterministic for a seed.
    """
    g = torch.Generator().manual_seed(seed)
    cases: list[ParityCase] = []

    def add(name, x, k, group, tie_free=False):
        cases.append(ParityCase(name, x.float().contiguous(), k, group, tie_free))

    add("chain_smooth_64_k5", smooth_fields((32, 3, 64), 2.0, g), 5, "chain", True)
    add("chain_smooth_200_k15", smooth_fields((48, 4, 200), 3.0, g), 15, "chain", True)
    add("chain_relu_128_k15", relu_fields((48, 4, 128), 2.0, 0.5, g), 15, "chain")
    add("chain_noise_100_k15", torch.randn(24, 3, 100, generator=g), 15, "chain", True)
    add("chain_rounded_96_k5", torch.round(smooth_fields((32, 3, 96), 2.0, g) * 4) / 4, 5, "chain")
    x = smooth_fields((32, 3, 80), 2.0, g)
    x[:, 1] = 0.0  # dead
    x[:, 2, 30:34] = 0.0  # a run of 4 zeros: its 2 inner sites are isolated (c0 = 4)
    add("chain_dead_and_zero_run_80_k5", x, 5, "chain")
    add("chain_tiny_s2_64_k5", smooth_fields((2, 3, 64), 2.0, g), 5, "chain", True)
    add("chain_fashion_mnist_196_k15", fashion_mnist_sequences(g), 15, "chain")

    add("volume_smooth_6x6x6_k5", smooth_fields((32, 4, 6, 6, 6), 1.0, g), 5, "volume", True)
    add("volume_smooth_8x8x4_k15", smooth_fields((48, 3, 8, 8, 4), 1.5, g), 15, "volume", True)
    add("volume_relu_8x8x4_k5", relu_fields((48, 3, 8, 8, 4), 1.5, 0.5, g), 5, "volume")
    add("volume_noise_6x6x6_k15", torch.randn(24, 3, 6, 6, 6, generator=g), 15, "volume", True)
    add(
        "volume_rounded_5x7x6_k5",
        torch.round(smooth_fields((32, 3, 5, 7, 6), 1.5, g) * 4) / 4,
        5,
        "volume",
    )
    x = smooth_fields((32, 3, 6, 6, 6), 1.5, g)
    x[:, 0] = 0.5  # constant: dead
    x[:, 1, 1:4, 1:4, 1:4] = 0.0  # a 3x3x3 zero block: its centre is isolated (c0 = 2)
    add("volume_dead_and_zero_block_6x6x6_k5", x, 5, "volume")
    add("volume_fashion_mnist_4x14x14_k15", fashion_mnist_volumes(g), 15, "volume")
    return cases
