"""PyTorch Lightning callbacks: refit a LightningModule's DropCluster layers on schedule, and
set its regularizers' drop rate from a :class:`~dropcluster.nn.DropRateSchedule`.

Install the extra: ``pip install -e '.[lightning]'`` in the dropcluster checkout. The callback
only calls the core
functions (:class:`~dropcluster.nn.RefitSchedule`, :func:`~dropcluster.nn.fit_clusters`), so a
run under Lightning fits exactly what a plain loop fits. Under a distributed strategy (DDP),
``fit_clusters`` fits on rank 0 and broadcasts the clusters, so every rank holds the same ones.

Example::

    from lightning.pytorch import Trainer
    from dropcluster.integrations.lightning import DropClusterRefit

    trainer = Trainer(max_epochs=250, callbacks=[DropClusterRefit(every=50)])
    trainer.fit(module, train_loader)   # refits at the start of epochs 50, 100, 150, 200
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor

from dropcluster.nn.dropcluster import DropCluster2d
from dropcluster.nn.fitting import ClusterFit, RefitSchedule, model_input
from dropcluster.nn.schedule import DropRateSchedule

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError as error:  # the optional extra is missing
    raise ImportError(
        "dropcluster.integrations.lightning needs PyTorch Lightning: "
        "pip install -e '.[lightning]' (in the dropcluster checkout)"
    ) from error

__all__ = ["DropClusterRefit", "DropRateScheduler"]


class DropClusterRefit(Callback):
    """Refit every :class:`~dropcluster.nn.DropCluster2d` of the module at the start of due epochs.

    The epochs follow :class:`~dropcluster.nn.RefitSchedule`: first ``first`` (default
    ``every``), then every ``every`` epochs (paper: s = 50); before the first refit the layers
    are the identity. The module runs in evaluation mode on ``n_images`` images of ``data``, or
    of the trainer's train dataloader when ``data`` is None, inside the precision plugin's
    forward context; the inputs are moved to the module's device. The module's ``forward``
    must take those inputs (the capture stops at the last DropCluster2d).

    Each refit logs, with ``pl_module.log``, the structured channels of every layer as
    ``dropcluster/structured/<layer name>``. The clusters live in the layers' buffers, so
    checkpoints carry them and a resumed run continues with them.

    No silent no-ops: at the start of the fit the callback warns (on rank 0) when the module
    holds no DropCluster2d, or when its first refit lies at or past ``trainer.max_epochs`` (the
    default ``every=50`` with ``max_epochs=50`` or fewer) while a layer is unfitted (a module
    restored with its clusters needs no refit); at the end of the fit, when a
    DropCluster2d of the module was never fitted (a fit stopped early, say). Once per callback.

    Args:
        every: epochs between two refits, s >= 1.
        first: epoch of the first refit (default: ``every``).
        n_images: images clustered per refit (see :func:`~dropcluster.nn.fit_clusters`).
        data: a (N, ...) tensor of inputs or an iterable of batches; None: the trainer's
            train dataloader, whose batches are tensors or ``(inputs, labels)`` pairs.
        prepare: turns a batch into the module's input (when batches are not inputs, e.g.
            dicts or raw uint8 images); its result is moved to the module's device.

    Attributes:
        schedule: the :class:`~dropcluster.nn.RefitSchedule`.
        last_fit: the :class:`~dropcluster.nn.ClusterFit` of the last refit, or None.
    """

    def __init__(
        self,
        every: int = 50,
        first: int | None = None,
        n_images: int = 512,
        data: Tensor | Iterable[Any] | None = None,
        prepare: Callable[[Any], Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.schedule = RefitSchedule(every, first, n_images)
        self.data = data
        self.prepare = prepare
        self.last_fit: ClusterFit | None = None
        self.warned = False

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epochs = trainer.max_epochs
        if not any(isinstance(m, DropCluster2d) for m in pl_module.modules()):
            self._warn(
                trainer,
                f"{self!r} was given a {type(pl_module).__name__} that holds no DropCluster2d: "
                f"it has nothing to fit; place one (dropcluster.nn.attach) or drop the callback",
            )
        elif (
            epochs is not None
            and epochs >= 0
            and self.schedule.never_fits(epochs)
            and RefitSchedule.unfitted_layers(pl_module)  # a restored fit needs no refit
        ):
            every, first = self.schedule.every, self.schedule.first
            knob = "every" if first == every else "first"
            named = f"every={every}" + ("" if first == every else f", first={first}")
            owner = f"DropClusterRefit({named}) with max_epochs={epochs}"
            self._warn(trainer, self.schedule.too_late_message(epochs, owner, knob))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        unfitted = RefitSchedule.unfitted_layers(pl_module)
        if unfitted:
            self._warn(
                trainer,
                f"the fit ended with DropCluster2d layer(s) {unfitted} never fitted: they were "
                f"the identity for the whole run; DropClusterRefit fits first at the start of "
                f"epoch {self.schedule.first}: give it first= (or every=) below the epochs the "
                f"fit runs",
            )

    def _warn(self, trainer: Trainer, message: str) -> None:
        if not self.warned and trainer.is_global_zero:
            self.warned = True
            warnings.warn(message, UserWarning, stacklevel=2)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if not self.schedule.due(epoch):
            return
        data = self.data if self.data is not None else trainer.train_dataloader
        precision = trainer.precision_plugin
        device = pl_module.device

        def prepare(batch: Any) -> Tensor:
            if self.prepare is None:
                return precision.convert_input(model_input(batch, device))
            return precision.convert_input(self.prepare(batch).to(device))

        with precision.forward_context():
            fit = self.schedule.step(pl_module, data, epoch, prepare=prepare)
        self.last_fit = fit
        for name, structured in zip(fit.layers, fit.structured, strict=True):
            # Every rank holds rank 0's clusters: the mean over ranks is the value itself.
            pl_module.log(f"dropcluster/structured/{name}", float(structured), sync_dist=True)

    def __repr__(self) -> str:
        return f"DropClusterRefit({self.schedule!r})"


class DropRateScheduler(Callback):
    """Set the drop rate of every regularizer of the module at the start of each epoch.

    The rate of epoch ``e`` (``trainer.current_epoch``, 0-based) is ``schedule.value(e)``,
    written by :meth:`~dropcluster.nn.DropRateSchedule.apply` into every regularizer of this
    package (its ``p`` buffer) and torch's dropout layers, and logged as ``dropcluster/p``. It
    depends on the epoch alone, so a fit resumed from a checkpoint (``ckpt_path=``) sets the
    rate the uninterrupted fit had; the rate itself is not saved.

    Args:
        schedule: a :class:`~dropcluster.nn.DropRateSchedule`, or its JSON form
            (``{"p": 0.1, "kind": "linear", "start_epoch": 0, "end_epoch": 50}``).

    Attributes:
        schedule: the schedule; rate: the rate set last (None before the first epoch).

    Example::

        schedule = DropRateSchedule(p=0.1, kind="early", end_epoch=20)
        trainer = Trainer(max_epochs=100, callbacks=[DropRateScheduler(schedule)])
    """

    def __init__(self, schedule: DropRateSchedule | Mapping[str, Any]) -> None:
        super().__init__()
        if not isinstance(schedule, DropRateSchedule):
            schedule = DropRateSchedule.from_dict(schedule)
        self.schedule = schedule
        self.rate: float | None = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.rate = self.schedule.apply(pl_module, trainer.current_epoch)
        pl_module.log("dropcluster/p", self.rate)

    def __repr__(self) -> str:
        return f"DropRateScheduler({self.schedule!r})"
