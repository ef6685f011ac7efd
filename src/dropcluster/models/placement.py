"""Where the paper puts each regularizer, as data, and one function that installs it.

Paper, "Experimental protocol": DropCluster after the first conv layer (k = 15 clusters);
Dropout and SpatialDropout after the conv layer in the fourth group of blocks; DropBlock with
5x5 blocks after the first group on CIFAR-100, 7x7 blocks after the fourth group on Tiny
ImageNet; StochasticDepth on every residual branch, rate p.

Data sets without a row of their own (``"cifar10"``, ``"fashion-mnist"``, ``"synthetic"``) use the
``"cifar100"`` row (:data:`DEFAULT_FAMILY`): small images, like CIFAR-100's. Models without
a fourth group (``resnet20``, ``lenet5``) map ``"group4"`` and ``"group4_inner"`` to their last
group (their ``slot_aliases``). A data set registered by a plugin uses the row of the family it
was registered with; a regularizer registered by a plugin takes the placement it was registered
with (:func:`dropcluster.plugins.register_regularizer`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from dropcluster.models.slots import SlottedModel
from dropcluster.nn import REGULARIZERS, build_regularizer
from dropcluster.nn.registry import regularizer_names
from dropcluster.plugins import plugin_dataset, plugin_regularizer
from dropcluster.validation import check_choice

__all__ = [
    "DEFAULT_FAMILY",
    "DEPTH_RULES",
    "PAPER_PLACEMENTS",
    "Placement",
    "check_placement",
    "dataset_family",
    "place_regularizer",
    "placement_for",
]


@dataclass(frozen=True)
class Placement:
    """A regularizer's slot (None: nowhere) and its default options in one data set family."""

    slot: str | None
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


def _row(dropblock: Placement) -> Mapping[str, Placement]:
    return MappingProxyType(
        {
            "none": Placement(None),
            "dropout": Placement("group4_inner"),
            "spatial_dropout": Placement("group4_inner"),
            "dropblock": dropblock,
            "dropcluster": Placement("stem", MappingProxyType({"n_clusters": 15})),
            "stochastic_depth": Placement("residual"),
        }
    )


#: Data set family -> regularizer name -> :class:`Placement` (the paper's protocol).
PAPER_PLACEMENTS: Mapping[str, Mapping[str, Placement]] = MappingProxyType(
    {
        "cifar100": _row(Placement("group1", MappingProxyType({"block_size": 5}))),
        "tiny-imagenet": _row(Placement("group4", MappingProxyType({"block_size": 7}))),
    }
)

#: The row used for data sets not in :data:`PAPER_PLACEMENTS`.
DEFAULT_FAMILY = "cifar100"

DEPTH_RULES = ("constant", "linear")


def check_placement(slot: str | Sequence[str] | None, depth_rule: str = "constant") -> list[str]:
    """Check ``place_regularizer``'s placement arguments (model-independent checks only: the
    slot names themselves are checked against a model by ``resolve_slot``).

    Returns:
        ``slot`` as a list of names (empty for None).

    Raises:
        ValueError: a slot that is neither a name nor a non-empty list of names, or an unknown
            depth rule.
    """
    check_choice("depth_rule", depth_rule, DEPTH_RULES)
    if slot is None:
        return []
    if isinstance(slot, str):
        return [slot]
    names = list(slot) if isinstance(slot, (list, tuple)) else []
    if not names or not all(isinstance(name, str) for name in names):
        raise ValueError(f"slot should be a slot name or a non-empty list, but got {slot!r}")
    return names


def dataset_family(dataset: str) -> str:
    """The row of :data:`PAPER_PLACEMENTS` that ``dataset``'s runs use: its own, the family a
    plugin registered it with, else :data:`DEFAULT_FAMILY`."""
    if dataset in PAPER_PLACEMENTS:
        return dataset
    entry = plugin_dataset(dataset) if isinstance(dataset, str) else None
    return entry.family if entry is not None else DEFAULT_FAMILY


def placement_for(name: str, dataset: str) -> Placement:
    """The paper's :class:`Placement` of regularizer ``name`` for ``dataset`` (for a
    regularizer registered by a plugin: the one it was registered with; ``Placement(None)``
    when it was registered without one).

    Raises:
        ValueError: unknown regularizer name (the message lists the valid ones).
    """
    check_choice("regularizer", name, regularizer_names(name))
    family = dataset_family(dataset)
    if name in REGULARIZERS:
        return PAPER_PLACEMENTS[family][name]
    placement = plugin_regularizer(name).placement
    if placement is None or isinstance(placement, Placement):
        return placement or Placement(None)
    return placement.get(dataset) or placement.get(family) or placement[DEFAULT_FAMILY]


def place_regularizer(
    model: SlottedModel,
    name: str,
    p: float,
    dataset: str = DEFAULT_FAMILY,
    *,
    slot: str | Sequence[str] | None = None,
    depth_rule: str = "constant",
    **options: Any,
) -> list[nn.Module]:
    """Build regularizer ``name`` with :func:`dropcluster.nn.build_regularizer` and install it
    where the paper put it for ``dataset``.

    Args:
        model: a model of :mod:`dropcluster.models` (anything with ``slots``).
        name: one of :data:`dropcluster.nn.REGULARIZERS` or a name registered by a plugin;
            ``"none"`` installs nothing (or, with ``slot``, empties that slot).
        p: drop rate in [0, 1).
        dataset: picks the row of :data:`PAPER_PLACEMENTS` (others: the row of their family,
            :func:`dataset_family`).
        slot: a slot to use instead of the paper's (paper names are mapped through the
            model's ``slot_aliases``, e.g. ``"group4"`` -> ``"group3"`` on ResNet-20), or a
            list of slots to install it in each (e.g. ``["group3", "group4"]``: DropBlock
            after the third and the fourth group, the paper's ablation).
        depth_rule: for per-block slots (``"residual"``, ``"group4_inner"``): ``"constant"``
            gives every block rate p; ``"linear"`` gives block l of L the rate ``p * l / L``
            (Huang et al. 2016's linear decay of survival, p being the last block's rate).
        **options: override the table's options (e.g. ``block_size=3``, ``n_clusters=10``).

    Returns:
        The installed modules, in forward order (empty for ``"none"``). A DropCluster2d stays
        the identity until fitted on its slot's input activations.

    Raises:
        ValueError: unknown regularizer, slot or depth rule, bad p or options.
        TypeError: ``model`` is not a :class:`~dropcluster.models.SlottedModel`.
    """
    if not isinstance(model, SlottedModel):
        raise TypeError(f"model should be a SlottedModel, but got {type(model).__name__}")
    placement = placement_for(name, dataset)
    targets = check_placement(slot if slot is not None else placement.slot, depth_rule)
    if not targets and name != "none":
        # Installing nothing would train the model without the regularizer, silently.
        raise ValueError(
            f"regularizer {name!r} has no slot: register it with a placement, or give its slot "
            f"(regularizer_options slot=..., one of {sorted(model.slots)})"
        )
    if name == "none":
        build_regularizer(name, p, **options)  # the same checks as the other names
        for target_name in targets:
            model.set_regularizer(model.resolve_slot(target_name), None)
        return []
    resolved = list(dict.fromkeys(model.resolve_slot(target_name) for target_name in targets))
    merged = {**placement.options, **options}
    # All built before any slot changes, so that a bad p or option leaves the model as it was.
    built = []
    for target_name in resolved:
        n_places = len(model.slots[target_name])
        if depth_rule == "linear":
            rates = [p * (index + 1) / n_places for index in range(n_places)]
        else:
            rates = [p] * n_places
        built.append([build_regularizer(name, rate, **merged) for rate in rates])
    installed = []
    for target_name, modules in zip(resolved, built, strict=True):
        installed += model.set_regularizer(target_name, iter(modules).__next__)
    return installed
