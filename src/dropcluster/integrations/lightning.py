"""PyTorch Lightning callback that refits a LightningModule's DropCluster layers on schedule.

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

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor

from dropcluster.nn.fitting import ClusterFit, RefitSchedule, model_input

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError as error:  # the optional extra is missing
    raise ImportError(
        "dropcluster.integrations.lightning needs PyTorch Lightning: "
        "pip install -e '.[lightning]' (in the dropcluster checkout)"
    ) from error

__all__ = ["DropClusterRefit"]


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
