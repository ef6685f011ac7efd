"""DropCluster2d of an earlier commit against this tree's, side by side in one run.

Loads ``src/dropcluster/nn/dropcluster.py`` as it was at ``--ref`` (``git show``; default: the
last commit of release 0.2.0) next to the current layer, and times both forward + backward in
training mode, eager and ``torch.compile``d, per-sample and shared masks, round-robin, as a
ratio to ``x * 2``; beside each, the memory autograd keeps for backward (as
``bench_layers.py`` counts it). Needs a git checkout. Run with ``MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=100000000000``; the values in force are printed.

    python benchmarks/bench_dropcluster_versions.py [--ref REV] [--shapes 32 16] [--rounds 30]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dropcluster.nn import DropCluster2d

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_layers import saved_bytes  # noqa: E402

RELEASE_0_2_0 = "5f8d1e9"


def load_layer_at(ref: str):
    """The ``DropCluster2d`` class of ``dropcluster/nn/dropcluster.py`` at git revision ref."""
    source = subprocess.run(
        ["git", "show", f"{ref}:src/dropcluster/nn/dropcluster.py"],
        cwd=HERE,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "dropcluster_at_ref.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("dropcluster_at_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DropCluster2d


def methods(old_layer, shape) -> dict:
    n_channels, height, width = shape[1:]
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(64, n_channels, height + 4, width + 4, generator=generator)
    activations = torch.relu(F.avg_pool2d(noise, 5, 1))
    found = {"x * 2": lambda t: t * 2}
    for per_sample in (True, False):
        kind = "per-sample" if per_sample else "shared"
        for label, layer in (("before", old_layer), ("now", DropCluster2d)):
            found[f"{label} {kind}"] = layer(0.1, 15, per_sample=per_sample).fit(activations)
            compiled = layer(0.1, 15, per_sample=per_sample).fit(activations)
            found[f"{label} {kind}, compiled"] = torch.compile(compiled)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default=RELEASE_0_2_0, help="git revision of 'before'")
    parser.add_argument(
        "--shapes",
        type=int,
        nargs="+",
        default=[32, 16],
        help="map sizes of (128, 64, S, S) inputs",
    )
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    old_layer = load_layer_at(args.ref)
    print(
        f"torch {torch.__version__} | threads {torch.get_num_threads()} | before = {args.ref}, "
        f"now = this tree | {args.rounds} rounds (median) | MALLOC_MMAP_MAX_="
        f"{os.environ.get('MALLOC_MMAP_MAX_', 'unset')}, MALLOC_TRIM_THRESHOLD_="
        f"{os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}"
    )
    for size in args.shapes:
        shape = (128, 64, size, size)
        found = methods(old_layer, shape)
        for module in found.values():
            if isinstance(module, torch.nn.Module):
                module.train()
        x = torch.randn(*shape, requires_grad=True)
        grad = torch.ones_like(x)
        times = {name: [] for name in found}
        for _ in range(2):  # warm-up (and the compiles)
            for method in found.values():
                x.grad = None
                method(x).backward(grad)
        for _ in range(args.rounds):
            for name, method in found.items():
                x.grad = None
                start = time.perf_counter()
                method(x).backward(grad)
                times[name].append(time.perf_counter() - start)
        floor = statistics.median(times["x * 2"])
        print(f"\n{shape} float32, forward + backward, x * 2 = {floor * 1000:.2f} ms")
        print(f"  {'method':<28} {'x floor':>8} {'saved MiB':>10}")
        for name, values in times.items():
            memory = saved_bytes(found[name], x) / 2**20
            print(f"  {name:<28} {statistics.median(values) / floor:>8.2f} {memory:>10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
