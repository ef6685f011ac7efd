"""Realised DropBlock drop fraction against the nominal p, for ours and the first-order gamma.

The 2-D protocol: for each map size H in {4, 8, 16, 32, 64}, block size 1..7
and p in {0.05, 0.1, 0.3}, average the dropped fraction over 200 draws of a (64, 16, H, H)
input (masks independent per sample and channel). On the CPU the masks come from the sparse
sampler of ``drop_block2d`` (many draws per call, dropped pixels counted without building the
output); with ``--device cuda`` from the dense sampler that accelerators and torch.compile use,
and the layer is also checked there: no host synchronisation in forward and backward (CUDA's
sync debug mode set to "error"), and under ``torch.compile`` (Inductor) ``set_p`` changes the
rate without a recompilation. "first-order" is the exact expected fraction f(gamma) under the
gamma of the DropBlock paper and torchvision, p * H^2 / (b^2 * (H - b + 1)^2), which ignores
overlapping blocks.

The 1-D and 3-D table: DropBlock1d and DropBlock3d on a few sequence lengths and volumes, block
sizes and rates, exact mode (realised fraction, its distance to p) beside mode="reference" (PyPI
dropblock 0.3.0's DropBlock3D, and its formulas with one axis for DropBlock1d), each cell
averaged over enough maps for a standard error <= --standard-error (the bound of
tests/test_dropblock.py). A rate check, not a timing.

    python benchmarks/check_dropblock_rate.py [--draws 200] [--device cuda] [--axes 1 2 3]
        [--standard-error 0.002]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch

from dropcluster.nn import (
    DropBlock1d,
    DropBlock2d,
    DropBlock3d,
    drop_block1d_reference,
    drop_block3d_reference,
)
from dropcluster.nn import dropblock as db
from dropcluster.nn import dropblock_sampler as sampler

HEIGHTS = (4, 8, 16, 32, 64)
RATES = (0.05, 0.1, 0.3)
BLOCK_SIZES = tuple(range(1, 8))

# The 1-D and 3-D table: map sizes, then block sizes and rates per number of axes.
ND_SIZES = {1: ((16,), (64,), (256,)), 3: ((4, 4, 4), (8, 8, 8), (16, 16, 16), (4, 16, 16))}
ND_BLOCK_SIZES = {1: (3, 7, 15), 3: (2, 3, 5)}
ND_RATES = (0.1, 0.3)
ND_REFERENCE = {1: drop_block1d_reference, 3: drop_block3d_reference}
# Sites per batch of maps drawn at once (4M on the CPU).
ND_BATCH_SITES = 1 << 22


def dropped_sites(shape, gamma: float, block, generator, device: torch.device) -> int:
    """Sites one draw of the layer's exact sampler drops in masks of ``shape`` (sparse on the
    CPU, dense elsewhere), counted without building the output."""
    if device.type == "cpu":
        corners = sampler.sample_block_corners(shape, gamma, *block, generator)
        return int(sampler.dropped_pixels(corners, shape, block)[2].sum())
    keep = db._dense_keep(shape, gamma, block, generator, torch.float32, device)
    return keep.numel() - int(keep.sum(dtype=torch.float64))


def realised_fraction(
    height: int, block_size: int, p: float, draws: int, seed: int, device: torch.device
) -> float:
    """Mean dropped fraction over ``draws`` draws of (64, 16, height, height) masks."""
    generator = torch.Generator(device).manual_seed(seed)
    gamma = db.solve_gamma(p, height, height, block_size)
    block = db.effective_block(block_size, height, height)
    pixels_per_batch = 1 << (22 if device.type == "cpu" else 28)
    draws_per_batch = max(1, pixels_per_batch // (64 * 16 * height * height))
    dropped, left = 0, draws
    while left:
        batch = min(draws_per_batch, left)
        shape = (64 * batch, 16, height, height)
        dropped += dropped_sites(shape, gamma, block, generator, device)
        left -= batch
    return dropped / (draws * 64 * 16 * height * height)


def first_order_fraction(height: int, block_size: int, p: float) -> float:
    block_h, block_w = db.effective_block(block_size, height, height)
    valid = (height - block_h + 1) * (height - block_w + 1)
    gamma = min(1.0, p * height * height / (block_h * block_w * valid))
    return db.expected_drop_fraction(gamma, height, height, block_size)


def maps_for(sizes: tuple[int, ...], block_size: int, p: float, standard_error: float) -> int:
    """Maps for a standard error <= ``standard_error`` of the mean dropped fraction: a site's
    drop is independent of every site more than a block away, so Var(map fraction) <= p (1 - p)
    * min(1, prod(2 b - 1) / sites) (tests/test_dropblock.py works it through)."""
    block = db.effective_block(block_size, *sizes)
    neighbours = min(1.0, math.prod(2 * e - 1 for e in block) / math.prod(sizes))
    return max(64, math.ceil(p * (1 - p) * neighbours / standard_error**2))


def realised_fraction_nd(
    sizes: tuple[int, ...], block_size: int, p: float, mode: str, n_maps: int, seed: int, device
) -> float:
    """Mean dropped fraction of ``n_maps`` DropBlock1d/3d masks of shape ``sizes``.

    Exact mode: :func:`dropped_sites`. Reference mode: the reference function's returned mask on
    one-channel inputs (its mask is shared by the channels anyway).
    """
    generator = torch.Generator(device).manual_seed(seed)
    sites = math.prod(sizes)
    per_batch = max(1, ND_BATCH_SITES // sites)
    gamma = db.solve_gamma(p, *sizes, block_size)
    block = db.effective_block(block_size, *sizes)
    dropped, left = 0, n_maps
    while left:
        batch = min(per_batch, left)
        shape = (batch, 1, *sizes)
        if mode == "reference":
            x = torch.ones(shape, device=device)
            _, keep = ND_REFERENCE[len(sizes)](
                x, p, block_size, generator=generator, return_mask=True
            )
            dropped += keep.numel() - int(keep.sum(dtype=torch.float64))
        else:
            dropped += dropped_sites(shape, gamma, block, generator, device)
        left -= batch
    return dropped / (n_maps * sites)


def report_1d_3d(axes, standard_error: float, device: torch.device) -> None:
    """The 1-D/3-D table: exact and reference mode's realised fractions against p."""
    print(
        f"DropBlock1d/DropBlock3d, realised dropped fraction (standard error <= "
        f"{standard_error}); exact: mode='exact', ref: mode='reference'"
    )
    worst, cell = 0.0, 0
    for n_axes in axes:
        blocks = ND_BLOCK_SIZES[n_axes]
        header = " ".join(f"b={b:<4}" for b in blocks)
        print(f"{'sizes':>12} {'p':>4} | exact  {header} | ref    {header}")
        for sizes in ND_SIZES[n_axes]:
            for p in ND_RATES:
                cells = {"exact": [], "reference": []}
                for mode, fractions in cells.items():
                    for b in blocks:
                        # A seed per cell: with one seed, cells would share their uniform
                        # numbers, and their errors would be correlated.
                        cell += 1
                        n_maps = maps_for(sizes, b, p, standard_error)
                        fractions.append(
                            realised_fraction_nd(sizes, b, p, mode, n_maps, cell, device)
                        )
                worst = max(worst, *(abs(f - p) for f in cells["exact"]))
                label = "x".join(str(size) for size in sizes)
                print(
                    f"{label:>12} {p:>4} |        "
                    + " ".join(f"{f:.4f}" for f in cells["exact"])
                    + " |        "
                    + " ".join(f"{f:.4f}" for f in cells["reference"])
                )
    print(f"max |realised - p|, exact mode: {worst:.4f} (4 standard errors: {4 * standard_error})")


def check_layer_on_device(device: torch.device) -> None:
    """No host sync in the eager layers; compiled, set_p needs no recompilation."""
    layer = DropBlock2d(0.1, 3).to(device)
    x = torch.randn(128, 64, 32, 32, device=device, requires_grad=True)
    layer(x).sum().backward()  # first call: solves gamma once for this rate and map size
    others = [
        (DropBlock1d(0.1, 5).to(device), torch.randn(128, 64, 256, device=device)),
        (DropBlock3d(0.1, 3).to(device), torch.randn(32, 32, 8, 16, 16, device=device)),
    ]
    for other, volume in others:
        other(volume.requires_grad_()).sum().backward()
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            layer(x).sum().backward()
            for other, volume in others:
                other(volume).sum().backward()
        for dtype in (torch.float16, torch.bfloat16):
            half = x.detach().to(dtype, memory_format=torch.channels_last).requires_grad_()
            out = layer(half)
            out.float().sum().backward()
            assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print(
        "eager forward + backward (float32; float16, bfloat16 channels_last; 1-D and 3-D "
        "float32): no host sync"
    )

    torch._dynamo.reset()
    compiled = torch.compile(layer)
    rates = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for p in (0.1, 0.3):
            layer.set_p(p)
            out = compiled(x)
            out.sum().backward()
            keep = (out != 0).float()
            scale = keep[0].numel() / keep.sum(dim=(1, 2, 3), keepdim=True)
            assert torch.allclose(out, x * keep * scale, atol=1e-5)
            rates.append(round(1 - float(keep.mean()), 4))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    print(f"compiled (inductor): rates {rates} for p = 0.1 then 0.3, {graphs} graph(s)")


def report_2d(draws: int, device: torch.device) -> None:
    """The 2-D protocol: ours against the first-order gamma, every H, p and block size."""
    print(f"{'H':>3} {'p':>5} | ours, realised, blocks 1..7{' ' * 30}| first-order, expected")
    worst_ours = worst_first = 0.0
    for height in HEIGHTS:
        for p in RATES:
            ours = [
                realised_fraction(height, b, p, draws, seed=b, device=device) for b in BLOCK_SIZES
            ]
            first = [first_order_fraction(height, b, p) for b in BLOCK_SIZES]
            worst_ours = max(worst_ours, *(abs(f - p) for f in ours))
            worst_first = max(worst_first, *(abs(f - p) for f in first))
            print(
                f"{height:>3} {p:>5} | "
                + " ".join(f"{f:.4f}" for f in ours)
                + " | "
                + " ".join(f"{f:.3f}" for f in first)
            )
    print(
        f"max |realised - p|: ours {worst_ours:.4f} (target 0.005); "
        f"first-order gamma (expected value) {worst_first:.4f}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--axes",
        type=int,
        nargs="+",
        choices=(1, 2, 3),
        default=(1, 2, 3),
        help="spatial axes to check: 2 runs the 2-D protocol, 1 and 3 the 1-D/3-D table",
    )
    parser.add_argument("--standard-error", type=float, default=0.002)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"torch {torch.__version__}, python {platform.python_version()} | {name} | torch "
        f"threads {torch.get_num_threads()} | {args.draws} draws of (64, 16, H, H) per cell"
    )
    if device.type == "cuda":
        check_layer_on_device(device)
    if 2 in args.axes:
        report_2d(args.draws, device)
    nd_axes = [n_axes for n_axes in (1, 3) if n_axes in args.axes]
    if nd_axes:
        report_1d_3d(nd_axes, args.standard_error, device)
    print(f"{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
