"""Fit the DropCluster layers of any model from its data, in any training loop.

:func:`fit_clusters` runs the model on a few batches, captures the input of every
:class:`~dropcluster.nn.DropCluster2d` inside it with forward pre-hooks (the forward stops as
soon as every layer has its input) and fits each layer (the paper's Algorithm 1).
:class:`RefitSchedule` says when: first at epoch ``s``, then every ``s`` epochs (paper: 50).

Under an initialised process group (DistributedDataParallel), rank 0 fits and broadcasts the
clusters, so every rank holds identical buffers whatever ``broadcast_buffers`` says. Fitting
once, not on the gathered activations of all ranks, keeps the fit what the paper does (one
minibatch of activations, here ``n_images`` of them), costs no more memory or time than on one
process, and needs one broadcast of small integer tables instead of gathering activations.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dropcluster.nn.dropcluster import DropCluster2d
from dropcluster.validation import check_int

__all__ = [
    "ClusterFit",
    "RefitSchedule",
    "fit_clusters",
    "model_input",
    "unwrap",
]


@dataclass
class ClusterFit:
    """What :func:`fit_clusters` did.

    Attributes:
        layers: module names of the fitted layers (in the unwrapped model).
        channels: channels of each layer.
        structured: structured channels of each layer.
        images: images whose activations were clustered.
        seconds: wall time (capture and fit).
    """

    layers: list[str] = field(default_factory=list)
    channels: list[int] = field(default_factory=list)
    structured: list[int] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        """The fields a training log keeps per refit (empty when no layer was fitted)."""
        if not self.layers:
            return {}
        return {
            "structured": self.structured,
            "channels": self.channels,
            "layers": self.layers,
            "refit_seconds": self.seconds,
        }


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile`` and (Distributed)DataParallel wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


@torch.no_grad()
def fit_clusters(
    model: nn.Module,
    data: Tensor | Iterable[Any],
    n_images: int = 512,
    *,
    prepare: Callable[[Any], Tensor] | None = None,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    process_group: Any = None,
) -> ClusterFit:
    """Fit every :class:`~dropcluster.nn.DropCluster2d` in ``model`` on its own input.

    Args:
        model: any module, possibly compiled or wrapped in (Distributed)DataParallel; it runs
            in evaluation mode for the capture (batch norm uses its running statistics), and
            the training mode of each of its submodules is restored afterwards.
        data: a (N, ...) tensor of model inputs, or an iterable of batches (a DataLoader): each
            batch a tensor, or a tuple/list whose first item is the input (``(images,
            labels)``).
        n_images: images whose activations are clustered (the paper clusters one minibatch;
            the unstructured verdict of its rule depends on that number).
        prepare: turns a batch into the model's input (normalisation, device), when the data
            are not model inputs already. Without it, tensors are moved to the model's device.
        batch_size: images per forward pass when ``data`` is a tensor.
        generator: random source for the ``"hopkins"`` rule.
        process_group: the group to broadcast in under distributed training (None: the
            default group, when one is initialised). Every rank of the group must call
            ``fit_clusters`` (it ends with collectives); when one rank fails, all raise.

    Returns:
        A :class:`ClusterFit`; empty when the model has no DropCluster2d.

    Raises:
        ValueError: ``data`` holds fewer than 2 images, or a layer's input could not be
            captured (the model never called it).
    """
    check_int("n_images", n_images, minimum=2)
    check_int("batch_size", batch_size, minimum=1)
    start = time.perf_counter()
    module = unwrap(model)
    named = [(name, m) for name, m in module.named_modules() if isinstance(m, DropCluster2d)]
    if not named:
        return ClusterFit()
    rank, world = _distributed(process_group)
    error = None
    try:
        captured, images = _capture(
            module, [m for _, m in named], data, n_images, prepare, batch_size
        )
        for name, layer in named:
            activations = torch.cat(captured[id(layer)])[:n_images]
            try:
                if rank == 0:
                    layer.fit(activations, generator=generator)
                else:
                    layer.materialize(tuple(activations.shape[1:]))
            except ValueError as error:
                raise ValueError(f"DropCluster2d {name!r}: {error}") from error
    except Exception as raised:  # noqa: BLE001 - re-raised below, after the other ranks know
        if world == 1:
            raise
        error = raised
    if world > 1:
        # One small collective first: a rank that failed must not leave the others waiting in
        # the broadcast until the process group times out.
        _agree_or_raise(error, rank, module, process_group)
        _broadcast(named, process_group)
    return ClusterFit(
        layers=[name for name, _ in named],
        channels=[int(layer.labels.shape[0]) for _, layer in named],
        structured=[int(layer.structured.sum()) for _, layer in named],
        images=images,
        seconds=time.perf_counter() - start,
    )


class _AllCaptured(Exception):
    """Raised by the capture hook to end a forward pass early."""


def _capture(module, layers, data, n_images, prepare, batch_size):
    """Run batches until every layer has ``n_images`` inputs; returns them and the count."""
    captured: dict[int, list[Tensor]] = {id(layer): [] for layer in layers}
    seen = {id(layer): 0 for layer in layers}

    def hook(layer, inputs):
        if seen[id(layer)] < n_images:
            activations = inputs[0].detach().float()
            captured[id(layer)].append(activations)
            seen[id(layer)] += activations.shape[0]
        if all(count >= batch_rows for count in seen.values()):
            raise _AllCaptured  # every layer has this batch: the rest of the forward is waste

    device = next((t.device for t in module.parameters()), None)
    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    # Each submodule's own mode, not the root's: a frozen (eval) part of a training model
    # must stay frozen after the refit.
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    images = 0
    try:
        for batch in _batches(data, batch_size):
            inputs = prepare(batch) if prepare is not None else model_input(batch, device)
            batch_rows = min(n_images, images + inputs.shape[0])
            try:
                module(inputs)
            except _AllCaptured:
                pass
            images = batch_rows
            if images >= n_images:
                break
    finally:
        for handle in handles:
            handle.remove()
        for submodule, training in modes:
            submodule.training = training
    if images < 2:
        raise ValueError(f"fit_clusters needs at least 2 images, but the data gave {images}")
    missing = [i for i, layer in enumerate(layers) if seen[id(layer)] < images]
    if missing:
        raise ValueError(
            f"the input of {len(missing)} DropCluster2d layer(s) was not captured: the model's "
            f"forward did not call them"
        )
    return captured, images


def _batches(data, batch_size):
    if isinstance(data, Tensor):
        for start in range(0, data.shape[0], batch_size):
            yield data[start : start + batch_size]
    else:
        yield from data


def model_input(batch: Any, device: torch.device | None) -> Tensor:
    """A batch's model input on ``device``: the batch itself, or the first item of an
    ``(inputs, labels)`` tuple or list.

    Raises:
        ValueError: the input is not a tensor (pass ``prepare=`` to :func:`fit_clusters`).
    """
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise ValueError(
            f"a batch should be a tensor or a (inputs, labels) pair, but got "
            f"{type(batch).__name__}: pass prepare= to turn it into the model's input"
        )
    return batch.to(device) if device is not None else batch


def _distributed(process_group) -> tuple[int, int]:
    """This process's rank and the group's size (0, 1 without distributed training)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def _agree_or_raise(error: Exception | None, rank: int, module: nn.Module, process_group) -> None:
    """Raise on every rank when any rank failed (its own error where it failed)."""
    import torch.distributed as dist

    device = next((t.device for t in module.buffers()), torch.device("cpu"))
    if dist.get_backend(process_group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    failed = torch.tensor([0 if error is None else 1], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=process_group)
    if error is not None:
        raise error
    if int(failed):
        raise RuntimeError(
            f"fit_clusters failed on another rank (this is rank {rank}); its error says why"
        )


def _broadcast(named, process_group) -> None:
    """Rank 0's clusters to every rank (the buffers have the same shapes everywhere)."""
    import torch.distributed as dist

    source = dist.get_global_rank(process_group, 0) if process_group is not None else 0
    for _, layer in named:
        for name in DropCluster2d.STATE:
            dist.broadcast(getattr(layer, name), src=source, group=process_group)
        layer._buffers_written()


class RefitSchedule:
    """When to refit: at the start of epoch ``first``, then every ``every`` epochs.

    The paper refits every s = 50 epochs, the first time after 50 epochs (before that the
    layers are the identity). Epochs count from 0, as ``range(epochs)`` does.

    Args:
        every: epochs between two refits, s >= 1.
        first: the first refit's epoch (default: ``every``).
        n_images: images clustered per refit (see :func:`fit_clusters`).

    Example::

        schedule = RefitSchedule(every=50)
        for epoch in range(250):
            schedule.step(model, train_loader, epoch)   # fits at epochs 50, 100, 150, 200
            for images, labels in train_loader:
                ...
    """

    def __init__(self, every: int = 50, first: int | None = None, n_images: int = 512) -> None:
        self.every = check_int("every", every, minimum=1)
        self.first = self.every if first is None else check_int("first", first, minimum=0)
        self.n_images = check_int("n_images", n_images, minimum=2)

    def due(self, epoch: int) -> bool:
        """True when the clusters are refitted at the start of ``epoch``."""
        return epoch >= self.first and (epoch - self.first) % self.every == 0

    def step(self, model: nn.Module, data, epoch: int, **options: Any) -> ClusterFit | None:
        """Refit when due (options go to :func:`fit_clusters`); returns the fit or None."""
        if not self.due(epoch):
            return None
        return fit_clusters(model, data, self.n_images, **options)

    def __repr__(self) -> str:
        return f"RefitSchedule(every={self.every}, first={self.first}, n_images={self.n_images})"
