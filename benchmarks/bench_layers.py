"""Forward + backward cost of each regularizer in training mode, as a ratio to ``x * 2``.

``x * 2`` forward and backward is the memory-bound floor of any elementwise layer. Every method
runs on the same (128, 64, 32, 32) input; the methods are timed round-robin (one call each per
round, many rounds) so that machine noise hits all of them alike, and the median per method is
reported. Beside the time, the memory a layer holds between its forward and its backward: the
bytes autograd saves for backward that are neither the input nor the module's own parameters
and buffers (what a training step holds per layer on top of the activations). Run through
``make bench`` (it sets ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000``, which
halves the time of large tensor operations on this VM); the values in force are printed.

    python benchmarks/bench_layers.py [--device cuda] [--dtypes float32 bfloat16] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch import nn

from dropcluster.nn import DropBlock2d, DropCluster2d

TARGETS = {
    "DropCluster2d per-sample": 2.0,
    "DropCluster2d per-sample, compiled": 1.3,
    "DropCluster2d shared mask": 1.25,
    "DropBlock2d (ours)": 2.0,
}


def _fitted_dropcluster(shape, device, per_sample: bool) -> DropCluster2d:
    n_samples, n_channels, height, width = shape
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(64, n_channels, height + 4, width + 4, generator=generator)
    activations = torch.relu(nn.functional.avg_pool2d(noise, 5, 1))
    layer = DropCluster2d(0.1, 15, per_sample=per_sample).fit(activations)
    return layer.to(device)


def build_methods(shape, device, compiled: bool = True) -> dict:
    """name -> callable(x) returning the output, all in training mode."""
    methods = {
        "x * 2 (floor)": lambda x: x * 2,
        "nn.Dropout(0.1)": nn.Dropout(0.1),
        "nn.Dropout2d(0.1)": nn.Dropout2d(0.1),
    }
    try:
        from dropblock import DropBlock2D  # the PyPI package the paper used

        reference = DropBlock2D(drop_prob=0.1, block_size=3).to(device)
        methods["PyPI dropblock DropBlock2D"] = reference
    except ImportError:
        print("(PyPI `dropblock` not installed: `pip install dropblock==0.3.0` adds its row)")
    methods["DropBlock2d (ours)"] = DropBlock2d(0.1, block_size=3).to(device)
    methods["DropCluster2d shared mask"] = _fitted_dropcluster(shape, device, per_sample=False)
    methods["DropCluster2d per-sample"] = _fitted_dropcluster(shape, device, per_sample=True)
    if compiled:
        # Inductor fuses the per-pixel gather into the multiply: one pass each way, like x * 2.
        methods["x * 2, compiled"] = torch.compile(lambda x: x * 2)
        layer = _fitted_dropcluster(shape, device, per_sample=True).train()
        methods["DropCluster2d per-sample, compiled"] = torch.compile(layer)
        layer = _fitted_dropcluster(shape, device, per_sample=False).train()
        methods["DropCluster2d shared mask, compiled"] = torch.compile(layer)
        methods["DropBlock2d (ours), compiled"] = torch.compile(DropBlock2d(0.1, 3).to(device))
    for module in methods.values():
        if isinstance(module, nn.Module):
            module.train()
    return methods


def saved_bytes(method, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward during ``method(x)``, leaving out tensors that share
    memory with ``x`` or with the module's parameters and buffers (they exist anyway)."""
    module = getattr(method, "_orig_mod", method)
    existing = {x.untyped_storage().data_ptr()}
    if isinstance(module, nn.Module):
        existing |= {t.untyped_storage().data_ptr() for t in module.parameters()}
        existing |= {t.untyped_storage().data_ptr() for t in module.buffers()}
        tables = getattr(module, "_tables", None)  # DropCluster2d's per-fit tables
        if tables is not None:
            existing |= {t.untyped_storage().data_ptr() for t in tables.onehots.values()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in existing:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = method(x)
    # A custom autograd function may keep tensors as attributes of its context (DropBlock2d's
    # CPU path keeps the dropped pixels' indices there): count those too.
    for tensor in _context_tensors(getattr(out, "grad_fn", None)):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in existing:
            saved[storage.data_ptr()] = storage.nbytes()
    return sum(saved.values())


def _context_tensors(value, depth: int = 0):
    """Tensors among the Python attributes of an autograd node, two objects deep."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth > 2 or value is None:
        return
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _context_tensors(item, depth + 1)
    elif hasattr(value, "__dict__"):
        for item in vars(value).values():
            yield from _context_tensors(item, depth + 1)


def time_methods(methods: dict, x: torch.Tensor, rounds: int) -> dict:
    grad = torch.ones_like(x)
    times = {name: [] for name in methods}
    synchronize = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(2):  # warm-up: allocator, kernels, caches
        for method in methods.values():
            method(x).backward(grad)
    for _ in range(rounds):
        for name, method in methods.items():
            x.grad = None
            synchronize()
            start = time.perf_counter()
            method(x).backward(grad)
            synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--shape", type=int, nargs=4, default=[128, 64, 32, 32])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="5 rounds on a small input")
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile row (compiles ~20 s)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.shape = 5, [16, 16, 16, 16]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    print(
        f"torch {torch.__version__}, python {platform.python_version()} | device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f" | torch threads {torch.get_num_threads()} | rounds {args.rounds} (median)"
    )
    print(
        "allocator: MALLOC_MMAP_MAX_="
        f"{os.environ.get('MALLOC_MMAP_MAX_', 'unset')}, MALLOC_TRIM_THRESHOLD_="
        f"{os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}"
    )
    print(f"input {tuple(args.shape)}, training mode, forward + backward, p = 0.1, block 3, k = 15")
    methods = build_methods(tuple(args.shape), device, compiled=not args.no_compile)
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(*args.shape, generator=generator).to(device, dtype).requires_grad_()
        medians = time_methods(methods, x, args.rounds)
        memory = {name: saved_bytes(method, x) for name, method in methods.items()}
        floor = medians["x * 2 (floor)"]
        print(f"\n{dtype_name} (input {x.numel() * x.element_size() / 2**20:.1f} MiB):")
        print(f"  {'method':<38} {'ms':>8} {'x floor':>8} {'saved MiB':>10}  target")
        for name, seconds in medians.items():
            target = TARGETS.get(name)
            verdict = ""
            if target is not None and dtype == torch.float32:
                verdict = f"<= {target}: {'met' if seconds / floor <= target else 'NOT MET'}"
            print(
                f"  {name:<38} {seconds * 1000:>8.2f} {seconds / floor:>8.2f} "
                f"{memory[name] / 2**20:>10.3f}  {verdict}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
