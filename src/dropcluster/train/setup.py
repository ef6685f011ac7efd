"""Build everything a run needs from its config: data on the device, model, optimizer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dropcluster.data import (
    DeviceLoader,
    ImageDataset,
    load_dataset,
    normalize,
    stratified_subset,
)
from dropcluster.data.datasets import augment_preset
from dropcluster.models import build_model, place_regularizer
from dropcluster.nn import ClusterFit, DropCluster2d, fit_clusters
from dropcluster.train.config import TrainConfig
from dropcluster.train.distributed import SINGLE, Ranks

__all__ = [
    "Precision",
    "Run",
    "build_configured_model",
    "build_run",
    "eval_preparer",
]


@dataclass
class Precision:
    """How a run computes: autocast on CUDA when ``amp`` is set, with a gradient scaler for
    float16 (bfloat16 has float32's range and needs none).

    Attributes:
        autocast: whether training and evaluation run under autocast.
        dtype: the autocast dtype.
        scaler: the gradient scaler (disabled unless autocast to float16).
    """

    autocast: bool
    dtype: torch.dtype
    scaler: torch.amp.GradScaler

    @classmethod
    def of(cls, config: TrainConfig, device: torch.device) -> Precision:
        """The precision ``config`` asks for on ``device`` (mixed precision on CUDA only)."""
        autocast = device.type == "cuda" and config.amp
        dtype = getattr(torch, config.amp_dtype)
        scaler = torch.amp.GradScaler(device.type, enabled=autocast and dtype == torch.float16)
        return cls(autocast, dtype, scaler)

    @property
    def eval_dtype(self) -> torch.dtype | None:
        """The dtype evaluation autocasts to (None: the model's own precision)."""
        return self.dtype if self.autocast else None


@dataclass
class Run:
    """The objects of one run (see :func:`build_run`).

    Attributes:
        config: the run's config.
        device: where it trains; ranks: its place among the processes of the run.
        model: the model with its regularizer (wrapped in DDP and compiled as the config says).
        optimizer, scheduler: SGD with weight-decay groups, and the step decay.
        loader: the training batches (augmented on the device).
        test_images, test_labels: the test set on the device (uint8 images).
        cluster_images: the training images DropCluster refits on (uint8, on the device).
        prepare_eval: uint8 images -> the model's normalised float input.
        has_dropcluster: whether the model holds a DropCluster2d.
        precision: autocast and gradient scaling.
    """

    config: TrainConfig
    device: torch.device
    ranks: Ranks
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: DeviceLoader
    test_images: Tensor
    test_labels: Tensor
    cluster_images: Tensor
    prepare_eval: Callable[[Tensor], Tensor]
    has_dropcluster: bool
    precision: Precision

    def refit(self) -> ClusterFit:
        """Refit every DropCluster2d of the model on ``cluster_images`` (rank 0 fits and
        broadcasts under distributed training); an empty :class:`ClusterFit` without one."""
        if not self.has_dropcluster:
            return ClusterFit()
        return fit_clusters(
            self.model,
            self.cluster_images,
            self.cluster_images.shape[0],
            prepare=self.prepare_eval,
            batch_size=self.config.eval_batch_size,
        )


def build_run(
    config: TrainConfig,
    device: torch.device,
    ranks: Ranks = SINGLE,
    *,
    datasets: tuple[ImageDataset, ImageDataset] | None = None,
) -> Run:
    """Data (uint8, on ``device``), the model with its regularizer in the paper's slot, SGD.

    Args:
        config: the run.
        device: where it trains.
        ranks: this process's place under distributed training (``ranks.world > 1``: the
            model is wrapped in DistributedDataParallel, its batch norms made SyncBatchNorm
            first when ``config.sync_batchnorm``, and the loader yields this process's share of
            each batch).
        datasets: the (training, test) sets, uint8 images on the CPU as the loaders give them;
            None: ``config.dataset`` loaded from ``config.data_dir``.

    Randomness: the caller seeds torch's global generator with ``config.seed`` first; the
    model's initialisation and the loader's generator are drawn from it, in this order (the
    same on every process of a distributed run).

    Raises:
        ValueError: an empty training or test set, or SyncBatchNorm asked for on the CPU.
    """
    if datasets is None:
        datasets = (
            load_dataset(config.dataset, "train", root=config.data_dir),
            load_dataset(config.dataset, "test", root=config.data_dir),
        )
    train_set, test_set = datasets
    _check_not_empty(config, train_set, test_set)
    index = stratified_subset(train_set.labels, config.train_fraction, seed=config.seed)
    train_images, train_labels = train_set.images[index], train_set.labels[index]
    model = build_configured_model(config, len(train_set.classes), train_images.shape[1], device)
    has_dropcluster = any(isinstance(m, DropCluster2d) for m in model.modules())
    if has_dropcluster:
        _materialize(model, train_images[:2].to(device), eval_preparer(config))
    model = _wrapped(model, config, device, ranks)
    optimizer, scheduler = _sgd(model, config)
    # Drawn after the model's initialisation, from the generator the caller seeded.
    generator = torch.Generator(device).manual_seed(
        int(torch.randint(0, 2**62, (), dtype=torch.int64))
    )
    loader = DeviceLoader(
        train_images,
        train_labels,
        config.batch_size,
        augment=augment_preset(config.dataset),
        generator=generator,
        device=device,
        drop_last=train_images.shape[0] >= config.batch_size,
        rank=ranks.rank,
        world=ranks.world,
    )
    # The clustered images: the first `cluster_images` of a fixed permutation of the subset.
    order = torch.randperm(
        train_images.shape[0], generator=torch.Generator().manual_seed(config.seed)
    )[: config.cluster_images]
    return Run(
        config=config,
        device=device,
        ranks=ranks,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        test_images=test_set.images.to(device),
        test_labels=test_set.labels.to(device),
        cluster_images=train_images[order].to(device),
        prepare_eval=eval_preparer(config),
        has_dropcluster=has_dropcluster,
        precision=Precision.of(config, device),
    )


def _check_not_empty(config: TrainConfig, train_set: ImageDataset, test_set: ImageDataset) -> None:
    for split, images in (("training", train_set.images), ("test", test_set.images)):
        if images.shape[0] == 0:
            # A run on no data would "finish" with 0 % and be recorded as a result.
            raise ValueError(
                f"the {config.dataset} {split} set (data_dir={config.data_dir!r}) holds no "
                f"images: check the data set's files"
            )


def _wrapped(
    model: nn.Module, config: TrainConfig, device: torch.device, ranks: Ranks
) -> nn.Module:
    """The model in DistributedDataParallel (SyncBatchNorm first when asked) under distributed
    training, and compiled when the config says so."""
    if ranks.distributed:
        if config.sync_batchnorm:
            if device.type != "cuda":
                raise ValueError(
                    "sync_batchnorm needs CUDA devices (torch's SyncBatchNorm works on GPUs "
                    "only): train without --sync-batchnorm on the CPU"
                )
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return torch.compile(model) if config.compile else model


def _sgd(model: nn.Module, config: TrainConfig):
    """SGD with two weight-decay groups, and the step decay of the learning rate."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        # Batch-norm scales and shifts and biases (the 1-d parameters) are a group of their own:
        # not decayed by default (the usual ResNet practice), decayed under weight_decay_on="all".
        (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    optimizer = torch.optim.SGD(
        [
            {"params": decay, "weight_decay": config.resolved_weight_decay()},
            {"params": no_decay, "weight_decay": config.decay_of_norms_and_biases()},
        ],
        lr=config.lr,
        momentum=config.momentum,
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(config.lr_milestones), gamma=config.lr_gamma
    )
    return optimizer, scheduler


@torch.no_grad()
def _materialize(model: nn.Module, images: Tensor, prepare) -> None:
    """One forward in evaluation mode, so that every DropCluster2d takes its input's shape now:
    before DistributedDataParallel copies the buffers and before torch.compile traces (a
    layer without its shapes would be traced as the identity and recompiled at the first
    fit). Evaluation mode draws no random numbers and leaves batch-norm statistics alone."""
    was_training = model.training
    model.eval()
    model(prepare(images))
    model.train(was_training)


def build_configured_model(
    config: TrainConfig, n_classes: int, in_channels: int, device: torch.device
) -> nn.Module:
    """The config's model with its regularizer in the paper's slot, on ``device`` (uncompiled)."""
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = build_model(
        config.model, n_classes=n_classes, in_channels=in_channels, stem=config.stem
    )
    place_regularizer(
        model, config.regularizer, config.p, config.dataset, **config.regularizer_options
    )
    return model.to(device=device, memory_format=memory_format)


def eval_preparer(config: TrainConfig) -> Callable[[Tensor], Tensor]:
    """The function that turns uint8 test images (N, C, H, W) into the model's float input."""
    augment = augment_preset(config.dataset)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format

    def prepare_eval(images: Tensor) -> Tensor:
        return normalize(images, augment.mean, augment.std).contiguous(memory_format=memory_format)

    return prepare_eval
