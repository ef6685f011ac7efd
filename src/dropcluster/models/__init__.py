"""Models with named regularizer slots: pre-activation ResNets and LeNet-5.

``build_model("resnet50", n_classes=100)`` builds a model; ``place_regularizer(model,
"dropcluster", 0.1, "cifar100")`` installs a regularizer where the paper put it;
``model.set_regularizer("group2", module)`` puts one anywhere else (see ``model.slots``).
"""

from __future__ import annotations

from dropcluster.models.lenet import LeNet5, lenet5
from dropcluster.models.placement import (
    DEFAULT_FAMILY,
    PAPER_PLACEMENTS,
    Placement,
    dataset_family,
    place_regularizer,
    placement_for,
)
from dropcluster.models.resnet import PreActResNet, resnet18, resnet20, resnet50
from dropcluster.models.slots import Slot, SlottedModel
from dropcluster.plugins import plugin_model, plugin_names
from dropcluster.validation import check_choice

#: The built-in models; plugins add theirs (:func:`dropcluster.plugins.register_model`).
MODELS = ("resnet50", "resnet18", "resnet20", "lenet5")


def model_names(wanted: str | None = None) -> tuple[str, ...]:
    """The built-in names, then those registered by plugins (given ``wanted``, a name not
    known yet, the installed plugins are loaded first)."""
    wanted = None if wanted in MODELS else wanted
    return MODELS + plugin_names("model", wanted)


def build_model(
    name: str, n_classes: int, in_channels: int = 3, stem: str | None = None
) -> SlottedModel:
    """A model by name.

    Args:
        name: one of :data:`MODELS`, or a name registered by a plugin (built by its factory,
            ``factory(n_classes, in_channels, stem=stem)``).
        n_classes: outputs of the classifier.
        in_channels: image channels (1 grayscale, 3 colour).
        stem: ``"imagenet"`` or ``"cifar"`` for the ResNets; None: the model's default
            (``"imagenet"`` for resnet50/resnet18, the paper's; ``"cifar"`` for resnet20).
            LeNet-5 has no stem choice (only None).

    Raises:
        ValueError: unknown name (the message lists the valid ones) or stem.
    """
    check_choice("model", name, model_names(name))
    if name not in MODELS:
        model = plugin_model(name)(n_classes, in_channels, stem=stem)
        if not isinstance(model, SlottedModel):
            raise ValueError(
                f"the factory of model {name!r} should return a SlottedModel (a model with "
                f"regularizer slots: docs/own-model.md), but returned {type(model).__name__}"
            )
        return model
    if name == "lenet5":
        if stem is not None:
            raise ValueError(f"lenet5 has no stem choice, but got stem={stem!r}")
        return lenet5(in_channels, n_classes)
    builder = {"resnet50": resnet50, "resnet18": resnet18, "resnet20": resnet20}[name]
    if stem is None:
        return builder(n_classes=n_classes, in_channels=in_channels)
    return builder(n_classes=n_classes, in_channels=in_channels, stem=stem)


__all__ = [
    "DEFAULT_FAMILY",
    "MODELS",
    "PAPER_PLACEMENTS",
    "LeNet5",
    "Placement",
    "PreActResNet",
    "Slot",
    "SlottedModel",
    "build_model",
    "dataset_family",
    "lenet5",
    "model_names",
    "place_regularizer",
    "placement_for",
    "resnet18",
    "resnet20",
    "resnet50",
]
