"""Pre-activation ResNets with regularizer slots.

He, Zhang, Ren and Sun, "Identity mappings in deep residual networks" (ECCV 2016), the ResNet
the DropCluster paper cites: each block computes ``shortcut + branch(BN-ReLU(x))`` with nothing
after the addition, and one BN-ReLU follows the last block, before global average pooling and
the linear classifier. A projection shortcut (1x1 conv) takes the pre-activated input, as in
the paper's Fig. 5 and timm's ``ResNetV2``.

Stems:

- ``"imagenet"``: 7x7 stride-2 conv -> BN -> ReLU -> 3x3 stride-2 max-pool, the stem of the
  pre-activation ResNet's reference implementation (``models/preresnet.lua`` in
  facebook/fb.resnet.torch, which the paper's ResNet citation points to). On 32x32 CIFAR-100
  images the first conv layer's activations are 64 x 16 x 16 (as the paper states), 64 x 32 x 32
  on Tiny ImageNet; after the max-pool the groups see 8 x 8 (CIFAR) and 16 x 16 (Tiny
  ImageNet), so the fourth group's maps are 1 x 1 and 2 x 2.
- ``"cifar"``: 3x3 stride-1 conv -> BN -> ReLU, no max-pool. The reference's CIFAR network has
  no BN-ReLU in its stem but pre-activates the first block's input for both of its paths
  ("both_preact"), which computes the same function; putting the BN-ReLU in the stem gives both
  stems the same DropCluster input: activations after a ReLU.

Because the stem ends in BN-ReLU, the first block of the first group does not pre-activate its
input again (the reference's "no_preact" block): its branch and its shortcut both take the stem's
activations. The parameter count is the same as with a plain conv stem: the stem's BN replaces
that block's first BN.

Slots (see :mod:`dropcluster.models.slots`):

- ``"stem"``: after the stem's ReLU, before the max-pool; its input is the first conv layer's
  activations (where DropCluster goes and what ReNA is fitted on). A channel whose BN output is
  negative everywhere is exactly zero there: a dead channel, which DropCluster finds
  unstructured.
- ``"group1"`` ... ``"groupG"``: after each group of blocks.
- ``"group1_inner"`` ... ``"groupG_inner"``: in every block of that group, right after its 3x3
  conv (bottleneck: the only 3x3 conv; basic block: the first of its two 3x3 convs), before the
  next BN-ReLU. The paper puts Dropout and SpatialDropout in ``"group4_inner"``.
- ``"residual"``: in every block, on the residual branch's output before the addition (where
  StochasticDepth goes).

A 3-group network (:func:`resnet20`) has no ``"group4"`` slots; its ``slot_aliases`` map
``"group4"`` and ``"group4_inner"`` to its last group, which
:func:`dropcluster.models.place_regularizer` follows.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from dropcluster.models.slots import Slot, SlottedModel
from dropcluster.validation import check_choice, check_int

__all__ = [
    "BLOCKS",
    "STEMS",
    "PreActBasicBlock",
    "PreActBottleneck",
    "PreActResNet",
    "resnet18",
    "resnet20",
    "resnet50",
]


STEMS = ("imagenet", "cifar")
BLOCKS = ("basic", "bottleneck")


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3x3 (stride) -> inner slot -> BN-ReLU-conv3x3 -> residual slot, + shortcut.

    With ``preact=False`` the first BN-ReLU is left out: the input is already activated (the
    first block after a BN-ReLU stem).

    Shape:
        input (N, in_channels, H, W) -> output (N, width, H / stride, W / stride).
    """

    expansion = 1

    def __init__(
        self, in_channels: int, width: int, stride: int, group_name: str, preact: bool = True
    ) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.preact = preact
        self.norm1 = nn.BatchNorm2d(in_channels) if preact else nn.Identity()
        self.conv1 = _conv3x3(in_channels, width, stride)
        self.inner = Slot(f"{group_name}_inner")
        self.norm2 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, out_channels)
        self.residual = Slot("residual")
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (
            _conv1x1(in_channels, out_channels, stride)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu(self.norm1(x)) if self.preact else x
        shortcut = x if self.shortcut is None else self.shortcut(activated)
        out = self.inner(self.conv1(activated))
        out = self.conv2(self.relu(self.norm2(out)))
        return self.residual(out) + shortcut


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1 -> BN-ReLU-conv3x3 (stride) -> inner slot -> BN-ReLU-conv1x1 (x4) ->
    residual slot, + shortcut. The stride is on the 3x3 conv (as torchvision's ResNet v1.5).

    With ``preact=False`` the first BN-ReLU is left out: the input is already activated (the
    first block after a BN-ReLU stem).

    Shape:
        input (N, in_channels, H, W) -> output (N, 4 * width, H / stride, W / stride).
    """

    expansion = 4

    def __init__(
        self, in_channels: int, width: int, stride: int, group_name: str, preact: bool = True
    ) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.preact = preact
        self.norm1 = nn.BatchNorm2d(in_channels) if preact else nn.Identity()
        self.conv1 = _conv1x1(in_channels, width)
        self.norm2 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.inner = Slot(f"{group_name}_inner")
        self.norm3 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, out_channels)
        self.residual = Slot("residual")
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (
            _conv1x1(in_channels, out_channels, stride)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu(self.norm1(x)) if self.preact else x
        shortcut = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv1(activated)
        out = self.inner(self.conv2(self.relu(self.norm2(out))))
        out = self.conv3(self.relu(self.norm3(out)))
        return self.residual(out) + shortcut


_BLOCK_CLASSES = {"basic": PreActBasicBlock, "bottleneck": PreActBottleneck}


def _stem(stem: str, in_channels: int, width: int) -> tuple[nn.Conv2d, nn.Module]:
    """The first conv and the pooling after the stem's BN-ReLU (see "Stems" above)."""
    if stem == "imagenet":
        conv = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        return conv, nn.MaxPool2d(3, stride=2, padding=1)
    return _conv3x3(in_channels, width), nn.Identity()


def _groups(
    block_class: type[nn.Module], depths: Sequence[int], widths: Sequence[int], channels: int
) -> tuple[nn.ModuleList, int]:
    """The groups of residual blocks, each ending in its slot, and their output channels.

    The first block of every group but the first has stride 2.
    """
    groups = []
    for index, (depth, width) in enumerate(zip(depths, widths, strict=True)):
        group_name = f"group{index + 1}"
        blocks = []
        for block_index in range(depth):
            stride = 2 if index > 0 and block_index == 0 else 1
            # The stem ends in BN-ReLU: the very first block takes activations already.
            preact = index > 0 or block_index > 0
            blocks.append(block_class(channels, width, stride, group_name, preact))
            channels = width * block_class.expansion
        # The group's slot is its last module: slots are listed in forward order.
        groups.append(nn.Sequential(*blocks, Slot(group_name)))
    return nn.ModuleList(groups), channels


class PreActResNet(SlottedModel):
    """A pre-activation ResNet with named regularizer slots (see the module docstring).

    Args:
        block: ``"basic"`` or ``"bottleneck"``.
        depths: blocks per group, e.g. ``(3, 4, 6, 3)``.
        widths: 3x3-conv channels per group (a bottleneck group outputs 4x as many); the first
            block of every group but the first has stride 2.
        n_classes: outputs of the classifier.
        in_channels: image channels (1 grayscale, 3 colour).
        stem: ``"imagenet"`` (7x7 stride-2 conv, BN-ReLU, 3x3 stride-2 max-pool) or
            ``"cifar"`` (3x3 stride-1 conv, BN-ReLU, no pooling).

    Shape:
        input (N, in_channels, H, W) float, any memory format -> logits (N, n_classes).
    """

    def __init__(
        self,
        block: str,
        depths: Sequence[int],
        widths: Sequence[int],
        n_classes: int,
        in_channels: int = 3,
        stem: str = "imagenet",
    ) -> None:
        super().__init__()
        check_choice("block", block, BLOCKS)
        check_choice("stem", stem, STEMS)
        if len(depths) != len(widths) or not depths:
            raise ValueError(
                f"depths and widths should be non-empty and of equal length, but got {depths} "
                f"and {widths}"
            )
        for index, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            check_int(f"depths[{index}]", depth, minimum=1)
            check_int(f"widths[{index}]", width, minimum=1)
        check_int("n_classes", n_classes, minimum=1)
        check_int("in_channels", in_channels, minimum=1)
        self.block = block
        self.stem_kind = stem
        self.depths = tuple(depths)
        self.widths = tuple(widths)
        self.conv1, self.stem_pool = _stem(stem, in_channels, widths[0])
        self.stem_norm = nn.BatchNorm2d(widths[0])
        self.stem = Slot("stem")
        self.groups, channels = _groups(_BLOCK_CLASSES[block], depths, widths, widths[0])

        self.final_norm = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, n_classes)
        self.n_features = channels

        last = f"group{len(depths)}"
        self.slot_aliases = {
            f"group{k}{suffix}": f"{last}{suffix}"
            for k in range(len(depths) + 1, 5)
            for suffix in ("", "_inner")
        }
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, in_channels, H, W) images -> (N, n_features) pooled features."""
        x = self.stem_pool(self.stem(self.relu(self.stem_norm(self.conv1(x)))))
        for group in self.groups:
            x = group(x)
        x = self.relu(self.final_norm(x))
        return self.pool(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))

    def extra_repr(self) -> str:
        return f"block={self.block!r}, depths={self.depths}, stem={self.stem_kind!r}"


def resnet50(n_classes: int = 1000, in_channels: int = 3, stem: str = "imagenet") -> PreActResNet:
    """Pre-activation ResNet-50: bottleneck blocks (3, 4, 6, 3), widths 64-512, the paper's."""
    return PreActResNet(
        "bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), n_classes, in_channels, stem
    )


def resnet18(n_classes: int = 1000, in_channels: int = 3, stem: str = "imagenet") -> PreActResNet:
    """Pre-activation ResNet-18: basic blocks (2, 2, 2, 2), widths 64-512."""
    return PreActResNet("basic", (2, 2, 2, 2), (64, 128, 256, 512), n_classes, in_channels, stem)


def resnet20(n_classes: int = 10, in_channels: int = 3, stem: str = "cifar") -> PreActResNet:
    """Pre-activation ResNet-20 (He et al. 2016, CIFAR): 3 groups of 3 basic blocks, widths
    16/32/64, 16-channel stem; about 0.27M parameters, for CPU runs.

    It has slots ``"group1"`` to ``"group3"``; the paper's ``"group4"`` placements go to
    ``"group3"`` (``slot_aliases``).
    """
    return PreActResNet("basic", (3, 3, 3), (16, 32, 64), n_classes, in_channels, stem)
