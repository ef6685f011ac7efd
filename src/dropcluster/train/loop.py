"""The training loop: one run from a :class:`TrainConfig`, resumable exactly after a crash.

Data flow: data set (uint8 on the device) -> batched augmentation -> model with the regularizer
in its paper slot -> SGD -> per-epoch top-1/top-5 on the test set -> JSON lines + checkpoint.
Every ``cluster_every`` epochs the inputs of the model's DropCluster layers are captured with
forward pre-hooks on ``cluster_images`` training images (no augmentation) and the layers are
refitted (paper, section 5). Under DistributedDataParallel (a later step) the refit, the log and
the checkpoint are the work rank 0 does before broadcasting the clusters; they are kept in
separate functions for that reason.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dropcluster.errors import DivergedError
from dropcluster.files import FolderLock, atomic_write_json, atomic_write_text
from dropcluster.nn import DropCluster2d, DropRateSchedule, RefitSchedule
from dropcluster.nn.fitting import unwrap
from dropcluster.train.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    kept_checkpoint_name,
    load_checkpoint,
    save_checkpoint,
)
from dropcluster.train.config import TrainConfig
from dropcluster.train.distributed import SINGLE, Ranks, all_sum, from_environment, gather
from dropcluster.train.tracking import (
    NullTracker,
    Tracker,
    check_tracker,
    epoch_scalars,
    final_scalars,
    make_tracker,
)

__all__ = [
    "DIVERGED_NAME",
    "DIVERGENCE_CHECK_STEPS",
    "DIVERGENCE_LOSS",
    "LOG_NAME",
    "RESULT_NAME",
    "RETUNABLE_AFTER_DIVERGENCE",
    "RUN_LOCK_NAME",
    "Progress",
    "RunResult",
    "autocast_context",
    "evaluate",
    "has_batch_norm",
    "read_log",
    "topk_correct",
    "topk_hits",
    "train",
    "train_epoch",
    "train_step",
]


LOG_NAME = "log.jsonl"
RESULT_NAME = "result.json"


@dataclass
class RunResult:
    """Per-epoch history and the final metrics of a run.

    Attributes:
        history: one dict per epoch (epoch, loss, train_top1, top1, top5, seconds, ...).
        top1, top5: mean test accuracy (%) over the last ``average_last`` epochs.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    top1: float = float("nan")
    top5: float = float("nan")


def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k logits, for each k.

    Args:
        logits: (N, classes) float; labels: (N,) int64.
    """
    return [int(count) for count in topk_hits(logits, labels, ks)]


def topk_hits(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> Tensor:
    """:func:`topk_correct` as a (len(ks),) int64 tensor on the logits' device (no host sync)."""
    largest = min(max(ks), logits.shape[1])
    top = logits.topk(largest, dim=1).indices
    hits = top == labels.unsqueeze(1)
    return torch.stack([hits[:, : min(k, largest)].any(dim=1).sum() for k in ks])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    prepare,
    batch_size: int,
    ranks: Ranks = SINGLE,
    amp_dtype: torch.dtype | None = None,
):
    """Top-1 and top-5 accuracy (%) of ``model`` on uint8 ``images``, in evaluation mode.

    Under distributed training each process scores every ``world``-th image and the counts are
    summed, so every process returns the accuracy on the whole set. ``amp_dtype``: evaluate
    under autocast to that dtype on the images' device (as the model trains); None: in the
    model's own precision. The counts stay on the device until the end (one synchronisation).
    """
    was_training = model.training
    model.eval()
    if ranks.distributed:
        images, labels = images[ranks.rank :: ranks.world], labels[ranks.rank :: ranks.world]
    counts = torch.zeros(2, dtype=torch.int64, device=labels.device)
    device_type = images.device.type
    for start in range(0, images.shape[0], batch_size):
        batch = prepare(images[start : start + batch_size])
        with autocast_context(device_type, amp_dtype):
            logits = model(batch)
        counts += topk_hits(logits, labels[start : start + batch_size])
    model.train(was_training)
    correct1, correct5 = counts.tolist()
    # Summed over the processes (the counts themselves when alone).
    correct1, correct5, total = all_sum([correct1, correct5, images.shape[0]], ranks, labels.device)
    return 100.0 * correct1 / max(1.0, total), 100.0 * correct5 / max(1.0, total)


def autocast_context(device_type: str, amp_dtype: torch.dtype | None):
    """Autocast to ``amp_dtype`` on ``device_type``, or nothing when it is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=amp_dtype)


class Progress:
    """One status line per epoch, rewritten in place on a terminal, with speed and ETA."""

    def __init__(self, total_epochs: int, stream: TextIO | None = None) -> None:
        self.total_epochs = total_epochs
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty()
        self.last = 0.0

    def step(
        self, epoch: int, step: int, steps: int, loss: Tensor, images_per_s: float, eta_s: float
    ) -> None:
        """Redraw the line at most 5 times a second; ``loss`` is read (a sync) only then."""
        now = time.perf_counter()
        if not self.interactive or (now - self.last < 0.2 and step < steps):
            return
        self.last = now
        width = 20
        filled = int(width * step / max(1, steps))
        line = (
            f"\repoch {epoch + 1}/{self.total_epochs} [{'#' * filled}{'.' * (width - filled)}] "
            f"loss {float(loss):.3f} {images_per_s:,.0f} img/s ETA {_clock(eta_s)}"
        )
        self.stream.write(line)
        self.stream.flush()

    def epoch(self, record: dict[str, Any], eta_s: float) -> None:
        if self.interactive:
            self.stream.write("\r" + " " * 79 + "\r")
        clusters = ""
        if "structured" in record:
            clusters = f", clusters refitted ({record['structured']} structured)"
        self.stream.write(
            f"epoch {record['epoch'] + 1}/{self.total_epochs}: loss {record['loss']:.3f}, "
            f"train {record['train_top1']:.1f}%, {_test_accuracy(record)}"
            f"{record['images_per_s']:,.0f} img/s, "
            f"ETA {_clock(eta_s)}{clusters}\n"
        )
        self.stream.flush()


def _test_accuracy(record: dict[str, Any]) -> str:
    if "top1" not in record:
        return "not tested (test_every), "
    return f"test top-1 {record['top1']:.2f}% top-5 {record['top5']:.2f}%, "


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    stop_after_epoch: int | None = None,
    progress_stream: TextIO | None = None,
) -> RunResult:
    """Run (or continue) one training run and write its results under ``out``.

    One process at a time writes a run folder: ``train`` holds the folder's lock (``.lock``)
    while it runs, and a second writer (a ``--resume`` beside a sweep's worker, say) is refused
    with :class:`~dropcluster.errors.RunBusyError`.

    Args:
        config: the run.
        out: folder for config.json, log.jsonl, checkpoint.pt and result.json (and TensorBoard's
            event files under ``tracker="tensorboard"``: :mod:`dropcluster.train.tracking`).
        resume: continue from ``out/checkpoint.pt`` if it exists (a finished run returns its
            result at once). Without it, an existing checkpoint is an error (nothing is
            overwritten). A run stopped by a diverging loss may resume with other optimisation
            settings (:data:`RETUNABLE_AFTER_DIVERGENCE`); any other run only with its own.
        stop_after_epoch: stop after this many epochs in total (for tests of resumption).
        progress_stream: where the progress display goes (default: stderr).

    Returns:
        The :class:`RunResult`.

    Raises:
        DivergedError: the training loss became NaN, infinite or above
            :data:`DIVERGENCE_LOSS`; the last good epoch's checkpoint is kept and no result is
            written.
        ImportError: the config's tracker needs a package that is not installed.
    """
    out = Path(out)
    check_tracker(config.tracker)  # before any work: a missing package is one line now
    checkpoint_path = out / CHECKPOINT_NAME
    if checkpoint_path.exists() and not resume:
        raise FileExistsError(
            f"{checkpoint_path} exists: pass resume=True (--resume) to continue that run, or "
            f"choose another output folder"
        )
    device, ranks = from_environment(config.resolved_device())
    if not ranks.main:  # rank 0 writes the run's files and holds its lock
        return _train_locked(config, out, resume, stop_after_epoch, io.StringIO(), device, ranks)
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, RUN_LOCK_NAME, "training run"):
        return _train_locked(config, out, resume, stop_after_epoch, progress_stream, device, ranks)


#: A mean training loss above this (cross-entropy in nats: the true class's probability below
#: e^-10000) only comes from a run whose weights have blown up; it is treated as divergence.
DIVERGENCE_LOSS = 1e4
#: Steps between two divergence checks inside an epoch (each check reads the loss: a GPU sync).
DIVERGENCE_CHECK_STEPS = 64
#: Settings a diverged run may resume with changed: they steer the optimiser only.
RETUNABLE_AFTER_DIVERGENCE = frozenset(
    {
        "lr",
        "momentum",
        "weight_decay",
        "weight_decay_on",
        "lr_milestones",
        "lr_gamma",
        "amp",
        "amp_dtype",
    }
)
#: Written into a run folder when its loss diverged; removed when the run resumes.
DIVERGED_NAME = "diverged.json"
RUN_LOCK_NAME = ".lock"


def _train_locked(
    config, out, resume, stop_after_epoch, progress_stream, device, ranks: Ranks
) -> RunResult:
    from dropcluster.train.setup import build_run

    state = _resumable_state(config, out, resume, device, ranks)
    torch.manual_seed(config.seed)
    run = build_run(config, device, ranks)
    if ranks.distributed:
        # The same weights and data order on every process (drawn above), but each process
        # draws its own dropout masks, as torch's dropout does under DDP.
        torch.manual_seed(config.seed * 1_000_003 + ranks.rank)
    checkpoint = Checkpoint(run)
    result = RunResult()
    start_epoch = 0
    if state is not None:
        start_epoch = checkpoint.load_state_dict(state, out / CHECKPOINT_NAME)
        result.history = list(state["history"])
    if ranks.main:
        _start_folder(out, config, result.history, resumed=state is not None)
    last_epoch = config.epochs if stop_after_epoch is None else min(config.epochs, stop_after_epoch)
    progress = Progress(config.epochs, progress_stream)
    refits = RefitSchedule(every=config.cluster_every)  # first at epoch s, then every s
    never_fitted = config.refit_warning(run.has_dropcluster)
    if never_fitted is not None and ranks.main:
        # Said before the run starts, not after it: the trainer's refits are fixed by the config.
        warnings.warn(never_fitted, UserWarning, stacklevel=3)
    noisy_norms = config.batch_norm_warning(ranks.world)
    if noisy_norms is not None and ranks.main and has_batch_norm(run.model):
        warnings.warn(noisy_norms, UserWarning, stacklevel=3)
    drop_rates = config.drop_rate_schedule()
    # The rate TensorBoard plots for a run without a schedule (one under a schedule is logged).
    constant_p = config.p if config.regularizer != "none" and drop_rates is None else None
    saved_epochs = start_epoch  # epochs in the last checkpoint written
    tracker = _tracker(config, out, ranks, start_epoch, last_epoch)
    try:
        for epoch in range(start_epoch, last_epoch):
            record = _run_epoch(
                run, epoch, last_epoch, refits, drop_rates, progress, out, saved_epochs
            )
            result.history.append(record)
            if ranks.main:
                _append_log(out / LOG_NAME, record)
                tracker.log_scalars(epoch, epoch_scalars(record, constant_p))
            if config.checkpoints_after(epoch) or epoch == last_epoch - 1:
                _save(checkpoint, out, epoch, result.history)
                saved_epochs = epoch + 1
            progress.epoch(record, (last_epoch - epoch - 1) * record["seconds"])
        _final_metrics(result, config)
        if len(result.history) == config.epochs and ranks.main:
            _write_result(out, result, config)
            tracker.log_scalars(config.epochs - 1, final_scalars(result.top1, result.top5))
    finally:
        tracker.close()
    return result


def _tracker(
    config: TrainConfig, out: Path, ranks: Ranks, start_epoch: int, last_epoch: int
) -> Tracker:
    """The run's tracker: rank 0's, when there are epochs to train. It opens at the epoch the run
    starts from: a resumed run's tracker has TensorBoard drop what earlier files logged from
    there on (epochs logged after the last checkpoint, which the run repeats)."""
    if not ranks.main or start_epoch >= last_epoch:
        return NullTracker()
    return make_tracker(config.tracker, out, purge_step=start_epoch)


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` holds a batch norm layer (whose statistics depend on the batch)."""
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return any(isinstance(module, norms) for module in model.modules())


def _resumable_state(
    config: TrainConfig, out: Path, resume: bool, device: torch.device, ranks: Ranks
) -> dict[str, Any] | None:
    """The checkpoint to resume from (checked against ``config``), or None to start."""
    path = out / CHECKPOINT_NAME
    if not (resume and path.exists()):
        return None
    state = load_checkpoint(path, map_location=device)
    _check_resumable(config, state, out, ranks)
    return state


def _start_folder(out: Path, config: TrainConfig, history: list[dict], *, resumed: bool) -> None:
    """The run folder as the run starts: its config, and its log as the checkpoint has it (the
    log may hold an epoch written after the last checkpoint)."""
    if resumed:
        atomic_write_text(out / LOG_NAME, "".join(json.dumps(r) + "\n" for r in history))
    else:
        (out / LOG_NAME).unlink(missing_ok=True)
    config.save(out / "config.json")
    (out / DIVERGED_NAME).unlink(missing_ok=True)


def _run_epoch(
    run,
    epoch: int,
    last_epoch: int,
    refits: RefitSchedule,
    drop_rates: DropRateSchedule | None,
    progress: Progress,
    out: Path,
    saved_epochs: int,
) -> dict[str, Any]:
    """One epoch of the loop: the drop rate of the epoch, a refit when due, training, a test
    when due; its log record.

    The scheduled rate is a function of the epoch alone, set before the epoch's first step
    and logged as ``p``: a resumed run sets the rate of the epoch it resumes at, as the run
    that never stopped did (the rate is not in the checkpoint, and need not be).
    """
    config, ranks = run.config, run.ranks
    record: dict[str, Any] = {"epoch": epoch}
    if drop_rates is not None:
        record["p"] = drop_rates.apply(unwrap(run.model), epoch)
    if run.has_dropcluster and refits.due(epoch):
        record.update(run.refit().record())
        if ranks.distributed:  # the broadcast made them equal: check it, it is cheap
            record["clusters_agree"] = len(set(gather(_cluster_digest(run.model), ranks))) == 1
    try:
        record.update(train_epoch(run, epoch, progress=progress, last_epoch=last_epoch))
    except DivergedError as error:
        if ranks.main:
            atomic_write_json(out / DIVERGED_NAME, {"epoch": epoch, "message": str(error)})
        raise DivergedError(f"{error}; {_divergence_advice(out, saved_epochs)}") from None
    if config.tests_after(epoch):
        eval_start = time.perf_counter()
        record["top1"], record["top5"] = evaluate(
            run.model,
            run.test_images,
            run.test_labels,
            run.prepare_eval,
            config.eval_batch_size,
            ranks,
            run.precision.eval_dtype,
        )
        record["eval_seconds"] = time.perf_counter() - eval_start
    return record


def _save(checkpoint: Checkpoint, out: Path, epoch: int, history: list[dict]) -> None:
    """The checkpoint after ``epoch`` (rank 0 writes it; every process gives its random state),
    and its kept copy when the config keeps that epoch's (e.g. the paper's figures after 50)."""
    state = checkpoint.state_dict(epoch, history)
    run = checkpoint.run
    if not run.ranks.main:
        return
    save_checkpoint(out / CHECKPOINT_NAME, state)
    if epoch + 1 in run.config.keep_checkpoints:
        save_checkpoint(out / kept_checkpoint_name(epoch + 1), state)


def _final_metrics(result: RunResult, config: TrainConfig) -> None:
    """The mean test accuracy over the last ``average_last`` tested epochs."""
    tail = [record for record in result.history if "top1" in record][-config.average_last :]
    if tail:
        result.top1 = sum(r["top1"] for r in tail) / len(tail)
        result.top5 = sum(r["top5"] for r in tail) / len(tail)


def _cluster_digest(model: nn.Module) -> int:
    """A number that differs when two processes hold different DropCluster clusters."""
    total = 0
    for module in unwrap(model).modules():
        if isinstance(module, DropCluster2d) and module.fitted:
            weights = torch.arange(1, module.labels.numel() + 1, device=module.labels.device)
            total += int((module.labels.flatten() * weights).sum())
            total += int(module.cluster_sizes.sum()) * 7 + int(module.structured.sum()) * 13
    return total


def _check_resumable(config: TrainConfig, state: dict[str, Any], out: Path, ranks: Ranks) -> None:
    """Refuse to resume ``state`` with a config that would change the run's results, except
    optimisation settings of a run that diverged, or with another number of processes."""
    saved_world = int(state.get("world_size", 1))
    if saved_world != ranks.world:
        raise ValueError(
            f"{out / CHECKPOINT_NAME} was trained by {saved_world} process(es), this is "
            f"{ranks.world}: resume it with the same number (dropcluster train "
            f"--nproc-per-node {saved_world}, or torchrun --nproc-per-node {saved_world}), since "
            f"each process's random draws are part of the run"
        )
    saved = TrainConfig.from_dict(state["config"])
    differences = saved.run_differences(config)
    if not differences:
        return
    diverged = (out / DIVERGED_NAME).is_file()
    if diverged and set(differences) <= RETUNABLE_AFTER_DIVERGENCE:
        return
    hint = (
        f"after a divergence only {sorted(RETUNABLE_AFTER_DIVERGENCE)} may change"
        if diverged
        else "resume with the run's own settings, or start a new run in another folder"
    )
    raise ValueError(
        f"{out / CHECKPOINT_NAME} belongs to a different config; differences (saved, given): "
        f"{differences}; {hint}"
    )


def train_step(run, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """One optimisation step of ``run`` on a batch, as the loop makes it: forward under the
    run's autocast, cross-entropy, backward (scaled for float16), SGD step.

    Args:
        run: a :class:`~dropcluster.train.setup.Run` (its model in training mode).
        images: (B, C, H, W) the model's input (a loader batch, augmented and normalised).
        labels: (B,) int64 class indices.

    Returns:
        The loss (0-d) and the logits (B, classes), detached: reading them is the caller's
        synchronisation, not the step's.
    """
    precision = run.precision
    with torch.autocast(run.device.type, dtype=precision.dtype, enabled=precision.autocast):
        logits = run.model(images)
        loss = F.cross_entropy(logits, labels)
    run.optimizer.zero_grad(set_to_none=True)
    precision.scaler.scale(loss).backward()
    precision.scaler.step(run.optimizer)
    precision.scaler.update()
    return loss.detach(), logits.detach()


def train_epoch(
    run, epoch: int, *, progress: Progress | None = None, last_epoch: int | None = None
) -> dict[str, Any]:
    """One pass over ``run.loader`` with :func:`train_step`, then one scheduler step.

    Args:
        run: a :class:`~dropcluster.train.setup.Run`.
        epoch: the epoch (0-based), for the progress line and the divergence message.
        progress: the progress line (None: none); last_epoch: where the run stops, for its ETA.

    Returns:
        The epoch's training metrics: ``loss``, ``train_top1`` (%), ``lr``, ``seconds``,
        ``images_per_s`` (summed over the processes under distributed training).

    Raises:
        DivergedError: the running mean loss is not finite or above :data:`DIVERGENCE_LOSS`
            (checked every :data:`DIVERGENCE_CHECK_STEPS` steps and at the end).
    """
    device, ranks, loader = run.device, run.ranks, run.loader
    last_epoch = epoch + 1 if last_epoch is None else last_epoch
    lr = run.optimizer.param_groups[0]["lr"]  # the rate of this epoch (the scheduler steps after)
    epoch_start = time.perf_counter()
    run.model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    steps = len(loader)
    for step, (images, labels) in enumerate(loader, start=1):
        loss, logits = train_step(run, images, labels)
        loss_sum += loss * labels.shape[0]
        correct += (logits.argmax(1) == labels).sum()
        seen += labels.shape[0]
        if step % DIVERGENCE_CHECK_STEPS == 0 or step == steps:
            # Summed over the processes, so that every one takes the same decision.
            total_loss, total_seen = all_sum([float(loss_sum), seen], ranks, device)
            _check_loss(total_loss / total_seen, epoch, step)
        if progress is not None:
            elapsed = time.perf_counter() - epoch_start
            remaining = (steps - step) * elapsed / step + (
                last_epoch - epoch - 1
            ) * elapsed * steps / step
            progress.step(epoch, step, steps, loss, seen / max(elapsed, 1e-9), remaining)
    run.scheduler.step()
    train_seconds = time.perf_counter() - epoch_start
    # Metrics of the whole batch stream: every process's sums added up.
    loss_total, correct_total, seen = all_sum(
        [float(loss_sum), float(correct), seen], ranks, device
    )
    return {
        "loss": loss_total / max(seen, 1),
        "train_top1": 100.0 * correct_total / max(seen, 1),
        "lr": lr,
        "seconds": train_seconds,
        "images_per_s": seen / max(train_seconds, 1e-9),
    }


def _check_loss(mean_loss: float, epoch: int, step: int) -> None:
    if not math.isfinite(mean_loss) or mean_loss > DIVERGENCE_LOSS:
        raise DivergedError(
            f"training diverged in epoch {epoch + 1} (mean loss {mean_loss:.4g} after {step} steps)"
        )


def _divergence_advice(out: Path, saved_epochs: int) -> str:
    kept = "no epoch was saved"
    if saved_epochs:
        kept = f"the checkpoint after epoch {saved_epochs} is kept"
    return (
        f"{kept}; nothing was recorded as finished. Resume with a smaller learning rate, e.g. "
        f"dropcluster train --resume --out {out} --lr 0.01 (lr, momentum, weight decay and the "
        f"lr schedule may change)"
    )


def _write_result(out: Path, result: RunResult, config: TrainConfig) -> None:
    """``result.json``: the final metrics (kept additions of later steps, e.g. corruptions)."""
    summary = {
        "top1": result.top1,
        "top5": result.top5,
        "average_last": min(config.average_last, len(result.history)),
        "epochs": config.epochs,
    }
    result_path = out / RESULT_NAME
    if result_path.is_file():
        # Resuming a finished run: keep what later steps added (corrupted-test results).
        summary = {**json.loads(result_path.read_text()), **summary}
    atomic_write_json(result_path, summary)


def _append_log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run's ``log.jsonl``, one per epoch, in epoch order.

    Tolerant of what a crash or a second writer leaves: an unreadable (half-written) line is
    skipped and an epoch logged twice keeps its last record. The checkpoint holds the true
    history; ``train(..., resume=True)`` rewrites the log from it.

    Raises:
        FileNotFoundError: no log at ``path``.
    """
    records: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records[record["epoch"]] = record
    return [records[epoch] for epoch in sorted(records)]
