"""Atomic checkpoints: everything needed to continue a run exactly where it stopped."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from dropcluster.errors import CheckpointError
from dropcluster.files import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"
#: The layout of the models a checkpoint holds, saved with it: 2 since dropcluster 0.2 (stems end
#: in batch norm and ReLU, LeNet-5's stem slot after its ReLU); a checkpoint without it is 0.1's.
MODEL_REVISION = 2
#: What a training checkpoint holds (besides the optional "scaler").
CHECKPOINT_KEYS = ("config", "epoch", "model", "optimizer", "scheduler", "loader", "rng",
                   "history")  # fmt: skip


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
_LOAD_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError,
                KeyError, IndexError, UnicodeDecodeError, AttributeError)  # fmt: skip


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
    if checkpoint.get("model_revision", 1) < MODEL_REVISION:
        raise CheckpointError(
            f"{path} was written by dropcluster 0.1, whose ResNet stem was a bare conv and "
            f"whose stem slot read the first conv before its ReLU; since 0.2 the stem is conv "
            f"-> batch norm -> ReLU (the paper's reference network) and DropCluster reads the "
            f"ReLU's output, so the run cannot continue with this version: train it again"
        )
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
