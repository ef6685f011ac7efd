"""Time the 2-D paths of this checkout against another release's, side by side in one run.

When a change generalises code that the 2-D layers use (the n-D ReNA, Spatial Hopkins,
DropCluster and DropBlock of release 0.6), the 2-D paths must stay as fast as before. This
script runs the same timing child under two source trees, alternating them (A B A B ...), so
drifts of the machine hit both alike, and prints the median of each case per tree and their
ratio. The baseline is any source folder of dropcluster, e.g. a worktree of an earlier commit:

    git worktree add /tmp/base HEAD~1
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 \\
        .venv/bin/python benchmarks/compare_releases.py --baseline /tmp/base/src

Cases (float32, CPU unless --device), on 128 x 64 x 32 x 32 activations (--shape): ReNA with
k = 15 (the defaults, and the paper's rules), Spatial Hopkins per channel, DropCluster2d forward
+ backward in training (a mask per sample, and one per minibatch), DropBlock2d forward +
backward (block 5).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "src"

CHILD = r"""
import json, sys, time
import torch
import torch.nn.functional as F
import dropcluster
from dropcluster.hopkins import spatial_hopkins
from dropcluster.nn import DropBlock2d, DropCluster2d
from dropcluster.rena import rena

device, reps = torch.device(sys.argv[1]), int(sys.argv[2])
n_images, channels, size = (int(value) for value in sys.argv[3:6])
torch.manual_seed(0)
# A first conv layer's output on smooth images: 3x3 conv + ReLU.
images = F.avg_pool2d(torch.rand(n_images, 3, size + 4, size + 4), 5, stride=1)
x = torch.relu(F.conv2d(images, torch.randn(channels, 3, 3, 3) / 3, torch.randn(channels) * 0.1))
x = x.contiguous().to(device)
grad = torch.randn_like(x)

def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()

def layer_step(layer):
    def call():
        inp = x.detach().requires_grad_(True)
        layer(inp).backward(grad)
    return call

shared = DropCluster2d(0.1, 15, per_sample=False, unstructured="rena",
                       identical_neighbours="split").to(device)
per_sample = DropCluster2d(0.1, 15).to(device)
shared.fit(x); per_sample.fit(x)
cases = {
    "rena defaults": lambda: rena(x, 15),
    "rena paper rules": lambda: rena(x, 15, unstructured="rena", identical_neighbours="split"),
    "spatial_hopkins": lambda: spatial_hopkins(x, generator=torch.Generator(device).manual_seed(0),
                                               reduction="mean"),
    "DropCluster2d per sample f+b": layer_step(per_sample.train()),
    "DropCluster2d shared f+b": layer_step(shared.train()),
    "DropBlock2d f+b": layer_step(DropBlock2d(0.1, 5).to(device).train()),
}
result = {"version": dropcluster.__version__}
for name, call in cases.items():
    call(); sync()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter(); call(); sync()
        times.append(time.perf_counter() - start)
    times.sort()
    result[name] = times[len(times) // 2]
print(json.dumps(result))
"""


def run_child(source: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=str(source))
    shape = [str(value) for value in args.shape]
    out = subprocess.run(
        [sys.executable, "-c", CHILD, args.device, str(args.reps), *shape],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="the other tree's src/")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3, help="A B rounds (default 3)")
    parser.add_argument("--reps", type=int, default=7, help="timed calls per case and round")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=[128, 64, 32],
        metavar=("N", "C", "SIZE"),
        help="images, channels and map size of the activations (default 128 64 32)",
    )
    args = parser.parse_args(argv)
    if not (args.baseline / "dropcluster" / "__init__.py").is_file():
        parser.error(f"--baseline should be a src/ folder holding dropcluster/: {args.baseline}")
    print(
        f"compare_releases: {os.cpu_count()} cpus, device {args.device}, activations "
        f"{args.shape[0]} x {args.shape[1]} x {args.shape[2]} x {args.shape[2]}, "
        f"{args.rounds} rounds x {args.reps} reps, MALLOC_MMAP_MAX_="
        f"{os.environ.get('MALLOC_MMAP_MAX_', 'unset')} MALLOC_TRIM_THRESHOLD_="
        f"{os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}",
        flush=True,
    )
    trees = {"baseline": args.baseline, "this checkout": HERE}
    medians: dict[str, list[dict]] = {name: [] for name in trees}
    for round_index in range(args.rounds):
        for name, source in trees.items():
            medians[name].append(run_child(source, args))
        print(f"  round {round_index + 1}/{args.rounds} done", flush=True)
    versions = {name: runs[0]["version"] for name, runs in medians.items()}
    cases = [key for key in medians["baseline"][0] if key != "version"]
    print(
        f"\n{'case':32s} {'baseline ' + versions['baseline']:>18s} "
        f"{'this ' + versions['this checkout']:>18s} {'ratio':>7s}"
    )
    for case in cases:
        base = statistics.median(run[case] for run in medians["baseline"])
        here = statistics.median(run[case] for run in medians["this checkout"])
        print(f"{case:32s} {base * 1e3:15.2f} ms {here * 1e3:15.2f} ms {here / base:7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
