"""Which layer? :func:`~dropcluster.nn.ranking.rank_layers` on this project's runs and models,
and its figure (structure against depth).

:func:`rank_run` ranks the places of a trained run (a ``dropcluster train`` or sweep run
folder) on its data set's test images; :func:`rank_model` those of a freshly initialised model
of :mod:`dropcluster.models` (the contrast: structure before training). Both use a seeded
sample of test images, normalised as the run evaluates them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from dropcluster.experiments.plotting import pyplot, save_figure
from dropcluster.hopkins import NO_TENDENCY
from dropcluster.nn.ranking import LayerRanking, rank_layers

__all__ = [
    "RankedModel",
    "plot_ranking",
    "rank_model",
    "rank_run",
]


@dataclass(frozen=True)
class RankedModel:
    """A ranking and what it was measured on.

    Attributes:
        ranking: what :func:`~dropcluster.nn.ranking.rank_layers` returned.
        model: the model's name (``"resnet20"``).
        dataset: the data set whose test images were used.
        source: ``"run <folder> (<E> epochs)"`` or ``"untrained (seed <s>)"``.
    """

    ranking: LayerRanking
    model: str
    dataset: str
    source: str


def rank_run(
    run_dir: str | Path,
    *,
    n_batches: int = 2,
    batch_size: int = 64,
    n_clusters: int = 15,
    unstructured: str = "dead",
    modules: list[str] | str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> RankedModel:
    """Rank the places of the trained run in ``run_dir`` on its test images.

    The images are the first ``n_batches * batch_size`` of a permutation of the test set drawn
    from ``seed`` (which also seeds Spatial Hopkins' sampled sites); the model runs in
    evaluation mode on ``device``. The other arguments are :func:`rank_layers`'.

    Raises:
        FileNotFoundError: ``run_dir`` is missing or holds no run.
        ValueError: bad arguments (see :func:`rank_layers`).
    """
    from dropcluster.train.restore import load_run

    run = load_run(run_dir, device=device)
    ranking = _rank(
        run.model,
        run.test_set.images,
        run.prepare_eval,
        n_batches,
        batch_size,
        n_clusters,
        unstructured,
        modules,
        seed,
    )
    source = f"run {run.run_dir} ({run.epochs_done} epochs)"
    return RankedModel(ranking, run.config.model, run.config.dataset, source)


def rank_model(
    model: str,
    dataset: str,
    *,
    data_dir: str | Path | None = None,
    n_batches: int = 2,
    batch_size: int = 64,
    n_clusters: int = 15,
    unstructured: str = "dead",
    modules: list[str] | str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> RankedModel:
    """Rank the places of an untrained ``model`` (:func:`dropcluster.models.build_model`'s
    names, its initialisation seeded with ``seed``) on ``dataset``'s test images, normalised as
    a training run would (see :func:`rank_run` for the rest).

    Raises:
        ValueError: unknown model or data set, bad arguments.
        FileNotFoundError: the data set's files are missing.
    """
    from dropcluster.data import load_dataset
    from dropcluster.train.config import TrainConfig, resolve_device
    from dropcluster.train.setup import build_configured_model, eval_preparer

    config = TrainConfig(
        dataset=dataset,
        model=model,
        regularizer="none",
        data_dir=None if data_dir is None else str(data_dir),
    )
    test_set = load_dataset(config.dataset, "test", root=config.data_dir)
    torch.manual_seed(seed)
    built = build_configured_model(
        config, len(test_set.classes), test_set.images.shape[1], resolve_device(device)
    )
    ranking = _rank(
        built,
        test_set.images,
        eval_preparer(config),
        n_batches,
        batch_size,
        n_clusters,
        unstructured,
        modules,
        seed,
    )
    return RankedModel(ranking, model, dataset, f"untrained (seed {seed})")


def _rank(
    model: nn.Module,
    images: Tensor,
    prepare,
    n_batches: int,
    batch_size: int,
    n_clusters: int,
    unstructured: str,
    modules,
    seed: int,
) -> LayerRanking:
    """rank_layers on a seeded sample of uint8 ``images`` (N, C, H, W)."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(images.shape[0], generator=generator)[: n_batches * batch_size]
    device = next(model.parameters()).device
    return rank_layers(
        model,
        images[index],
        modules=modules,
        n_batches=n_batches,
        batch_size=batch_size,
        n_clusters=n_clusters,
        unstructured=unstructured,
        prepare=lambda batch: prepare(batch.to(device)),
        generator=generator,
    )


def plot_ranking(ranking: LayerRanking, path: str | Path, *, title: str | None = None) -> Path:
    """Draw every ranked place in depth order: its per-channel Spatial Hopkins, and its
    structured fraction.

    Top panel: a box per place (the channels' S: median, quartiles, whiskers at 1.5 IQR, the
    outlying channels as points), the mean as a dot, 0.5 (no structure) dashed, the best place
    labelled; bottom panel: structured channels / channels. The x axis is the forward order, each
    place named (module name, and the slot's name where it is one); the paper's point is the
    drift towards 0.5 with depth.

    Args:
        ranking: what :func:`~dropcluster.nn.ranking.rank_layers` returned.
        path: where the figure goes (format from the suffix, PNG by default).
        title: the figure's title; None: a sentence on what was measured.

    Returns:
        ``path`` as a Path.

    Raises:
        ImportError: matplotlib (the ``plot`` extra) is not installed.
    """
    plt = pyplot()
    layers = ranking.by_depth()
    positions = list(range(1, len(layers) + 1))
    labels = [
        layer.name if layer.slot in (None, layer.name) else f"{layer.name}\n({layer.slot})"
        for layer in layers
    ]
    width = max(6.0, 0.45 * len(layers) + 2.0)
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(width, 6.4), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]}
    )
    top.boxplot(
        [list(layer.hopkins) for layer in layers],
        positions=positions,
        widths=0.6,
        flierprops={"markersize": 3},
        medianprops={"color": "tab:orange"},
    )
    top.plot(
        positions,
        [layer.hopkins_mean for layer in layers],
        "o",
        color="tab:blue",
        markersize=4,
        label="mean over channels",
    )
    best = next(i for i, layer in enumerate(layers) if layer.name == ranking.best)
    top.annotate(
        "best",
        (positions[best], max(layers[best].hopkins)),
        xytext=(0, 6),
        textcoords="offset points",
        ha="center",
        fontsize=8,
        color="tab:blue",
    )
    top.axhline(NO_TENDENCY, color="black", linestyle="--", linewidth=1, label="0.5: no structure")
    top.margins(y=0.1)  # room for the "best" label above the tallest box
    top.set_ylabel("Spatial Hopkins per channel")
    top.legend(fontsize=8, loc="upper right")
    bottom.bar(positions, [layer.structured_fraction for layer in layers], color="tab:green")
    bottom.set_ylim(0, 1.05)
    bottom.set_ylabel("structured\nfraction")
    bottom.set_xticks(positions)
    bottom.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    bottom.set_xlabel("place, in forward order")
    if title is None:
        title = (
            f"Structure by depth: {ranking.n_images} images; structured = ReNA's "
            f"{ranking.unstructured!r} rule, {ranking.n_clusters} clusters"
        )
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)
