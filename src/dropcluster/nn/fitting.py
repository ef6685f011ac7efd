"""Fit the DropCluster layers of any model from its data, in any training loop.

:func:`fit_clusters` runs the model on a few batches, captures the input of every
:class:`~dropcluster.nn.DropCluster2d` (and :class:`~dropcluster.nn.DropCluster1d`,
:class:`~dropcluster.nn.DropCluster3d`) inside it with forward pre-hooks (the forward stops as
soon as every layer has its input) and fits each layer (the paper's Algorithm 1).
:class:`RefitSchedule` says when: first at epoch ``s``, then every ``s`` epochs (paper: 50).

Under an initialised process group (DistributedDataParallel), rank 0 fits and broadcasts the
clusters, so every rank holds identical buffers whatever ``broadcast_buffers`` says. Fitting
once, not on the gathered activations of all ranks, keeps the fit what the paper does (one
minibatch of activations, here ``n_images`` of them), costs no more memory or time than on one
process, and needs one broadcast of small integer tables instead of gathering activations.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dropcluster.nn.dropcluster import DROPCLUSTER_LAYERS
from dropcluster.validation import check_int

__all__ = [
    "evaluating",
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
    """Fit every :class:`~dropcluster.nn.DropCluster2d` in ``model`` on its own input (and
    every :class:`~dropcluster.nn.DropCluster1d` and :class:`~dropcluster.nn.DropCluster3d`:
    their (N, C, L) and (N, C, D, H, W) inputs are captured alike).

    Which images: from a tensor or a map-style dataset, ``n_images`` drawn at random without
    replacement (``torch.randperm`` with ``generator``), run in increasing index order; when
    ``n_images`` covers the data, all of it, in order, and no random number is drawn. An
    iterable cannot be sampled: its first batches, in its own order, until ``n_images`` (shuffle
    a DataLoader for a random sample: it draws from its own generator).

    Args:
        model: any module, possibly compiled or wrapped in (Distributed)DataParallel; it runs
            in evaluation mode for the capture (batch norm uses its running statistics), and
            the training mode of each of its submodules is restored afterwards.
        data: a (N, ...) tensor of model inputs; a map-style dataset (anything with
            ``__len__`` and ``__getitem__`` but a list or tuple, e.g. a
            ``torch.utils.data.Dataset``) whose items are inputs or ``(input, label)`` pairs,
            collated into batches by ``torch.utils.data.default_collate`` as a DataLoader does;
            or an iterable of batches (a DataLoader, an iterator, a list or tuple of batches):
            each batch a tensor, or a tuple/list whose first item is the input (``(images,
            labels)``).
        n_images: images whose activations are clustered (the paper clusters one minibatch;
            the unstructured verdict of its rule depends on that number). Data with fewer
            images give a warning, and the fit uses what they hold.
        prepare: turns a batch into the model's input (normalisation, device), when the data
            are not model inputs already (uint8 images: without it the forward of a float
            model fails, with a message naming ``prepare=``). Without it, tensors are moved to
            the model's device.
        batch_size: images per forward pass when ``data`` is a tensor or a dataset.
        generator: random source of the image draw (a tensor or a dataset) and of the
            ``"hopkins"`` rule; None: torch's global generator.
        process_group: the group to broadcast in under distributed training (None: the
            default group, when one is initialised). Every rank of the group must call
            ``fit_clusters`` (it ends with collectives); when one rank fails, all raise.

    Returns:
        A :class:`ClusterFit`; empty when the model has no DropCluster layer.

    Raises:
        ValueError: ``data`` holds fewer than 2 images, a batch of integer images met a model
            that takes float input (pass ``prepare=``), or a layer's input could not be
            captured (the model never called it).
    """
    check_int("n_images", n_images, minimum=2)
    check_int("batch_size", batch_size, minimum=1)
    start = time.perf_counter()
    module = unwrap(model)
    named = [(name, m) for name, m in module.named_modules() if isinstance(m, DROPCLUSTER_LAYERS)]
    if not named:
        return ClusterFit()
    rank, world = _distributed(process_group)
    error = None
    try:
        batches = _batches(data, n_images, batch_size, generator)
        captured, images = _capture(module, [m for _, m in named], batches, n_images, prepare)
        if images < n_images:
            warnings.warn(
                f"fit_clusters got {images} images, fewer than the n_images={n_images} asked: "
                f"the clusters are fitted on {images}",
                stacklevel=3,  # the caller of fit_clusters, past torch.no_grad's wrapper
            )
        for name, layer in named:
            activations = torch.cat(captured[id(layer)])[:n_images]
            try:
                if rank == 0:
                    layer.fit(activations, generator=generator)
                else:
                    layer.materialize(tuple(activations.shape[1:]))
            except ValueError as error:
                raise ValueError(f"{type(layer).__name__} {name!r}: {error}") from error
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


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in evaluation mode for the block, then give every submodule back its own
    mode (not the root's: a frozen, evaluating part of a training model stays frozen)."""
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for submodule, training in modes:
            submodule.training = training


def _capture(module, layers, batches, n_images, prepare):
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
    images = 0
    with evaluating(module):
        try:
            for batch in batches:
                inputs = prepare(batch) if prepare is not None else model_input(batch, device)
                batch_rows = min(n_images, images + inputs.shape[0])
                try:
                    module(inputs)
                except _AllCaptured:
                    pass
                except RuntimeError as error:
                    if inputs.is_floating_point() or inputs.is_complex():
                        raise
                    raise ValueError(_input_type_problem(inputs, prepare, error)) from error
                images = batch_rows
                if images >= n_images:
                    break
        finally:
            for handle in handles:
                handle.remove()
    if images < 2:
        raise ValueError(f"fit_clusters needs at least 2 images, but the data gave {images}")
    missing = [layer for layer in layers if seen[id(layer)] < images]
    if missing:
        kinds = "/".join(sorted({type(layer).__name__ for layer in missing}))
        raise ValueError(
            f"the input of {len(missing)} {kinds} layer(s) was not captured: the model's "
            f"forward did not call them"
        )
    return captured, images


def _input_type_problem(inputs: Tensor, prepare, error: RuntimeError) -> str:
    """The one-line message for a forward that failed on a non-float batch (uint8 images)."""
    cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if prepare is None:
        advice = (
            "pass prepare= to turn a batch into the model's float input (e.g. prepare=lambda "
            "batch: batch.float() / 255, or batch[0].float() / 255 for (images, labels) pairs)"
        )
    else:
        advice = "make prepare= return the model's float input"
    return (
        f"fit_clusters ran the model on a {inputs.dtype} batch and its forward failed "
        f"({cause}): {advice}"
    )


def _batches(data, n_images: int, batch_size: int, generator: torch.Generator | None):
    """The batches to run: drawn from a tensor or a map-style dataset, or the iterable's own."""
    if not _samplable(data):
        return iter(data)
    length = data.shape[0] if isinstance(data, Tensor) else len(data)
    index = _draw(length, n_images, generator)
    return _sampled_batches(data, index, batch_size)


def _samplable(data) -> bool:
    """A tensor, or a map-style dataset (``__len__`` and ``__getitem__``; a list or tuple is a
    sequence of batches, as it always was)."""
    from torch.utils.data import IterableDataset

    if isinstance(data, Tensor):
        return True
    if isinstance(data, (list, tuple, str, bytes, dict, IterableDataset)):
        return False
    return hasattr(data, "__len__") and hasattr(data, "__getitem__")


def _draw(length: int, n_images: int, generator: torch.Generator | None) -> Tensor:
    """Indices of ``n_images`` of ``length`` items, uniformly without replacement, increasing.

    All of them (no random number drawn) when ``n_images >= length``: a sample of everything
    is everything, and a caller that fits on all its images keeps its random stream as it was.
    """
    if n_images >= length:
        return torch.arange(length)
    device = generator.device if generator is not None else "cpu"
    drawn = torch.randperm(length, generator=generator, device=device)[:n_images]
    # Increasing order: the fit depends on which images, not on the order they were drawn in.
    return drawn.sort().values.cpu()


def _sampled_batches(data, index: Tensor, batch_size: int):
    from torch.utils.data import default_collate

    for start in range(0, index.numel(), batch_size):
        chunk = index[start : start + batch_size]
        if isinstance(data, Tensor):
            if index.numel() == data.shape[0]:  # every image, in order: a view, no copy
                yield data[start : start + batch_size]
            else:
                yield data[chunk.to(data.device)]
        else:
            yield default_collate([data[int(i)] for i in chunk])


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
        for name in layer.STATE:
            dist.broadcast(getattr(layer, name), src=source, group=process_group)
        layer._buffers_written()


class RefitSchedule:
    """When to refit: at the start of epoch ``first``, then every ``every`` epochs.

    The paper refits every s = 50 epochs, the first time after 50 epochs (before that the
    layers are the identity). Epochs count from 0, as ``range(epochs)`` does.

    No silent no-ops: a run whose first refit never comes leaves every DropCluster2d the
    identity for the whole run. Give the run's length as ``epochs`` and the schedule warns
    (once, with what to change) when it is built with its first refit at or past ``epochs``,
    and when :meth:`step` is called for the last epoch while a DropCluster2d of the model is
    still unfitted (a loop that skipped the due epochs). Without ``epochs``, call
    :meth:`finish` after the loop.

    Args:
        every: epochs between two refits, s >= 1.
        first: the first refit's epoch (default: ``every``).
        n_images: images clustered per refit (see :func:`fit_clusters`).
        epochs: the run's number of epochs (0 to epochs - 1), when known; None: unknown.
        seed: seeds the images each refit draws from a tensor or a map-style dataset: the
            refit at epoch ``e`` draws with :meth:`generator` (``torch.Generator()
            .manual_seed(seed * 1_000_003 + e)``), so successive refits fit on different
            images, and a run, resumed or not, draws the same ones at the same epoch. An
            iterable gives its own first batches (see :func:`fit_clusters`); a ``generator=``
            passed to :meth:`step` replaces this one.

    Example::

        schedule = RefitSchedule(every=50, epochs=250)
        for epoch in range(250):
            schedule.step(model, train_loader, epoch)   # fits at epochs 50, 100, 150, 200
            for images, labels in train_loader:
                ...
    """

    def __init__(
        self,
        every: int = 50,
        first: int | None = None,
        n_images: int = 512,
        *,
        epochs: int | None = None,
        seed: int = 0,
    ) -> None:
        self.seed = check_int("seed", seed, minimum=0, maximum=2**32 - 1)
        self.every = check_int("every", every, minimum=1)
        self.first = self.every if first is None else check_int("first", first, minimum=0)
        self.n_images = check_int("n_images", n_images, minimum=2)
        self.epochs = None if epochs is None else check_int("epochs", epochs, minimum=1)
        self.warned = False
        if self.epochs is not None and self.never_fits(self.epochs):
            named = f"every={self.every}" + ("" if first is None else f", first={self.first}")
            knob = "every" if first is None else "first"
            self._warn(self.too_late_message(self.epochs, f"RefitSchedule({named})", knob), 3)

    def due(self, epoch: int) -> bool:
        """True when the clusters are refitted at the start of ``epoch``."""
        return epoch >= self.first and (epoch - self.first) % self.every == 0

    def never_fits(self, epochs: int) -> bool:
        """Whether a run of ``epochs`` epochs (0 to epochs - 1) ends before the first refit."""
        return self.first >= epochs

    def too_late_message(self, epochs: int, owner: str, knob: str = "every") -> str:
        """What the warning of a run of ``epochs`` epochs that never refits says.

        ``owner`` names the schedule (``"RefitSchedule(every=50)"``, a callback, a config
        field), ``knob`` the argument to change.
        """
        # The paper's rhythm: a refit every fifth of the run (4 in 250 epochs).
        example = epochs // 5 if knob == "first" else max(1, epochs // 5)
        if example < epochs:
            change = f"set {knob} below {epochs}, e.g. {knob}={example}"
        else:  # one epoch: a refit at epoch every >= 1 never comes
            change = f"train 2 epochs or more (a refit at epoch {knob} >= 1 needs them)"
        return (
            f"{owner} refits first at the start of epoch {self.first}, but the run has {epochs} "
            f"epoch{'s' if epochs > 1 else ''} (0 to {epochs - 1}): DropCluster2d stays the "
            f"identity for the whole run; {change}"
        )

    @staticmethod
    def unfitted_layers(model: nn.Module) -> list[str]:
        """Names of the DropCluster layers (1-, 2- or 3-D) of ``model`` (unwrapped) that are
        not fitted."""
        return [
            name or "(the model)"
            for name, module in unwrap(model).named_modules()
            if isinstance(module, DROPCLUSTER_LAYERS) and not module.fitted
        ]

    def step(self, model: nn.Module, data, epoch: int, **options: Any) -> ClusterFit | None:
        """Refit when due (options go to :func:`fit_clusters`); returns the fit or None.

        With ``epochs`` known, the call for the last epoch (``epochs - 1``) checks the model
        after any refit: an unfitted DropCluster2d gets the warning of :meth:`finish`. A
        refit draws its images with :meth:`generator` unless ``options`` holds a generator.
        """
        fit = None
        if self.due(epoch):
            if options.get("generator") is None:  # a fresh draw of images at every refit
                options["generator"] = self.generator(epoch)
            fit = fit_clusters(model, data, self.n_images, **options)
        if self.epochs is not None and epoch == self.epochs - 1:
            self.finish(model, stacklevel=4)
        return fit

    def generator(self, epoch: int) -> torch.Generator:
        """The CPU generator of the refit at ``epoch``: seeded ``seed * 1_000_003 + epoch``."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def finish(self, model: nn.Module, *, stacklevel: int = 3) -> list[str]:
        """End-of-run check: warn (once per schedule) when a DropCluster2d of ``model`` was
        never fitted; returns the names of the unfitted layers."""
        unfitted = self.unfitted_layers(model)
        if unfitted:
            self._warn(
                f"the run ends with DropCluster2d layer(s) {unfitted} never fitted: they were "
                f"the identity for the whole run; call RefitSchedule.step(model, data, epoch) "
                f"at the start of every epoch (this schedule fits at epoch {self.first}, then "
                f"every {self.every} epochs) with first below the run's epochs, or "
                f"fit_clusters(model, data) before training",
                stacklevel=stacklevel,
            )
        return unfitted

    def _warn(self, message: str, stacklevel: int) -> None:
        if not self.warned:
            self.warned = True
            warnings.warn(message, UserWarning, stacklevel=stacklevel)

    def __repr__(self) -> str:
        epochs = "" if self.epochs is None else f", epochs={self.epochs}"
        return (
            f"RefitSchedule(every={self.every}, first={self.first}, n_images={self.n_images}"
            f"{epochs})"
        )
