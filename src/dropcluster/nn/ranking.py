"""Which layer? Rank the places of a model by the spatial structure of their activations.

The paper puts DropCluster after the first conv layer because its activations are the most
structured: deeper maps drift towards a Spatial Hopkins of 0.5, no structure (its Figure 8).
:func:`rank_layers` measures that drift on any model: it runs a few batches in evaluation mode
without gradients, captures the activations at each place, and reports per place the Spatial
Hopkins distribution over channels, the fraction of channels ReNA calls structured, the map size
and the channel count, sorted from the most structured place down.

Which places (``modules=None``): the places a regularizer would go.

- a model with slots (this project's models, anything with a ``slots`` mapping of name ->
  modules): every slot, each block's own for per-block slots, measured on the slot's input, the
  activations the regularizer in that slot sees (``"stem"``: after the first conv layer's
  BN-ReLU);
- any other model: the output of every ``nn.Conv1d``/``Conv2d``/``Conv3d``, the conv layer's
  output activations the paper measures.

Named places (``modules=["layer1.0.bn1", ...]``) are measured on the module's output, what
``attach(model, after=name, ...)`` would regularize (the names of ``named_modules()``): name the
activation that follows a conv (torchvision's stem: ``"relu"``) to measure after it.
``modules="convs"`` or ``"slots"`` picks one of the two default sets.

Measuring many places, and ranking them by Spatial Hopkins, is this project's addition: the
paper measures the first conv layer and a few deeper ones (Figures 4 and 8). The paper's
statistic is 2-D; 1-D and 3-D maps (``Conv1d``/``Conv3d`` outputs) use the n-D Spatial Hopkins
and ReNA of :mod:`dropcluster.hopkins` and :mod:`dropcluster.rena`, this project's extension.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dropcluster.hopkins import NO_TENDENCY, spatial_hopkins
from dropcluster.nn.fitting import evaluating, model_input, unwrap
from dropcluster.rena import check_modes, rena
from dropcluster.validation import check_int

__all__ = [
    "LayerRanking",
    "LayerStructure",
    "PLACE_SETS",
    "rank_layers",
]


#: The named sets of places ``modules=`` accepts besides a list of module names.
PLACE_SETS = ("convs", "slots")

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_QUARTILES = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class LayerStructure:
    """The spatial structure of the activations at one place of a model.

    Attributes:
        name: the module's name in ``named_modules()`` of the (unwrapped) model, the ``after``
            of :func:`~dropcluster.nn.attach`.
        order: forward order, 0 for the place the forward reaches first (depth).
        slot: the slot's name when the place is a slot of the model (``"stem"``,
            ``"residual"``...), else None.
        channels: C, channels of the activations.
        size: the map's spatial size, ``(L,)``, ``(H, W)`` or ``(D, H, W)``.
        hopkins: (C,) per-channel Spatial Hopkins S, each the mean over the images.
        structured: channels ReNA calls structured (the ``unstructured`` rule of the ranking).
    """

    name: str
    order: int
    slot: str | None
    channels: int
    size: tuple[int, ...]
    hopkins: tuple[float, ...]
    structured: int

    @property
    def hopkins_mean(self) -> float:
        """Mean over channels of the per-channel S (0.5: no structure; 1: smooth maps)."""
        return math.fsum(self.hopkins) / len(self.hopkins)

    @property
    def hopkins_quartiles(self) -> tuple[float, float, float]:
        """First quartile, median and third quartile of the per-channel S over channels
        (linear interpolation, as ``torch.quantile``)."""
        values = torch.tensor(self.hopkins, dtype=torch.float64)
        quartiles = torch.quantile(values, torch.tensor(_QUARTILES, dtype=torch.float64))
        return tuple(float(q) for q in quartiles)

    @property
    def structured_fraction(self) -> float:
        """Structured channels / channels."""
        return self.structured / self.channels

    def to_row(self) -> dict[str, Any]:
        """The place as a flat dict of plain values (JSON, CSV)."""
        q1, median, q3 = self.hopkins_quartiles
        return {
            "module": self.name,
            "order": self.order,
            "slot": self.slot,
            "channels": self.channels,
            "size": "x".join(str(side) for side in self.size),
            "hopkins_mean": self.hopkins_mean,
            "hopkins_q1": q1,
            "hopkins_median": median,
            "hopkins_q3": q3,
            "structured": self.structured,
            "structured_fraction": self.structured_fraction,
        }


@dataclass(frozen=True)
class LayerRanking:
    """What :func:`rank_layers` measured: the places, most structured first.

    A sequence of :class:`LayerStructure` (``ranking[0]``, ``len``, iteration), sorted by the
    mean per-channel Spatial Hopkins, highest first; ties by the structured fraction, highest
    first, then by depth, shallowest first.

    Attributes:
        layers: the places, sorted.
        n_images: images whose activations were measured.
        n_clusters: clusters per channel of ReNA's verdict.
        unstructured: ReNA's rule for unstructured channels (see :func:`dropcluster.rena.rena`).
        skipped: ``"name (why)"`` for each default place that could not be measured (not called
            by the forward, maps smaller than 3 along an axis, not an (N, C, ...) map).
    """

    layers: tuple[LayerStructure, ...]
    n_images: int
    n_clusters: int
    unstructured: str
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LayerStructure]:
        return iter(self.layers)

    def __getitem__(self, index: int) -> LayerStructure:
        return self.layers[index]

    @property
    def best(self) -> str:
        """The most structured place's module name (``attach(model, ranking.best, layer)``)."""
        return self.layers[0].name

    def by_depth(self) -> tuple[LayerStructure, ...]:
        """The places in forward order (shallowest first)."""
        return tuple(sorted(self.layers, key=lambda layer: layer.order))

    def to_rows(self) -> list[dict[str, Any]]:
        """One flat dict per place, in rank order, with its ``rank`` (from 1)."""
        return [{"rank": rank, **layer.to_row()} for rank, layer in enumerate(self.layers, 1)]

    def format(self) -> str:
        """A plain-text table, one line per place in rank order, and a line saying what the
        columns are."""
        header = ("rank", "module", "slot", "depth", "C", "map", "S mean", "S q1", "S med", "S q3")
        lines = [(*header, "structured")]
        for row in self.to_rows():
            lines.append(
                (
                    str(row["rank"]),
                    row["module"],
                    row["slot"] or "-",
                    str(row["order"]),
                    str(row["channels"]),
                    row["size"],
                    *(f"{row[key]:.3f}" for key in _HOPKINS_COLUMNS),
                    f"{row['structured']}/{row['channels']} ({row['structured_fraction']:.0%})",
                )
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
        text = [
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
            for line in lines
        ]
        text.append(
            f"S: Spatial Hopkins per channel, mean over {self.n_images} images "
            f"({NO_TENDENCY}: no structure, 1: smooth maps); structured: ReNA's "
            f"{self.unstructured!r} rule, {self.n_clusters} clusters; depth: forward order"
        )
        text.extend(f"skipped: {reason}" for reason in self.skipped)
        return "\n".join(text)

    def __str__(self) -> str:
        return self.format()


_HOPKINS_COLUMNS = ("hopkins_mean", "hopkins_q1", "hopkins_median", "hopkins_q3")


@torch.no_grad()
def rank_layers(
    model: nn.Module,
    data: Tensor | Iterable[Any],
    *,
    modules: Sequence[str] | str | None = None,
    n_batches: int = 2,
    batch_size: int = 64,
    n_clusters: int = 15,
    unstructured: str = "dead",
    prepare: Callable[[Any], Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> LayerRanking:
    """Rank the places of ``model`` by the spatial structure of their activations.

    Runs the first ``n_batches`` batches of ``data`` through the model in evaluation mode
    without gradients (each submodule's training mode is restored afterwards), captures the
    activations at every place (see the module docstring: by default the slots of a model with
    slots, else every conv layer's output), and measures per place:

    - Spatial Hopkins S of every channel (:func:`dropcluster.hopkins.spatial_hopkins` with
      ``reduction="mean"``: each channel's mean over the images), summarised over channels by
      its mean and quartiles;
    - the channels ReNA calls structured (:func:`dropcluster.rena.rena` on all the images at
      once, ``n_clusters`` clusters, the ``unstructured`` rule; the default ``"dead"`` is
      :class:`~dropcluster.nn.DropCluster2d`'s: a channel constant over every image is
      unstructured).

    A module called several times in one forward is measured at its first call. A named module
    is measured on its own output, before any regularizer attached to it; a slot on its input.
    The activations of every place are kept (float32, on the model's device) until the
    forward passes end, since ReNA's verdict needs all the images at once: mind the memory of
    ``n_batches * batch_size`` images at many places of a large model.

    Args:
        model: any module, possibly compiled or wrapped in (Distributed)DataParallel.
        data: a (N, ...) tensor of model inputs, or a map-style dataset whose items are inputs
            or ``(input, label)`` pairs: batches of ``batch_size`` in index order (shuffle it
            first for a random sample); or an iterable of batches (a DataLoader): its first
            ``n_batches``, each a tensor or a tuple/list whose first item is the input.
        modules: None (the default places), ``"convs"``, ``"slots"``, or module names as
            ``named_modules()`` of the unwrapped model gives them.
        n_batches: batches run, >= 1.
        batch_size: images per batch drawn from a tensor or a dataset.
        n_clusters: clusters per channel of ReNA's verdict (the paper's 15).
        unstructured: ReNA's rule for unstructured channels: ``"dead"``, ``"rena"`` (the
            paper's), ``"hopkins"`` or ``"none"``.
        prepare: turns a batch into the model's input (normalisation, device); None: tensors
            go to the model's device as they are.
        generator: random source of Spatial Hopkins' sampled sites (and of the ``"hopkins"``
            rule), drawn from place by place in depth order; None: torch's global generator.

    Returns:
        A :class:`LayerRanking`, most structured place first (``.best`` names it).

    Raises:
        ValueError: bad arguments; a named module that is not in the model, not called by the
            forward, or whose output is not an (N, C, L), (N, C, H, W) or (N, C, D, H, W)
            tensor with maps of at least 3 along each axis; fewer than 2 images; no place to
            measure.

    Example::

        ranking = rank_layers(model, test_images[:256], prepare=normalize)
        print(ranking)                   # the table
        attach(model, ranking, DropCluster2d(0.1))  # after ranking.best
    """
    n_batches = check_int("n_batches", n_batches, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    n_clusters = check_int("n_clusters", n_clusters, minimum=1)
    check_modes(unstructured, "merge")
    inner = unwrap(model)
    slots = _slot_names(inner)
    places, named = _places(inner, modules, slots)
    captured, order, images = _capture(
        model, inner, places, slots, data, n_batches, batch_size, prepare
    )
    layers: list[LayerStructure] = []
    skipped: list[str] = []
    for name in sorted(places, key=lambda name: order.get(name, math.inf)):
        problem = _problem(captured.get(name))
        if problem is None:
            activations = torch.cat(captured[name])
            layers.append(
                _measure(
                    name,
                    order[name],
                    slots.get(id(places[name])),
                    activations,
                    n_clusters,
                    unstructured,
                    generator,
                )
            )
        elif named:
            raise ValueError(f"cannot measure module {name!r}: {problem}")
        else:
            skipped.append(f"{name} ({problem})")
    if not layers:
        raise ValueError(
            f"no place of {type(inner).__name__} could be measured: {'; '.join(skipped)}"
        )
    ranked = sorted(
        layers, key=lambda layer: (-layer.hopkins_mean, -layer.structured_fraction, layer.order)
    )
    return LayerRanking(tuple(ranked), images, n_clusters, unstructured, tuple(skipped))


def _slot_names(model: nn.Module) -> dict[int, str]:
    """``id(module) -> slot name`` for the slots of a model with slots (else empty)."""
    slots = getattr(model, "slots", None)
    if not isinstance(slots, Mapping):
        return {}
    return {
        id(module): name
        for name, modules in slots.items()
        for module in (modules if isinstance(modules, (tuple, list)) else (modules,))
        if isinstance(module, nn.Module)
    }


def _places(
    model: nn.Module, modules: Sequence[str] | str | None, slots: dict[int, str]
) -> tuple[dict[str, nn.Module], bool]:
    """The places to measure, ``{name: module}`` in ``named_modules()`` order, and whether the
    caller named them (then every one must be measurable)."""
    if modules is None or isinstance(modules, str):
        wanted = modules if modules is not None else ("slots" if slots else "convs")
        if wanted not in PLACE_SETS:
            raise ValueError(
                f"modules should be None, {' or '.join(map(repr, PLACE_SETS))}, or a list of "
                f"module names, but got {modules!r}"
            )
        if wanted == "slots":
            found = {name: m for name, m in model.named_modules() if id(m) in slots}
        else:
            found = {name: m for name, m in model.named_modules() if isinstance(m, _CONVS)}
        if not found:
            raise ValueError(f"{type(model).__name__} has no {wanted[:-1]} to measure")
        return found, False
    names = list(modules)
    if not names or not all(isinstance(name, str) for name in names):
        raise ValueError(f"modules should be a non-empty list of module names, but got {modules!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"modules should name each module once, but got {names}")
    found = {}
    for name in names:
        try:
            found[name] = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"{type(model).__name__} has no submodule {name!r} (names are those of "
                f"named_modules())"
            ) from None
    return found, True


def _capture(model, inner, places, slots, data, n_batches, batch_size, prepare):
    """Run the batches; returns ``{name: [activations per batch]}``, ``{name: depth order}``
    and the number of images. A slot's input is captured, any other module's output."""
    captured: dict[str, list[Tensor | None]] = {name: [] for name in places}
    order: dict[str, int] = {}
    seen_this_forward: set[str] = set()

    def keep(name: str, value: Any) -> None:
        if name in seen_this_forward:
            return  # measured at its first call of each forward
        seen_this_forward.add(name)
        order.setdefault(name, len(order))
        # A copy: an in-place activation later in the forward must not change what is kept.
        kept = value.detach().to(torch.float32, copy=True) if isinstance(value, Tensor) else None
        captured[name].append(kept)

    handles = []
    for name, module in places.items():
        if id(module) in slots:
            hook = _InputHook(name, keep)
            handles.append(module.register_forward_pre_hook(hook))
        else:
            # prepend: the module's own output, before a regularizer attached to it.
            handles.append(module.register_forward_hook(_OutputHook(name, keep), prepend=True))
    device = next((t.device for t in inner.parameters()), None)
    images = 0
    try:
        with evaluating(inner):
            for batch in _batches(data, n_batches, batch_size):
                inputs = prepare(batch) if prepare is not None else model_input(batch, device)
                seen_this_forward.clear()
                model(inputs)
                images += int(inputs.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    if images < 2:
        raise ValueError(f"rank_layers needs at least 2 images, but the data gave {images}")
    return captured, order, images


class _InputHook:
    """Forward pre-hook: hands the module's first input to ``keep``."""

    def __init__(self, name: str, keep: Callable[[str, Any], None]) -> None:
        self.name, self.keep = name, keep

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        self.keep(self.name, inputs[0] if inputs else None)


class _OutputHook:
    """Forward hook: hands the module's output to ``keep``."""

    def __init__(self, name: str, keep: Callable[[str, Any], None]) -> None:
        self.name, self.keep = name, keep

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        self.keep(self.name, output)


def _batches(data, n_batches: int, batch_size: int) -> Iterator[Any]:
    """The first ``n_batches`` batches: slices of a tensor, collated items of a map-style
    dataset, or an iterable's own batches."""
    if isinstance(data, Tensor):
        return (
            data[start : start + batch_size]
            for start in _starts(data.shape[0], n_batches, batch_size)
        )
    if _map_style(data):
        from torch.utils.data import default_collate

        return (
            default_collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
            for start in _starts(len(data), n_batches, batch_size)
        )
    return itertools.islice(iter(data), n_batches)


def _starts(length: int, n_batches: int, batch_size: int) -> range:
    return range(0, min(length, n_batches * batch_size), batch_size)


def _map_style(data) -> bool:
    """A map-style dataset (``__len__`` and ``__getitem__``); a list or tuple holds batches."""
    from torch.utils.data import IterableDataset

    if isinstance(data, (list, tuple, str, bytes, dict, IterableDataset)):
        return False
    return hasattr(data, "__len__") and hasattr(data, "__getitem__")


def _problem(batches: list[Tensor | None] | None) -> str | None:
    """Why the captured activations cannot be measured, or None."""
    if not batches:
        return "the forward did not call it"
    first = batches[0]
    if first is None or first.dim() not in (3, 4, 5):
        shape = "no tensor" if first is None else f"shape {tuple(first.shape)}"
        return f"expected an (N, C, L), (N, C, H, W) or (N, C, D, H, W) tensor, got {shape}"
    if any(b is None or b.shape[1:] != first.shape[1:] for b in batches):
        return "its maps change shape from batch to batch"
    if min(first.shape[2:]) < 3:
        size = "x".join(map(str, first.shape[2:]))
        return f"maps of {size}, smaller than 3 along an axis (Spatial Hopkins needs 3)"
    return None


def _measure(
    name: str,
    order: int,
    slot: str | None,
    activations: Tensor,
    n_clusters: int,
    unstructured: str,
    generator: torch.Generator | None,
) -> LayerStructure:
    """Spatial Hopkins per channel and ReNA's verdict on (N, C, *size) activations."""
    hopkins = spatial_hopkins(activations, generator=generator, reduction="mean")
    size = tuple(int(side) for side in activations.shape[2:])
    # ReNA clamps k to the sites with a warning; the verdict is still meaningful then.
    k = min(n_clusters, math.prod(size))
    verdict = rena(activations, k, unstructured=unstructured, generator=generator)
    return LayerStructure(
        name=name,
        order=order,
        slot=slot,
        channels=int(activations.shape[1]),
        size=size,
        hopkins=tuple(float(value) for value in hopkins.cpu()),
        structured=verdict.n_structured,
    )
