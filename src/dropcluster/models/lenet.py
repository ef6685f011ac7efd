"""LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling: the paper's cluster-visualisation model.

conv 5x5, 6 channels (padding 2) -> ReLU -> 2x2 max-pool -> conv 5x5, 16 channels -> ReLU ->
max-pool to 5x5 -> fc 120 -> fc 84 -> fc n_classes. The second pooling is adaptive so that
28x28 and 32x32 images both work: on 28x28 images (Fashion-MNIST, padded by 2 as in the
original's 32x32 input) it is the classic 2x2 pool (10x10 -> 5x5); on 32x32 images it pools
12x12 maps to 5x5 with overlapping 3x3 windows.

Slots: ``"stem"`` (the first conv layer's activations, after its ReLU and before its pooling:
where DropCluster goes, as in the ResNets) and ``"group1"`` (after the second conv's ReLU, before
its pooling). The paper's ``"group4"`` and ``"group4_inner"`` placements go to ``"group1"``;
LeNet has no residual blocks. (Its ReLUs are not in place: a hook that keeps a slot's input
must keep it unchanged.)
"""

from __future__ import annotations

from torch import Tensor, nn

from dropcluster.models.slots import Slot, SlottedModel
from dropcluster.validation import check_int

__all__ = [
    "LeNet5",
    "lenet5",
]


class LeNet5(SlottedModel):
    """LeNet-5 with a ``"stem"`` and a ``"group1"`` slot (see the module docstring).

    Args:
        in_channels: image channels (1 grayscale, 3 colour).
        n_classes: outputs of the classifier.

    Shape:
        input (N, in_channels, H, W) with H, W >= 18 (28 or 32 intended) -> logits (N, n_classes).
    """

    slot_aliases = {"group4": "group1", "group4_inner": "group1"}

    def __init__(self, in_channels: int = 1, n_classes: int = 10) -> None:
        super().__init__()
        check_int("in_channels", in_channels, minimum=1)
        check_int("n_classes", n_classes, minimum=1)
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.stem = Slot("stem")
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.group1 = Slot("group1")
        self.pool2 = nn.AdaptiveMaxPool2d(5)
        self.relu = nn.ReLU()
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, n_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.stem(self.relu(self.conv1(x))))
        x = self.pool2(self.group1(self.relu(self.conv2(x))))
        return self.classifier(x.flatten(1))


def lenet5(in_channels: int = 1, n_classes: int = 10) -> LeNet5:
    """LeNet-5 for 28x28 or 32x32 images (see :class:`LeNet5`)."""
    return LeNet5(in_channels, n_classes)
