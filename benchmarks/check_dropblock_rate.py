"""Realised DropBlock drop fraction against the nominal p, for ours and the first-order gamma.

The protocol of the layers issue: for each map size H in {4, 8, 16, 32, 64}, block size 1..7
and p in {0.05, 0.1, 0.3}, average the dropped fraction over 200 draws on a (64, 16, H, H)
input. "first-order" uses the same sampler with the gamma of the DropBlock paper and
torchvision, p * H^2 / (block^2 * (H - block + 1)^2), which ignores overlapping blocks.

    python benchmarks/check_dropblock_rate.py [--draws 200]
"""

from __future__ import annotations

import argparse
import time

import torch

from dropcluster.nn import dropblock as db


def realised_fraction(height: int, block: int, gamma: float, draws: int, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    dropped = 0.0
    for _ in range(draws):
        keep = db._sparse_keep((64, 16, height, height), gamma, block, generator, torch.float32)
        dropped += 1.0 - float(keep.mean())
    return dropped / draws


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=200)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print(f"torch {torch.__version__}; {args.draws} draws of (64, 16, H, H) per cell")
    print(f"{'H':>3} {'p':>5} | ours: realised per block 1..7" + " " * 24 + "| first-order gamma")
    worst_ours = worst_first = 0.0
    for height in (4, 8, 16, 32, 64):
        for p in (0.05, 0.1, 0.3):
            ours, first = [], []
            for block in range(1, 8):
                gamma = db.solve_gamma(p, height, height, block)
                ours.append(realised_fraction(height, block, gamma, args.draws, block))
                b = min(block, height)
                naive = min(1.0, p * height**2 / (b**2 * (height - b + 1) ** 2))
                first.append(db.expected_drop_fraction(naive, height, height, block))
            worst_ours = max(worst_ours, max(abs(f - p) for f in ours))
            worst_first = max(worst_first, max(abs(f - p) for f in first))
            print(
                f"{height:>3} {p:>5} | " + " ".join(f"{f:.4f}" for f in ours) + " | "
                + " ".join(f"{f:.3f}" for f in first)
            )  # fmt: skip
    print(
        f"max |realised - p|: ours {worst_ours:.4f} (target 0.005); "
        f"first-order gamma (expected value) {worst_first:.4f}"
    )
    print(f"{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
