"""One prepared GPU run that answers the performance issue's GPU questions, in plain tables.

Made for one short window on one NVIDIA H100 or H200 (torch 2.13): the sections run in the
order of what their numbers are worth, each table printed (and flushed) as soon as it is
measured, so that a run cut short keeps what it had:

1. The paper's protocol on one GPU, through the training loop's own path (build_run, the
   DeviceLoader's batched augmentation, ``train_epoch``, ``evaluate``, ``Checkpoint``,
   ``fit_clusters``) on synthetic data sets of the real sizes held on the GPU: images/s, compile,
   evaluation (as training runs it: the config's autocast, channels_last), checkpoint and refit
   times, one 250-epoch run, and the GPU-hours of the paper presets on one GPU and on 8. Goal:
   one CIFAR-100 run < 15 minutes.
2. Each regularizer's share of a ResNet-50 training step, in its paper slot (bf16 autocast,
   channels_last). Goal: DropCluster < 1 % of the step.
3. Layer costs at DropCluster's input shapes in the paper, (128, 64, 16, 16) (CIFAR-100 after
   the ImageNet stem) and (128, 64, 32, 32) (Tiny ImageNet), float32 and bfloat16, eager and
   torch.compile'd (by default only the bfloat16 shapes, the ones training runs under bf16
   autocast, are compiled): forward + backward in training mode as a ratio to ``x * 2`` (the
   memory-bound floor of any elementwise layer), in device time (N back-to-back calls per
   synchronisation) beside the launch-bound time of one synchronised call. Goal: compiled
   DropCluster <= 1.5x in device time.
4. Device kernels per forward + backward of each layer (torch.profiler).
5. Compiled DropCluster2d masks stay independent across channels and images (torch inductor's
   CUDA RNG had a reported regression, pytorch issue 198333, where groups of 4 channels got
   identical dropout masks).
6. ReNA on the GPU at 512 x 64 x 32 x 32, k = 15, beside the CPU. Goal: < 50 ms.
7. ReNA on CUDA against the CPU: same labels, and both times.
8. Spatial Hopkins on CUDA.

Every section prints what it measured and a ledger line: its compiles (and their seconds), its
timed calls, its seconds. Compiles count against ``--budget-s``: a compile whose expected cost
(the median of the compiles of its kind measured so far, else a stated prior) would overrun the
budget is skipped, and optional repetitions past the budget are cut (the script says where). A
failing section prints its traceback and the others still run (exit status 1). Compiled code
goes to a persistent inductor cache (``--cache-dir``), so a section rerun alone after a timeout
reuses its kernels. Timings are warmed up, synchronised, the median of repeated runs, and
round-robin between the methods compared, so that drifts of the machine hit all of them alike.

    PYTHONPATH=src python benchmarks/check_cuda.py --plan               # what a run will cost
    PYTHONPATH=src python benchmarks/check_cuda.py                      # the GPU run
    PYTHONPATH=src python benchmarks/check_cuda.py --only 3,4           # some sections again
    PYTHONPATH=src python benchmarks/check_cuda.py --device cpu --smoke # all, tiny, CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import math
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
#: The GPU run's default budget: a 15-minute window less the machine's start (a few minutes)
#: and room to rerun a cut section with ``--only``; the default plan is estimated under 8 min.
BUDGET_S = 420.0
SMOKE_BUDGET_S = 40.0
#: The persistent inductor cache (FX graphs, AOT autograd graphs, Triton kernels), under the
#: repository root: a rerun of a section after a timeout compiles nothing it compiled before.
CACHE_DIR = Path(__file__).resolve().parents[1] / ".cache" / "check_cuda" / "inductor"

# ---------------------------------------------------------------------------------------------
# The plan's GPU costs (``--plan``). None is measured on this project: no GPU was lent to the
# sessions that wrote this script. They are the usual orders of magnitude of torch 2.x on an
# H100/H200-class GPU with 16 CPU cores, stated so that the first run's ledger lines (measured
# compiles, timed calls and seconds per section) can replace them.

#: Cold inductor compile of one small layer's forward + backward (dynamo trace, AOT autograd,
#: 2-6 Triton kernels built in parallel workers): typically 5-15 s; the warm cache: ~1-2 s.
LAYER_COMPILE_S = 10.0
#: Cold inductor compile of a ResNet-50 graph (the training step's forward + backward, or the
#: evaluation forward): typically 40-90 s for the training graph in the default mode.
MODEL_COMPILE_S = 60.0
COMPILE_PRIORS_GPU = {"layer": LAYER_COMPILE_S, "model": MODEL_COMPILE_S}
#: Seconds per timed call, warm-ups included, by section: a training chunk (30 CIFAR steps at
#: ~15 ms or 15 Tiny ImageNet steps at ~30 ms; ResNet-50 eager is launch-bound at batch 128),
#: a test evaluation or a 190 MB checkpoint written with fsync (section 1); a ResNet-50 step
#: (2); a device batch of >= 10 ms or a single launch-bound call, about half each (3); ReNA on
#: the device (~30 ms) and on the CPU (~0.2 s) (6); a ReNA (7) or Hopkins (8) call.
CALL_S = {"1": 0.5, "2": 0.03, "3": 0.006, "4": 0.0, "5": 0.0, "6": 0.1, "7": 0.02, "8": 0.01}
#: Seconds of set-up by section: building the runs (ResNet-50 on the GPU, the synthetic data
#: sets moved there, the evaluation, checkpoint and refit of 16 runs in section 1, 12 in 2),
#: fitting the layers' clusters (3), profiling every layer (4), the CPU side of ReNA (6, 7).
SETUP_S = {"1": 25.0, "2": 18.0, "3": 3.0, "4": 5.0, "5": 1.0, "6": 2.0, "7": 3.0, "8": 0.5}
#: What the default plan must fit: a 15-minute window less start-up and a rerun.
PLAN_GOAL_S = 8 * 60


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
    parity_reps: int
    hopkins: tuple[int, int, int]  # images, channels, size
    hopkins_reps: int
    layers: dict[str, tuple[int, int, int, int]]  # data set -> DropCluster's input shape
    layer_rounds: int
    device_batch_s: float  # a device timing of a layer covers at least this (N calls per sync)
    max_per_sync: int  # at most this many calls per synchronisation
    compiled_methods: tuple[str, ...]  # keys of layer_methods compiled as well
    compiled_shapes: int  # the first shapes of ``layers`` with compiled rows
    masks: tuple[int, int, int]  # images, channels, size
    model: str | None  # sections 1, 2: None: the preset's (ResNet-50); smoke: a smaller one
    batch: int | None  # training batch of sections 1 and 2; None: the preset's (128)
    eval_batch: int | None  # None: the config's
    eval_reps: int
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
    compile_priors: dict[str, float]  # kind -> expected seconds of a compile before any is timed


COMPILED_METHODS = ("dropout2d", "dropblock", "dropblock_ref", "dc_sample", "dc_shared", "dc_paper")
FULL = Sizes(
    parity=(16, 32, 56),
    parity_images=128,
    parity_channels=64,
    parity_reps=10,
    hopkins=(128, 64, 32),
    hopkins_reps=10,
    layers={"cifar100": (128, 64, 16, 16), "tiny-imagenet": (128, 64, 32, 32)},
    layer_rounds=15,
    device_batch_s=0.010,
    max_per_sync=2000,
    compiled_methods=COMPILED_METHODS,
    compiled_shapes=2,
    masks=(512, 16, 16),
    model=None,
    batch=None,
    eval_batch=None,
    eval_reps=3,
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
    compile_priors=COMPILE_PRIORS_GPU,
)
# Tiny sizes that go through every code path on a CPU in seconds: a ResNet-18 instead of the
# presets' ResNet-50 (the same slots, a quarter of the build, checkpoint and step time), one
# tiny compile per compiled dtype (aot_eager: traced forward and backward, no code generation)
# plus the mask check's.
SMOKE = Sizes(
    parity=(8,),
    parity_images=16,
    parity_channels=8,
    parity_reps=2,
    hopkins=(16, 8, 8),
    hopkins_reps=2,
    layers={"cifar100": (4, 8, 8, 8), "tiny-imagenet": (4, 8, 16, 16)},
    layer_rounds=2,
    device_batch_s=0.0005,
    max_per_sync=8,
    compiled_methods=("dc_paper",),
    compiled_shapes=1,
    masks=(64, 16, 8),
    model="resnet18",
    batch=4,
    eval_batch=32,
    eval_reps=1,
    cluster_images=16,
    step_warmup=1,
    step_rounds=2,
    train_images={"cifar100": 64, "tiny-imagenet": 64},
    test_images=32,
    protocol_steps={"cifar100": 2, "tiny-imagenet": 1},
    protocol_rounds=1,
    protocol_warmup=1,
    protocol_compiled=(),
    rena=(32, 8, 16),
    rena_reps=2,
    rena_cpu_reps=1,
    compile_priors={"layer": 1.0, "model": 10.0},
)

#: Section keys in the order they run, with their titles: the most valuable numbers first.
SECTIONS = {
    "1": "the paper's protocol on one GPU: images/s, one run, preset GPU-hours",
    "2": "share of a ResNet-50 training step, each regularizer in its paper slot",
    "3": "layer costs: forward + backward as a ratio to x * 2",
    "4": "kernels per forward + backward",
    "5": "compiled DropCluster2d masks: independent across channels and images",
    "6": "ReNA on the device",
    "7": "ReNA parity: labels on the device against the CPU",
    "8": "Spatial Hopkins on the device",
}


def say(*lines: str) -> None:
    """Print and flush at once: a run killed by its timeout keeps every line printed."""
    for line in lines:
        print(line)
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# Time keeping


@dataclass
class Ledger:
    """What one section spent: compiles (made and skipped), timed calls, seconds."""

    compiles: int = 0
    compile_s: float = 0.0
    skipped: int = 0
    timed_calls: int = 0
    seconds: float = 0.0


class Clock:
    """Elapsed time against the budget; past it, optional repetitions are cut and compiles that
    would overrun it are skipped (and said so). Keeps each section's ledger."""

    def __init__(self, budget_s: float, compile_priors: dict[str, float]) -> None:
        self.budget_s = budget_s
        self.priors = dict(compile_priors)
        self.start = time.perf_counter()
        self.cuts: list[str] = []
        self.compiles: list[tuple[str, str, float]] = []  # (kind, what, seconds), in order
        self.ledgers: dict[str, Ledger] = {}
        self.section = "-"

    @property
    def ledger(self) -> Ledger:
        return self.ledgers.setdefault(self.section, Ledger())

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
        say(f"  (budget {self.budget_s:.0f} s spent at {self.elapsed():.0f} s: cut {what})")

    def timed(self, function: Callable[[], object], sync: Callable[[], None]) -> float:
        """Seconds of one call, the device synchronised before and after (a timed call)."""
        self.ledger.timed_calls += 1
        return timed(function, sync)

    def expected_compile_s(self, kind: str) -> float:
        """The median of the ``kind`` compiles measured so far, else the prior."""
        measured = [seconds for k, _, seconds in self.compiles if k == kind]
        return statistics.median(measured) if measured else self.priors[kind]

    def may_compile(self, kind: str, what: str) -> bool:
        """Whether a ``kind`` compile fits the budget; if not, the cut is recorded and said."""
        expected = self.expected_compile_s(kind)
        if self.elapsed() + expected <= self.budget_s:
            return True
        self.ledger.skipped += 1
        self.cut(f"compile of {what} (expected {expected:.0f} s)")
        return False

    def compiled(self, kind: str, what: str, seconds: float) -> None:
        """Record a compile that was made and its measured seconds."""
        self.compiles.append((kind, what, seconds))
        self.ledger.compiles += 1
        self.ledger.compile_s += seconds

    def compile(self, kind: str, what: str, call: Callable[[], object], sync) -> float | None:
        """Seconds of ``call``'s first (compiling) call, or None when the budget skipped it."""
        if not self.may_compile(kind, what):
            return None
        seconds = timed(call, sync)
        self.compiled(kind, what, seconds)
        return seconds


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
        times.append(clock.timed(function, sync))
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
            times[name].append(clock.timed(function, sync))
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
    return dict(_paper_configs(dataset))


@functools.cache
def _paper_configs(dataset: str) -> dict[str, TrainConfig]:
    # Expanding a preset's grid takes ~0.2 s; the plan and the sections ask many times.
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
        ("model", sizes.model),
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
# 5, 7, 8: the checks of the CUDA paths


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
            sizes.parity_reps,
            min(3, sizes.parity_reps),
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
        sizes.hopkins_reps,
        min(3, sizes.hopkins_reps),
        clock,
        "Hopkins timing",
    )
    print(
        f"  input {tuple(x.shape)} on {device}: median over channels "
        f"{float(value.median()):.3f}, {seconds * 1000:.2f} ms"
    )


# Not public in the package (the layer's own count is ``cluster_kernels._drop_counts``): the
# clusters a DropCluster2d drops per channel, recomputed here from its public buffers.
# floor(p * n) with p stored in float32 needs the same relative slack as the layer's kernel
# (0.7 is 0.69999999 in float32, and 0.7 * 10 would floor to 6).
FLOOR_SLACK = 1e-6


def dropping_channels(layer: DropCluster2d) -> torch.Tensor:
    """(K,) int64 indices of the channels that drop at least one cluster at the layer's p:
    structured, and floor(p * n) >= 1 for their ``n = cluster_counts[c]`` clusters. The others
    keep every pixel, and an argmax over their all-kept rows would read as "dropped label 0"."""
    counts = layer.cluster_counts.double()
    n_drop = torch.floor(float(layer.p) * counts * (1 + FLOOR_SLACK))
    return (layer.structured & (n_drop >= 1)).nonzero().squeeze(1)


def mask_agreement(layer: DropCluster2d, out: torch.Tensor) -> tuple[float, float, float, int]:
    """Max and mean over pairs of dropping channels (:func:`dropping_channels`) of the fraction
    of images in which both drop the same cluster, the same fraction for consecutive images of
    one channel, and the number of channels compared. ``out``: (N, C, H, W), the layer applied
    to ones (a dropped pixel is 0)."""
    channels = dropping_channels(layer)
    k = channels.numel()
    if k < 2:
        raise RuntimeError(f"only {k} channels drop a cluster: nothing to compare")
    zeros = (out[:, channels] == 0).reshape(out.shape[0], k, -1)
    labels = layer.labels[channels].reshape(k, -1)
    dropped = torch.stack(
        [labels[i][zeros[:, i].float().argmax(dim=1)] for i in range(k)], dim=1
    )  # label of a dropped pixel, per image and dropping channel
    same = (dropped.unsqueeze(2) == dropped.unsqueeze(1)).float().mean(0)
    off_diagonal = same[~torch.eye(k, dtype=torch.bool, device=same.device)]
    consecutive = (dropped[1:] == dropped[:-1]).float().mean()
    return float(off_diagonal.max()), float(off_diagonal.mean()), float(consecutive), k


def check_compiled_masks(device: torch.device, sizes: Sizes, backend: str, clock: Clock) -> None:
    images, channels, size = sizes.masks
    layer = DropCluster2d(0.1, 15).fit(conv_like(size, channels, 128)).to(device)
    x = torch.ones(images, channels, size, size, device=device)
    compiled = torch.compile(layer, backend=backend, dynamic=False)
    k = dropping_channels(layer).numel()
    print(
        f"   input ({images}, {channels}, {size}, {size}) of ones, per-sample masks, "
        f"backend {backend}; the {k} channels that drop a cluster (floor(p * n) >= 1) "
        f"compared; chance about 1/15 = 0.067, identical masks would give 1.0"
    )
    sync = synchronizer(device)
    if clock.compile("layer", "the mask check's layer", lambda: compiled(x), sync) is None:
        return
    print(
        f"  {'':<9} {'same cluster, two channels: max':>32} {'mean':>7} {'consecutive images':>19}"
    )
    for name, function in (("eager", layer), ("compiled", compiled)):
        worst, mean, consecutive, _ = mask_agreement(layer, function(x))
        print(f"  {name:<9} {worst:>32.3f} {mean:>7.3f} {consecutive:>19.3f}")
    before = float((compiled(x) == 0).float().mean())
    layer.set_p(0.3)
    after = float((compiled(x) == 0).float().mean())
    print(f"  compiled, set_p(0.1 -> 0.3): zero fraction {before:.3f} -> {after:.3f}")


# ---------------------------------------------------------------------------------------------
# 3, 4: layer costs and kernel counts


def fitted_dropcluster(shape, device: torch.device, **options) -> DropCluster2d:
    """A DropCluster2d fitted on conv-like activations of the input's (C, H, W), on ``device``
    (ReNA runs on the device: fast; section 7 checks that it gives the CPU's labels)."""
    n_samples, channels, size, _ = shape
    activations = conv_like(size, channels, max(n_samples, 16)).to(device)
    return DropCluster2d(0.1, 15, **options).fit(activations).to(device)


#: The layers section 3 times, in its rows' order (``layer_methods``'s keys).
LAYER_KEYS = (
    "floor",
    "dropout2d",
    "dropblock",
    "dropblock_ref",
    "dc_sample",
    "dc_shared",
    "dc_paper",
    "stochastic_depth",
)


def layer_methods(dataset: str, shape, device: torch.device) -> dict[str, tuple[str, object]]:
    """key -> (label, callable) of every layer compared, in training mode, on ``device``."""
    block = 5 if dataset == "cifar100" else 7  # the paper's DropBlock size on this data set
    methods: dict[str, tuple[str, object]] = {
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
    assert tuple(methods) == LAYER_KEYS  # the plan counts these
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
    """One layer's times at one shape and dtype (seconds per forward + backward)."""

    label: str
    device_s: dict[str, float] = field(default_factory=dict)  # by mode: N calls per sync / N
    launch_s: dict[str, float] = field(default_factory=dict)  # by mode: one synchronised call
    per_sync: dict[str, int] = field(default_factory=dict)  # by mode: N
    compile_s: float | None = None
    kernels: dict[str, tuple[int, float | None]] = field(default_factory=dict)  # by mode


def back_to_back(call: Callable[[], None], n: int) -> Callable[[], None]:
    """``n`` calls of ``call`` with no synchronisation between them: timed once, the device
    time of a call is the total over ``n`` once ``n`` calls keep the device busy."""

    def calls() -> None:
        for _ in range(n):
            call()

    return calls


def calls_per_sync(call, sync, sizes: Sizes, clock: Clock) -> int:
    """N such that N back-to-back calls cover at least ``sizes.device_batch_s`` (from a first
    pass of 8 calls per sync; at most ``sizes.max_per_sync``)."""
    per_call = clock.timed(back_to_back(call, 8), sync) / 8
    return max(1, min(sizes.max_per_sync, math.ceil(sizes.device_batch_s / max(per_call, 1e-9))))


def time_layers(
    methods, compiled: dict, x: torch.Tensor, device: torch.device, sizes: Sizes, clock: Clock
) -> dict[str, LayerRow]:
    """Eager and compiled forward + backward of every method on ``x``, round-robin: per round,
    each one's N back-to-back calls per sync (device time) and one synchronised call (launch
    bound). Compiles go through the clock (a compile that would overrun the budget is skipped)."""
    sync = synchronizer(device)
    grad = torch.ones_like(x)
    calls = {
        (key, "eager"): forward_backward(method, x, grad) for key, (_, method) in methods.items()
    }
    rows = {key: LayerRow(label) for key, (label, _) in methods.items()}
    shape = f"{tuple(x.shape)} {dtype_name(x.dtype)}"
    for key, layer in compiled.items():
        call = forward_backward(layer, x, grad)
        try:  # the first call compiles
            rows[key].compile_s = clock.compile("layer", f"{rows[key].label} {shape}", call, sync)
        except Exception as error:  # noqa: BLE001 - report it, time the others
            print(f"  compile of {rows[key].label} FAILED: {type(error).__name__}: {error}")
            continue
        if rows[key].compile_s is not None:
            calls[key, "compiled"] = call
    for call in calls.values():  # warm-up: allocator, kernels, caches
        call()
        call()
    per_sync = {name: calls_per_sync(call, sync, sizes, clock) for name, call in calls.items()}
    timings = {}
    for name, call in calls.items():
        timings[name, "device"] = back_to_back(call, per_sync[name])
        timings[name, "launch"] = call
    medians = round_robin(timings, sync, sizes.layer_rounds, 3, clock, "layer timing")
    for (key, mode), n in per_sync.items():
        rows[key].per_sync[mode] = n
        rows[key].device_s[mode] = medians[(key, mode), "device"] / n
        rows[key].launch_s[mode] = medians[(key, mode), "launch"]
    if clock.over():
        clock.cut(f"kernel counts of {shape}")
        return rows
    for (key, mode), call in calls.items():
        rows[key].kernels[mode] = count_kernels(call, device)
    return rows


def layer_cells(row: LayerRow, floor: float, mode: str) -> str:
    """device ms/call (N per sync), its ratio to x * 2's, and the launch-bound ms/call."""
    if mode not in row.device_s:
        return f"{'-':>27} {'-':>7} {'-':>20}"
    device = f"{ms(row.device_s[mode])} ({row.per_sync[mode]})"
    ratio = f"{row.device_s[mode] / floor:.2f}x"
    return f"{device:>27} {ratio:>7} {ms(row.launch_s[mode]):>20}"


def print_layer_table(rows: dict[str, LayerRow]) -> None:
    floor = rows["floor"].device_s["eager"]
    eager, compiled = "eager", "compiled"
    print(f"  {'':<42} {eager:-^56} {compiled:-^56}")
    columns = f"{'device ms/call (N per sync)':>27} {'ratio':>7} {'launch-bound ms/call':>20}"
    print(f"  {'method':<42} {columns} {columns} {'compile s':>10}  goal")
    for key, row in rows.items():
        goal = ""
        if key.startswith("dc_") and "compiled" in row.device_s:
            ratio = row.device_s["compiled"] / floor
            goal = f"compiled <= {LAYER_GOAL}x (device time): {met(ratio <= LAYER_GOAL)}"
        compile_s = "-" if row.compile_s is None else f"{row.compile_s:.1f}"
        print(
            f"  {row.label:<42} {layer_cells(row, floor, 'eager')} "
            f"{layer_cells(row, floor, 'compiled')} {compile_s:>10}  {goal}"
        )
    sys.stdout.flush()


def compiled_combo(sizes: Sizes, shape_index: int, dtype: torch.dtype, dtypes) -> bool:
    """Whether the (shape, dtype) combination gets compiled rows."""
    return shape_index < sizes.compiled_shapes and dtype in dtypes


def layer_costs(device: torch.device, sizes: Sizes, backend: str, clock: Clock, dtypes) -> dict:
    """Section 3; returns the kernel counts for section 4: shape -> dtype -> rows. ``dtypes``:
    the dtypes whose shapes are compiled too (default: bfloat16 only, as training runs)."""
    print(
        f"   training mode, forward + backward, p = 0.1, k = 15; ratio to x * 2 (eager) in "
        f"device time: N back-to-back calls per synchronisation (N makes one timing cover >= "
        f"{sizes.device_batch_s * 1e3:g} ms), divided by N; launch-bound: one call, the device "
        f"synchronised before and after (launch overhead included; section 4 gives the "
        f"kernels' busy time); compiled: torch.compile(layer, backend={backend!r}, "
        f"dynamic=False) for {', '.join(dtype_name(d) for d in dtypes)}"
    )
    counts: dict = {}
    breaks_before = graph_breaks()
    for index, (dataset, shape) in enumerate(sizes.layers.items()):
        methods = layer_methods(dataset, shape, device)
        compiled_layers = {
            key: torch.compile(methods[key][1], backend=backend, dynamic=False)
            for key in sizes.compiled_methods
        }
        for dtype in (torch.float32, torch.bfloat16):
            compiled = compiled_layers if compiled_combo(sizes, index, dtype, dtypes) else {}
            generator = torch.Generator().manual_seed(1)
            x = torch.randn(*shape, generator=generator).to(device, dtype).requires_grad_()
            rows = time_layers(methods, compiled, x, device, sizes, clock)
            print(
                f"\n-- {shape} {dtype_name(dtype)} ({dataset}: DropCluster's "
                f"input), x * 2 floor {ms(rows['floor'].device_s['eager'])} ms device time"
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
    """Section 4, from the counts section 3 took beside its timings."""
    if not counts:
        print("  no counts: section 3 did not run or failed")
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
# 2: a regularizer's share of a ResNet-50 training step


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
            f"\n-- {dataset}: {configs['none'].model} ({configs['none'].stem} stem), "
            f"batch {batch}, "
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
# 1: the paper's protocol on one GPU


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
    """What section 1 measured on one data set (times in seconds)."""

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
    eval_dtype: torch.dtype | None = None  # the evaluation's autocast dtype (None: none)


def train_chunk(entry: Entry, steps: int, device: torch.device, clock: Clock) -> float:
    """Seconds of ``steps`` training steps through ``train.loop.train_epoch`` (a timed call)."""
    run = dataclasses.replace(entry.run, loader=FirstBatches(entry.run.loader, steps))
    progress = Progress(entry.config.epochs, io.StringIO())  # not a terminal: draws nothing

    def chunk() -> None:
        train_epoch(run, 0, progress=progress)

    return clock.timed(chunk, synchronizer(device))


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
            return train_chunk(entry, n_steps, device, clock)
        except Exception as error:  # noqa: BLE001 - report it, measure the others
            print(f"  {entry.regularizer} {entry.mode} FAILED: {type(error).__name__}: {error}")
            entries.remove(entry)
            return None

    breaks = {}
    for entry in list(entries):
        what = f"{result.dataset} {entry.regularizer}'s training step"
        if entry.mode == "compiled" and not clock.may_compile("model", what):
            entries.remove(entry)
            continue
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
            clock.compiled(
                "model", f"{result.dataset} {entry.regularizer}'s training step", compile_s
            )
            print(
                f"  {entry.regularizer} compiled: {compile_s:.1f} s to compile (first "
                f"{sizes.protocol_warmup} steps {entry.first_s:.1f} s), graph breaks "
                f"{breaks[key]}"
            )


def measure_evaluation(
    entries: list[Entry], device: torch.device, sizes: Sizes, clock: Clock, result: Protocol
) -> None:
    """Seconds per test image of ``train.loop.evaluate`` on the no-regularizer model, in each
    mode measured, called as the training loop calls it: the run's evaluation autocast
    (``run.precision.eval_dtype``: bf16 on CUDA when the config's ``amp`` is on) and its
    evaluation preparer (channels_last as configured). In compiled mode the first call
    compiles the evaluation graph."""
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
                amp_dtype=run.precision.eval_dtype,
            )

        what = f"{result.dataset} evaluation graph"
        if entry.mode == "compiled" and not clock.may_compile("model", what):
            continue
        first = clock.timed(call, sync)
        seconds = repeated(call, sync, sizes.eval_reps, 1, clock, f"{result.dataset} evaluations")
        result.eval_s[entry.mode] = seconds / run.test_images.shape[0]
        result.eval_dtype = run.precision.eval_dtype
        if entry.mode == "compiled":
            result.eval_compile_s = max(first - seconds, 0.0)
            clock.compiled("model", what, result.eval_compile_s)


#: Timed checkpoint writes and refits per data set (section 1).
WRITE_REPS = 2


def measure_checkpoint(entry: Entry, clock: Clock) -> float:
    """Seconds of the per-epoch checkpoint, built and written as ``train.loop`` does it."""
    checkpoint = Checkpoint(entry.run)

    def save(folder: Path) -> None:
        save_checkpoint(folder / "checkpoint.pt", checkpoint.state_dict(0, []))

    sync = synchronizer(torch.device(entry.config.device))
    with tempfile.TemporaryDirectory() as folder:
        reps = WRITE_REPS
        return repeated(lambda: save(Path(folder)), sync, reps, 1, clock, "checkpoint writes")


def measure_refit(entries: list[Entry], device: torch.device, clock: Clock) -> float:
    for entry in entries:
        if entry.regularizer == "dropcluster" and entry.mode == "eager":
            call = lambda entry=entry: refit(entry.run, entry.config)  # noqa: E731
            return repeated(call, synchronizer(device), WRITE_REPS, 1, clock, "refits")
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
    measure_evaluation(entries, device, sizes, clock, result)
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
        amp = "none" if result.eval_dtype is None else dtype_name(result.eval_dtype)
        print(
            f"  test evaluation ({mode}, train.loop.evaluate, batch {config.eval_batch_size}, "
            f"autocast {amp}, channels_last {config.channels_last}): "
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
        compiled = protocol_compiles(dataset, sizes, compile_tiny)
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
        raise RuntimeError(f"section 1 failed on {', '.join(failed)} (tracebacks above)")


# ---------------------------------------------------------------------------------------------
# 6: ReNA on the GPU


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
# The plan: what each section will compile and time, from the same sizes the run uses


#: The kind of compile each section makes (its expected cost: LAYER_COMPILE_S or
#: MODEL_COMPILE_S on a GPU).
COMPILE_KIND = {"1": "model", "3": "layer", "5": "layer"}


def protocol_compiles(dataset: str, sizes: Sizes, compile_tiny: bool) -> tuple[str, ...]:
    """The regularizers section 1 compiles on ``dataset`` (also a key of its paper configs)."""
    compiled = sizes.protocol_compiled if dataset == "cifar100" or compile_tiny else ()
    return tuple(reg for reg in compiled if reg in paper_configs(dataset))


def plan_counts(sizes: Sizes, args) -> dict[str, tuple[int, int]]:
    """Section -> (compiles, timed calls) a run with ``args`` makes when nothing is cut: the
    same loops as the sections (a test holds them equal to the smoke run's ledger)."""
    counts: dict[str, tuple[int, int]] = {}
    compiles, calls = 0, 0
    for dataset in DATASETS:
        regs = len(paper_configs(dataset))
        compiled = protocol_compiles(dataset, sizes, args.compile_tiny)
        entries = regs + len(compiled)
        eval_modes = 1 + ("none" in compiled)
        compiles += len(compiled) + ("none" in compiled)
        calls += entries * (1 + sizes.protocol_rounds) + eval_modes * (1 + sizes.eval_reps)
        calls += WRITE_REPS * (1 + ("dropcluster" in paper_configs(dataset)))
    counts["1"] = (compiles, calls)
    counts["2"] = (0, sum(len(paper_configs(d)) for d in DATASETS) * sizes.step_rounds)
    compiles, calls = 0, 0
    for index in range(len(sizes.layers)):
        for dtype in (torch.float32, torch.bfloat16):
            compiled = len(sizes.compiled_methods) * compiled_combo(
                sizes, index, dtype, args.dtypes
            )
            compiles += compiled
            calls += (len(LAYER_KEYS) + compiled) * (1 + 2 * sizes.layer_rounds)
    counts["3"] = (compiles, calls)
    counts["4"] = (0, 0)  # the profiler's calls (kernel counts) are not timed calls
    counts["5"] = (1, 0)
    counts["6"] = (0, 2 * (sizes.rena_reps + sizes.rena_cpu_reps))
    counts["7"] = (0, len(sizes.parity) * sizes.parity_reps)
    counts["8"] = (0, sizes.hopkins_reps)
    return {key: counts[key] for key in args.only}


def plan_seconds(key: str, compiles: int, calls: int) -> float:
    """Estimated GPU seconds of a section: set-up, compiles and timed calls at the GPU costs."""
    kind = COMPILE_KIND.get(key)
    compile_s = compiles * COMPILE_PRIORS_GPU[kind] if kind else 0.0
    return SETUP_S[key] + compile_s + calls * CALL_S[key]


def print_plan(sizes: Sizes, args) -> float:
    """The run plan (nothing runs): per section its compiles, timed calls and estimated GPU
    seconds, the total, and the costs assumed. Returns the total."""
    say(
        f"check_cuda plan: {'smoke (tiny sizes)' if args.smoke else 'full sizes'}, compiled "
        f"dtypes {', '.join(dtype_name(d) for d in args.dtypes)}, budget {args.budget_s:.0f} s, "
        f"sections {','.join(args.only)}; GPU seconds estimated for an H100/H200-class GPU"
    )
    say(f"  {'section':<8} {'title':<72} {'compiles':>8} {'timed calls':>11} {'est. s':>7}")
    total, total_compiles = 0.0, 0
    for key, (compiles, calls) in plan_counts(sizes, args).items():
        seconds = plan_seconds(key, compiles, calls)
        total += seconds
        total_compiles += compiles
        say(f"  {key:<8} {SECTIONS[key]:<72} {compiles:>8} {calls:>11} {seconds:>7.0f}")
    goal = f"goal <= {PLAN_GOAL_S} s: {met(total <= PLAN_GOAL_S)}"
    say(f"  {'total':<8} {'':<72} {total_compiles:>8} {'':>11} {total:>7.0f}  ({goal})")
    say(
        "assumptions (named constants of the script, not yet measured on a GPU):",
        f"  LAYER_COMPILE_S = {LAYER_COMPILE_S:g} s per cold inductor compile of a layer "
        f"(forward + backward); MODEL_COMPILE_S = {MODEL_COMPILE_S:g} s per ResNet-50 graph "
        f"(training step, or evaluation)",
        f"  CALL_S (s per timed call, warm-ups included) = {CALL_S}",
        f"  SETUP_S (s of set-up per section) = {SETUP_S}",
        "  a section's estimate: SETUP_S + compiles x its compile cost + timed calls x CALL_S; "
        "the counts are the run's own loops (equal to the smoke run's ledger lines)",
    )
    return total


# ---------------------------------------------------------------------------------------------
# Driver


def cache_counters() -> dict[str, int]:
    """torch's compile-cache counters (0 where torch has none of them)."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001 - a private module: report zeros, do not fail
        return {}
    return {
        "fx hits": int(counters["inductor"]["fxgraph_cache_hit"]),
        "fx misses": int(counters["inductor"]["fxgraph_cache_miss"]),
        "aot hits": int(counters["aot_autograd"]["autograd_cache_hit"]),
        "aot misses": int(counters["aot_autograd"]["autograd_cache_miss"]),
    }


def use_cache(folder: str) -> None:
    """Compile into a persistent inductor cache in ``folder`` (FX graphs, AOT autograd graphs
    and Triton kernels under it); set before anything compiles (inductor reads the folder when
    it first writes, and its compile workers inherit the environment)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(folder).resolve())
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True


def print_header(device: torch.device, args) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    say(
        f"check_cuda: torch {torch.__version__} ({cuda}), python {platform.python_version()} | "
        f"device {device}: {name or 'cpu'} | torch threads {torch.get_num_threads()} | "
        f"cudnn.benchmark {torch.backends.cudnn.benchmark} (as in training)",
        f"allocator: MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')}, "
        f"MALLOC_TRIM_THRESHOLD_={os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}",
        f"budget {args.budget_s:.0f} s (compiles that would overrun it are skipped, optional "
        f"repetitions after it cut) | {'smoke (tiny sizes)' if args.smoke else 'full sizes'} | "
        f"compile backend {args.compile_backend}, compiled dtypes "
        f"{', '.join(dtype_name(d) for d in args.dtypes)} | inductor cache {args.cache_dir} | "
        f"sections {','.join(args.only)}",
    )


def ledger_line(key: str, ledger: Ledger, caches: dict[str, int], elapsed: float) -> str:
    """One section's ledger: its compiles, timed calls and seconds (the plan's units)."""
    cache = ", ".join(f"{name} {value}" for name, value in caches.items()) or "no counters"
    return (
        f"  [ledger {key}: {ledger.compiles} compiles {ledger.compile_s:.1f} s ({ledger.skipped} "
        f"skipped; inductor caches this section: {cache}), {ledger.timed_calls} timed calls, "
        f"{ledger.seconds:.1f} s; {elapsed:.0f} s elapsed]"
    )


def run_section(key: str, function: Callable[[], object], clock: Clock, failed: list[str]):
    say(f"\n== {key}. {SECTIONS[key]}")
    clock.section = key
    start = clock.elapsed()
    caches_before = cache_counters()
    result = None
    try:
        result = function()
    except Exception:  # noqa: BLE001 - a GPU run is precious: the other sections still run
        failed.append(key)
        print(f"  section {key} FAILED:")
        traceback.print_exc(file=sys.stdout)
    clock.ledger.seconds = clock.elapsed() - start
    caches = {name: value - caches_before.get(name, 0) for name, value in cache_counters().items()}
    say(ledger_line(key, clock.ledger, caches, clock.elapsed()))
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: every section, CPU")
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print the run plan (compiles, timed calls, estimated GPU seconds) and exit",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help=f"compiles that would overrun it are skipped, optional repetitions after it cut "
        f"({BUDGET_S:.0f}; smoke {SMOKE_BUDGET_S:.0f})",
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections among {','.join(SECTIONS)} (run in that order)",
    )
    parser.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (inductor; smoke: aot_eager)"
    )
    dtypes = parser.add_mutually_exclusive_group()
    dtypes.add_argument(
        "--bf16-only",
        dest="dtypes",
        action="store_const",
        const=(torch.bfloat16,),
        help="section 3: compile only the bfloat16 shapes, the ones training runs (default)",
    )
    dtypes.add_argument(
        "--all-dtypes",
        dest="dtypes",
        action="store_const",
        const=(torch.float32, torch.bfloat16),
        help="section 3: compile the float32 shapes too (one more compile per layer and shape)",
    )
    parser.add_argument(
        "--compile-tiny",
        action="store_true",
        help="section 1: compile on Tiny ImageNet too (two more compiles)",
    )
    parser.add_argument(
        "--cache-dir",
        default=str(CACHE_DIR),
        help="the persistent inductor cache (default: .cache/check_cuda/inductor in the "
        "repository): a rerun reuses what an earlier run compiled",
    )
    return parser


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dtypes is None:
        args.dtypes = (torch.bfloat16,)
    only = {key.strip() for key in args.only.split(",") if key.strip()}
    unknown = sorted(only - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose among {','.join(SECTIONS)}")
    if "4" in only:
        only.add("3")  # section 4 prints the kernel counts section 3 takes
    args.only = [key for key in SECTIONS if key in only]
    if args.budget_s is None:
        args.budget_s = SMOKE_BUDGET_S if args.smoke else BUDGET_S
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.smoke else "inductor"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    if args.plan:
        print_plan(sizes, args)
        return 0
    device = torch.device(args.device)
    if not args.smoke and (device.type != "cuda" or not torch.cuda.is_available()):
        raise SystemExit(
            "check_cuda: CUDA is not available (full sizes need a GPU; "
            "--device cpu --smoke runs every section on tiny sizes)"
        )
    sys.stdout.reconfigure(line_buffering=True)  # piped (| tee): a line is out once printed
    use_cache(args.cache_dir)
    clock = Clock(args.budget_s, sizes.compile_priors)
    allow_recompiles()
    print_header(device, args)
    failed: list[str] = []
    backend = args.compile_backend
    results: dict[str, object] = {}
    sections = {
        "1": lambda: protocol(device, sizes, args.compile_tiny, clock),
        "2": lambda: step_share(device, sizes, clock),
        "3": lambda: layer_costs(device, sizes, backend, clock, args.dtypes),
        "4": lambda: print_kernel_counts(results.get("3"), device),
        "5": lambda: check_compiled_masks(device, sizes, backend, clock),
        "6": lambda: rena_speed(device, sizes, clock),
        "7": lambda: check_rena_parity(device, sizes, clock),
        "8": lambda: check_hopkins(device, sizes, clock),
    }
    for key in args.only:
        results[key] = run_section(key, sections[key], clock, failed)
    cuts = f"; cut: {'; '.join(clock.cuts)}" if clock.cuts else "; nothing cut"
    say(
        f"\ndone in {clock.elapsed():.0f} s (budget {args.budget_s:.0f} s){cuts}"
        f"{'; FAILED sections: ' + ','.join(failed) if failed else ''}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
