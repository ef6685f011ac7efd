"""StochasticDepth: masking the branch output versus skipping the dropped samples' branch.

A ResNet bottleneck branch (1x1 256->64, 3x3 64->64, 1x1 64->256, BN + ReLU) on an input of
(64, 256, 16, 16) float32 that requires grad, as inside a network; forward + backward in
training mode. For each p, three blocks share one branch: no drop (``p = 0`` masking, the
reference), masking and ``skip_dropped=True``; the two drop variants use generators with the
same seed, so they draw the same masks. They are timed round-robin in one run (medians over
rounds, after one warm-up round; "kept" is the mean kept fraction). Their peak memory is read
from the profiler's allocation events for one step of each, with one shared mask (its kept
fraction is printed): the most bytes held at once, above what was held before the step.
Ratios are skip / mask; "1-p" is what skipping would give if the branch were all the cost.

Run it with glibc's allocator pinned, so that the large blocks freed after each step are
reused rather than unmapped and faulted in again at the next one:

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 \\
        python benchmarks/bench_stochastic_depth.py [--quick] [--rounds N] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch import nn

from dropcluster.nn import StochasticDepthResidual

RATES = (0.1, 0.25, 0.5)


def bottleneck() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(256, 64, 1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 256, 1, bias=False),
        nn.BatchNorm2d(256),
    )


def free_grads(block: nn.Module, x: torch.Tensor) -> None:
    """What ``optimizer.zero_grad()`` does before a step: gradients set to None."""
    block.zero_grad(set_to_none=True)
    x.grad = None


def step(block: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    """One training step's forward and backward, gradients freed first."""
    free_grads(block, x)
    block(x).backward(grad_out)


def peak_bytes(block: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> int | None:
    """Most CPU bytes held at once during one step, above the start; None if unavailable."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    # Free outside the profile what the step would free inside (the profiler cannot size
    # blocks allocated before it started): old gradients and the last recorded mask.
    free_grads(block, x)
    block.last_mask = None
    try:
        with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
            block(x).backward(grad_out)
        # Allocation (+) and free (-) events in time order; the private kineto results keep
        # every one of them, where the public events() attribute them to enclosing ops.
        events = [
            (event.start_ns(), event.nbytes())
            for event in profiler.profiler.kineto_results.events()
            if event.name() == "[memory]" and event.device_type().name == "CPU"
        ]
    except (AttributeError, RuntimeError):
        return None
    held = peak = 0
    for _, nbytes in sorted(events):
        held += nbytes
        peak = max(peak, held)
    return peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds (default 12)")
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 8, 2 rounds")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = 8 if args.quick else 64
    rounds = 2 if args.quick else args.rounds
    cpu = platform.processor() or platform.machine()
    print(
        f"torch {torch.__version__} | {cpu} cpu, {torch.get_num_threads()} threads | "
        f"{rounds} rounds after 1 warm-up, medians | "
        f"MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')} "
        f"MALLOC_TRIM_THRESHOLD_={os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}"
    )
    print(
        f"bottleneck branch on ({batch}, 256, 16, 16) float32, forward + backward, training; "
        f"peak = most bytes held during a step"
    )
    header = (
        f"{'p':>5} {'kept':>5} {'no drop ms':>10} {'mask ms':>8} {'skip ms':>8} "
        f"{'skip/mask':>9} {'1-p':>5} | {'kept':>5} {'mask MiB':>8} {'skip MiB':>8} "
        f"{'skip/mask':>9}"
    )
    print(header)
    x = torch.randn(batch, 256, 16, 16, requires_grad=True)
    grad_out = torch.randn(batch, 256, 16, 16)
    for p in RATES:
        torch.manual_seed(0)
        branch = bottleneck()
        blocks = {
            "none": StochasticDepthResidual(branch, 0.0),
            "mask": StochasticDepthResidual(branch, p, generator=torch.Generator().manual_seed(1)),
            "skip": StochasticDepthResidual(
                branch, p, skip_dropped=True, generator=torch.Generator().manual_seed(1)
            ),
        }
        blocks["mask"].record_mask = True
        times = {name: [] for name in blocks}
        kept = []
        for index in range(rounds + 1):
            for name, block in blocks.items():
                start = time.perf_counter()
                step(block, x, grad_out)
                if index:  # round 0 warms up
                    times[name].append(time.perf_counter() - start)
            kept.append(float(blocks["mask"].last_mask.mean()))
        median = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        # Same seed for both: the memory step of each variant draws the same mask.
        for name in ("mask", "skip"):
            blocks[name].generator.manual_seed(2)
        peaks = {name: peak_bytes(blocks[name], x, grad_out) for name in ("mask", "skip")}
        memory_kept = float(blocks["mask"].last_mask.mean())
        if None in peaks.values():
            memory = f"{memory_kept:>5.2f} {'n/a':>8} {'n/a':>8} {'n/a':>9}"
        else:
            mask_mib, skip_mib = (peaks[name] / 2**20 for name in ("mask", "skip"))
            memory = (
                f"{memory_kept:>5.2f} {mask_mib:>8.1f} {skip_mib:>8.1f} {skip_mib / mask_mib:>9.2f}"
            )
        print(
            f"{p:>5} {statistics.mean(kept):>5.2f} {median['none']:>10.1f} "
            f"{median['mask']:>8.1f} {median['skip']:>8.1f} "
            f"{median['skip'] / median['mask']:>9.2f} {1 - p:>5.2f} | {memory}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
