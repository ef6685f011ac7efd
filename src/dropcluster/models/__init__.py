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
    place_regularizer,
    placement_for,
)
from dropcluster.models.resnet import PreActResNet, resnet18, resnet20, resnet50
from dropcluster.models.slots import Slot, SlottedModel
from dropcluster.validation import check_choice

MODELS = ("resnet50", "resnet18", "resnet20", "lenet5")


def build_model(
    name: str, n_classes: int, in_channels: int = 3, stem: str | None = None
) -> SlottedModel:
    """A model by name.

    Args:
        name: one of :data:`MODELS`.
        n_classes: outputs of the classifier.
        in_channels: image channels (1 grayscale, 3 colour).
        stem: ``"imagenet"`` or ``"cifar"`` for the ResNets; None: the model's default
            (``"imagenet"`` for resnet50/resnet18, the paper's; ``"cifar"`` for resnet20).
            LeNet-5 has no stem choice (only None).

    Raises:
        ValueError: unknown name (the message lists the valid ones) or stem.
    """
    check_choice("model", name, MODELS)
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
    "lenet5",
    "place_regularizer",
    "placement_for",
    "resnet18",
    "resnet20",
    "resnet50",
]
