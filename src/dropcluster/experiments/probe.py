"""Cluster analysis of a first conv layer: ReNA clusters and Spatial Hopkins per channel.

This is the measurement behind the paper's Figures 1-4 in its simplest form: take a minibatch of
real images, run them through a first conv layer (optionally trained for a few steps first, so
its filters are not random), cluster every channel with :func:`dropcluster.rena.rena` under each
rule for unstructured channels, and measure each channel's Spatial Hopkins statistic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dropcluster.hopkins import spatial_hopkins
from dropcluster.rena import UNSTRUCTURED_MODES, ReNAResult, rena

__all__ = [
    "ChannelAnalysis",
    "FirstConvProbe",
    "analyze_activations",
    "train_probe",
]


@dataclass
class ChannelAnalysis:
    """The result of :func:`analyze_activations` for one minibatch of activations (N, C, H, W).

    Attributes:
        hopkins: (C,) float32 Spatial Hopkins per channel, mean over the batch.
        results: the ReNA result under each ``unstructured`` rule, keyed by rule name.
        seconds: wall time of each step, keyed by step name.
    """

    hopkins: Tensor
    results: dict[str, ReNAResult]
    seconds: dict[str, float] = field(default_factory=dict)


def analyze_activations(
    activations: Tensor,
    n_clusters: int = 15,
    *,
    rules: tuple[str, ...] = UNSTRUCTURED_MODES,
    generator: torch.Generator | None = None,
) -> ChannelAnalysis:
    """Cluster every channel under each rule and measure its Spatial Hopkins statistic.

    Args:
        activations: (N, C, H, W) float, a minibatch of one layer's outputs.
        n_clusters: clusters per channel (the paper: 15).
        rules: the ``unstructured`` rules of :func:`rena` to compare.
        generator: random source of the Spatial Hopkins sample.
    """
    seconds = {}
    start = time.perf_counter()
    hopkins = spatial_hopkins(activations, generator=generator, reduction="mean")
    seconds["spatial_hopkins"] = time.perf_counter() - start
    results = {}
    for rule in rules:
        start = time.perf_counter()
        if rule == "rena":
            # The paper's rule with the reference semantics, as the paper ran it.
            results[rule] = rena(
                activations, n_clusters, unstructured="rena", identical_neighbours="split"
            )
        else:
            results[rule] = rena(activations, n_clusters, unstructured=rule, generator=generator)
        seconds[f"rena[{rule}]"] = time.perf_counter() - start
    return ChannelAnalysis(hopkins=hopkins, results=results, seconds=seconds)


class FirstConvProbe(nn.Module):
    """A small classifier whose first conv layer is the one analysed.

    conv(k x k, ``channels``) -> ReLU -> max-pool 2 -> conv 3x3 (64) -> ReLU -> global average
    pool -> linear. Training it for a few hundred steps gives first-layer filters that respond to
    edges and textures, as trained networks' do, instead of random ones.
    """

    def __init__(self, in_channels: int, channels: int, kernel_size: int, n_classes: int):
        super().__init__()
        self.first_conv = nn.Conv2d(in_channels, channels, kernel_size, padding=kernel_size // 2)
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, n_classes),
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.body(self.first_conv(images))

    @torch.no_grad()
    def first_conv_activations(self, images: Tensor) -> Tensor:
        """(N, C, H, W) float32 outputs of the first conv layer followed by its ReLU."""
        return torch.relu(self.first_conv(images))


def train_probe(
    probe: FirstConvProbe,
    images: Tensor,
    labels: Tensor,
    steps: int,
    *,
    batch_size: int = 128,
    lr: float = 0.05,
    generator: torch.Generator | None = None,
) -> float:
    """Train ``probe`` with SGD for ``steps`` minibatches; returns the last 20 steps' accuracy.

    Args:
        images: (N, C, H, W) float32, normalised.
        labels: (N,) int64 class indices.
    """
    if steps == 0:
        return float("nan")
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9)
    correct = []
    probe.train()
    for _ in range(steps):
        index = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        logits = probe(images[index])
        loss = nn.functional.cross_entropy(logits, labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        correct.append((logits.argmax(1) == labels[index]).float().mean().item())
    probe.eval()
    return sum(correct[-20:]) / len(correct[-20:])
