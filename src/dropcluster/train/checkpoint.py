"""Atomic checkpoints: everything needed to continue a run exactly where it stopped."""

from __future__ import annotations

import bisect
import pickle
import zipfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dropcluster.compat import rank_rng_state, refuse_0_1_checkpoint
from dropcluster.errors import CheckpointError
from dropcluster.files import atomic_write
from dropcluster.nn.fitting import unwrap
from dropcluster.train.config import TrainConfig
from dropcluster.train.distributed import gather

if TYPE_CHECKING:
    from dropcluster.train.setup import Run

__all__ = [
    "CHECKPOINT_KEYS",
    "CHECKPOINT_NAME",
    "MODEL_REVISION",
    "Checkpoint",
    "kept_checkpoint_name",
    "load_checkpoint",
    "load_model_state",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT_NAME = "checkpoint.pt"
#: The layout of the models a checkpoint holds, saved with it: 2 since dropcluster 0.2 (stems end
#: in batch norm and ReLU, LeNet-5's stem slot after its ReLU); a checkpoint without it is 0.1's.
MODEL_REVISION = 2
#: What a training checkpoint holds (besides the optional "scaler").
CHECKPOINT_KEYS = ("config", "epoch", "model", "optimizer", "scheduler", "loader", "rng", "history")


def kept_checkpoint_name(epoch: int) -> str:
    """The file name of the checkpoint kept after ``epoch`` epochs (``keep_checkpoints``)."""
    return f"checkpoint-epoch{epoch}.pt"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` with ``torch.save`` to a temporary file, then rename it over ``path``.

    A crash or a full disk while writing leaves the previous checkpoint intact and no temporary
    file behind: the data are flushed to disk before the (atomic) rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda stream: torch.save(state, stream))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is empty, truncated, corrupted or not a training checkpoint;
            the message names the file and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    advice = (
        "it is damaged (an interrupted copy or a failing disk?): restore it from a copy, or "
        "delete it to start the run over"
    )
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty: {advice}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except _LOAD_ERRORS as error:
        detail = " ".join(str(error).split())[:200]
        if str(map_location) != "cpu" and _readable_on_cpu(path):
            # The file is fine: the device it was to be loaded onto is the problem.
            raise CheckpointError(
                f"checkpoint {path} is intact but cannot be loaded onto {map_location} "
                f"({detail}): choose another device"
            ) from error
        raise CheckpointError(f"checkpoint {path} cannot be read ({detail}): {advice}") from error
    if not isinstance(state, dict) or any(key not in state for key in CHECKPOINT_KEYS):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path} is not a dropcluster training checkpoint: expected the keys "
            f"{list(CHECKPOINT_KEYS)}, found {found}"
        )
    return state


#: What torch.load raises for a file it cannot read.
_LOAD_ERRORS = (
    RuntimeError,
    pickle.UnpicklingError,
    EOFError,
    zipfile.BadZipFile,
    ValueError,
    KeyError,
    IndexError,
    UnicodeDecodeError,
    AttributeError,
)


def _readable_on_cpu(path: Path) -> bool:
    """Whether the checkpoint loads on the CPU: only a file that does not is called damaged."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS:
        return False
    return True


def load_model_state(model: torch.nn.Module, checkpoint: dict[str, Any], path: str | Path) -> None:
    """Load the model weights of ``checkpoint`` (what :func:`load_checkpoint` returns) into
    ``model``, with a one-line error naming the checkpoint ``path``.

    Raises:
        CheckpointError: a checkpoint of dropcluster 0.1 (no ``model_revision``: its models had
            another stem; a LeNet-5's even has the same keys), or weights that do not fit.
    """
    refuse_0_1_checkpoint(checkpoint, path, MODEL_REVISION)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise CheckpointError(f"{path} does not fit the run's model: {detail}") from error


def rng_state() -> dict[str, Any]:
    """The global random states a run consumes (torch CPU, and CUDA where present)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoint:
    """A run's whole state, as its checkpoint file holds it: enough to continue the run exactly.

    :meth:`state_dict` gathers it (every process's random state: under distributed training
    every process calls it, and rank 0 writes the result with :func:`save_checkpoint`);
    :meth:`load_state_dict` puts a loaded one back into the run.

    Args:
        run: the :class:`~dropcluster.train.setup.Run` whose state this is.

    Example::

        checkpoint = Checkpoint(run)
        save_checkpoint(out / CHECKPOINT_NAME, checkpoint.state_dict(epoch, history))
        next_epoch = checkpoint.load_state_dict(load_checkpoint(path), path)
    """

    def __init__(self, run: Run) -> None:
        self.run = run

    def state_dict(self, epoch: int, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The state after ``epoch`` (0-based) with the run's per-epoch ``history``."""
        run = self.run
        rng = gather(rng_state(), run.ranks)  # every process's random state, for an exact resume
        return {
            "config": run.config.to_dict(),
            "epoch": epoch,
            "model": unwrap(run.model).state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "loader": run.loader.state_dict(),
            "rng": rng[0],
            "rng_ranks": rng,
            "world_size": run.ranks.world,
            "history": list(history),
            "scaler": run.precision.scaler.state_dict(),
            "model_revision": MODEL_REVISION,
        }

    def load_state_dict(self, state: dict[str, Any], path: str | Path) -> int:
        """Put ``state`` (from :func:`load_checkpoint` of ``path``) into the run; returns the
        next epoch. The run's config's optimisation settings replace the stored ones (the same
        unless a diverged run resumes with new ones).

        Raises:
            CheckpointError: weights that do not fit the run's model, or a 0.1 checkpoint.
        """
        run = self.run
        load_model_state(unwrap(run.model), state, path)
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.loader.load_state_dict(state["loader"])
        set_rng_state(rank_rng_state(state, run.ranks.rank))
        if "scaler" in state:
            run.precision.scaler.load_state_dict(state["scaler"])
        _apply_optimizer_settings(run.optimizer, run.scheduler, run.config)
        return int(state["epoch"]) + 1


def _apply_optimizer_settings(optimizer, scheduler, config: TrainConfig) -> None:
    """Put the config's lr schedule, momentum and weight decay into restored optimiser states
    (a no-op when resuming with the same config; the new settings after a divergence)."""
    scheduler.milestones = Counter(config.lr_milestones)
    scheduler.gamma = config.lr_gamma
    scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)
    passed = bisect.bisect_right(sorted(config.lr_milestones), scheduler.last_epoch)
    lr = config.lr * config.lr_gamma**passed
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["initial_lr"] = config.lr
        group["momentum"] = config.momentum
    # build_run puts the decayed parameters in the first group, the others in the second.
    optimizer.param_groups[0]["weight_decay"] = config.resolved_weight_decay()
    optimizer.param_groups[1]["weight_decay"] = config.decay_of_norms_and_biases()
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
