"""StochasticDepth: masking the branch output versus skipping the dropped samples' branch.

A ResNet bottleneck branch (1x1 256->64, 3x3 64->64, 1x1 64->256, BN + ReLU) on
(64, 256, 16, 16) float32, forward + backward in training mode, for each p; both variants are
timed round-robin in the same run and the ratio skip / mask is printed. Run through
``make bench`` or with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` (printed).

    python benchmarks/bench_stochastic_depth.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from dropcluster.nn import StochasticDepthResidual


def bottleneck() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(256, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 256, 1, bias=False), nn.BatchNorm2d(256),
    )  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="2 rounds, batch 8")
    args = parser.parse_args(argv)
    batch = 8 if args.quick else 64
    rounds = 2 if args.quick else args.rounds
    print(
        f"torch {torch.__version__} | cpu, threads {torch.get_num_threads()} | rounds {rounds} "
        f"(median) | MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')}, "
        f"MALLOC_TRIM_THRESHOLD_={os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}"
    )
    print(f"input ({batch}, 256, 16, 16), bottleneck branch, forward + backward, training")
    print(f"  {'p':>5} {'mask ms':>9} {'skip ms':>9} {'skip/mask':>9}")
    x = torch.randn(batch, 256, 16, 16)
    for p in (0.1, 0.25, 0.5):
        torch.manual_seed(0)
        branch = bottleneck()
        blocks = {
            skip: StochasticDepthResidual(
                branch, p, skip_dropped=skip, generator=torch.Generator().manual_seed(1)
            )
            for skip in (False, True)
        }
        times = {False: [], True: []}
        for index in range(rounds + 1):
            for skip, block in blocks.items():
                start = time.perf_counter()
                block(x).sum().backward()
                if index:  # the first round warms up
                    times[skip].append(time.perf_counter() - start)
        mask, skip = statistics.median(times[False]), statistics.median(times[True])
        print(f"  {p:>5} {mask * 1000:>9.1f} {skip * 1000:>9.1f} {skip / mask:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
