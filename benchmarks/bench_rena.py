"""Time batched ReNA (`dropcluster.rena`) against nilearn's, run one channel at a time.

The data mimic a first conv layer's output: 128 smooth images through a random 3x3 conv + ReLU,
64 channels, a few of them dead (all zero) and a few almost dead (a strongly negative bias, so
mostly zero), as real networks have. Every method clusters every channel into k=15 clusters:

* nilearn with n_iter=1000 (the paper's setting; a channel that cannot converge, such as a dead
  one, runs all 1000 rounds because nilearn has no early exit) and with n_iter=10 (its default);
* `dropcluster.rena` with unstructured="rena", identical_neighbours="split" (the reference
  semantics: the like-for-like row) and with its defaults.

Parity columns compare each row with nilearn at n_iter=1000: channels with the same number of
clusters, and the mean adjusted Rand index over the channels nilearn converged on (ties in
nilearn's cut are broken by numpy's unstable sort, so ARI 1.0 is not expected; see
tests/test_rena_parity.py for the exact comparison). The defaults differ by design on channels
with identical neighbours (dead and almost-dead ones).

Run it with the allocator settings of the Makefile (`make bench` exports them):

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 .venv/bin/python benchmarks/bench_rena.py

Targets: at least 50x faster than nilearn at 1000 rounds and 5x at 10 rounds.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from nilearn_reference import adjusted_rand, conv_activations, grid_mask  # noqa: E402

from dropcluster.rena import rena  # noqa: E402

N_CLUSTERS = 15
DEAD_CHANNELS = (7, 29, 50)
ALMOST_DEAD_CHANNELS = (13, 41)
TARGET_VS_NILEARN_1000 = 50.0
TARGET_VS_NILEARN_10 = 5.0


def make_activations(size: int, n_channels: int, n_samples: int, seed: int) -> torch.Tensor:
    """First-conv-like activations (N, C, size, size), float32, some channels (almost) dead."""
    generator = torch.Generator().manual_seed(seed)
    bias = 0.1 * torch.randn(n_channels, generator=generator)
    almost_dead = [c for c in ALMOST_DEAD_CHANNELS if c < n_channels]
    # Mostly zero: between 0.01% and 8% of the values survive, depending on the conv weights.
    bias[almost_dead] = torch.tensor([-2.0, -3.0])[: len(almost_dead)]
    x = conv_activations(n_samples, n_channels, (size, size), 3, generator, bias=bias)
    x[:, [c for c in DEAD_CHANNELS if c < n_channels]] = 0
    return x


def time_nilearn(x: np.ndarray, n_iter: int, repeats: int) -> tuple[float, list]:
    """Median wall time of nilearn over all channels, one channel at a time, and its results."""
    from nilearn.regions.rena_clustering import recursive_neighbor_agglomeration

    n_samples, n_channels, height, width = x.shape
    mask = grid_mask(height, width)
    channels = [np.ascontiguousarray(x[:, c].reshape(n_samples, -1)) for c in range(n_channels)]
    times, results = [], []
    # A node with no edges left divides by zero in nilearn's 1-NN step: harmless, but noisy.
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(repeats):
            start = time.perf_counter()
            results = [
                recursive_neighbor_agglomeration(features, mask, N_CLUSTERS, n_iter=n_iter)
                for features in channels
            ]
            times.append(time.perf_counter() - start)
    return statistics.median(times), [(int(n), np.asarray(lab)) for n, lab in results]


def time_ours(x: torch.Tensor, repeats: int, **options) -> tuple[float, list]:
    """Median wall time of one batched `rena` call over all channels (after a warm-up)."""

    def run():
        result = rena(x, N_CLUSTERS, **options)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        return result

    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    labels = result.labels.flatten(1).cpu().numpy()
    found = result.n_found.cpu().numpy()
    return statistics.median(times), [(int(n), lab) for n, lab in zip(found, labels, strict=True)]


def parity(results: list, reference: list) -> tuple[str, str]:
    """(n_found agreement "a/C", mean ARI over the channels the reference converged on)."""
    agree = sum(n == ref_n for (n, _), (ref_n, _) in zip(results, reference, strict=True))
    aris = [
        adjusted_rand(labels, ref_labels)
        for (_, labels), (ref_n, ref_labels) in zip(results, reference, strict=True)
        if ref_n <= N_CLUSTERS
    ]
    mean_ari = f"{np.mean(aris):.3f}" if aris else "-"
    return f"{agree}/{len(reference)}", mean_ari


def describe_machine(device: torch.device, args) -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line)
    except (OSError, StopIteration):
        pass
    lines = [
        f"torch {torch.__version__}, numpy {np.__version__}, python {platform.python_version()}",
        f"device: {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        f"cpu: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "allocator: "
        + ", ".join(
            f"{name}={os.environ.get(name, '(unset)')}"
            for name in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
        ),
        f"data: {args.channels} channels x {args.samples} samples, k={N_CLUSTERS}, "
        f"dead channels {[c for c in DEAD_CHANNELS if c < args.channels]}, almost dead "
        f"{[c for c in ALMOST_DEAD_CHANNELS if c < args.channels]}",
        f"repetitions (median): dropcluster {args.repeats} after 1 warm-up, nilearn n_iter=10 "
        f"{args.nilearn_repeats}, nilearn n_iter=1000 {args.nilearn_1000_repeats}",
    ]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="device for dropcluster (default cpu)")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[16, 32, 56], help="map sizes (square)"
    )
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nilearn-repeats", type=int, default=3)
    parser.add_argument("--nilearn-1000-repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 16x16, 8 channels, 32 samples, 1 repeat"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.channels, args.samples = [16], 8, 32
        args.repeats = args.nilearn_repeats = args.nilearn_1000_repeats = 1
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given, but torch.cuda.is_available() is False")

    for line in describe_machine(device, args):
        print(line)
    header = f"{'map':>6}  {'method':<34} {'seconds':>9} {'x ours':>8} {'n_found':>8} {'ARI':>6}"
    print()
    print(header)
    print("-" * len(header))
    verdicts = []
    for size in args.sizes:
        x = make_activations(size, args.channels, args.samples, args.seed)
        x_numpy = x.numpy()
        x_device = x.to(device)
        # Warm-up nilearn (imports, first calls) on one channel.
        time_nilearn(x_numpy[:, :1], 10, 1)
        rows = {}
        rows["dropcluster, reference semantics"] = time_ours(
            x_device, args.repeats, unstructured="rena", identical_neighbours="split"
        )
        rows["dropcluster, defaults"] = time_ours(x_device, args.repeats)
        rows["nilearn n_iter=10"] = time_nilearn(x_numpy, 10, args.nilearn_repeats)
        rows["nilearn n_iter=1000 (paper)"] = time_nilearn(x_numpy, 1000, args.nilearn_1000_repeats)
        reference = rows["nilearn n_iter=1000 (paper)"][1]
        ours_seconds = rows["dropcluster, reference semantics"][0]
        for method, (seconds, results) in rows.items():
            agree, mean_ari = ("ref", "ref") if results is reference else parity(results, reference)
            print(
                f"{f'{size}x{size}':>6}  {method:<34} {seconds:>9.4f} "
                f"{seconds / ours_seconds:>8.1f} {agree:>8} {mean_ari:>6}",
                flush=True,
            )
        stuck = sum(n > N_CLUSTERS for n, _ in reference)
        print(f"{'':>6}  ({stuck} channel(s) end with more than k={N_CLUSTERS} in nilearn)")
        for ours_method in ("dropcluster, reference semantics", "dropcluster, defaults"):
            ours = rows[ours_method][0]
            for nilearn_method, target in (
                ("nilearn n_iter=1000 (paper)", TARGET_VS_NILEARN_1000),
                ("nilearn n_iter=10", TARGET_VS_NILEARN_10),
            ):
                speedup = rows[nilearn_method][0] / ours
                verdicts.append(
                    f"{size}x{size}: {ours_method} is {speedup:.1f}x faster than "
                    f"{nilearn_method} (target >= {target:.0f}x): "
                    + ("met" if speedup >= target else "NOT MET")
                )
    print()
    for verdict in verdicts:
        print(verdict)
    return 0


if __name__ == "__main__":
    sys.exit(main())
