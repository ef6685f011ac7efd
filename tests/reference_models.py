"""Hand-written copies of the module layouts of popular model libraries, for tests.

torchvision and timm are not dependencies, so their layouts are copied here: the same module
names, nesting and forward order (the names are what ``attach`` and a pretrained state_dict
depend on), with a ``width`` argument so tests run small. ``width=64`` gives torchvision's
ResNet-18 exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock: one ``relu`` module called twice per forward."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck (v1.5: the stride on the 3x3 conv), one ``relu``
    module called three times per forward; the branch ends in ``bn3``."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """torchvision.models.resnet18's layout: conv1, bn1, relu, maxpool, layer1-4, avgpool, fc.

    ``block=Bottleneck, layers=(3, 4, 6, 3)`` gives torchvision's ResNet-50 layout.
    """

    def __init__(
        self,
        n_classes: int = 1000,
        width: int = 64,
        block: type[nn.Module] = BasicBlock,
        layers: tuple[int, int, int, int] = (2, 2, 2, 2),
    ) -> None:
        super().__init__()
        self.block = block
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width * block.expansion, n_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        out_planes = planes * self.block.expansion
        if stride != 1 or self.inplanes != out_planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        layers = [self.block(self.inplanes, planes, stride, downsample)]
        self.inplanes = out_planes
        layers += [self.block(out_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class DepthwiseSeparable(nn.Module):
    """timm's DepthwiseSeparableConv: conv_dw, bn1, act1, conv_pw, bn2 (no residual here)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(
            in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.act1 = nn.ReLU(inplace=True)
        self.conv_pw = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv_pw(self.act1(self.bn1(self.conv_dw(x)))))


class TimmStyleNet(nn.Module):
    """timm's EfficientNet layout: conv_stem, bn1, act1, blocks (stages of blocks), conv_head,
    bn2, act2, global_pool, classifier."""

    def __init__(self, n_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.blocks = nn.Sequential(
            nn.Sequential(DepthwiseSeparable(width, width)),
            nn.Sequential(
                DepthwiseSeparable(width, 2 * width), DepthwiseSeparable(2 * width, 2 * width)
            ),
        )
        self.conv_head = nn.Conv2d(2 * width, 4 * width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * width)
        self.act2 = nn.ReLU(inplace=True)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * width, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        x = self.act2(self.bn2(self.conv_head(x)))
        return self.classifier(torch.flatten(self.global_pool(x), 1))


class TimmBasicBlock(nn.Module):
    """timm.models.resnet.BasicBlock: conv1, bn1, drop_block, act1, aa, conv2, bn2, se, act2,
    downsample, drop_path; ``drop_path`` (None without stochastic depth) acts on the branch
    after ``se``, before the addition."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        drop_path: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.drop_block = nn.Identity()
        self.act1 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = None
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.bn2(self.conv2(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act2(x)


class TimmGlobalPool(nn.Module):
    """timm's SelectAdaptivePool2d (``pool_type="avg"``, flattened): (N, C, H, W) -> (N, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.flatten(self.pool(x))


class TimmResNet18(nn.Module):
    """timm.models.resnet18's layout: conv1, bn1, act1, maxpool, layer1-4, global_pool, fc.

    ``drop_path`` (a factory of rate, e.g. ``StochasticDepth``) with ``drop_path_rate`` > 0
    gives block i of L (from 0) a drop-path module of rate ``drop_path_rate * i / (L - 1)``,
    timm's rule, and None where that rate is 0, as timm does.
    """

    def __init__(
        self,
        n_classes: int = 1000,
        width: int = 64,
        drop_path_rate: float = 0.0,
        drop_path: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        n_blocks, index, inplanes = 8, 0, width
        for stage in range(4):
            planes, blocks = width * 2**stage, []
            for block_index in range(2):
                stride = 2 if stage > 0 and block_index == 0 else 1
                downsample = None
                if stride != 1 or inplanes != planes:
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                        nn.BatchNorm2d(planes),
                    )
                rate = drop_path_rate * index / (n_blocks - 1)
                path = drop_path(rate) if drop_path is not None and rate > 0 else None
                blocks.append(TimmBasicBlock(inplanes, planes, stride, downsample, path))
                inplanes, index = planes, index + 1
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.global_pool = TimmGlobalPool()
        self.fc = nn.Linear(inplanes, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.global_pool(x))
