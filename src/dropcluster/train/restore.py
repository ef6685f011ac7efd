"""Load a trained run back from its folder: config, model weights and test set, for evaluation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dropcluster.data import ImageDataset, load_dataset
from dropcluster.train.checkpoint import (
    CHECKPOINT_NAME,
    kept_checkpoint_name,
    load_checkpoint,
    load_model_state,
)
from dropcluster.train.config import TrainConfig, resolve_device
from dropcluster.train.setup import build_configured_model, eval_preparer

__all__ = [
    "LoadedRun",
    "load_run",
]


@dataclass
class LoadedRun:
    """A trained run, ready for evaluation.

    Attributes:
        run_dir: the run's folder.
        config: its :class:`TrainConfig`.
        model: the model with the checkpoint's weights (and fitted clusters), in eval mode.
        prepare_eval: turns uint8 images (N, C, H, W) into the model's normalised float input.
        test_set: the config's test set (uint8 images on the CPU).
        epochs_done: epochs the checkpoint holds.
        history: the per-epoch records saved with the checkpoint.
    """

    run_dir: Path
    config: TrainConfig
    model: nn.Module
    prepare_eval: Callable[[Tensor], Tensor]
    test_set: ImageDataset
    epochs_done: int
    history: list[dict[str, Any]]

    @property
    def finished(self) -> bool:
        return self.epochs_done >= self.config.epochs


def load_run(
    run_dir: str | Path,
    device: str | torch.device = "cpu",
    test_set: ImageDataset | None = None,
    *,
    epoch: int | None = None,
) -> LoadedRun:
    """Rebuild the model of the run in ``run_dir`` (``config.json`` + ``checkpoint.pt``).

    Args:
        run_dir: a folder written by :func:`dropcluster.train.train`.
        device: where the model goes ("auto": CUDA when there is one, else the CPU); the run's
            own device setting is ignored, so a model trained on a GPU can be evaluated on the
            CPU.
        test_set: the test set, if the caller has it already (saves loading it again).
        epoch: load the checkpoint kept after this many epochs (``keep_checkpoints``,
            ``checkpoint-epoch{E}.pt``) instead of the last one.

    Raises:
        FileNotFoundError: the folder, its config or its checkpoint is missing.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder at {run_dir}")
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no config.json: expected a folder written by `dropcluster train`"
        )
    config = TrainConfig.from_file(config_path)
    device = resolve_device(device)
    checkpoint_path = run_dir / (CHECKPOINT_NAME if epoch is None else kept_checkpoint_name(epoch))
    if epoch is not None and not checkpoint_path.is_file():
        kept = sorted(path.name for path in run_dir.glob("checkpoint-epoch*.pt"))
        raise FileNotFoundError(
            f"{run_dir} has no checkpoint kept after epoch {epoch} ({checkpoint_path.name}); "
            f"kept: {', '.join(kept) or 'none'} (train with keep_checkpoints=[{epoch}] to keep it)"
        )
    state = load_checkpoint(checkpoint_path, map_location=device)
    if test_set is None:
        test_set = load_dataset(config.dataset, "test", root=config.data_dir)
    model = build_configured_model(config, len(test_set.classes), test_set.images.shape[1], device)
    load_model_state(model, state, checkpoint_path)
    model.eval()
    return LoadedRun(
        run_dir=run_dir,
        config=config,
        model=model,
        prepare_eval=eval_preparer(config),
        test_set=test_set,
        epochs_done=int(state["epoch"]) + 1,
        history=list(state.get("history", [])),
    )
