"""Dead channels at the stem of trained runs: how many of the first conv layer's channels never
fire (zero after the stem's ReLU on every pixel of every image), per run and per weight-decay
scope (``weight_decay_on``: "all", the paper's plain weight decay, or "weights").

For every finished run folder under the given sweep folders (``SWEEP/runs/*``), the model is
loaded from its last checkpoint (or the one kept after ``--epoch``), ``--images`` test images
(the first ones of a seeded permutation) pass through it in evaluation mode, and the channels
whose activations at the ``stem`` slot are constant are counted. Also printed: the smallest
absolute batch-norm scale of the stem, which weight decay on batch norm pulls towards zero.

    python benchmarks/count_dead_channels.py runs/evidence runs/evidence-bn-not-decayed \
        [--only none-] [--images 512]
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

import torch

from dropcluster.experiments.sweep import RUNS_FOLDER
from dropcluster.train.restore import load_run


@torch.no_grad()
def dead_stem_channels(run_dir: Path, images: int, epoch: int | None):
    """The stem channels of the run that are constant on ``images`` test images, the smallest
    |scale| of the stem's batch norm, and the loaded run."""
    run = load_run(run_dir, epoch=epoch)
    model = run.model.eval()
    captured = []
    hook = model.slot("stem").register_forward_pre_hook(lambda m, i: captured.append(i[0]))
    order = torch.randperm(len(run.test_set), generator=torch.Generator().manual_seed(0))
    batch = run.test_set.images[order[:images]]
    for start in range(0, batch.shape[0], 256):
        model(run.prepare_eval(batch[start : start + 256]))
    hook.remove()
    flat = torch.cat(captured).transpose(0, 1).flatten(1)
    dead = torch.nonzero(flat.amax(dim=1) == flat.amin(dim=1)).flatten().tolist()
    return dead, float(model.stem_norm.weight.abs().min()), run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep folders")
    parser.add_argument("--only", default="", help="run ids starting with this")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--epoch", type=int, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    groups: dict[tuple[str, float], list[int]] = defaultdict(list)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.images} images")
    print(f"{'run':<44} {'decay on':>8} {'dead':>5} {'channels':>8} {'min |BN scale|':>14}")
    for sweep in args.sweeps:
        for run_dir in sorted((sweep / RUNS_FOLDER).iterdir()):
            if not run_dir.name.startswith(args.only) or not (run_dir / "result.json").is_file():
                continue
            dead, smallest, run = dead_stem_channels(run_dir, args.images, args.epoch)
            config, channels = run.config, run.model.stem_norm.num_features
            groups[(config.weight_decay_on, config.train_fraction)].append(len(dead))
            print(
                f"{run_dir.name:<44} {config.weight_decay_on:>8} {len(dead):>5} "
                f"{channels:>8} {smallest:>14.4f}  {dead}"
            )
    print("\nper weight-decay scope and training fraction: dead stem channels per run")
    for (scope, fraction), counts in sorted(groups.items()):
        mean = statistics.fmean(counts)
        print(
            f"  weight_decay_on={scope:<8} fraction {fraction:g}: runs {len(counts)}, "
            f"mean {mean:.2f}, max {max(counts)}, counts {counts}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
