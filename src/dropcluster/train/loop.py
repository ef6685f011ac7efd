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

import bisect
import contextlib
import io
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dropcluster.errors import DivergedError
from dropcluster.files import FolderLock, atomic_write_json, atomic_write_text
from dropcluster.nn import DropCluster2d, RefitSchedule, fit_clusters
from dropcluster.nn.fitting import unwrap
from dropcluster.train.checkpoint import (
    CHECKPOINT_NAME,
    MODEL_REVISION,
    kept_checkpoint_name,
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dropcluster.train.config import TrainConfig
from dropcluster.train.distributed import SINGLE, Ranks, all_sum, from_environment, gather

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
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, prepare, batch_size: int,
             ranks: Ranks = SINGLE, amp_dtype: torch.dtype | None = None):  # fmt: skip
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
    correct1, correct5, total = all_sum([correct1, correct5, images.shape[0]], ranks,
                                        labels.device)  # fmt: skip
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

    def step(self, epoch: int, step: int, steps: int, loss: Tensor, images_per_s: float,
             eta_s: float) -> None:  # fmt: skip
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
        out: folder for config.json, log.jsonl, checkpoint.pt and result.json.
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
    """
    out = Path(out)
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
        return _train_locked(config, out, resume, stop_after_epoch, progress_stream, device,
                             ranks)  # fmt: skip


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


def _train_locked(config, out, resume, stop_after_epoch, progress_stream, device,
                  ranks: Ranks) -> RunResult:  # fmt: skip
    from dropcluster.train.setup import build_run

    checkpoint_path = out / CHECKPOINT_NAME
    state = load_checkpoint(checkpoint_path, map_location=device) if (
        resume and checkpoint_path.exists()) else None  # fmt: skip
    if state is not None:
        _check_resumable(config, state, out, ranks)
    torch.manual_seed(config.seed)
    run = build_run(config, device, ranks)
    if ranks.distributed:
        # The same weights and data order on every process (drawn above), but each process
        # draws its own dropout masks, as torch's dropout does under DDP.
        torch.manual_seed(config.seed * 1_000_003 + ranks.rank)
    autocast = device.type == "cuda" and config.amp
    amp_dtype = getattr(torch, config.amp_dtype)
    # float16 needs loss scaling; bfloat16 has float32's range and does not.
    scaler = torch.amp.GradScaler(device.type, enabled=autocast and amp_dtype == torch.float16)
    result = RunResult()
    start_epoch = 0
    if state is not None:
        start_epoch = _restore(run, scaler, state, config, ranks, out / CHECKPOINT_NAME)
        result.history = list(state["history"])
    if ranks.main:
        if state is not None:
            # The log may hold an epoch written after the last checkpoint: rewrite it.
            log = "".join(json.dumps(r) + "\n" for r in result.history)
            atomic_write_text(out / LOG_NAME, log)
        else:
            (out / LOG_NAME).unlink(missing_ok=True)
        config.save(out / "config.json")
        (out / DIVERGED_NAME).unlink(missing_ok=True)

    last_epoch = config.epochs if stop_after_epoch is None else min(config.epochs, stop_after_epoch)
    progress = Progress(config.epochs, progress_stream)
    refits = RefitSchedule(every=config.cluster_every)  # first at epoch s, then every s
    saved_epochs = start_epoch  # epochs in the last checkpoint written
    for epoch in range(start_epoch, last_epoch):
        record: dict[str, Any] = {"epoch": epoch}
        if run.has_dropcluster and refits.due(epoch):
            fit = fit_clusters(
                run.model,
                run.cluster_images,
                run.cluster_images.shape[0],
                prepare=run.prepare_eval,
                batch_size=config.eval_batch_size,
            )
            record.update(fit.record())
            if ranks.distributed:  # the broadcast made them equal: check it, it is cheap
                record["clusters_agree"] = len(set(gather(_cluster_digest(run.model), ranks))) == 1
        try:
            record.update(_train_epoch(run, scaler, device, autocast, amp_dtype, progress, epoch,
                                       last_epoch, ranks))  # fmt: skip
        except DivergedError as error:
            if ranks.main:
                atomic_write_json(out / DIVERGED_NAME, {"epoch": epoch, "message": str(error)})
            raise DivergedError(f"{error}; {_divergence_advice(out, saved_epochs)}") from None
        if config.tests_after(epoch):
            eval_start = time.perf_counter()
            record["top1"], record["top5"] = evaluate(
                run.model, run.test_images, run.test_labels, run.prepare_eval,
                config.eval_batch_size, ranks, amp_dtype if autocast else None,
            )  # fmt: skip
            record["eval_seconds"] = time.perf_counter() - eval_start
        result.history.append(record)
        if ranks.main:
            _append_log(out / LOG_NAME, record)
        saving = config.checkpoints_after(epoch) or epoch == last_epoch - 1
        if saving:  # every process's random state, for an exact resume
            rng = gather(rng_state(), ranks)
        if ranks.main and saving:
            checkpoint = {
                "config": config.to_dict(), "epoch": epoch, "model": unwrap(run.model).state_dict(),
                "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                "loader": run.loader.state_dict(), "rng": rng[0], "rng_ranks": rng,
                "world_size": ranks.world, "history": result.history,
                "scaler": scaler.state_dict(), "model_revision": MODEL_REVISION,
            }  # fmt: skip
            save_checkpoint(checkpoint_path, checkpoint)
            if epoch + 1 in config.keep_checkpoints:  # e.g. the paper's figures after 50 epochs
                save_checkpoint(out / kept_checkpoint_name(epoch + 1), checkpoint)
        if saving:
            saved_epochs = epoch + 1
        progress.epoch(record, (last_epoch - epoch - 1) * record["seconds"])

    tail = [record for record in result.history if "top1" in record][-config.average_last :]
    if tail:
        result.top1 = sum(r["top1"] for r in tail) / len(tail)
        result.top5 = sum(r["top5"] for r in tail) / len(tail)
    if len(result.history) == config.epochs and ranks.main:
        _write_result(out, result, config)
    return result


def _cluster_digest(model: nn.Module) -> int:
    """A number that differs when two processes hold different DropCluster clusters."""
    total = 0
    for module in unwrap(model).modules():
        if isinstance(module, DropCluster2d) and module.fitted:
            weights = torch.arange(1, module.labels.numel() + 1, device=module.labels.device)
            total += int((module.labels.flatten() * weights).sum())
            total += int(module.cluster_sizes.sum()) * 7 + int(module.structured.sum()) * 13
    return total


def _check_resumable(config: TrainConfig, state: dict[str, Any], out: Path,
                     ranks: Ranks) -> None:  # fmt: skip
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


def _restore(
    run, scaler, state: dict[str, Any], config: TrainConfig, ranks: Ranks, path: Path
) -> int:
    """Load the checkpoint's states into the run's objects; returns the next epoch."""
    load_model_state(unwrap(run.model), state, path)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.loader.load_state_dict(state["loader"])
    set_rng_state(state["rng_ranks"][ranks.rank] if "rng_ranks" in state else state["rng"])
    if "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    _apply_optimizer_settings(run.optimizer, run.scheduler, config)
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


def _train_epoch(run, scaler, device, autocast: bool, amp_dtype, progress: Progress, epoch: int,
                 last_epoch: int, ranks: Ranks = SINGLE) -> dict[str, Any]:  # fmt: skip
    """One pass over the training set; returns the epoch's training metrics.

    Raises:
        DivergedError: the running mean loss is not finite or above DIVERGENCE_LOSS.
    """
    model, optimizer, loader = run.model, run.optimizer, run.loader
    lr = optimizer.param_groups[0]["lr"]  # the rate of this epoch (the scheduler steps after)
    epoch_start = time.perf_counter()
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    steps = len(loader)
    for step, (images, labels) in enumerate(loader, start=1):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=autocast):
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach() * labels.shape[0]
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += labels.shape[0]
        if step % DIVERGENCE_CHECK_STEPS == 0 or step == steps:
            # Summed over the processes, so that every one takes the same decision.
            total_loss, total_seen = all_sum([float(loss_sum), seen], ranks, device)
            _check_loss(total_loss / total_seen, epoch, step)
        elapsed = time.perf_counter() - epoch_start
        rate = seen / max(elapsed, 1e-9)
        remaining = (steps - step) * elapsed / step + (
            last_epoch - epoch - 1
        ) * elapsed * steps / step
        progress.step(epoch, step, steps, loss.detach(), rate, remaining)
    run.scheduler.step()
    train_seconds = time.perf_counter() - epoch_start
    # Metrics of the whole batch stream: every process's sums added up.
    loss_total, correct_total, seen = all_sum([float(loss_sum), float(correct), seen], ranks,
                                              device)  # fmt: skip
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
    summary = {"top1": result.top1, "top5": result.top5,
               "average_last": min(config.average_last, len(result.history)),
               "epochs": config.epochs}  # fmt: skip
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
