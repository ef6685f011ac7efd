"""Training-step costs: the loader, each regularizer against none, and a DropCluster refit.

A demo-like configuration (Fashion-MNIST, resnet20, p = 0.1, batch 128, 20 % of the training
set), three measurements in one run:

1. images/s of training steps fed by ``DeviceLoader`` (shuffling and batched augmentation
   included) against the same steps fed one pre-made batch, alternately;
2. the time of a training step (forward, loss, backward, SGD) with each regularizer in its
   slot as a ratio to the same model without one, all timed round-robin on one pre-made batch
   (every model starts from the same weights);
3. one DropCluster refit (capture + ReNA on 512 images) as a fraction of one epoch.

Run with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` (``make bench``); the
values in force are printed.

    python benchmarks/bench_train.py [--steps 30] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from dropcluster.train.config import TrainConfig
from dropcluster.train.loop import train_step
from dropcluster.train.setup import build_run

#: (label, regularizer, regularizer_options) of the step-cost comparison.
ARMS = (
    ("none", "none", {}),
    ("dropout", "dropout", {}),
    ("spatial_dropout", "spatial_dropout", {}),
    ("dropblock", "dropblock", {}),
    ("stochastic_depth", "stochastic_depth", {}),
    ("dropcluster", "dropcluster", {}),
    (
        "dropcluster, paper's layer",
        "dropcluster",
        {"per_sample": False, "unstructured": "rena", "identical_neighbours": "split"},
    ),
)
TARGET_DROPCLUSTER_OVERHEAD = 0.03


def regularizer_costs(base: TrainConfig, device: torch.device, steps: int) -> dict[str, float]:
    """Median seconds of one training step per arm of :data:`ARMS`, timed round-robin."""
    steps_of = {}
    for label, regularizer, options in ARMS:
        config = TrainConfig(
            **{
                **base.to_dict(),
                "regularizer": regularizer,
                "p": 0.0 if regularizer == "none" else base.p,
                "regularizer_options": options,
            }
        )
        torch.manual_seed(0)
        run = build_run(config, device)
        if run.has_dropcluster:
            run.refit()
        images, labels = next(iter(run.loader))
        steps_of[label] = _step_function(run, images, labels)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in steps_of.values():  # warm-up
        step()
        step()
    times = {label: [] for label in steps_of}
    for _ in range(steps):
        for label, step in steps_of.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}


def _step_function(run, images, labels):
    """The loop's training step on one fixed batch, as a function of nothing (for round-robin
    timing)."""
    return lambda: train_step(run, images, labels)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    config = TrainConfig(
        dataset="fashion-mnist",
        model="resnet20",
        regularizer="dropcluster",
        p=0.1,
        batch_size=128,
        train_fraction=0.2,
        cluster_images=512,
        device=args.device,
    )
    device = torch.device(args.device)
    torch.manual_seed(0)
    run = build_run(config, device)
    loader = run.loader
    run.refit()
    batches = iter(loader)
    fixed_images, fixed_labels = next(batches)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(images, labels):
        train_step(run, images, labels)

    times = {"device loader": [], "pre-made batch": []}
    for _ in range(3):  # warm-up
        step(fixed_images, fixed_labels)
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        try:
            images, labels = next(batches)
        except StopIteration:
            batches = iter(loader)
            images, labels = next(batches)
        step(images, labels)
        sync()
        times["device loader"].append(time.perf_counter() - start)
        start = time.perf_counter()
        step(fixed_images, fixed_labels)
        sync()
        times["pre-made batch"].append(time.perf_counter() - start)
    print(
        f"torch {torch.__version__} | {device} | threads {torch.get_num_threads()} | "
        f"{args.steps} steps each, alternating (median) | MALLOC_MMAP_MAX_="
        f"{os.environ.get('MALLOC_MMAP_MAX_', 'unset')}, MALLOC_TRIM_THRESHOLD_="
        f"{os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}"
    )
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, seconds in medians.items():
        print(f"  {name:<16} {config.batch_size / seconds:>8.0f} images/s")
    overhead = medians["device loader"] / medians["pre-made batch"] - 1
    print(f"  loader overhead: {overhead:+.1%} (target <= 5 %)")
    epoch_seconds = medians["device loader"] * len(loader)
    refits = []
    for _ in range(3):
        sync()
        start = time.perf_counter()
        run.refit()
        sync()
        refits.append(time.perf_counter() - start)
    refit = statistics.median(refits)
    print(
        f"  one refit: {refit * 1000:.0f} ms = {refit / epoch_seconds:.2%} of one epoch "
        f"({len(loader)} steps, {epoch_seconds:.1f} s) (target <= 1 %)"
    )
    costs = regularizer_costs(config, device, args.steps)
    print(f"\ntraining step per regularizer (p = {config.p}, {args.steps} rounds, round-robin):")
    floor = costs["none"]
    for label, seconds in costs.items():
        verdict = ""
        if label.startswith("dropcluster"):
            met = seconds / floor - 1 <= TARGET_DROPCLUSTER_OVERHEAD
            state = "met" if met else "NOT MET"
            verdict = f"  (target <= +{TARGET_DROPCLUSTER_OVERHEAD:.0%}: {state})"
        print(f"  {label:<28} {seconds * 1000:>7.1f} ms  {seconds / floor - 1:>+7.1%}{verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
