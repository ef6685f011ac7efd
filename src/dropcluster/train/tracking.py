"""Training curves for an experiment tracker: TensorBoard, or none (the default).

A tracker takes ``(step, {tag: value})`` and writes it where a viewer reads it. The trainer
hands it each epoch's ``log.jsonl`` record as scalars (:func:`epoch_scalars`), with the
record's epoch (0-based, as in the log) as the step; the sweep's worker adds the corrupted
test sets' results (:func:`corruption_scalars`) at step ``epochs``. TensorBoard's writer is
imported only when a run asks for it: the package ``tensorboard`` is an optional extra
(``pip install 'dropcluster[tensorboard]'``).

A resumed run opens a new event file whose first record tells TensorBoard to drop every value
logged at or after the epoch it resumes at (``purge_step``): the epochs a crash made the run
repeat appear once, with the values of the run that went on.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from dropcluster.validation import check_choice

__all__ = [
    "EPOCH_TAGS",
    "TRACKERS",
    "NullTracker",
    "TensorBoardTracker",
    "Tracker",
    "check_tracker",
    "corruption_scalars",
    "epoch_scalars",
    "final_scalars",
    "make_tracker",
]


#: The trackers a run may name (``TrainConfig.tracker``).
TRACKERS = ("none", "tensorboard")

#: The tag of each numeric field of a ``log.jsonl`` record (fields an epoch lacks are left out:
#: ``top1`` only after tested epochs, ``p`` only under a drop schedule, the refit's only after
#: a refit). The refit's per-layer lists are summed: see :func:`epoch_scalars`.
EPOCH_TAGS = {
    "loss": "train/loss",
    "train_top1": "train/top1",
    "lr": "train/lr",
    "p": "train/p",
    "top1": "test/top1",
    "top5": "test/top5",
    "seconds": "speed/epoch_seconds",
    "images_per_s": "speed/images_per_s",
    "eval_seconds": "speed/eval_seconds",
    "refit_seconds": "refit/seconds",
}

_INSTALL_HINT = "pip install 'dropcluster[tensorboard]' (or pip install tensorboard)"


class Tracker(Protocol):
    """Where a run's scalars go. ``log_scalars`` may be called once per step, with any tags."""

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Record ``values`` (tag -> number) at ``step``."""
        ...

    def close(self) -> None:
        """Write out what is buffered and let the files go."""
        ...


class NullTracker:
    """The tracker ``"none"``: records nothing (processes of a distributed run but rank 0 use
    it too)."""

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """TensorBoard event files in ``folder`` (``tensorboard --logdir folder`` shows them).

    Args:
        folder: the run folder (the event files go beside ``log.jsonl``).
        purge_step: TensorBoard drops the values earlier files of the folder hold at this step
            and after (a resumed run: the epoch it resumes at); None: nothing is dropped.

    Raises:
        ImportError: the ``tensorboard`` package is not installed (the message says what to
            install).
    """

    def __init__(self, folder: str | Path, purge_step: int | None = None) -> None:
        writer_class = _summary_writer()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _wait_past_earlier_files(folder)
        self.writer = writer_class(str(folder), purge_step=purge_step)

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), step)
        # Once per epoch: a viewer open beside the run sees it at once, a crash loses nothing.
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def check_tracker(name: str) -> None:
    """Raise unless tracker ``name`` is known and can be made here.

    Raises:
        ValueError: an unknown name.
        ImportError: the tracker's package is missing (one line saying what to install).
    """
    check_choice("tracker", name, TRACKERS)
    if name == "tensorboard":
        _summary_writer()


def make_tracker(name: str, folder: str | Path, *, purge_step: int | None = None) -> Tracker:
    """The tracker ``name`` (one of :data:`TRACKERS`) writing into ``folder``.

    Args:
        name: ``"none"`` (a :class:`NullTracker`) or ``"tensorboard"``.
        folder: where its files go (the run folder).
        purge_step: see :class:`TensorBoardTracker`.

    Raises:
        ValueError: an unknown name; ImportError: its package is missing.
    """
    check_choice("tracker", name, TRACKERS)
    if name == "tensorboard":
        return TensorBoardTracker(folder, purge_step)
    return NullTracker()


def epoch_scalars(record: Mapping[str, Any], constant_p: float | None = None) -> dict[str, float]:
    """The scalars of one ``log.jsonl`` record, by tag (:data:`EPOCH_TAGS`).

    A refit adds ``refit/structured`` (structured channels, summed over the DropCluster
    layers), ``refit/structured_fraction`` (of their channels), one ``refit/structured/<layer>``
    per layer when there are several, and ``refit/clusters_agree`` (1 or 0) under distributed
    training. ``constant_p``: the rate logged as ``train/p`` when the record has none (a run
    without a drop schedule); None logs no rate then.
    """
    scalars = {tag: float(record[key]) for key, tag in EPOCH_TAGS.items() if key in record}
    if "train/p" not in scalars and constant_p is not None:
        scalars["train/p"] = float(constant_p)
    if "structured" in record:
        structured, channels = record["structured"], record["channels"]
        scalars["refit/structured"] = float(sum(structured))
        scalars["refit/structured_fraction"] = sum(structured) / max(1, sum(channels))
        if len(structured) > 1:
            for layer, count in zip(record["layers"], structured, strict=True):
                scalars[f"refit/structured/{layer}"] = float(count)
    if "clusters_agree" in record:
        scalars["refit/clusters_agree"] = float(bool(record["clusters_agree"]))
    return scalars


def final_scalars(top1: float, top5: float) -> dict[str, float]:
    """The run's result (the mean test accuracy over its last ``average_last`` epochs)."""
    return {"final/top1": float(top1), "final/top5": float(top5)}


def corruption_scalars(rows: list[Mapping[str, Any]]) -> dict[str, float]:
    """Corrupted-test results (the rows of ``corruptions.json``) as scalars.

    Tags: ``corruption/clean/top1`` (and ``top5``): the clean test set; ``corruption/mean/...``:
    the mean over every corruption and severity; ``corruption/severity<k>/...``: the mean over
    the corruptions at severity k; ``corruption/<name>/...``: the mean over a corruption's
    severities. Every row is in ``corruptions.json``.
    """
    corrupted = [row for row in rows if row["corruption"] != "clean"]
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["corruption"] == "clean":
            groups["clean"] = [row]
    if corrupted:
        groups["mean"] = corrupted
    for row in corrupted:
        groups.setdefault(f"severity{row['severity']}", []).append(row)
    for row in corrupted:
        groups.setdefault(row["corruption"], []).append(row)
    scalars = {}
    for group, members in groups.items():
        for metric in ("top1", "top5"):
            scalars[f"corruption/{group}/{metric}"] = sum(r[metric] for r in members) / len(members)
    return scalars


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:  # torch's module needs the tensorboard package
        raise ImportError(
            f"tracker 'tensorboard' needs the tensorboard package, which is not installed: "
            f"{_INSTALL_HINT}"
        ) from error
    return SummaryWriter


_EVENT_FILE = re.compile(r"events\.out\.tfevents\.(\d+)\.")


def _wait_past_earlier_files(folder: Path) -> None:
    """Wait until a new event file sorts after the folder's earlier ones.

    TensorBoard reads a folder's event files in name order, and the name's first key is the
    second the file was made (then host, process id and a counter, which do not sort by
    age): a file made within the same second as an earlier one could be read first, and its
    purge would drop the wrong values. Only a restart within a second meets this (tests do).
    """
    stamps = [
        int(match.group(1))
        for path in folder.iterdir()
        if (match := _EVENT_FILE.match(path.name)) is not None
    ]
    if stamps:
        wait = max(stamps) + 1 - time.time()
        if wait > 0:
            time.sleep(wait + 0.01)
