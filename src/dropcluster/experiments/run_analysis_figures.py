"""Figures of a run's cluster analysis (the paper's Figures 1-4 and 8), drawn from plain arrays.

Each function takes NumPy arrays (or CPU tensors), draws one figure and writes it as a PNG;
:func:`dropcluster.experiments.run_analysis.analyze_run` computes what they show. matplotlib is an
optional extra, imported only when a figure is drawn.

Colours are shared by all figures: clusters use a categorical palette of 18 colours (``tab20``
without its reds, which mean "unstructured" or "dropped" here; the nine saturated colours first,
then their light partners, so that clusters 0-8, which ReNA numbers by their first pixel and
which are often neighbours, never get two shades of one hue); structured channels are blue and
unstructured ones red.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dropcluster.experiments.plotting import pyplot, save_figure

__all__ = [
    "LOW_STRUCTURE",
    "NO_STRUCTURE",
    "N_PALETTE_COLOURS",
    "STRUCTURED_COLOUR",
    "UNSTRUCTURED_COLOUR",
    "LayerHopkins",
    "cluster_colormap",
    "plot_channel_hopkins",
    "plot_cluster_maps",
    "plot_examples",
    "plot_layer_hopkins",
]


STRUCTURED_COLOUR = "tab:blue"
UNSTRUCTURED_COLOUR = "tab:red"
#: Spatial Hopkins of a field with no spatial structure.
NO_STRUCTURE = 0.5
#: Channels below this Spatial Hopkins are counted as "little structure" (the ``"hopkins"``
#: rule's default threshold in :func:`dropcluster.rena.rena`).
LOW_STRUCTURE = 0.55
N_PALETTE_COLOURS = 18
#: Index of red in ``tab20`` (its light partner follows).
_TAB20_RED = 6


@dataclass(frozen=True)
class LayerHopkins:
    """The per-channel Spatial Hopkins of one layer, for :func:`plot_layer_hopkins`.

    Attributes:
        name: the slot name ("stem", "group1", ...).
        channels: C.
        height, width: the map size.
        values: (C,) float batch-mean Spatial Hopkins per channel, or None when the maps are
            smaller than 3x3 (no interior pixel has 8 neighbours, so S is undefined).
    """

    name: str
    channels: int
    height: int
    width: int
    values: np.ndarray | None


def cluster_colormap():
    """A ``ListedColormap`` of 18 categorical colours for cluster indices (label % 18)."""
    plt = pyplot()
    from matplotlib.colors import ListedColormap

    tab20 = plt.get_cmap("tab20").colors
    saturated = [tab20[i] for i in range(0, 20, 2) if i != _TAB20_RED]
    light = [tab20[i + 1] for i in range(0, 20, 2) if i != _TAB20_RED]
    return ListedColormap(saturated + light)


def plot_cluster_maps(
    labels,
    structured,
    n_found,
    hopkins,
    path: str | Path,
    *,
    title: str,
) -> Path:
    """One small panel per channel with its cluster map (paper, Figures 1-3, all channels).

    Args:
        labels: (C, H, W) int cluster of each pixel.
        structured: (C,) bool; unstructured panels are greyed, framed in red and labelled.
        n_found: (C,) int clusters per channel (shown in the panel titles).
        hopkins: (C,) float Spatial Hopkins per channel (shown in the panel titles), or None.
        path: where the PNG goes.
        title: the figure's title.

    Returns:
        ``path`` as a Path.
    """
    plt = pyplot()
    labels = np.asarray(labels)
    structured = np.asarray(structured, dtype=bool)
    n_found = np.asarray(n_found)
    n_channels = labels.shape[0]
    n_columns = max(1, math.ceil(math.sqrt(n_channels)))
    n_rows = max(1, math.ceil(n_channels / n_columns))
    panel = 1.45
    # At least 7 inches wide so that the three title lines fit above a narrow grid.
    figure, axes = plt.subplots(
        n_rows,
        n_columns,
        figsize=(max(7.0, panel * n_columns), panel * n_rows + 1.2),
        squeeze=False,
    )
    colormap = cluster_colormap()
    title_size = 7 if n_columns > 4 else 8
    for channel, axis in enumerate(axes.flat):
        axis.set_xticks([])
        axis.set_yticks([])
        if channel >= n_channels:
            axis.set_axis_off()
            continue
        score = "" if hopkins is None else f", S={float(hopkins[channel]):.2f}"
        if structured[channel]:
            axis.imshow(
                labels[channel] % N_PALETTE_COLOURS,
                cmap=colormap,
                vmin=-0.5,
                vmax=N_PALETTE_COLOURS - 0.5,
                interpolation="nearest",
            )
            axis.set_title(f"ch {channel}: {int(n_found[channel])} cl.{score}", fontsize=title_size)
        else:
            axis.imshow(np.full(labels.shape[1:], 0.85), cmap="gray", vmin=0, vmax=1)
            axis.text(
                0.5,
                0.5,
                "unstructured",
                transform=axis.transAxes,
                ha="center",
                va="center",
                color=UNSTRUCTURED_COLOUR,
                fontsize=title_size,
                fontweight="bold",
            )
            axis.set_title(f"ch {channel}{score}", fontsize=title_size, color=UNSTRUCTURED_COLOUR)
            for spine in axis.spines.values():
                spine.set_edgecolor(UNSTRUCTURED_COLOUR)
                spine.set_linewidth(2.0)
    n_unstructured = int((~structured).sum())
    figure.suptitle(
        f"{title}\n{n_channels} channels, {n_unstructured} unstructured (red frame: masked in "
        f"training and evaluation)\ncolours = cluster index (ReNA numbers clusters by their "
        f"first pixel); cl. = clusters, S = Spatial Hopkins",
        fontsize=9,
    )
    figure.tight_layout()
    return save_figure(figure, path)


def plot_examples(
    images,
    image_names: Sequence[str],
    activations,
    labels,
    structured,
    masks,
    channels: Sequence[int],
    path: str | Path,
    *,
    title: str,
) -> Path:
    """Input images, some channels' activations, their clusters and a DropCluster mask.

    The paper's Figures 1-3 side by side: for each image (a row) the input, then for each
    channel its activation map, its cluster map laid over the activation, and the activation
    with a sampled DropCluster mask applied (dropped pixels tinted red, before rescaling).

    Args:
        images: (n, C_in, H_in, W_in) uint8 input images (C_in 1 or 3).
        image_names: n row labels (e.g. "test #12\\nshirt").
        activations: (n, C, H, W) float activations of the clustered layer.
        labels: (C, H, W) int cluster of each pixel.
        structured: (C,) bool.
        masks: (n, C, H, W) 0/1 float, the mask sampled for each image.
        channels: the channels to show (a few).
        path: where the PNG goes.
        title: the figure's title.

    Returns:
        ``path`` as a Path.
    """
    plt = pyplot()
    images = np.asarray(images)
    activations = np.asarray(activations, dtype=np.float32)
    labels = np.asarray(labels)
    structured = np.asarray(structured, dtype=bool)
    masks = np.asarray(masks, dtype=np.float32)
    n_images = images.shape[0]
    n_columns = 1 + 3 * len(channels)
    panel = 1.35
    figure, axes = plt.subplots(
        n_images, n_columns, figsize=(panel * n_columns, panel * n_images + 1.1), squeeze=False
    )
    colormap = cluster_colormap()
    # Solid red: a translucent tint over viridis' yellow reads as brown, not as "dropped".
    red = np.zeros((*labels.shape[1:], 4), dtype=np.float32)
    red[..., 0] = 0.9
    red[..., 1:3] = 0.05
    for row in range(n_images):
        picture = images[row].transpose(1, 2, 0)
        axis = axes[row, 0]
        if picture.shape[2] == 1:
            axis.imshow(picture[..., 0], cmap="gray", vmin=0, vmax=255)
        else:
            axis.imshow(picture)
        axis.set_ylabel(image_names[row], fontsize=8)
        for index, channel in enumerate(channels):
            # One colour scale per channel across the images, so the rows compare.
            low = float(activations[:, channel].min())
            high = max(float(activations[:, channel].max()), low + 1e-6)
            activation = activations[row, channel]
            column = 1 + 3 * index
            axes[row, column].imshow(activation, cmap="viridis", vmin=low, vmax=high)
            overlay = axes[row, column + 1]
            overlay.imshow(activation, cmap="gray", vmin=low, vmax=high)
            if structured[channel]:
                overlay.imshow(
                    labels[channel] % N_PALETTE_COLOURS,
                    cmap=colormap,
                    vmin=-0.5,
                    vmax=N_PALETTE_COLOURS - 0.5,
                    alpha=0.6,
                    interpolation="nearest",
                )
            masked = axes[row, column + 2]
            masked.imshow(activation * masks[row, channel], cmap="viridis", vmin=low, vmax=high)
            tint = red.copy()
            tint[..., 3] = masks[row, channel] == 0
            masked.imshow(tint, interpolation="nearest")
            if row == 0:
                state = "" if structured[channel] else " (unstructured)"
                axes[row, column].set_title(f"ch {channel}{state}\nactivation", fontsize=8)
                overlay.set_title(f"ch {channel}\nclusters", fontsize=8)
                masked.set_title(f"ch {channel}\nmasked (red: dropped)", fontsize=8)
        if row == 0:
            axis.set_title("input", fontsize=8)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(
        f"{title}\nactivation colours per channel: viridis from its minimum (dark) to its "
        "maximum (yellow) over these images; clusters in categorical colours",
        fontsize=10,
    )
    figure.tight_layout()
    return save_figure(figure, path)


def plot_channel_hopkins(
    hopkins,
    structured,
    path: str | Path,
    *,
    title: str,
    sort: bool = True,
) -> Path:
    """Bar chart of each channel's Spatial Hopkins (paper, Figure 4), 0.5 marked.

    Args:
        hopkins: (C,) float batch-mean Spatial Hopkins per channel, in [0, 1].
        structured: (C,) bool; structured and unstructured bars get different colours.
        path: where the PNG goes.
        title: the figure's title.
        sort: bars in decreasing order of S (True) or in channel order.

    Returns:
        ``path`` as a Path.
    """
    plt = pyplot()
    from matplotlib.patches import Patch

    hopkins = np.asarray(hopkins, dtype=np.float64)
    structured = np.asarray(structured, dtype=bool)
    n_channels = hopkins.shape[0]
    # Stable sort: equal values keep channel order, so the figure is deterministic.
    order = np.argsort(-hopkins, kind="stable") if sort else np.arange(n_channels)
    colours = [STRUCTURED_COLOUR if structured[c] else UNSTRUCTURED_COLOUR for c in order]
    figure, axis = plt.subplots(figsize=(max(6.0, 0.16 * n_channels + 2.0) + 2.2, 3.8))
    positions = np.arange(n_channels)
    axis.bar(positions, hopkins[order], color=colours, width=0.8)
    axis.set_xticks(positions)
    axis.set_xticklabels(
        [str(c) for c in order],
        fontsize=7 if n_channels > 24 else 9,
        rotation=90 if n_channels > 24 else 0,
    )
    axis.set_xlim(-0.7, n_channels - 0.3)
    axis.set_ylim(0, 1)
    no_structure = axis.axhline(
        NO_STRUCTURE, color="black", linestyle="--", linewidth=1, label="0.5: no spatial structure"
    )
    axis.set_xlabel("channel" + (" (sorted by Spatial Hopkins)" if sort else ""))
    axis.set_ylabel("Spatial Hopkins (batch mean)")
    axis.set_title(title, fontsize=10)
    handles = [
        Patch(color=STRUCTURED_COLOUR, label=f"structured ({int(structured.sum())})"),
        Patch(color=UNSTRUCTURED_COLOUR, label=f"unstructured ({int((~structured).sum())})"),
        no_structure,
    ]
    # Outside the axes: inside, it would hide bars whatever the corner.
    axis.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_layer_hopkins(layers: Sequence[LayerHopkins], path: str | Path, *, title: str) -> Path:
    """One histogram of per-channel Spatial Hopkins per layer (paper, Figure 8).

    Small multiples on a shared x axis from 0 to 1, with 0.5 (no structure) and each layer's
    median marked; deeper layers drifting towards 0.5 is the paper's point.

    Args:
        layers: the layers in forward order.
        path: where the PNG goes.
        title: the figure's title.

    Returns:
        ``path`` as a Path.
    """
    plt = pyplot()
    n_layers = len(layers)
    n_columns = min(n_layers, 5)
    n_rows = math.ceil(n_layers / n_columns)
    # The same x range on every panel (not sharex, which hides tick labels above empty panels).
    figure, axes = plt.subplots(
        n_rows, n_columns, figsize=(2.9 * n_columns, 2.6 * n_rows + 0.8), squeeze=False
    )
    bins = np.linspace(0.0, 1.0, 41)
    for axis, layer in zip(axes.flat, layers, strict=False):
        axis.set_title(
            f"{layer.name}: {layer.channels} ch, {layer.height}×{layer.width}", fontsize=9
        )
        axis.set_xlim(0, 1)
        if layer.values is None:
            axis.text(
                0.5,
                0.5,
                f"maps {layer.height}×{layer.width}:\ntoo small for Spatial\nHopkins (needs 3×3)",
                transform=axis.transAxes,
                ha="center",
                va="center",
                fontsize=8,
            )
            axis.set_xticks([])
            axis.set_yticks([])
            continue
        values = np.asarray(layer.values, dtype=np.float64)
        axis.hist(values, bins=bins, color=STRUCTURED_COLOUR, edgecolor="white", linewidth=0.4)
        axis.axvline(NO_STRUCTURE, color="black", linestyle="--", linewidth=1, label="0.5")
        median = float(np.median(values))
        axis.axvline(median, color="tab:orange", linewidth=1.5, label=f"median {median:.2f}")
        axis.legend(fontsize=7, loc="upper left", framealpha=0.9)
        axis.yaxis.get_major_locator().set_params(integer=True)
    for axis in axes.flat[n_layers:]:
        axis.set_axis_off()
    for axis, layer in zip(axes.flat, layers, strict=False):
        if layer.values is not None:
            axis.set_xlabel("Spatial Hopkins", fontsize=9)
    for axis in axes[:, 0]:
        axis.set_ylabel("channels", fontsize=9)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)
