"""Training-step throughput: device-resident loader versus a pre-made batch, and refit cost.

A demo-like configuration (Fashion-MNIST, resnet20, DropCluster p = 0.1, batch 128,
20 % of the training set): images/s of training steps fed by ``DeviceLoader`` (shuffling and
batched augmentation included) against the same steps fed one pre-made batch, measured
alternately in one run; and the time of one DropCluster refit (capture + ReNA on 512 images)
as a fraction of one epoch. Run with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000``
(``make bench``); the values in force are printed.

    python benchmarks/bench_train.py [--steps 30] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from dropcluster.nn import fit_clusters
from dropcluster.train.config import TrainConfig
from dropcluster.train.setup import build_run


def _refit(run, config) -> None:
    """One DropCluster refit as the trainer makes it."""
    images = run.cluster_images
    fit_clusters(run.model, images, images.shape[0], prepare=run.prepare_eval,
                 batch_size=config.eval_batch_size)  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    config = TrainConfig(dataset="fashion-mnist", model="resnet20", regularizer="dropcluster",
                         p=0.1, batch_size=128, train_fraction=0.2, cluster_images=512,
                         device=args.device)  # fmt: skip
    device = torch.device(args.device)
    torch.manual_seed(0)
    run = build_run(config, device)
    model, optimizer, loader = run.model, run.optimizer, run.loader
    _refit(run, config)
    batches = iter(loader)
    fixed_images, fixed_labels = next(batches)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(images, labels):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

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
    print(f"torch {torch.__version__} | {device} | threads {torch.get_num_threads()} | "
          f"{args.steps} steps each, alternating (median) | MALLOC_MMAP_MAX_="
          f"{os.environ.get('MALLOC_MMAP_MAX_', 'unset')}, MALLOC_TRIM_THRESHOLD_="
          f"{os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}")  # fmt: skip
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
        _refit(run, config)
        sync()
        refits.append(time.perf_counter() - start)
    refit = statistics.median(refits)
    print(
        f"  one refit: {refit * 1000:.0f} ms = {refit / epoch_seconds:.2%} of one epoch "
        f"({len(loader)} steps, {epoch_seconds:.1f} s) (target <= 1 %)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
