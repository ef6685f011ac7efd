"""One prepared GPU run that answers the performance issue's GPU questions, in plain tables.

Made to run once on one NVIDIA H100 or H200 (torch 2.13) in under 5 minutes:

A. ReNA on CUDA against the CPU: same labels, and both times.
B. Spatial Hopkins on CUDA.
1. Layer costs at DropCluster's input shapes in the paper, (128, 64, 16, 16) (CIFAR-100 after
   the ImageNet stem) and (128, 64, 32, 32) (Tiny ImageNet), float32 and bfloat16, eager and
   torch.compile'd: forward + backward in training mode as a ratio to ``x * 2`` (the
   memory-bound floor of any elementwise layer). Goal: compiled DropCluster <= 1.5x.
2. Device kernels per forward + backward of each layer (torch.profiler).
C. Compiled DropCluster2d masks stay independent across channels and images (torch inductor's
   CUDA RNG had a reported regression, pytorch issue 198333, where groups of 4 channels got
   identical dropout masks).
3. Each regularizer's share of a ResNet-50 training step, in its paper slot (bf16 autocast,
   channels_last). Goal: DropCluster < 1 % of the step.
4. The paper's protocol on one GPU, through the training loop's own path (build_run, the
   DeviceLoader's batched augmentation, ``train_epoch``, ``evaluate``, ``Checkpoint``,
   ``fit_clusters``) on synthetic data sets of the real sizes held on the GPU: images/s, compile,
   evaluation, checkpoint and refit times, one 250-epoch run, and the GPU-hours of the paper
   presets on one GPU and on 8. Goal: one CIFAR-100 run < 15 minutes.
5. ReNA on the GPU at 512 x 64 x 32 x 32, k = 15, beside the CPU. Goal: < 50 ms.

Every section prints what it measured and how long it took. After ``--budget-s`` seconds the
optional repetitions still to come are cut (the script says where); a failing section prints
its traceback and the others still run (exit status 1). Timings are warmed up, synchronised,
the median of repeated runs, and round-robin between the methods compared, so that drifts of
the machine hit all of them alike.

    PYTHONPATH=src python benchmarks/check_cuda.py                  # the GPU run
    PYTHONPATH=src python benchmarks/check_cuda.py --only 3,4       # some sections again
    PYTHONPATH=src python benchmarks/check_cuda.py --device cpu --smoke   # all, tiny, < 1 min
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dropcluster.data import ImageDataset
from dropcluster.experiments.presets import expand_grid, load_preset
from dropcluster.hopkins import spatial_hopkins
from dropcluster.models.placement import placement_for
from dropcluster.nn import DropBlock2d, DropCluster2d, RefitSchedule, StochasticDepth
from dropcluster.rena import rena
from dropcluster.train.checkpoint import Checkpoint, save_checkpoint
from dropcluster.train.config import TrainConfig
from dropcluster.train.loop import Progress, evaluate, train_epoch, train_step
from dropcluster.train.setup import build_run

#: ReNA's rules in the paper's layer (the presets' DropCluster options).
REFERENCE = {"unstructured": "rena", "identical_neighbours": "split"}
#: The paper's DropCluster layer: one mask per minibatch, the paper's ReNA rules.
PAPER_LAYER = {"per_sample": False, **REFERENCE}
LAYER_GOAL = 1.5  # compiled DropCluster, forward + backward, as a multiple of x * 2
SHARE_GOAL = 0.01  # DropCluster's extra time, as a fraction of a ResNet-50 training step
RUN_GOAL_S = 15 * 60  # one 250-epoch CIFAR-100 run
RENA_GOAL_S = 0.050  # ReNA on 512 x 64 x 32 x 32, k = 15


@dataclass(frozen=True)
class DataSet:
    """A paper data set: its preset and the sizes of the real one."""

    preset: str
    image_size: int
    classes: int
    train: int
    test: int


DATASETS = {
    "cifar100": DataSet("paper-cifar100", 32, 100, 50_000, 10_000),
    "tiny-imagenet": DataSet("paper-tiny-imagenet", 64, 200, 100_000, 10_000),
}


@dataclass(frozen=True)
class Sizes:
    """Problem sizes and repetitions of one mode: the GPU run, or the CPU smoke run."""

    parity: tuple[int, ...]  # map sizes of the ReNA parity check
    parity_images: int
    parity_channels: int
    hopkins: tuple[int, int, int]  # images, channels, size
    layers: dict[str, tuple[int, int, int, int]]  # data set -> DropCluster's input shape
    layer_rounds: int
    compiled_methods: tuple[str, ...]  # keys of layer_methods compiled as well
    compiled_combos: int  # (shape, dtype) combinations with compiled rows, in order
    masks: tuple[int, int, int]  # images, channels, size
    batch: int | None  # training batch of sections 3 and 4; None: the preset's (128)
    eval_batch: int | None  # None: the config's
    cluster_images: int | None  # images of a DropCluster refit; None: the preset's (128)
    step_warmup: int
    step_rounds: int
    train_images: dict[str, int]
    test_images: int
    protocol_steps: dict[str, int]  # training steps per timed chunk
    protocol_rounds: int
    protocol_warmup: int
    protocol_compiled: tuple[str, ...]  # regularizers also timed compiled (each one compile)
    rena: tuple[int, int, int]  # images, channels, size
    rena_reps: int
    rena_cpu_reps: int


COMPILED_METHODS = ("dropout2d", "dropblock", "dropblock_ref", "dc_sample", "dc_shared", "dc_paper")
FULL = Sizes(
    parity=(16, 32, 56),
    parity_images=128,
    parity_channels=64,
    hopkins=(128, 64, 32),
    layers={"cifar100": (128, 64, 16, 16), "tiny-imagenet": (128, 64, 32, 32)},
    layer_rounds=30,
    compiled_methods=COMPILED_METHODS,
    compiled_combos=4,
    masks=(512, 16, 16),
    batch=None,
    eval_batch=None,
    cluster_images=None,
    step_warmup=3,
    step_rounds=20,
    train_images={name: data.train for name, data in DATASETS.items()},
    test_images=10_000,
    protocol_steps={"cifar100": 30, "tiny-imagenet": 15},
    protocol_rounds=3,
    protocol_warmup=10,
    protocol_compiled=("none", "dropcluster"),
    rena=(512, 64, 32),
    rena_reps=10,
    rena_cpu_reps=2,
)
# Tiny sizes that go through every code path on a CPU in well under a minute; one tiny
# compile (aot_eager: traced forward and backward, no code generation) plus the mask check's.
SMOKE = Sizes(
    parity=(8,),
    parity_images=16,
    parity_channels=8,
    hopkins=(16, 8, 8),
    layers={"cifar100": (4, 8, 8, 8), "tiny-imagenet": (4, 8, 16, 16)},
    layer_rounds=3,
    compiled_methods=("dc_paper",),
    compiled_combos=1,
    masks=(64, 16, 8),
    batch=4,
    eval_batch=32,
    cluster_images=16,
    step_warmup=1,
    step_rounds=2,
    train_images={"cifar100": 256, "tiny-imagenet": 256},
    test_images=64,
    protocol_steps={"cifar100": 2, "tiny-imagenet": 1},
    protocol_rounds=2,
    protocol_warmup=1,
    protocol_compiled=(),
    rena=(32, 8, 16),
    rena_reps=3,
    rena_cpu_reps=1,
)

SECTIONS = ("A", "B", "1", "2", "C", "3", "4", "5")


# ---------------------------------------------------------------------------------------------
# Time keeping


class Clock:
    """Elapsed time against the budget; past it, optional repetitions are cut (and said so)."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.start = time.perf_counter()
        self.cuts: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over(self) -> bool:
        return self.elapsed() > self.budget_s

    def enough(self, done: int, minimum: int, what: str) -> bool:
        """True, after saying so, when ``done >= minimum`` repetitions and the budget is spent."""
        if done < minimum or not self.over():
            return False
        self.cut(f"{what} after {done}")
        return True

    def cut(self, what: str) -> None:
        self.cuts.append(what)
        print(f"  (budget {self.budget_s:.0f} s spent at {self.elapsed():.0f} s: cut {what})")


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed(function: Callable[[], object], sync: Callable[[], None]) -> float:
    """Seconds of one call, the device synchronised before and after."""
    sync()
    start = time.perf_counter()
    function()
    sync()
    return time.perf_counter() - start


def repeated(function, sync, reps: int, minimum: int, clock: Clock, what: str) -> float:
    """Median seconds over up to ``reps`` calls (at least ``minimum``) after one warm-up."""
    function()
    times = []
    for done in range(reps):
        if clock.enough(done, minimum, what):
            break
        times.append(timed(function, sync))
    return statistics.median(times)


def round_robin(
    functions: dict, sync, rounds: int, minimum: int, clock: Clock, what: str
) -> dict[str, float]:
    """Median seconds per function, timed one call each per round (warm them up first)."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for done in range(rounds):
        if clock.enough(done, minimum, f"{what}: rounds"):
            break
        for name, function in functions.items():
            times[name].append(timed(function, sync))
    return {name: statistics.median(values) for name, values in times.items()}


def allow_recompiles(limit: int = 64) -> None:
    """Raise dynamo's recompile limit: the layers below compile one code object (each layer
    class's ``forward``) for many shapes and dtypes; past the default 8 dynamo would silently
    run the rest eagerly, and the "compiled" rows would time eager code."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


def graph_breaks() -> int:
    """Graph breaks dynamo counted so far in this process (-1: the counter is unavailable)."""
    try:
        from torch._dynamo.utils import counters

        return int(sum(counters["graph_break"].values()))
    except Exception:  # noqa: BLE001 - a private counter: report it missing, do not fail
        return -1


def count_kernels(function: Callable[[], object], device: torch.device) -> tuple[int, float | None]:
    """Device kernels (and memcpy/memset) one call launches on CUDA and their summed duration
    in microseconds (the device's busy time, launch gaps excluded); aten ops on the CPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = synchronizer(device)
    sync()
    with profile(activities=activities) as profiler:
        function()
        sync()
    events = profiler.events()
    if cuda:
        kernels = [event for event in events if event.device_type == DeviceType.CUDA]
        return len(kernels), sum(event.time_range.elapsed_us() for event in kernels)
    return sum(1 for event in events if event.name.startswith("aten::")), None


def kernel_unit(device: torch.device) -> str:
    if device.type == "cuda":
        return (
            "device kernels (CUDA events: kernels, memcpy, memset) and, in brackets, their "
            "summed duration in us (device busy time, launch gaps excluded)"
        )
    return "aten ops (CPU: no device kernels; nested ops included)"


# ---------------------------------------------------------------------------------------------
# Inputs


def conv_like(size: int, n_channels: int = 64, n_samples: int = 128) -> torch.Tensor:
    """ReLU activations of a random 5x5 conv on smooth images: what DropCluster is fitted on."""
    generator = torch.Generator().manual_seed(0)
    images = F.avg_pool2d(torch.rand(n_samples, 3, size + 8, size + 8, generator=generator), 5, 1)
    weight = torch.randn(n_channels, 3, 5, 5, generator=generator) * 0.2
    bias = torch.randn(n_channels, generator=generator) * 0.1
    x = torch.relu(F.conv2d(images, weight, bias))[..., :size, :size].contiguous()
    x[:, :3] = 0.0  # dead channels, as in real networks
    x[:, 3:5] = torch.relu(x[:, 3:5] - x[:, 3:5].mean() * 3)  # almost dead
    return x


def synthetic_split(dataset: str, n_images: int, device: torch.device, seed: int) -> ImageDataset:
    """Random uint8 images of the data set's size, balanced labels, on the CPU as the real
    loaders give them (``build_run`` moves them to ``device``, as for real data)."""
    info = DATASETS[dataset]
    generator = torch.Generator().manual_seed(seed)
    shape = (n_images, 3, info.image_size, info.image_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    labels = torch.arange(n_images) % info.classes
    return ImageDataset(images, labels, [f"class{k}" for k in range(info.classes)], dataset)


def synthetic_run(config: TrainConfig, device: torch.device, splits: dict[str, ImageDataset]):
    """``build_run`` of ``config`` on the synthetic splits: the model, the regularizer's slot,
    the optimizer's groups, torch.compile, the DeviceLoader and the evaluation preparer are
    the training loop's own."""
    torch.manual_seed(config.seed)
    return build_run(config, device, datasets=(splits["train"], splits["test"]))


def paper_configs(dataset: str) -> dict[str, TrainConfig]:
    """Per regularizer, the first full-data run of the data set's paper preset (its slot and
    options: the paper's DropCluster layer, DropBlock as the cited package)."""
    configs: dict[str, TrainConfig] = {}
    for spec in expand_grid(load_preset(DATASETS[dataset].preset)):
        if spec.train_fraction == 1.0 and spec.config.variant is None:
            configs.setdefault(spec.regularizer, spec.config)
    return configs


def measured_config(
    config: TrainConfig, device: torch.device, sizes: Sizes, compiled: bool
) -> TrainConfig:
    changes = {"device": str(device), "compile": compiled}
    for name, value in (
        ("batch_size", sizes.batch),
        ("eval_batch_size", sizes.eval_batch),
        ("cluster_images", sizes.cluster_images),
    ):
        if value is not None:
            changes[name] = value
    return config.replace(**changes)


def refit(run, config: TrainConfig) -> None:
    """One DropCluster refit as the training loop makes it."""
    run.refit()


def slot_of(config: TrainConfig) -> str:
    slot = config.regularizer_options.get("slot")
    if slot is None:
        slot = placement_for(config.regularizer, config.dataset).slot
    return "-" if slot is None else slot if isinstance(slot, str) else "+".join(slot)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.3f}"


def met(ok: bool) -> str:
    return "met" if ok else "NOT MET"


# ---------------------------------------------------------------------------------------------
# A, B, C: the checks of the CUDA paths


def check_rena_parity(device: torch.device, sizes: Sizes, clock: Clock) -> None:
    sync = synchronizer(device)
    print(
        f"   {sizes.parity_channels} channels x {sizes.parity_images} images, k = 15; labels "
        f"with the paper's rules {REFERENCE}; {device} against the CPU"
    )
    print(
        f"  {'map':<7} {'n_found equal':>13} {'same labels':>12} {'defaults equal':>15} "
        f"{'CPU ms':>9} {'device ms':>10} {'speed-up':>9}"
    )
    for size in sizes.parity:
        x = conv_like(size, sizes.parity_channels, sizes.parity_images)
        x_device = x.to(device)
        start = time.perf_counter()
        cpu = rena(x, 15, **REFERENCE)
        cpu_s = time.perf_counter() - start  # the CPU is timed once: it is the slow side
        on_device = rena(x_device, 15, **REFERENCE)
        same_found = bool(torch.equal(cpu.n_found, on_device.n_found.cpu()))
        same = (cpu.labels == on_device.labels.cpu()).flatten(1).all(1).float().mean()
        defaults = torch.equal(rena(x, 15).structured, rena(x_device, 15).structured.cpu())
        device_s = repeated(
            lambda x=x_device: rena(x, 15, **REFERENCE),
            sync,
            10,
            3,
            clock,
            f"ReNA parity {size}x{size} timing",
        )
        print(
            f"  {f'{size}x{size}':<7} {str(same_found):>13} {float(same):>12.1%} "
            f"{str(defaults):>15} {cpu_s * 1e3:>9.1f} {device_s * 1e3:>10.1f} "
            f"{cpu_s / device_s:>8.1f}x"
        )


def check_hopkins(device: torch.device, sizes: Sizes, clock: Clock) -> None:
    images, channels, size = sizes.hopkins
    x = conv_like(size, channels, images).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    value = spatial_hopkins(x, generator=generator, reduction="mean")
    seconds = repeated(
        lambda: spatial_hopkins(x, generator=generator),
        synchronizer(device),
        10,
        3,
        clock,
        "Hopkins timing",
    )
    print(
        f"  input {tuple(x.shape)} on {device}: median over channels "
        f"{float(value.median()):.3f}, {seconds * 1000:.2f} ms"
    )


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


def check_compiled_masks(device: torch.device, sizes: Sizes, backend: str) -> None:
    images, channels, size = sizes.masks
    print(
        f"   input ({images}, {channels}, {size}, {size}) of ones, per-sample masks, "
        f"backend {backend}; chance 1/15 = 0.067, identical masks would give 1.0"
    )
    layer = DropCluster2d(0.1, 15).fit(conv_like(size, channels, 128)).to(device)
    x = torch.ones(images, channels, size, size, device=device)
    compiled = torch.compile(layer, backend=backend, dynamic=False)
    print(
        f"  {'':<9} {'same cluster, two channels: max':>32} {'mean':>7} {'consecutive images':>19}"
    )
    for name, function in (("eager", layer), ("compiled", compiled)):
        worst, mean, consecutive = _mask_agreement(layer, function(x))
        print(f"  {name:<9} {worst:>32.3f} {mean:>7.3f} {consecutive:>19.3f}")
    before = float((compiled(x) == 0).float().mean())
    layer.set_p(0.3)
    after = float((compiled(x) == 0).float().mean())
    print(f"  compiled, set_p(0.1 -> 0.3): zero fraction {before:.3f} -> {after:.3f}")


# ---------------------------------------------------------------------------------------------
# 1, 2: layer costs and kernel counts


def fitted_dropcluster(shape, device: torch.device, **options) -> DropCluster2d:
    """A DropCluster2d fitted on conv-like activations of the input's (C, H, W), on ``device``
    (ReNA runs on the device: fast; section A checks that it gives the CPU's labels)."""
    n_samples, channels, size, _ = shape
    activations = conv_like(size, channels, max(n_samples, 16)).to(device)
    return DropCluster2d(0.1, 15, **options).fit(activations).to(device)


def layer_methods(dataset: str, shape, device: torch.device) -> dict[str, tuple[str, object]]:
    """key -> (label, callable) of every layer compared, in training mode, on ``device``."""
    block = 5 if dataset == "cifar100" else 7  # the paper's DropBlock size on this data set
    methods = {
        "floor": ("x * 2 (floor)", lambda x: x * 2),
        "dropout2d": ("nn.Dropout2d(0.1)", nn.Dropout2d(0.1)),
        "dropblock": (f"DropBlock2d(0.1, {block})", DropBlock2d(0.1, block)),
        "dropblock_ref": (
            f"DropBlock2d(0.1, {block}) reference",
            DropBlock2d(0.1, block, mode="reference"),
        ),
        "dc_sample": ("DropCluster2d per_sample=True", fitted_dropcluster(shape, device)),
        "dc_shared": (
            "DropCluster2d per_sample=False",
            fitted_dropcluster(shape, device, per_sample=False),
        ),
        "dc_paper": (
            "DropCluster2d paper (shared, rena, split)",
            fitted_dropcluster(shape, device, **PAPER_LAYER),
        ),
        "stochastic_depth": ("StochasticDepth(0.1)", StochasticDepth(0.1)),
    }
    for _, method in methods.values():
        if isinstance(method, nn.Module):
            method.to(device).train()
    return methods


def forward_backward(layer, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        x.grad = None
        layer(x).backward(grad)

    return call


@dataclass
class LayerRow:
    label: str
    eager_s: float
    compiled_s: float | None = None
    compile_s: float | None = None
    kernels: dict[str, tuple[int, float | None]] = field(default_factory=dict)  # by mode


def time_layers(
    methods, compiled: dict, x: torch.Tensor, device: torch.device, sizes: Sizes, clock: Clock
) -> dict[str, LayerRow]:
    """Eager and compiled forward + backward of every method on ``x``, round-robin."""
    sync = synchronizer(device)
    grad = torch.ones_like(x)
    calls = {key: forward_backward(method, x, grad) for key, (_, method) in methods.items()}
    rows = {key: LayerRow(label, 0.0) for key, (label, _) in methods.items()}
    for key, layer in compiled.items():
        call = forward_backward(layer, x, grad)
        try:
            rows[key].compile_s = timed(call, sync)  # the first call compiles
        except Exception as error:  # noqa: BLE001 - report it, time the others
            print(f"  compile of {rows[key].label} FAILED: {type(error).__name__}: {error}")
            continue
        calls[f"{key} compiled"] = call
    for call in calls.values():  # warm-up: allocator, kernels, caches
        call()
        call()
    medians = round_robin(calls, sync, sizes.layer_rounds, 3, clock, "layer timing")
    for name, seconds in medians.items():
        key, _, mode = name.partition(" ")
        if mode:
            rows[key].compiled_s = seconds
        else:
            rows[key].eager_s = seconds
    if clock.over():
        clock.cut(f"kernel counts of {tuple(x.shape)} {dtype_name(x.dtype)}")
        return rows
    for name, call in calls.items():
        key, _, mode = name.partition(" ")
        rows[key].kernels[mode or "eager"] = count_kernels(call, device)
    return rows


def print_layer_table(rows: dict[str, LayerRow]) -> None:
    floor = rows["floor"].eager_s
    print(
        f"  {'method':<42} {'eager ms':>9} {'ratio':>7} {'compiled ms':>12} {'ratio':>7} "
        f"{'compile s':>10}  goal"
    )
    for key, row in rows.items():
        compiled = "-" if row.compiled_s is None else f"{row.compiled_s / floor:.2f}x"
        goal = ""
        if key.startswith("dc_") and row.compiled_s is not None:
            goal = f"compiled <= {LAYER_GOAL}x: {met(row.compiled_s / floor <= LAYER_GOAL)}"
        compile_s = "-" if row.compile_s is None else f"{row.compile_s:.1f}"
        print(
            f"  {row.label:<42} {ms(row.eager_s):>9} {row.eager_s / floor:>6.2f}x "
            f"{ms(row.compiled_s):>12} {compiled:>7} {compile_s:>10}  {goal}"
        )


def layer_costs(device: torch.device, sizes: Sizes, backend: str, clock: Clock) -> dict:
    """Section 1; returns the kernel counts for section 2: shape -> dtype -> rows."""
    print(
        f"   training mode, forward + backward, p = 0.1, k = 15; wall time with the device "
        f"synchronised around each call (launch overhead included; section 2 gives the "
        f"device's busy time); ratio to x * 2 (eager); compiled: torch.compile(layer, "
        f"backend={backend!r}, dynamic=False)"
    )
    counts: dict = {}
    combo = 0
    breaks_before = graph_breaks()
    for dataset, shape in sizes.layers.items():
        methods = layer_methods(dataset, shape, device)
        compiled_layers = {
            key: torch.compile(methods[key][1], backend=backend, dynamic=False)
            for key in sizes.compiled_methods
        }
        for dtype in (torch.float32, torch.bfloat16):
            compiled = compiled_layers if combo < sizes.compiled_combos else {}
            combo += 1
            generator = torch.Generator().manual_seed(1)
            x = torch.randn(*shape, generator=generator).to(device, dtype).requires_grad_()
            rows = time_layers(methods, compiled, x, device, sizes, clock)
            print(
                f"\n-- {shape} {dtype_name(dtype)} ({dataset}: DropCluster's "
                f"input), x * 2 floor {ms(rows['floor'].eager_s)} ms"
            )
            print_layer_table(rows)
            counts.setdefault(shape, {})[dtype] = rows
    print(f"\n  graph breaks in the compiled layers: {graph_breaks() - breaks_before}")
    return counts


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def kernel_cell(value: tuple[int, float | None] | None) -> str:
    if value is None:
        return "-"
    count, device_us = value
    return str(count) if device_us is None else f"{count} ({device_us:.0f})"


def print_kernel_counts(counts: dict | None, device: torch.device) -> None:
    """Section 2, from the counts section 1 took beside its timings."""
    if not counts:
        print("  no counts: section 1 did not run or failed")
        return
    print(f"   {kernel_unit(device)} per forward + backward, training mode")
    for shape, by_dtype in counts.items():
        columns = [(dtype, mode) for dtype in by_dtype for mode in ("eager", "compiled")]
        header = "".join(f" {f'{mode} {dtype_name(dtype)}':>17}" for dtype, mode in columns)
        print(f"\n-- {shape}")
        print(f"  {'method':<42}{header}")
        first = next(iter(by_dtype.values()))
        for key, row in first.items():
            values = [by_dtype[dtype][key].kernels.get(mode) for dtype, mode in columns]
            cells = "".join(f" {kernel_cell(value):>17}" for value in values)
            print(f"  {row.label:<42}{cells}")


# ---------------------------------------------------------------------------------------------
# 3: a regularizer's share of a ResNet-50 training step


def training_step(run, images, labels, config: TrainConfig, device: torch.device):
    """One step as the training loop makes it (``train.loop.train_step``), on a fixed batch."""
    return lambda: train_step(run, images, labels)


def step_share(device: torch.device, sizes: Sizes, clock: Clock) -> None:
    sync = synchronizer(device)
    for dataset, info in DATASETS.items():
        configs = {
            reg: measured_config(config, device, sizes, compiled=False)
            for reg, config in paper_configs(dataset).items()
        }
        batch = configs["none"].batch_size
        n_images = max(4 * batch, 256)
        splits = {
            split: synthetic_split(dataset, n_images, device, seed)
            for seed, split in enumerate(("train", "test"))
        }
        steps = {}
        for reg, config in configs.items():
            run = synthetic_run(config, device, splits)
            if run.has_dropcluster:
                refit(run, config)  # fitted: the layer drops clusters, as after epoch 50
            images, labels = next(iter(run.loader))
            steps[reg] = training_step(run, images, labels, config, device)
        for step in steps.values():
            for _ in range(sizes.step_warmup):
                step()
        medians = round_robin(steps, sync, sizes.step_rounds, 2, clock, f"{dataset} steps")
        amp = "bf16 autocast" if device.type == "cuda" else "float32 (no autocast on the CPU)"
        print(
            f"\n-- {dataset}: ResNet-50 ({configs['none'].stem} stem), batch {batch}, "
            f"3x{info.image_size}x{info.image_size}, {amp}, channels_last, eager, "
            f"forward + cross-entropy + backward + SGD step"
        )
        base = medians["none"]
        print(
            f"  {'regularizer':<18} {'slot':<16} {'step ms':>9} {'extra ms':>9} "
            f"{'extra %':>8}  goal"
        )
        for reg, seconds in medians.items():
            extra = "-" if reg == "none" else f"{(seconds - base) * 1000:.3f}"
            share = "-" if reg == "none" else f"{(seconds - base) / base:.2%}"
            goal = ""
            if reg == "dropcluster":
                goal = f"< {SHARE_GOAL:.0%}: {met((seconds - base) / base < SHARE_GOAL)}"
            print(
                f"  {reg:<18} {slot_of(configs[reg]):<16} {seconds * 1000:>9.2f} "
                f"{extra:>9} {share:>8}  {goal}"
            )


# ---------------------------------------------------------------------------------------------
# 4: the paper's protocol on one GPU


class FirstBatches:
    """The next ``steps`` batches of a DeviceLoader (across epochs), as a loader for
    ``train_epoch``: it runs a chunk of an epoch through the loop's own step code."""

    def __init__(self, loader, steps: int) -> None:
        self.loader, self.steps = loader, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator:
        produced = 0
        while True:
            for batch in self.loader:
                yield batch
                produced += 1
                if produced == self.steps:
                    return


@dataclass
class Entry:
    """One regularizer in one mode (eager or compiled) with its run objects."""

    regularizer: str
    mode: str
    config: TrainConfig
    run: object
    first_s: float = 0.0  # the first chunk: warm-up, and the compile in compiled mode


@dataclass
class Protocol:
    """What section 4 measured on one data set (times in seconds)."""

    dataset: str
    configs: dict[str, TrainConfig]  # the paper preset's config of each regularizer
    batch: int = 0
    step_s: dict[tuple[str, str], float] = field(default_factory=dict)  # (reg, mode) -> step
    compile_s: dict[tuple[str, str], float] = field(default_factory=dict)
    eval_s: dict[str, float] = field(default_factory=dict)  # mode -> per test image
    eval_compile_s: float = 0.0
    checkpoint_s: float = 0.0
    refit_s: float = 0.0
    estimated: str = ""  # how compiled step times that were not measured are estimated


def train_chunk(entry: Entry, steps: int, device: torch.device) -> float:
    """Seconds of ``steps`` training steps through ``train.loop.train_epoch``."""
    run = dataclasses.replace(entry.run, loader=FirstBatches(entry.run.loader, steps))
    progress = Progress(entry.config.epochs, io.StringIO())  # not a terminal: draws nothing

    def chunk() -> None:
        train_epoch(run, 0, progress=progress)

    return timed(chunk, synchronizer(device))


def protocol_entries(
    result: Protocol, device: torch.device, sizes: Sizes, compiled: tuple[str, ...], splits
) -> list[Entry]:
    """A run per regularizer and mode, DropCluster fitted (before any compile: the first fit
    flips a flag torch.compile guards on, which would compile the model again)."""
    entries = []
    for reg, paper in result.configs.items():
        for mode in ("eager", "compiled") if reg in compiled else ("eager",):
            config = measured_config(paper, device, sizes, compiled=mode == "compiled")
            run = synthetic_run(config, device, splits)
            if run.has_dropcluster:
                refit(run, config)
            entries.append(Entry(reg, mode, config, run))
    return entries


def measure_training(
    entries: list[Entry],
    steps: int,
    sizes: Sizes,
    device: torch.device,
    clock: Clock,
    result: Protocol,
) -> None:
    """Warm every entry up (compiling the compiled ones), then time chunks round-robin. An
    entry that fails (a compile error, a diverged loss) is reported and left out."""

    def chunk(entry: Entry, n_steps: int) -> float | None:
        try:
            return train_chunk(entry, n_steps, device)
        except Exception as error:  # noqa: BLE001 - report it, measure the others
            print(f"  {entry.regularizer} {entry.mode} FAILED: {type(error).__name__}: {error}")
            entries.remove(entry)
            return None

    breaks = {}
    for entry in list(entries):
        before = graph_breaks()
        entry.first_s = chunk(entry, sizes.protocol_warmup) or 0.0
        breaks[entry.regularizer, entry.mode] = graph_breaks() - before
    times: dict[tuple[str, str], list[float]] = {(e.regularizer, e.mode): [] for e in entries}
    for done in range(sizes.protocol_rounds):
        if clock.enough(done, 1, f"{result.dataset} training chunks: rounds"):
            break
        for entry in list(entries):
            seconds = chunk(entry, steps)
            if seconds is not None:
                times[entry.regularizer, entry.mode].append(seconds / steps)
    for entry in entries:
        key = (entry.regularizer, entry.mode)
        result.step_s[key] = statistics.median(times[key])
        if entry.mode == "compiled":
            compile_s = max(entry.first_s - sizes.protocol_warmup * result.step_s[key], 0.0)
            result.compile_s[key] = compile_s
            print(
                f"  {entry.regularizer} compiled: {compile_s:.1f} s to compile (first "
                f"{sizes.protocol_warmup} steps {entry.first_s:.1f} s), graph breaks "
                f"{breaks[key]}"
            )


def measure_evaluation(
    entries: list[Entry], device: torch.device, clock: Clock, result: Protocol
) -> None:
    """Seconds per test image of ``train.loop.evaluate`` on the no-regularizer model, in each
    mode measured (in compiled mode the first call compiles the evaluation graph)."""
    sync = synchronizer(device)
    for entry in entries:
        if entry.regularizer != "none":
            continue
        run, config = entry.run, entry.config

        def call(run=run, config=config):
            return evaluate(
                run.model,
                run.test_images,
                run.test_labels,
                run.prepare_eval,
                config.eval_batch_size,
            )

        first = timed(call, sync)
        seconds = repeated(call, sync, 3, 1, clock, f"{result.dataset} evaluations")
        result.eval_s[entry.mode] = seconds / run.test_images.shape[0]
        if entry.mode == "compiled":
            result.eval_compile_s = max(first - seconds, 0.0)


def measure_checkpoint(entry: Entry, clock: Clock) -> float:
    """Seconds of the per-epoch checkpoint, built and written as ``train.loop`` does it."""
    checkpoint = Checkpoint(entry.run)

    def save(folder: Path) -> None:
        save_checkpoint(folder / "checkpoint.pt", checkpoint.state_dict(0, []))

    sync = synchronizer(torch.device(entry.config.device))
    with tempfile.TemporaryDirectory() as folder:
        return repeated(lambda: save(Path(folder)), sync, 2, 1, clock, "checkpoint writes")


def measure_refit(entries: list[Entry], device: torch.device, clock: Clock) -> float:
    for entry in entries:
        if entry.regularizer == "dropcluster" and entry.mode == "eager":
            call = lambda entry=entry: refit(entry.run, entry.config)  # noqa: E731
            return repeated(call, synchronizer(device), 2, 1, clock, "refits")
    return 0.0


def measure_protocol(
    dataset: str, device: torch.device, sizes: Sizes, compiled: tuple[str, ...], clock: Clock
) -> Protocol:
    info = DATASETS[dataset]
    n_train, n_test = sizes.train_images[dataset], sizes.test_images
    splits = {
        "train": synthetic_split(dataset, n_train, device, 0),
        "test": synthetic_split(dataset, n_test, device, 1),
    }
    print(
        f"\n-- {dataset}: synthetic {n_train} training + {n_test} test images "
        f"3x{info.image_size}x{info.image_size} uint8 on {device}, {info.classes} classes; "
        f"compiled: {', '.join(compiled) or 'nothing (eager only)'}"
    )
    result = Protocol(dataset, paper_configs(dataset))
    entries = protocol_entries(result, device, sizes, compiled, splits)
    config = entries[0].config
    result.batch = config.batch_size
    steps = sizes.protocol_steps[dataset]
    print(
        f"  batch {result.batch}, {steps} steps per timed chunk through "
        f"train.loop.train_epoch (DeviceLoader + augment_batch; CUDA: autocast "
        f"{config.amp_dtype}; channels_last), median of {sizes.protocol_rounds} chunks"
    )
    measure_training(entries, steps, sizes, device, clock, result)
    measure_evaluation(entries, device, clock, result)
    result.checkpoint_s = measure_checkpoint(entries[0], clock)
    result.refit_s = measure_refit(entries, device, clock)
    print_protocol(result, config)
    return result


def train_seconds(result: Protocol, reg: str, mode: str, fraction: float = 1.0) -> float:
    """The training steps of one epoch over ``fraction`` of the real training set."""
    info = DATASETS[result.dataset]
    return fraction * info.train / result.batch * result.step_s[reg, mode]


def evaluation_seconds(result: Protocol, mode: str, images: int | None = None) -> float:
    """``train.loop.evaluate`` on ``images`` test images (default: the real test set)."""
    images = DATASETS[result.dataset].test if images is None else images
    return images * result.eval_s.get(mode, result.eval_s.get("eager", 0.0))


def epoch_seconds(result: Protocol, reg: str, mode: str) -> float:
    """One full-data epoch: the training steps, the test-set evaluation and the checkpoint."""
    return train_seconds(result, reg, mode) + evaluation_seconds(result, mode) + result.checkpoint_s


def refits_per_run(config: TrainConfig) -> int:
    schedule = RefitSchedule(every=config.cluster_every)
    return sum(schedule.due(epoch) for epoch in range(config.epochs))


def tested_epochs(config: TrainConfig) -> int:
    """Epochs that end with a test-set evaluation (``test_every``)."""
    return sum(config.tests_after(epoch) for epoch in range(config.epochs))


def checkpointed_epochs(config: TrainConfig) -> int:
    """Epochs that end with a checkpoint (``checkpoint_every``)."""
    return sum(config.checkpoints_after(epoch) for epoch in range(config.epochs))


def compile_seconds(result: Protocol, reg: str, mode: str) -> float:
    """Compile time one run pays: its training and evaluation graphs, once (DropCluster2d gets
    its shapes before the model is compiled and its fits change buffers, not the graph)."""
    if mode != "compiled":
        return 0.0
    train = result.compile_s.get((reg, mode), result.compile_s.get(("none", mode), 0.0))
    return train + result.eval_compile_s


def run_seconds(result: Protocol, config: TrainConfig, mode: str, corrupted_sets: int = 0) -> float:
    """One run of ``config``: its epochs (steps, checkpoint, test evaluations), refits,
    compiles and corrupted test sets (their evaluation only, not making them)."""
    reg = config.regularizer
    seconds = config.epochs * train_seconds(result, reg, mode, config.train_fraction)
    seconds += checkpointed_epochs(config) * result.checkpoint_s
    seconds += tested_epochs(config) * evaluation_seconds(result, mode)
    if reg == "dropcluster":
        seconds += refits_per_run(config) * result.refit_s
    seconds += corrupted_sets * evaluation_seconds(result, mode)
    return seconds + compile_seconds(result, reg, mode)


def print_protocol(result: Protocol, config: TrainConfig) -> None:
    info = DATASETS[result.dataset]
    epochs = result.configs["none"].epochs
    print(
        f"  {'regularizer':<18} {'mode':<9} {'images/s':>9} {'step ms':>8} {'compiles s':>10} "
        f"{'epoch s':>8} {f'run, {epochs} ep':>13}  goal"
    )
    for (reg, mode), step_s in result.step_s.items():
        run_s = run_seconds(result, result.configs[reg], mode)
        compile_s = f"{compile_seconds(result, reg, mode):.1f}" if mode == "compiled" else "-"
        goal = ""
        if result.dataset == "cifar100":
            goal = f"< {RUN_GOAL_S // 60} min: {met(run_s < RUN_GOAL_S)}"
        print(
            f"  {reg:<18} {mode:<9} {result.batch / step_s:>9.0f} {step_s * 1e3:>8.2f} "
            f"{compile_s:>10} {epoch_seconds(result, reg, mode):>8.2f} "
            f"{run_s / 60:>9.1f} min  {goal}"
        )
    print("  (compiles s: what one run spends compiling, training and evaluation graphs)")
    for mode in result.eval_s:
        extra = f", compile {result.eval_compile_s:.1f} s" if mode == "compiled" else ""
        print(
            f"  test evaluation ({mode}, train.loop.evaluate, batch {config.eval_batch_size}): "
            f"{evaluation_seconds(result, mode):.3f} s per {info.test} images{extra}"
        )
    print(
        f"  one checkpoint (model + SGD state, fsync; written every checkpoint_every epochs): "
        f"{result.checkpoint_s:.3f} s"
    )
    print(
        f"  DropCluster refit (fit_clusters on {config.cluster_images} images): "
        f"{result.refit_s * 1000:.1f} ms, {refits_per_run(result.configs['dropcluster'])} "
        f"per run"
    )
    for mode in ("eager", "compiled"):
        if ("none", mode) in result.step_s and ("dropcluster", mode) in result.step_s:
            base = result.step_s["none", mode]
            share = (result.step_s["dropcluster", mode] - base) / base
            print(
                f"  DropCluster's share of the {mode} training step: {share:+.2%} "
                f"(goal < {SHARE_GOAL:.0%}: {met(share < SHARE_GOAL)})"
            )


def with_compiled_estimates(result: Protocol, reference: Protocol | None) -> Protocol:
    """A copy with the compiled step times that were not measured estimated: the compiled
    no-regularizer step (measured, or the eager one scaled by ``reference``'s compiled/eager
    ratio) plus the regularizer's eager extra cost; ``estimated`` says what was estimated."""
    step_s = dict(result.step_s)
    note = ""
    if ("none", "compiled") not in step_s:
        if reference is None or ("none", "compiled") not in reference.step_s:
            return result
        ratio = reference.step_s["none", "compiled"] / reference.step_s["none", "eager"]
        step_s["none", "compiled"] = step_s["none", "eager"] * ratio
        note = f"compiled none = eager none x {ratio:.2f} ({reference.dataset}'s ratio); "
    base, eager_base = step_s["none", "compiled"], step_s["none", "eager"]
    guessed = [
        reg
        for reg in result.configs
        if (reg, "eager") in step_s and (reg, "compiled") not in step_s
    ]
    for reg in guessed:
        step_s[reg, "compiled"] = base + max(step_s[reg, "eager"] - eager_base, 0.0)
    if guessed:
        note += f"compiled {', '.join(guessed)} = compiled none + their eager extra"
    compile_s = dict(result.compile_s)
    if reference is not None and not compile_s:
        compile_s = dict(reference.compile_s)
    return dataclasses.replace(result, step_s=step_s, compile_s=compile_s, estimated=note)


def print_one_run(result: Protocol) -> None:
    """The goal: one CIFAR-100 run of the paper's protocol in under 15 minutes."""
    cells = []
    for reg in ("none", "dropcluster"):
        for mode in ("eager", "compiled"):
            if (reg, mode) in result.step_s:
                minutes = run_seconds(result, result.configs[reg], mode) / 60
                cells.append(f"{reg} {mode} {minutes:.1f} min")
    key = ("dropcluster", "compiled")
    if key not in result.step_s:
        key = ("dropcluster", "eager")
    best = run_seconds(result, result.configs["dropcluster"], key[1])
    info = DATASETS[result.dataset]
    print(
        f"\n  one {result.dataset} run ({result.configs['none'].epochs} epochs of "
        f"{info.train} training + {info.test} test images): {', '.join(cells)}; goal "
        f"< {RUN_GOAL_S // 60} min ({' '.join(key)}): {met(best < RUN_GOAL_S)}"
    )


def preset_totals(result: Protocol, preset) -> dict[str, list[float]]:
    """regularizer -> [runs, epochs x fraction, eager seconds, compiled seconds]."""
    corrupted = 0
    if preset.evaluate is not None:
        settings = preset.evaluate.corruption
        corrupted = len(settings.corruptions) * len(settings.severities)
    compiled = ("none", "compiled") in result.step_s
    totals: dict[str, list[float]] = {}
    for spec in expand_grid(preset):
        row = totals.setdefault(spec.regularizer, [0, 0.0, 0.0, 0.0])
        sets = corrupted if spec.evaluate_corruptions else 0
        row[0] += 1
        row[1] += spec.config.epochs * spec.train_fraction
        row[2] += run_seconds(result, spec.config, "eager", sets)
        row[3] += run_seconds(result, spec.config, "compiled", sets) if compiled else 0.0
    return totals


def project_presets(results: dict[str, Protocol]) -> None:
    """GPU-hours of every run of the paper presets, from the measured times."""
    print(
        "\n-- projected GPU time of the paper presets; a run: epochs x (training steps + test "
        "evaluation + checkpoint) + refits + compiles + corrupted test sets (evaluation only)"
    )
    for dataset, measured in results.items():
        result = with_compiled_estimates(measured, results.get("cifar100"))
        preset = load_preset(DATASETS[dataset].preset)
        totals = preset_totals(result, preset)
        compiled = ("none", "compiled") in result.step_s
        print(f"\n  {preset.name}")
        print(
            f"  {'regularizer':<18} {'runs':>5} {'epochs x fraction':>18} {'eager GPU-h':>12} "
            f"{'compiled GPU-h':>15}"
        )
        for reg, (runs, epochs, eager, fast) in totals.items():
            fast_h = f"{fast / 3600:.1f}" if compiled else "-"
            print(f"  {reg:<18} {runs:>5} {epochs:>18.0f} {eager / 3600:>12.1f} {fast_h:>15}")
        runs = sum(row[0] for row in totals.values())
        eager_h = sum(row[2] for row in totals.values()) / 3600
        line = f"  projected {preset.name}: {runs} runs, {eager_h:.1f} GPU-hours eager"
        if compiled:
            compiled_h = sum(row[3] for row in totals.values()) / 3600
            line += (
                f", {compiled_h:.1f} GPU-hours compiled; on 8 GPUs {eager_h / 8:.1f} h "
                f"eager, {compiled_h / 8:.1f} h compiled"
            )
        else:
            line += f"; on 8 GPUs {eager_h / 8:.1f} h eager (compiled: not measured)"
        print(line + " (runs spread evenly)")
        if result.estimated:
            print(f"  estimated: {result.estimated}")


def protocol(device: torch.device, sizes: Sizes, compile_tiny: bool, clock: Clock) -> None:
    results, failed = {}, []
    for dataset in DATASETS:
        compiled = sizes.protocol_compiled if dataset == "cifar100" or compile_tiny else ()
        try:
            results[dataset] = measure_protocol(dataset, device, sizes, compiled, clock)
        except Exception:  # noqa: BLE001 - the other data set and the projection still run
            failed.append(dataset)
            print(f"  {dataset} FAILED:")
            traceback.print_exc(file=sys.stdout)
    if "cifar100" in results:
        print_one_run(results["cifar100"])
    project_presets(results)
    if failed:
        raise RuntimeError(f"section 4 failed on {', '.join(failed)} (tracebacks above)")


# ---------------------------------------------------------------------------------------------
# 5: ReNA on the GPU


def rena_speed(device: torch.device, sizes: Sizes, clock: Clock) -> None:
    images, channels, size = sizes.rena
    x_cpu = conv_like(size, channels, images)
    x = x_cpu.to(device)
    sync = synchronizer(device)
    print(
        f"   rena(x, 15) on {tuple(x.shape)}; median of up to {sizes.rena_reps} on {device}, "
        f"{sizes.rena_cpu_reps} on the CPU"
    )
    print(f"  {'rules':<26} {'device ms':>10} {'CPU ms':>9} {'speed-up':>9}  goal")
    for label, options in (("default (dead, merge)", {}), ("paper (rena, split)", REFERENCE)):
        device_s = repeated(
            lambda o=options: rena(x, 15, **o),
            sync,
            sizes.rena_reps,
            3,
            clock,
            f"ReNA {label} on {device}",
        )
        cpu_s = repeated(
            lambda o=options: rena(x_cpu, 15, **o),
            lambda: None,
            sizes.rena_cpu_reps,
            1,
            clock,
            f"ReNA {label} on the CPU",
        )
        print(
            f"  {label:<26} {device_s * 1e3:>10.1f} {cpu_s * 1e3:>9.1f} "
            f"{cpu_s / device_s:>8.1f}x  < {RENA_GOAL_S * 1e3:.0f} ms: "
            f"{met(device_s < RENA_GOAL_S)}"
        )


# ---------------------------------------------------------------------------------------------
# Driver


def print_header(device: torch.device, args) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    print(
        f"check_cuda: torch {torch.__version__} ({cuda}), python {platform.python_version()} | "
        f"device {device}: {name or 'cpu'} | torch threads {torch.get_num_threads()} | "
        f"cudnn.benchmark {torch.backends.cudnn.benchmark} (as in training)"
    )
    print(
        f"allocator: MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')}, "
        f"MALLOC_TRIM_THRESHOLD_={os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}"
    )
    print(
        f"budget {args.budget_s:.0f} s (optional repetitions after it are cut) | "
        f"{'smoke (tiny sizes)' if args.smoke else 'full sizes'} | compile backend "
        f"{args.compile_backend} | sections {','.join(args.only)}"
    )


def run_section(
    key: str, title: str, function: Callable[[], object], clock: Clock, failed: list[str]
):
    print(f"\n== {key}. {title}")
    start = clock.elapsed()
    result = None
    try:
        result = function()
    except Exception:  # noqa: BLE001 - a GPU run is precious: the other sections still run
        failed.append(key)
        print(f"  section {key} FAILED:")
        traceback.print_exc(file=sys.stdout)
    print(f"  [{key}: {clock.elapsed() - start:.1f} s; {clock.elapsed():.0f} s elapsed]")
    sys.stdout.flush()
    return result


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: every section, CPU")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="after this many seconds, cut optional repetitions (280; smoke 40)",
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections among {','.join(SECTIONS)}",
    )
    parser.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (inductor; smoke: aot_eager)"
    )
    parser.add_argument(
        "--compile-tiny",
        action="store_true",
        help="section 4: compile on Tiny ImageNet too (two more compiles)",
    )
    args = parser.parse_args(argv)
    args.only = [key.strip() for key in args.only.split(",") if key.strip()]
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose among {','.join(SECTIONS)}")
    if "2" in args.only and "1" not in args.only:
        args.only.append("1")  # section 2 prints the kernel counts section 1 takes
    if args.budget_s is None:
        args.budget_s = 40.0 if args.smoke else 280.0
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.smoke else "inductor"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if not args.smoke and (device.type != "cuda" or not torch.cuda.is_available()):
        raise SystemExit(
            "check_cuda: CUDA is not available (full sizes need a GPU; "
            "--device cpu --smoke runs every section on tiny sizes)"
        )
    sizes = SMOKE if args.smoke else FULL
    clock = Clock(args.budget_s)
    allow_recompiles()
    print_header(device, args)
    failed: list[str] = []
    backend = args.compile_backend
    sections = {
        "A": (
            "ReNA parity: labels on the device against the CPU",
            lambda: check_rena_parity(device, sizes, clock),
        ),
        "B": ("Spatial Hopkins on the device", lambda: check_hopkins(device, sizes, clock)),
        "1": (
            "layer costs: forward + backward as a ratio to x * 2",
            lambda: layer_costs(device, sizes, backend, clock),
        ),
        "C": (
            "compiled DropCluster2d masks: independent across channels and images",
            lambda: check_compiled_masks(device, sizes, backend),
        ),
        "3": (
            "share of a ResNet-50 training step, each regularizer in its paper slot",
            lambda: step_share(device, sizes, clock),
        ),
        "4": (
            "the paper's protocol on one GPU: images/s, one run, preset GPU-hours",
            lambda: protocol(device, sizes, args.compile_tiny, clock),
        ),
        "5": ("ReNA on the device", lambda: rena_speed(device, sizes, clock)),
    }
    results: dict[str, object] = {}
    # Section 2 prints the kernel counts section 1 took beside its timings.
    sections["2"] = (
        "kernels per forward + backward",
        lambda: print_kernel_counts(results.get("1"), device),
    )
    for key in SECTIONS:
        if key in args.only:
            title, function = sections[key]
            results[key] = run_section(key, title, function, clock, failed)
    cuts = f"; cut: {'; '.join(clock.cuts)}" if clock.cuts else "; nothing cut"
    print(
        f"\ndone in {clock.elapsed():.0f} s (budget {args.budget_s:.0f} s){cuts}"
        f"{'; FAILED sections: ' + ','.join(failed) if failed else ''}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
