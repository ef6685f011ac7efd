"""CUDA checks and timings: ReNA, Spatial Hopkins and the regularizer layers on a GPU.

Runs in about a minute on one GPU and needs only torch and numpy (no nilearn): put ``src`` on
``PYTHONPATH`` or install the package. It checks that the CUDA paths give the same results as
the CPU ones, times them side by side, and checks that compiled DropCluster2d masks stay
independent across channels and samples (torch inductor's CUDA RNG had a reported regression,
pytorch issue 198333, where groups of 4 channels received identical dropout masks).

    PYTHONPATH=src python benchmarks/check_cuda.py
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F

from dropcluster.hopkins import spatial_hopkins
from dropcluster.nn import DropBlock2d, DropCluster2d, StochasticDepth
from dropcluster.rena import rena

REFERENCE = {"unstructured": "rena", "identical_neighbours": "split"}


def _timed(function, repeats: int, cuda: bool) -> float:
    function()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def conv_like(size: int, n_channels: int = 64, n_samples: int = 128) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    images = F.avg_pool2d(torch.rand(n_samples, 3, size + 8, size + 8, generator=generator), 5, 1)
    weight = torch.randn(n_channels, 3, 5, 5, generator=generator) * 0.2
    bias = torch.randn(n_channels, generator=generator) * 0.1
    x = torch.relu(F.conv2d(images, weight, bias))[..., :size, :size].contiguous()
    x[:, :3] = 0.0  # dead channels, as in real networks
    x[:, 3:5] = torch.relu(x[:, 3:5] - x[:, 3:5].mean() * 3)  # almost dead
    return x


def check_rena() -> None:
    print("== ReNA: CUDA vs CPU (64 channels x 128 samples, k = 15)")
    for size in (16, 32, 56):
        x = conv_like(size)
        cpu = rena(x, 15, **REFERENCE)
        gpu = rena(x.cuda(), 15, **REFERENCE)
        same_found = bool(torch.equal(cpu.n_found, gpu.n_found.cpu()))
        same_labels = (cpu.labels == gpu.labels.cpu()).flatten(1).all(1).float().mean()
        default_cpu, default_gpu = rena(x, 15), rena(x.cuda(), 15)
        cpu_time = _timed(lambda x=x: rena(x, 15, **REFERENCE), 3, False)
        x_gpu = x.cuda()
        gpu_time = _timed(lambda x_gpu=x_gpu: rena(x_gpu, 15, **REFERENCE), 10, True)
        print(
            f"  {size}x{size}: n_found equal {same_found}, channels with identical labels "
            f"{float(same_labels):.1%}, defaults structured equal "
            f"{bool(torch.equal(default_cpu.structured, default_gpu.structured.cpu()))} | "
            f"CPU {cpu_time * 1000:.1f} ms, CUDA {gpu_time * 1000:.1f} ms "
            f"({cpu_time / gpu_time:.1f}x)"
        )


def check_hopkins() -> None:
    x = conv_like(32).cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)
    value = spatial_hopkins(x, generator=generator, reduction="mean")
    seconds = _timed(lambda: spatial_hopkins(x, generator=generator), 10, True)
    print(
        f"== Spatial Hopkins on CUDA: median over channels {float(value.median()):.3f}, "
        f"{seconds * 1000:.2f} ms for (128, 64, 32, 32)"
    )


def check_layers() -> None:
    print("== layers on CUDA: forward + backward, training, (128, 64, 32, 32), ratio to x * 2")
    x_fit = conv_like(32)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(128, 64, 32, 32, device="cuda", dtype=dtype, requires_grad=True)
        grad = torch.ones_like(x)
        layers = {
            "x * 2": lambda t: t * 2,
            "nn.Dropout2d": torch.nn.Dropout2d(0.1),
            "DropBlock2d": DropBlock2d(0.1, 3).cuda(),
            "DropCluster2d shared": DropCluster2d(0.1, per_sample=False).fit(x_fit).cuda(),
            "DropCluster2d per-sample": DropCluster2d(0.1).fit(x_fit).cuda(),
            "StochasticDepth": StochasticDepth(0.1).cuda(),
        }
        medians = {}
        for name, layer in layers.items():
            medians[name] = _timed(lambda f=layer, x=x, g=grad: f(x).backward(g), 20, True)
        floor = medians["x * 2"]
        row = ", ".join(f"{name} {value / floor:.2f}" for name, value in medians.items())
        print(f"  {dtype}: x*2 = {floor * 1e3:.3f} ms; {row}")


def _mask_agreement(layer, out: torch.Tensor) -> tuple[float, float, float]:
    """Max and mean over pairs of structured channels of the fraction of images in which both
    drop the same cluster, and the same fraction for consecutive images of one channel."""
    structured = layer.structured.nonzero().squeeze(1)
    zeros = (out[:, structured] == 0).reshape(out.shape[0], structured.numel(), -1)
    labels = layer.labels[structured].reshape(structured.numel(), -1)
    dropped = torch.stack(
        [labels[i][zeros[:, i].float().argmax(dim=1)] for i in range(structured.numel())], dim=1
    )  # label of a dropped pixel, per image and structured channel (1 cluster of 15 dropped)
    same = (dropped.unsqueeze(2) == dropped.unsqueeze(1)).float().mean(0)
    off_diagonal = same[~torch.eye(same.shape[0], dtype=torch.bool, device=same.device)]
    consecutive = (dropped[1:] == dropped[:-1]).float().mean()
    return float(off_diagonal.max()), float(off_diagonal.mean()), float(consecutive)


def check_compiled_masks() -> None:
    print("== DropCluster2d masks on CUDA, eager and compiled (inductor), structured channels")
    print("   chance level 1/15 = 0.067; identical masks would give 1.0")
    layer = DropCluster2d(0.1, 15).fit(conv_like(16, n_channels=16)).cuda()
    x = torch.ones(512, 16, 16, 16, device="cuda")
    compiled = torch.compile(layer)
    for name, function in (("eager", layer), ("compiled", compiled)):
        worst, mean, consecutive = _mask_agreement(layer, function(x))
        print(
            f"  {name:<8} same cluster in two channels: max {worst:.3f}, mean {mean:.3f}; "
            f"in consecutive images: {consecutive:.3f}"
        )
    before = float((compiled(x) == 0).float().mean())
    layer.set_p(0.3)
    after = float((compiled(x) == 0).float().mean())
    print(f"  compiled, set_p(0.1 -> 0.3): zero fraction {before:.3f} -> {after:.3f}")


def main() -> int:
    if not torch.cuda.is_available():
        raise SystemExit("CUDA is not available")
    print(
        f"torch {torch.__version__} | {torch.cuda.get_device_name()} | "
        f"MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')}"
    )
    check_rena()
    check_hopkins()
    check_layers()
    check_compiled_masks()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
