"""Analyse a trained run: its DropCluster clusters and the spatial structure of its activations.

:func:`analyze_run` reads a run folder (what :func:`dropcluster.train.train` writes), passes a
seeded sample of test images through the model in evaluation mode, and writes the paper's cluster
figures for that run:

* the cluster map of every channel of the clustered layer, unstructured channels marked
  (paper, Figures 1-3);
* a few test images with some channels' activations, their clusters and a sampled DropCluster
  mask (Figures 1-3);
* the per-channel Spatial Hopkins statistic of that layer (Figure 4);
* histograms of per-channel Spatial Hopkins at the stem and after each group of blocks
  (Figure 8: deeper layers drift towards 0.5, which is why DropCluster sits after the first
  conv).

The clusters are the model's own when it has a fitted :class:`~dropcluster.nn.DropCluster2d`;
otherwise they are fitted here with ReNA on the stem's input activations, with the project's
default rule, so runs with another regularizer (or none) can be compared with the same figures.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dropcluster.experiments.plotting import pyplot
from dropcluster.experiments.run_analysis_figures import (
    LOW_STRUCTURE,
    LayerHopkins,
    plot_channel_hopkins,
    plot_cluster_maps,
    plot_examples,
    plot_layer_hopkins,
)
from dropcluster.experiments.store import FINISHED, ResultsStore, RunRecord
from dropcluster.experiments.sweep import RUNS_FOLDER
from dropcluster.files import atomic_write_json, atomic_write_text
from dropcluster.hopkins import spatial_hopkins
from dropcluster.models import SlottedModel, placement_for
from dropcluster.models.slots import Slot
from dropcluster.nn import Clusters, DropCluster2d, drop_cluster2d
from dropcluster.nn.clusters import fixed_tables
from dropcluster.rena import check_modes, rena
from dropcluster.train.config import resolve_device
from dropcluster.train.restore import LoadedRun, load_run
from dropcluster.validation import check_int

__all__ = [
    "ANALYSIS_DIR",
    "DIGITS",
    "EXAMPLE_CHANNELS",
    "FIGURE_NAMES",
    "ILLUSTRATIVE_P",
    "JSON_NAME",
    "MARKDOWN_NAME",
    "MAX_EXAMPLE_IMAGES",
    "analyze_best_dropcluster_run",
    "analyze_run",
    "analyze_sweep_runs",
    "best_dropcluster_run",
]


#: Default output folder, inside the run folder.
ANALYSIS_DIR = "analysis"
MARKDOWN_NAME = "analysis.md"
JSON_NAME = "analysis.json"
FIGURE_NAMES = {
    "cluster_maps": "cluster_maps.png",
    "examples": "examples.png",
    "channel_hopkins": "channel_hopkins.png",
    "layer_hopkins": "layer_hopkins.png",
}
#: Channels shown in the example figure: the structured ones with the highest Spatial Hopkins.
EXAMPLE_CHANNELS = 3
#: More rows than this make the example figure unreadable.
MAX_EXAMPLE_IMAGES = 16
#: Drop rate of the illustrative mask drawn for runs without a DropCluster layer: with 15
#: clusters it drops 3 per channel, enough to see (the paper's best p, 0.1, drops one).
ILLUSTRATIVE_P = 0.2
#: Digits kept for the floats of analysis.json.
DIGITS = 6


@dataclass
class _Clusters:
    """The clustered layer's clusters, from the model or fitted here.

    labels (C, H, W) int64, structured (C,) bool, n_found (C,) int64, sizes (C, K) int64, all on
    the CPU; ``source`` is "model" or "fitted here"; ``description`` says which, in a sentence.
    """

    labels: Tensor
    structured: Tensor
    n_found: Tensor
    sizes: Tensor
    source: str
    n_clusters: int
    rule: str
    description: str


@dataclass
class _Captured:
    """What one pass over the sample images records.

    activations: (N, C, H, W) float32 CPU inputs of the clustered slot; shapes: slot name ->
    (C, H, W); hopkins: slot name -> (C,) float64 batch-mean Spatial Hopkins, or None when the
    maps are smaller than 3x3.
    """

    activations: Tensor
    shapes: dict[str, tuple[int, int, int]]
    hopkins: dict[str, Tensor | None]


@dataclass
class _Measured:
    """Everything the figures and the report show, measured on the sample images.

    sample_index: (N,) int64 test-set indices of the sample (the examples are its first
    ``n_images``); examples: (n_images, C, H, W) float32 activations of the clustered slot;
    hopkins: (C,) float64 Spatial Hopkins per channel there; masks: (n_images, C, H, W) 0/1
    float32 sampled DropCluster mask of the examples, with rate ``mask_p`` and description
    ``mask_note``; channels: the example channels; layers: Spatial Hopkins at each depth;
    dead: the channels that are constant over every sample image and pixel (after a ReLU: zero
    everywhere, a channel that never fires).
    """

    slot_name: str
    sample_index: Tensor
    clusters: _Clusters
    hopkins: Tensor
    examples: Tensor
    masks: Tensor
    mask_p: float
    mask_note: str
    channels: list[int]
    layers: list[LayerHopkins]
    dead: list[int]


def analyze_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    n_images: int = 4,
    sample_images: int = 256,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    epoch: int | None = None,
    unstructured: str | None = None,
) -> Path:
    """Write the cluster analysis of the run in ``run_dir``: figures, numbers and a report.

    Only evaluation-mode forward passes without gradients are run; the model is not changed.
    The sample images are the first ``sample_images`` of a permutation of the test set drawn
    from ``seed``, and the example images are the first ``n_images`` of them. All random draws
    (the sample, Spatial Hopkins' pixels, the illustrated mask) come from generators seeded
    with ``seed``: the same call gives the same ``analysis.json``.

    Args:
        run_dir: a folder written by :func:`dropcluster.train.train` (config.json,
            checkpoint.pt).
        out_dir: where the files go (created); default ``run_dir / "analysis"``.
        n_images: test images in the example figure, 1 to 16, at most ``sample_images``.
        sample_images: test images whose activations are clustered and measured, >= 2
            (fewer when the test set is smaller: the number used is in the report).
        device: where the model runs ("auto": CUDA when there is one, else the CPU).
        seed: seeds every random draw, an int >= 0.
        progress: called with a short message before each step (e.g. ``print``).
        epoch: analyse the checkpoint kept after this many epochs (``keep_checkpoints``)
            instead of the last one (the paper's figures: after 50 epochs).
        unstructured: the unstructured rule when the clusters are fitted here (a run without a
            fitted DropCluster layer): ``"rena"`` (the paper's: ReNA does not reach the number
            of clusters) or ``"dead"``; None: the run's layer's rule, else ``"dead"``.

    Returns:
        The path of ``analysis.md``. Beside it: ``analysis.json`` (every number of the report)
        and the PNG figures of :data:`FIGURE_NAMES`.

    Raises:
        FileNotFoundError: ``run_dir`` is missing or holds no run (from
            :func:`~dropcluster.train.restore.load_run`).
        ValueError: bad ``n_images``, ``sample_images``, ``seed`` or ``device``; a model
            without slots.
        ImportError: matplotlib (the ``plot`` extra) is not installed.
    """
    _check_arguments(n_images, sample_images, seed)
    pyplot()  # fail before the forward passes when matplotlib is missing
    say = progress if progress is not None else _silent
    say(f"loading the run in {run_dir}")
    if unstructured is not None:
        check_modes(unstructured, "merge")
    run = load_run(run_dir, device=resolve_device(device), epoch=epoch)
    n_sample = _sample_size(run, run_dir, sample_images, n_images)
    default_out = ANALYSIS_DIR if epoch is None else f"{ANALYSIS_DIR}-epoch{epoch}"
    out_dir = Path(out_dir) if out_dir is not None else run.run_dir / default_out
    out_dir.mkdir(parents=True, exist_ok=True)
    measured = _measure(run, n_sample, n_images, seed, say, unstructured)
    say(f"drawing the figures into {out_dir}")
    _draw_figures(run, measured, out_dir)
    report = _report(run, measured, seed)
    atomic_write_json(out_dir / JSON_NAME, report)
    markdown_path = atomic_write_text(out_dir / MARKDOWN_NAME, _markdown(report))
    say(f"wrote {markdown_path}")
    return markdown_path


def _silent(message: str) -> None:
    """The default progress callback: says nothing."""


def best_dropcluster_run(store: ResultsStore) -> RunRecord | None:
    """The sweep's DropCluster run a report analyses: among the finished DropCluster runs on
    the largest training fraction, the first seed's with the highest top-1 (None: no such
    run)."""
    # The regularizer column is the bare name, so this takes every DropCluster arm (plain and
    # variants such as dropcluster:ours) alike.
    runs = [r for r in store.runs(status=FINISHED) if r.regularizer == "dropcluster"]
    if not runs:
        return None
    largest = max(r.train_fraction for r in runs)
    candidates = [r for r in runs if r.train_fraction == largest]
    first_seed = min(r.seed for r in candidates)
    return max((r for r in candidates if r.seed == first_seed), key=lambda r: r.top1 or 0.0)


def analyze_best_dropcluster_run(
    out_dir: str | Path, *, progress: Callable[[str], None] | None = None, **options: Any
) -> Path | None:
    """Analyse the :func:`best_dropcluster_run` of the sweep in ``out_dir``, once: a run with an
    analysis keeps it. Returns the path of its ``analysis.md`` (None: no finished DropCluster
    run); ``progress`` hears which run is analysed; ``options`` go to :func:`analyze_run`
    (``sample_images``, ``epoch``, ``unstructured``).

    Raises:
        ImportError: matplotlib (the ``plot`` extra) is not installed.
    """
    with ResultsStore.in_folder(out_dir, readonly=True) as store:
        best = best_dropcluster_run(store)
    if best is None:
        return None
    run_dir = Path(out_dir) / RUNS_FOLDER / best.run_id
    markdown_path = run_dir / ANALYSIS_DIR / MARKDOWN_NAME
    if markdown_path.is_file():
        return markdown_path
    if progress is not None:
        progress(f"cluster analysis of {best.run_id}")
    return analyze_run(run_dir, **options)


def _check_arguments(n_images: int, sample_images: int, seed: int) -> None:
    check_int("n_images", n_images, minimum=1)
    check_int("sample_images", sample_images, minimum=2)
    check_int("seed", seed, minimum=0)
    if n_images > MAX_EXAMPLE_IMAGES:
        raise ValueError(
            f"n_images should be at most {MAX_EXAMPLE_IMAGES} (one figure row each), but got "
            f"{n_images}"
        )
    if n_images > sample_images:
        raise ValueError(
            f"n_images ({n_images}) should be at most sample_images ({sample_images}): the "
            f"example images are taken from the sample"
        )


def _sample_size(run: LoadedRun, run_dir: str | Path, sample_images: int, n_images: int) -> int:
    """The number of sample images (at most the test set); checks the model can be analysed."""
    model = run.model
    if not isinstance(model, SlottedModel) or "stem" not in model.slots:
        raise ValueError(
            f"the model of {run_dir} ({type(model).__name__}) has no 'stem' slot; analyze_run "
            f"needs a model of dropcluster.models"
        )
    n_test = len(run.test_set)
    n_sample = min(sample_images, n_test)
    if n_sample < 2:
        raise ValueError(f"the test set has {n_test} image(s); clustering needs at least 2")
    if n_images > n_sample:
        raise ValueError(
            f"n_images should be at most the number of sample images ({n_sample}), but got "
            f"{n_images}"
        )
    return n_sample


@torch.no_grad()
def _measure(
    run: LoadedRun,
    n_sample: int,
    n_images: int,
    seed: int,
    say: Callable[[str], None],
    unstructured: str | None = None,
) -> _Measured:
    """Pass a seeded sample of test images through the model; cluster, measure, sample a mask."""
    model = run.model
    sample_index = torch.randperm(len(run.test_set), generator=torch.Generator().manual_seed(seed))
    sample_index = sample_index[:n_sample]
    slot_name, cluster_slot, layer = _clustered_slot(model)
    layer_names = _depth_slot_names(model)
    say(f"capturing activations of {n_sample} test images at {', '.join(layer_names)}")
    captured = _capture(
        model,
        run.test_set.images[sample_index],
        run.prepare_eval,
        {**{name: model.slot(name) for name in layer_names}, slot_name: cluster_slot},
        slot_name,
        run.config.eval_batch_size,
        next(model.parameters()).device,
        seed,
    )
    activations = captured.activations
    say("reading the clusters" if layer is not None and layer.fitted else "fitting ReNA")
    clusters = _clusters(layer, activations, run, slot_name, n_sample, seed, unstructured)
    hopkins = captured.hopkins[slot_name]
    if hopkins is None:
        raise ValueError(
            f"the maps at slot {slot_name!r} are {tuple(activations.shape[2:])}, too small for "
            f"Spatial Hopkins (3x3 at least)"
        )
    say("sampling a DropCluster mask")
    examples = activations[:n_images]
    masks, mask_p, mask_note = _sample_masks(layer, clusters, examples, seed)
    layers = [
        LayerHopkins(
            name,
            *captured.shapes[name],
            None if captured.hopkins[name] is None else captured.hopkins[name].numpy(),
        )
        for name in layer_names
    ]
    channels = _example_channels(clusters.structured, hopkins)
    flat = activations.transpose(0, 1).flatten(1)
    dead = torch.nonzero(flat.amax(dim=1) == flat.amin(dim=1)).flatten().tolist()
    return _Measured(
        slot_name,
        sample_index,
        clusters,
        hopkins,
        examples,
        masks,
        mask_p,
        mask_note,
        channels,
        layers,
        dead,
    )


def _draw_figures(run: LoadedRun, measured: _Measured, out_dir: Path) -> None:
    """The four figures of :data:`FIGURE_NAMES`, in ``out_dir``."""
    run_name = run.run_dir.resolve().name
    slot, clusters, hopkins = measured.slot_name, measured.clusters, measured.hopkins
    n_sample = len(measured.sample_index)
    example_index = measured.sample_index[: len(measured.examples)]
    class_names = run.test_set.classes
    plot_cluster_maps(
        clusters.labels.numpy(),
        clusters.structured.numpy(),
        clusters.n_found.numpy(),
        hopkins.numpy(),
        out_dir / FIGURE_NAMES["cluster_maps"],
        title=f"{run_name}: clusters at '{slot}' ({clusters.source})",
    )
    plot_examples(
        run.test_set.images[example_index].numpy(),
        [f"test #{int(i)}\n{class_names[int(run.test_set.labels[i])]}" for i in example_index],
        measured.examples.numpy(),
        clusters.labels.numpy(),
        clusters.structured.numpy(),
        measured.masks.numpy(),
        measured.channels,
        out_dir / FIGURE_NAMES["examples"],
        title=f"{run_name}: activations at '{slot}', clusters, and {measured.mask_note}",
    )
    plot_channel_hopkins(
        hopkins.numpy(),
        clusters.structured.numpy(),
        out_dir / FIGURE_NAMES["channel_hopkins"],
        title=f"{run_name}: Spatial Hopkins per channel at '{slot}' "
        f"(mean over {n_sample} test images)",
    )
    plot_layer_hopkins(
        measured.layers,
        out_dir / FIGURE_NAMES["layer_hopkins"],
        title=f"{run_name}: per-channel Spatial Hopkins by depth ({n_sample} test images)",
    )


def _clustered_slot(model: SlottedModel) -> tuple[str, Slot, DropCluster2d | None]:
    """The first slot (in forward order) that holds a DropCluster2d, or the stem slot."""
    for name, slots in model.slots.items():
        for slot in slots:
            if isinstance(slot.regularizer, DropCluster2d):
                return name, slot, slot.regularizer
    return "stem", model.slot("stem"), None


def _depth_slot_names(model: SlottedModel) -> list[str]:
    """ "stem", "group1", ..., "groupG": the activations at increasing depth (paper, Fig. 8)."""
    groups = [name for name in model.slots if re.fullmatch(r"group\d+", name)]
    return ["stem", *sorted(groups, key=lambda name: int(name[len("group") :]))]


def _capture(
    model: nn.Module,
    images: Tensor,
    prepare: Callable[[Tensor], Tensor],
    slots: dict[str, Slot],
    cluster_slot_name: str,
    batch_size: int,
    device: torch.device,
    seed: int,
) -> _Captured:
    """Run ``images`` (N, C, H, W) uint8 through ``model`` and record the slots' inputs.

    The clustered slot's inputs are kept whole; every slot's per-channel Spatial Hopkins is
    summed batch by batch (keeping every deep layer's activations would not fit in memory for
    a ResNet-50). Each slot draws from its own generator, so its values do not depend on which
    other slots are measured.
    """
    kept: list[Tensor] = []
    shapes: dict[str, tuple[int, int, int]] = {}
    sums: dict[str, Tensor | None] = {}
    generators = {
        name: torch.Generator().manual_seed(seed * 1000 + 1 + index)
        for index, name in enumerate(slots)
    }

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0].detach()
            shapes[name] = tuple(x.shape[1:])
            if name == cluster_slot_name:
                # A copy: later in-place operations of the model must not change what is kept.
                kept.append(x.to("cpu", torch.float32, copy=True).contiguous())
            if x.shape[2] < 3 or x.shape[3] < 3:
                sums[name] = None
                return
            per_image = spatial_hopkins(x.float(), generator=generators[name])  # (n, C)
            batch_sum = per_image.double().sum(dim=0).cpu()
            sums[name] = batch_sum if sums.get(name) is None else sums[name] + batch_sum

        return hook

    handles = [slot.register_forward_pre_hook(hook_for(name)) for name, slot in slots.items()]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, images.shape[0], batch_size):
            model(prepare(images[start : start + batch_size].to(device)))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    n_images = images.shape[0]
    hopkins = {name: None if total is None else total / n_images for name, total in sums.items()}
    return _Captured(torch.cat(kept), shapes, hopkins)


def _clusters(
    layer: DropCluster2d | None,
    activations: Tensor,
    run: LoadedRun,
    slot_name: str,
    n_sample: int,
    seed: int,
    unstructured: str | None = None,
) -> _Clusters:
    """The model's fitted clusters, or ReNA's on ``activations`` (N, C, H, W) float32 with the
    ``unstructured`` rule (None: the layer's, else ``"dead"``)."""
    if layer is not None and layer.fitted:
        if tuple(layer.labels.shape) != tuple(activations.shape[1:]):
            raise ValueError(
                f"the DropCluster layer was fitted on {tuple(layer.labels.shape)} maps, but its "
                f"input is {tuple(activations.shape[1:])}"
            )
        return _Clusters(
            labels=layer.labels.cpu(),
            structured=layer.structured.cpu(),
            n_found=layer.cluster_counts.cpu(),
            sizes=layer.cluster_sizes.cpu(),
            source="model",
            n_clusters=layer.n_clusters,
            rule=layer.unstructured,
            description=(
                f"the run's fitted `DropCluster2d` at slot `{slot_name}` (fitted during training "
                f"on {run.config.cluster_images} training images, refitted every "
                f"{run.config.cluster_every} epoch(s); n_clusters={layer.n_clusters}, "
                f"unstructured rule `{layer.unstructured}`)"
            ),
        )
    if layer is not None:
        options = dict(
            n_clusters=layer.n_clusters,
            max_rounds=layer.max_rounds,
            unstructured=unstructured or layer.unstructured,
            identical_neighbours=layer.identical_neighbours,
        )
        why = (
            "the run's `DropCluster2d` was not fitted yet (training stopped before its first refit)"
        )
    else:
        n_clusters = int(placement_for("dropcluster", run.config.dataset).options["n_clusters"])
        rule = unstructured or "dead"
        # The paper's rule goes with the reference's tie semantics (its cluster maps too).
        ties = "split" if rule == "rena" else "merge"
        options = dict(n_clusters=n_clusters, unstructured=rule, identical_neighbours=ties)
        why = f"the run has no DropCluster layer (regularizer `{run.config.regularizer}`)"
    result = rena(activations, generator=torch.Generator().manual_seed(seed), **options)
    rule = options.get("unstructured", "dead")
    return _Clusters(
        labels=result.labels,
        structured=result.structured,
        n_found=result.n_found,
        sizes=result.sizes,
        source="fitted here",
        n_clusters=result.n_clusters,
        rule=rule,
        description=(
            f"fitted here with ReNA (n_clusters={result.n_clusters}, unstructured rule `{rule}`, "
            f"identical neighbours {options['identical_neighbours']}) "
            f"on the `{slot_name}` slot's input activations of the {n_sample} sample test "
            f"images, because {why}"
        ),
    )


def _sample_masks(
    layer: DropCluster2d | None, clusters: _Clusters, examples: Tensor, seed: int
) -> tuple[Tensor, float, str]:
    """A training-mode DropCluster mask (n, C, H, W) 0/1 float32 for the example activations.

    Uses the layer's rate and per-sample setting when there is a layer, else
    :data:`ILLUSTRATIVE_P`; returns the mask, the rate and a phrase describing it.
    """
    if layer is not None:
        p, per_sample = float(layer.p), layer.per_sample
        note = f"a sampled training mask (the layer's p={p:g})"
    else:
        p, per_sample = ILLUSTRATIVE_P, True
        note = f"an illustrative training mask (p={p:g}; the run has no DropCluster layer)"
    # As the layer holds them: a channel ReNA left with more than n_clusters is unstructured.
    tables = Clusters(
        *fixed_tables(
            clusters.labels,
            clusters.structured,
            clusters.n_found,
            clusters.sizes,
            clusters.n_clusters,
        )
    )
    generator = torch.Generator().manual_seed(seed)
    _, mask = drop_cluster2d(
        examples,
        p,
        tables,
        training=True,
        per_sample=per_sample,
        generator=generator,
        return_mask=True,
    )
    return mask.expand_as(examples).contiguous(), p, note


def _example_channels(structured: Tensor, hopkins: Tensor) -> list[int]:
    """Up to :data:`EXAMPLE_CHANNELS` channels: structured first, then by decreasing Hopkins."""
    # Stable order: ties keep channel order, so the choice is deterministic.
    order = np.lexsort((np.arange(hopkins.numel()), -hopkins.numpy(), ~structured.numpy()))
    return [int(c) for c in order[:EXAMPLE_CHANNELS]]


def _summary(values: np.ndarray | None) -> dict[str, float | None]:
    if values is None:
        return {"median": None, "q1": None, "q3": None, "fraction_below_0_55": None}
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {
        "median": round(float(median), DIGITS),
        "q1": round(float(q1), DIGITS),
        "q3": round(float(q3), DIGITS),
        "fraction_below_0_55": round(float(np.mean(values < LOW_STRUCTURE)), DIGITS),
    }


def _report(run: LoadedRun, measured: _Measured, seed: int) -> dict[str, Any]:
    """Every number of the analysis, as JSON-ready values."""
    config = run.config
    clusters = measured.clusters
    structured = clusters.structured.tolist()
    n_channels, height, width = clusters.labels.shape
    last = run.history[-1] if run.history else {}
    return {
        "run": {
            "run_dir": str(run.run_dir),
            "name": run.run_dir.resolve().name,
            "model": config.model,
            "stem": getattr(run.model, "stem_kind", None),
            "dataset": config.dataset,
            "regularizer": config.regularizer,
            "p": config.p,
            "regularizer_options": config.regularizer_options,
            "train_fraction": config.train_fraction,
            "epochs_done": run.epochs_done,
            "epochs": config.epochs,
            "seed": config.seed,
            "last_top1": last.get("top1"),
        },
        "seed": seed,
        "sample_images": len(measured.sample_index),
        "example_images": [int(i) for i in measured.sample_index[: len(measured.examples)]],
        "clusters": {
            "slot": measured.slot_name,
            "source": clusters.source,
            "description": clusters.description,
            "n_clusters": clusters.n_clusters,
            "unstructured_rule": clusters.rule,
            "channels": n_channels,
            "height": height,
            "width": width,
            "n_structured": int(sum(structured)),
            "n_unstructured": n_channels - int(sum(structured)),
            "structured": structured,
            "n_found": clusters.n_found.tolist(),
        },
        "dead_channels": measured.dead,
        "channel_hopkins": [round(float(v), DIGITS) for v in measured.hopkins],
        "example_channels": measured.channels,
        "mask": {
            "p": measured.mask_p,
            "description": measured.mask_note,
            "dropped_fraction": round(float(1.0 - measured.masks.mean()), DIGITS),
        },
        "layers": [
            {
                "name": layer.name,
                "channels": layer.channels,
                "height": layer.height,
                "width": layer.width,
                "hopkins": None
                if layer.values is None
                else [round(float(v), DIGITS) for v in layer.values],
                **_summary(layer.values),
            }
            for layer in measured.layers
        ],
        "figures": dict(FIGURE_NAMES),
    }


def _number(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, or "n/a" for None and NaN."""
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f}"


def _markdown(report: dict[str, Any]) -> str:
    """The report as Markdown, with relative links to the figures."""
    run, clusters = report["run"], report["clusters"]
    figures = report["figures"]
    options = ", ".join(f"{k}={v}" for k, v in sorted(run["regularizer_options"].items()))
    top1 = run["last_top1"]
    n_unstructured, n_channels = clusters["n_unstructured"], clusters["channels"]
    slot = clusters["slot"]
    hopkins = report["channel_hopkins"]
    masked_by = (
        "masked by DropCluster" if clusters["source"] == "model" else "DropCluster would mask them"
    )
    disagree = [
        c for c in range(n_channels) if clusters["structured"][c] and hopkins[c] < LOW_STRUCTURE
    ]
    lines = [
        f"# Cluster analysis of run `{run['name']}`",
        "",
        "| | |",
        "|---|---|",
        f"| folder | `{run['run_dir']}` |",
        f"| model | {run['model']}" + (f" ({run['stem']} stem)" if run["stem"] else "") + " |",
        f"| data set | {run['dataset']} (train fraction {run['train_fraction']:g}) |",
        f"| regularizer | {run['regularizer']}, p={run['p']:g}"
        + (f" ({options})" if options else "")
        + " |",
        f"| epochs | {run['epochs_done']} of {run['epochs']} (run seed {run['seed']}) |",
        f"| last test top-1 | {_number(top1, 2)} % |",
        f"| analysed | {report['sample_images']} test images (seed {report['seed']}) |",
        "",
        "Every figure and number below comes from evaluation-mode forward passes of the test "
        "images; all numbers are in `analysis.json`.",
        "",
        f"## Clusters at `{slot}` ({n_channels} channels, {clusters['height']}×"
        f"{clusters['width']} maps)",
        "",
        f"Clusters: {clusters['description']}.",
        "",
        f"**{n_unstructured} of {n_channels} channels are unstructured** ({masked_by} in "
        f"training and evaluation); {clusters['n_structured']} are structured.",
        "",
        f"**{len(report['dead_channels'])} dead channel(s)** (constant over every pixel of the "
        f"{report['sample_images']} images: after a ReLU, a channel that never fires): "
        f"{report['dead_channels'] or 'none'}.",
        "",
        f"![cluster map of every channel]({figures['cluster_maps']})",
        "",
        f"*{figures['cluster_maps']}*: one panel per channel, colours are cluster indices; "
        "unstructured channels are grey with a red frame.",
        "",
        "## Example images",
        "",
        f"![examples]({figures['examples']})",
        "",
        f"*{figures['examples']}*: test images {report['example_images']}; channels "
        f"{report['example_channels']} (the structured channels with the highest Spatial "
        f"Hopkins): activation, clusters over the activation, and {report['mask']['description']}"
        f". Red: dropped, {100 * report['mask']['dropped_fraction']:.1f} % of the pixels of all "
        "channels of these images.",
        "",
        f"## Spatial Hopkins per channel at `{slot}`",
        "",
        f"![Spatial Hopkins per channel]({figures['channel_hopkins']})",
        "",
        f"*{figures['channel_hopkins']}*: mean Spatial Hopkins over the {report['sample_images']}"
        " images for each channel, sorted; 0.5 means no spatial structure (paper, Figure 4).",
        "",
    ]
    if disagree:
        lines += [
            f"{len(disagree)} structured channel(s) have Spatial Hopkins below "
            f"{LOW_STRUCTURE}: {disagree}.",
            "",
        ]
    lines += [
        "## Spatial Hopkins by depth",
        "",
        f"![Spatial Hopkins by depth]({figures['layer_hopkins']})",
        "",
        f"*{figures['layer_hopkins']}*: per-channel mean Spatial Hopkins at the stem and after "
        "each group of blocks (paper, Figure 8).",
        "",
        f"| layer | channels | map | median | IQR | fraction < {LOW_STRUCTURE} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for layer in report["layers"]:
        if layer["median"] is None:
            summary = "n/a (maps under 3×3) | n/a | n/a"
        else:
            summary = (
                f"{layer['median']:.3f} | {layer['q1']:.3f}–{layer['q3']:.3f} | "
                f"{layer['fraction_below_0_55']:.2f}"
            )
        lines.append(
            f"| {layer['name']} | {layer['channels']} | {layer['height']}×{layer['width']} | "
            f"{summary} |"
        )
    lines += [
        "",
        f"## Channels at `{slot}`",
        "",
        "| channel | structured | clusters found | Spatial Hopkins |",
        "|---:|:---:|---:|---:|",
    ]
    for channel in range(n_channels):
        flag = "yes" if clusters["structured"][channel] else "**no**"
        lines.append(
            f"| {channel} | {flag} | {clusters['n_found'][channel]} | {hopkins[channel]:.3f} |"
        )
    return "\n".join(lines) + "\n"


def analyze_sweep_runs(
    out_dir: str | Path,
    settings: Any,
    *,
    progress: Callable[[str], None] | None = None,
) -> list[Path]:
    """Analyse the sweep's runs as its preset's ``analyze`` settings say, once per run.

    Args:
        out_dir: the sweep folder.
        settings: the preset's :class:`~dropcluster.experiments.presets.AnalyzeSettings`.
        progress: hears which run is analysed.

    Returns:
        The ``analysis.md`` paths, in the database's run order (a run with an analysis keeps
        it: delete its ``analysis`` folder to redo it). A run that cannot be analysed (no
        checkpoint of the epoch asked for, say) is skipped and named to ``progress``.

    Raises:
        ImportError: matplotlib (the ``plot`` extra) is not installed.
    """
    options = {
        "sample_images": settings.sample_images,
        "epoch": settings.epoch,
        "unstructured": settings.unstructured,
    }
    if settings.runs == "best-dropcluster":
        path = analyze_best_dropcluster_run(out_dir, progress=progress, **options)
        return [] if path is None else [path]
    with ResultsStore.in_folder(out_dir, readonly=True) as store:
        finished = store.runs(status=FINISHED)
    paths = []
    for record in finished:
        run_dir = Path(out_dir) / RUNS_FOLDER / record.run_id
        markdown_path = run_dir / ANALYSIS_DIR / MARKDOWN_NAME
        if not markdown_path.is_file():
            if progress is not None:
                progress(f"cluster analysis of {record.run_id}")
            try:
                analyze_run(run_dir, run_dir / ANALYSIS_DIR, **options)
            except (OSError, ValueError) as error:  # one bad run does not stop the others
                if progress is not None:
                    progress(f"no cluster analysis of {record.run_id}: {error}")
                continue
        paths.append(markdown_path)
    return paths
