"""DropCluster in a model and a training loop that are not this package's.

A torchvision ResNet-18 learns Fashion-MNIST with a DropCluster2d attached after its stem's
ReLU (64 x 14 x 14 maps on 28 x 28 images), clusters refitted every ``--refit-every`` epochs from
the training images. One process::

    python examples/own_model.py --epochs 4 --train-images 10000

Several (DistributedDataParallel; each rank trains on its shard, rank 0 fits the clusters and
broadcasts them)::

    torchrun --nproc-per-node 2 examples/own_model.py --epochs 4 --train-images 10000

Without torchvision installed, the same layout (module names included) is built here, so the
script runs with torch and dropcluster alone.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn

from dropcluster.data import load_dataset
from dropcluster.nn import DropCluster2d, RefitSchedule, attach

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST's training-set pixel statistics


def resnet18(num_classes: int) -> nn.Module:
    try:
        from torchvision.models import resnet18 as torchvision_resnet18
    except ImportError:
        return _ResNet18(num_classes)
    return torchvision_resnet18(num_classes=num_classes)


class _BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class _ResNet18(nn.Module):
    """torchvision's ResNet-18 layout: conv1, bn1, relu, maxpool, layer1-4, avgpool, fc."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        for index, (inplanes, planes, stride) in enumerate(widths, start=1):
            first, second = _BasicBlock(inplanes, planes, stride), _BasicBlock(planes, planes)
            self.add_module(f"layer{index}", nn.Sequential(first, second))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--refit-every", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    device = torch.device(
        f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    )
    torch.manual_seed(args.seed)  # the same initial weights on every rank

    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    train_x = ((train.images[: args.train_images].float() / 255 - MEAN) / STD).to(device)
    train_y = train.labels[: args.train_images].to(device)
    test_x = ((test.images.float() / 255 - MEAN) / STD).to(device)

    model = resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # greyscale input; names unchanged
    drop = attach(model, "relu", DropCluster2d(args.p, 15, input_shape=(64, 14, 14)))
    model = model.to(device)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    refits = RefitSchedule(every=args.refit_every, n_images=512)
    generator = torch.Generator().manual_seed(args.seed)

    for epoch in range(args.epochs):
        start = time.perf_counter()
        fit = refits.step(model, train_x, epoch)  # every rank calls it; rank 0 fits
        order = torch.randperm(train_x.shape[0], generator=generator)[rank::world].to(device)
        model.train()
        for batch in order.split(args.batch_size // world):
            loss = nn.functional.cross_entropy(model(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            predictions = torch.cat([model(chunk).argmax(1) for chunk in test_x.split(1000)])
        accuracy = 100.0 * float((predictions.cpu() == test.labels).float().mean())
        if rank == 0:
            refitted = f", refit: {fit.structured[0]}/64 structured" if fit else ""
            print(
                f"epoch {epoch + 1}/{args.epochs}: loss {float(loss.detach()):.3f}, test top-1 "
                f"{accuracy:.2f}% ({time.perf_counter() - start:.0f} s){refitted}",
                flush=True,
            )
    if rank == 0:
        print(f"DropCluster2d after training: {drop}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
