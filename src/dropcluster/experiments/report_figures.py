"""Figures of a sweep report, drawn from plain aggregated numbers (never from the database).

Every function takes dicts keyed by *arm* (a regularizer, or ``regularizer:variant`` such as
``"dropcluster:ours"``, see :func:`dropcluster.experiments.presets.arm_name`), writes one PNG and
returns its path. A value is ``(mean, std)`` over seeds, in percent, with ``std = None`` when
only one seed finished (then no error bar is drawn). Each arm keeps the same colour, marker and
legend position in every figure, so figures can be read side by side: a plain arm has its
regularizer's colour and marker and a solid line; variants get colours and markers of their own
and a dashed line (see :func:`arm_styles`). matplotlib is imported only when a figure is drawn
(:func:`dropcluster.experiments.plotting.pyplot`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from dropcluster.data.corruptions import CORRUPTIONS
from dropcluster.experiments.plotting import pyplot, save_figure
from dropcluster.plugins import plugin_display_name
from dropcluster.validation import check_choice

__all__ = [
    "DISPLAY_NAMES",
    "PLUGIN_COLOURS",
    "REGULARIZER_COLOURS",
    "REGULARIZER_ORDER",
    "VARIANT_COLOURS",
    "arm_styles",
    "display_name",
    "ordered_regularizers",
    "plot_corruption_severity",
    "plot_learning_curves",
    "plot_training_fraction",
    "split_arm",
]


#: A mean over seeds and its sample standard deviation (None with a single seed), in percent.
MeanStd = tuple[float, float | None]

#: Order of regularizers in legends and tables: the paper's baselines first, DropCluster last.
REGULARIZER_ORDER = (
    "none",
    "dropout",
    "spatial_dropout",
    "dropblock",
    "stochastic_depth",
    "dropcluster",
)

#: The paper's names for the regularizers.
DISPLAY_NAMES = {
    "none": "No dropout",
    "dropout": "Dropout",
    "spatial_dropout": "SpatialDropout",
    "dropblock": "DropBlock",
    "stochastic_depth": "StochasticDepth",
    "dropcluster": "DropCluster",
}

#: One colour per regularizer (tab10 entries), the same in every figure.
REGULARIZER_COLOURS = {
    "none": "#7f7f7f",
    "dropout": "#1f77b4",
    "spatial_dropout": "#17becf",
    "dropblock": "#2ca02c",
    "stochastic_depth": "#ff7f0e",
    "dropcluster": "#d62728",
}

_MARKERS = {
    "none": "o",
    "dropout": "v",
    "spatial_dropout": "^",
    "dropblock": "s",
    "stochastic_depth": "D",
    "dropcluster": "*",
}

#: Colours and markers of the regularizers registered by plugins (and of unknown names), none of
#: them a built-in regularizer's or a variant's, taken in turn in the order of
#: :func:`ordered_regularizers` (see :func:`arm_styles`).
PLUGIN_COLOURS = ("#000000", "#b8860b", "#008080", "#ff1493", "#556b2f", "#4b0082")
_PLUGIN_MARKERS = ("x", "+", "1", "2", "3", "4")

#: Colours and markers of variant arms, none of them a regularizer's own, taken in turn by the
#: variants of a figure (see :func:`arm_styles`).
VARIANT_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#393b79", "#637939", "#843c39")
_VARIANT_MARKERS = ("P", "X", "h", "p", "<", ">", "d")

_METRIC_LABELS = {"top1": "top-1 accuracy (%)", "top5": "top-5 accuracy (%)"}

#: A style per arm: keyword arguments of matplotlib's ``plot``/``errorbar``.
Styles = Mapping[str, dict]


def split_arm(arm: str) -> tuple[str, str | None]:
    """``"dropcluster:ours"`` -> ``("dropcluster", "ours")``; ``"dropcluster"`` ->
    ``("dropcluster", None)`` (the inverse of :func:`dropcluster.experiments.presets.arm_name`)."""
    regularizer, _, variant = arm.partition(":")
    return regularizer, variant or None


def display_name(arm: str) -> str:
    """The paper's name of an arm's regularizer, with the variant in brackets:
    ``"dropcluster:ours"`` -> ``"DropCluster (ours)"``; a regularizer registered by a plugin
    has the display name it was registered with; an unknown one keeps its name."""
    regularizer, variant = split_arm(arm)
    name = DISPLAY_NAMES.get(regularizer) or plugin_display_name(regularizer) or regularizer
    return name if variant is None else f"{name} ({variant})"


def _arm_order(arm: str) -> tuple[int, str, bool, str]:
    # Known regularizers in the paper's order, unknown ones after them by name; within one
    # regularizer the plain arm first, then its variants by name.
    regularizer, variant = split_arm(arm)
    known = REGULARIZER_ORDER.index(regularizer) if regularizer in REGULARIZER_ORDER else None
    rank = len(REGULARIZER_ORDER) if known is None else known
    return rank, regularizer if known is None else "", variant is not None, variant or ""


def ordered_regularizers(names) -> list[str]:
    """The arms ``names`` in order: by regularizer as in :data:`REGULARIZER_ORDER` (unknown
    ones last, alphabetically), then the plain arm before its variants, variants alphabetically.
    """
    return sorted(set(names), key=_arm_order)


def arm_styles(arms) -> dict[str, dict]:
    """A distinct, deterministic style per arm: ``{arm: {"color", "marker", "linestyle",
    "label"}}``.

    A plain arm has its regularizer's colour and marker and a solid line; the regularizers of
    plugins take :data:`PLUGIN_COLOURS` and their markers in turn. The variants, in the
    order of :func:`ordered_regularizers`, take :data:`VARIANT_COLOURS` and the variant markers
    in turn (so two variants of one regularizer never share a colour while there are no more
    variants than colours) and a dashed line. Give every arm of a report at once, so that an arm
    keeps its style in every figure.
    """
    styles, n_variants = {}, 0
    ordered = ordered_regularizers(arms)
    plugins = list(dict.fromkeys(split_arm(a)[0] for a in ordered))
    plugins = [name for name in plugins if name not in REGULARIZER_COLOURS]
    for arm in ordered:
        regularizer, variant = split_arm(arm)
        if variant is None and regularizer in REGULARIZER_COLOURS:
            colour, marker, linestyle = REGULARIZER_COLOURS[regularizer], _MARKERS[regularizer], "-"
        elif variant is None:
            rank = plugins.index(regularizer)
            colour = PLUGIN_COLOURS[rank % len(PLUGIN_COLOURS)]
            marker, linestyle = _PLUGIN_MARKERS[rank % len(_PLUGIN_MARKERS)], "-"
        else:
            colour = VARIANT_COLOURS[n_variants % len(VARIANT_COLOURS)]
            marker = _VARIANT_MARKERS[n_variants % len(_VARIANT_MARKERS)]
            linestyle, n_variants = "--", n_variants + 1
        styles[arm] = {
            "color": colour,
            "marker": marker,
            "linestyle": linestyle,
            "label": display_name(arm),
        }
    return styles


def _styles_for(data: Mapping, styles: Styles | None) -> Styles:
    """``styles`` when it has every arm of ``data`` (the report gives all its arms), else the
    styles of the arms of both (an arm missing from ``styles`` still gets one of its own)."""
    if styles is not None and set(data) <= set(styles):
        return styles
    return arm_styles(set(data) | set(styles or ()))


def _check_not_empty(name: str, data: Mapping) -> None:
    if not any(data.values()):
        raise ValueError(f"{name} has nothing to plot: every arm's data is empty")


def _std_or_zero(std: float | None) -> float:
    return 0.0 if std is None or math.isnan(std) else std


def plot_corruption_severity(
    accuracy: Mapping[str, Mapping[str, Mapping[int, MeanStd]]],
    out_path: str | Path,
    *,
    metric: str = "top1",
    title: str | None = None,
    styles: Styles | None = None,
) -> Path:
    """Accuracy against corruption severity, one panel per corruption (paper, Figures 9-10).

    Args:
        accuracy: ``accuracy[arm][corruption][severity] = (mean, std)``; severity 0 is
            the clean test set and is drawn at x = 0 of every panel. A corruption named
            ``"mean"`` (the mean over corruptions), if present, is drawn last.
        out_path: the PNG to write.
        metric: ``"top1"`` or ``"top5"``, for the axis label.
        title: figure title (default: says the metric and that bars are std over seeds).
        styles: the style of each arm (default: :func:`arm_styles` of ``accuracy``'s arms).

    Returns:
        ``out_path`` as a Path.

    Raises:
        ValueError: bad metric, or no data at all.
    """
    check_choice("metric", metric, _METRIC_LABELS)
    _check_not_empty("the corruption figure", accuracy)
    styles = _styles_for(accuracy, styles)
    # The paper's 7 in its order, the other 12 after them, unknown names next, the mean last.
    order = (*CORRUPTIONS, "mean")
    corruptions = sorted(
        {name for per_reg in accuracy.values() for name in per_reg},
        key=lambda name: (name == "mean", order.index(name) if name in order else len(order), name),
    )
    plt = pyplot()
    n_columns = min(4, len(corruptions))
    n_rows = math.ceil(len(corruptions) / n_columns)
    figure, axes = plt.subplots(
        n_rows, n_columns, figsize=(3.3 * n_columns, 2.8 * n_rows + 0.6), squeeze=False
    )
    severities = sorted(
        {s for per_reg in accuracy.values() for points in per_reg.values() for s in points}
    )
    for panel, corruption in zip(axes.flat, corruptions, strict=False):
        for arm in ordered_regularizers(accuracy):
            points = accuracy[arm].get(corruption, {})
            if not points:
                continue
            xs = sorted(points)
            panel.errorbar(
                xs,
                [points[x][0] for x in xs],
                yerr=[_std_or_zero(points[x][1]) for x in xs],
                capsize=2,
                linewidth=1.4,
                markersize=5,
                **styles[arm],
            )
        label = "mean over corruptions" if corruption == "mean" else corruption.replace("_", " ")
        panel.set_title(label, fontsize=10)
        panel.set_xticks(severities)
        panel.set_xticklabels(["clean" if s == 0 else str(s) for s in severities])
        panel.grid(alpha=0.3)
    for panel in axes[-1]:
        panel.set_xlabel("severity")
    for panel in axes[:, 0]:
        panel.set_ylabel(_METRIC_LABELS[metric])
    for panel in list(axes.flat)[len(corruptions) :]:
        panel.set_visible(False)
    _figure_legend(figure, axes)
    figure.suptitle(
        title
        or f"Test {_METRIC_LABELS[metric]} against corruption severity "
        "(mean over seeds, bars: std)",
    )
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    return save_figure(figure, out_path, bbox_inches="tight")


def plot_training_fraction(
    accuracy: Mapping[str, Mapping[float, MeanStd]],
    out_path: str | Path,
    *,
    metric: str = "top1",
    title: str | None = None,
    styles: Styles | None = None,
) -> Path:
    """Accuracy against the fraction of the training set used, a line per arm.

    Args:
        accuracy: ``accuracy[arm][fraction] = (mean, std)``, fraction in (0, 1].
        out_path: the PNG to write.
        metric: ``"top1"`` or ``"top5"``, for the axis label.
        title: figure title.
        styles: the style of each arm (default: :func:`arm_styles` of ``accuracy``'s arms).

    Returns:
        ``out_path`` as a Path.

    Raises:
        ValueError: bad metric, or no data at all.
    """
    check_choice("metric", metric, _METRIC_LABELS)
    _check_not_empty("the training-fraction figure", accuracy)
    styles = _styles_for(accuracy, styles)
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    fractions = set()
    for arm in ordered_regularizers(accuracy):
        points = accuracy[arm]
        if not points:
            continue
        xs = sorted(points)
        fractions.update(xs)
        axis.errorbar(
            [100 * x for x in xs],
            [points[x][0] for x in xs],
            yerr=[_std_or_zero(points[x][1]) for x in xs],
            capsize=3,
            linewidth=1.6,
            markersize=6,
            **styles[arm],
        )
    axis.set_xticks([100 * x for x in sorted(fractions)])
    axis.set_xticklabels([f"{100 * x:g}" for x in sorted(fractions)])
    axis.set_xlabel("training set used (%)")
    axis.set_ylabel(f"test {_METRIC_LABELS[metric]}")
    axis.set_title(title or "Accuracy against training-set size (mean over seeds, bars: std)")
    axis.grid(alpha=0.3)
    axis.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    return save_figure(figure, out_path, bbox_inches="tight")


def plot_learning_curves(
    curves: Mapping[str, Sequence[tuple[int, float, float | None]]],
    out_path: str | Path,
    *,
    metric: str = "top1",
    average_last: int | None = None,
    title: str | None = None,
    styles: Styles | None = None,
) -> Path:
    """Test accuracy against epoch, a line per arm with a shaded band of ±1 std.

    Args:
        curves: ``curves[arm] = [(epoch, mean, std), ...]`` over seeds; std None (one
            seed) draws no band.
        out_path: the PNG to write.
        metric: ``"top1"`` or ``"top5"``, for the axis label.
        average_last: K; when given, the last K epochs (those the reported metric averages)
            are shaded.
        title: figure title.
        styles: the style of each arm (default: :func:`arm_styles` of ``curves``' arms).

    Returns:
        ``out_path`` as a Path.

    Raises:
        ValueError: bad metric, or no data at all.
    """
    check_choice("metric", metric, _METRIC_LABELS)
    _check_not_empty("the learning-curve figure", curves)
    styles = _styles_for(curves, styles)
    if average_last is not None and (isinstance(average_last, bool) or average_last < 1):
        raise ValueError(f"average_last has to be a positive integer, but got {average_last!r}")
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.8, 4.2))
    for arm in ordered_regularizers(curves):
        points = sorted(curves[arm])
        if not points:
            continue
        epochs = [epoch for epoch, _, _ in points]
        means = [mean for _, mean, _ in points]
        stds = [_std_or_zero(std) for _, _, std in points]
        style = dict(styles[arm])
        # Markers only on short curves: on long schedules they hide the line.
        marker = style.pop("marker")
        if len(points) > 30:
            marker = None
        axis.plot(epochs, means, marker=marker, markersize=4, linewidth=1.6, **style)
        if any(stds):
            axis.fill_between(
                epochs,
                [m - s for m, s in zip(means, stds, strict=True)],
                [m + s for m, s in zip(means, stds, strict=True)],
                color=style["color"],
                alpha=0.18,
                linewidth=0,
            )
    last_epoch = max(epoch for points in curves.values() for epoch, _, _ in points)
    if average_last is not None:
        axis.axvspan(
            last_epoch - average_last + 0.5,
            last_epoch,
            color="#bbbbbb",
            alpha=0.25,
            linewidth=0,
            zorder=0,
            label=f"last {average_last} epochs (averaged)",
        )
    axis.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    axis.set_xlabel("epoch")
    axis.set_ylabel(f"test {_METRIC_LABELS[metric]}")
    axis.set_title(title or "Learning curves (mean over seeds, band: ±1 std)")
    axis.grid(alpha=0.3)
    axis.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    return save_figure(figure, out_path, bbox_inches="tight")


def _figure_legend(figure, axes) -> None:
    """One legend under all panels: inside a panel it would cover lines."""
    handles, labels = {}, []
    for panel in axes.flat:
        for handle, label in zip(*panel.get_legend_handles_labels(), strict=True):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    figure.legend(
        [handles[label] for label in labels],
        labels,
        loc="lower center",
        ncol=min(len(labels), 6),
        frameon=False,
    )
