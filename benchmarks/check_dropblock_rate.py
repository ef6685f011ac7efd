"""Realised DropBlock drop fraction against the nominal p, for ours and the first-order gamma.

The protocol: for each map size H in {4, 8, 16, 32, 64}, block size 1..7
and p in {0.05, 0.1, 0.3}, average the dropped fraction over 200 draws of a (64, 16, H, H)
input (masks independent per sample and channel). On the CPU the masks come from the sparse
sampler of ``drop_block2d`` (many draws per call, dropped pixels counted without building the
output); with ``--device cuda`` from the dense sampler that accelerators and torch.compile use,
and the layer is also checked there: no host synchronisation in forward and backward (CUDA's
sync debug mode set to "error"), and under ``torch.compile`` (Inductor) ``set_p`` changes the
rate without a recompilation. "first-order" is the exact expected fraction f(gamma) under the
gamma of the DropBlock paper and torchvision, p * H^2 / (b^2 * (H - b + 1)^2), which ignores
overlapping blocks.

    python benchmarks/check_dropblock_rate.py [--draws 200] [--device cuda]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from dropcluster.nn import DropBlock2d
from dropcluster.nn import dropblock as db
from dropcluster.nn import dropblock_sampler as sampler

HEIGHTS = (4, 8, 16, 32, 64)
RATES = (0.05, 0.1, 0.3)
BLOCK_SIZES = tuple(range(1, 8))


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
        if device.type == "cpu":
            corners = sampler.sample_block_corners(shape, gamma, *block, generator)
            dropped += int(sampler.dropped_pixels(corners, shape, block)[2].sum())
        else:
            keep = db._dense_keep(shape, gamma, *block, generator, torch.float32, device)
            dropped += keep.numel() - int(keep.sum(dtype=torch.float64))
        left -= batch
    return dropped / (draws * 64 * 16 * height * height)


def first_order_fraction(height: int, block_size: int, p: float) -> float:
    block_h, block_w = db.effective_block(block_size, height, height)
    valid = (height - block_h + 1) * (height - block_w + 1)
    gamma = min(1.0, p * height * height / (block_h * block_w * valid))
    return db.expected_drop_fraction(gamma, height, height, block_size)


def check_layer_on_device(device: torch.device) -> None:
    """No host sync in the eager layer; compiled, set_p needs no recompilation."""
    layer = DropBlock2d(0.1, 3).to(device)
    x = torch.randn(128, 64, 32, 32, device=device, requires_grad=True)
    layer(x).sum().backward()  # first call: solves gamma once for this rate and map size
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            layer(x).sum().backward()
        for dtype in (torch.float16, torch.bfloat16):
            half = x.detach().to(dtype, memory_format=torch.channels_last).requires_grad_()
            out = layer(half)
            out.float().sum().backward()
            assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print("eager forward + backward (float32; float16, bfloat16 channels_last): no host sync")

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--device", default="cpu")
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
    print(f"{'H':>3} {'p':>5} | ours, realised, blocks 1..7{' ' * 30}| first-order, expected")
    worst_ours = worst_first = 0.0
    for height in HEIGHTS:
        for p in RATES:
            ours = [
                realised_fraction(height, b, p, args.draws, seed=b, device=device)
                for b in BLOCK_SIZES
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
    print(f"{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
