"""The tiny training configuration the loop's tests share: synthetic data, 3 epochs, a refit at
every epoch from epoch 1; each test file changes what its tests need."""

from __future__ import annotations

from dropcluster.train.config import TrainConfig


def tiny_config(**changes) -> TrainConfig:
    """A ResNet-20 with DropCluster (p = 0.2) on a quarter of the synthetic set, with
    ``changes`` applied (any :class:`TrainConfig` field)."""
    values = dict(
        dataset="synthetic",
        model="resnet20",
        regularizer="dropcluster",
        p=0.2,
        epochs=3,
        batch_size=32,
        lr=0.05,
        cluster_every=1,
        cluster_images=64,
        train_fraction=0.25,
        average_last=2,
        eval_batch_size=256,
        channels_last=False,
    )
    values.update(changes)
    return TrainConfig(**values)
