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

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dropcluster.nn import DropCluster2d
from dropcluster.train.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dropcluster.train.config import TrainConfig

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
    largest = min(max(ks), logits.shape[1])
    top = logits.topk(largest, dim=1).indices
    hits = top == labels.unsqueeze(1)
    return [int(hits[:, : min(k, largest)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, prepare, batch_size: int):
    """Top-1 and top-5 accuracy (%) of ``model`` on uint8 ``images``, in evaluation mode."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    for start in range(0, images.shape[0], batch_size):
        batch = prepare(images[start : start + batch_size])
        c1, c5 = topk_correct(model(batch), labels[start : start + batch_size])
        correct1 += c1
        correct5 += c5
    model.train(was_training)
    total = max(1, images.shape[0])
    return 100.0 * correct1 / total, 100.0 * correct5 / total


@torch.no_grad()
def refit_clusters(model: nn.Module, images: Tensor, prepare, batch_size: int) -> dict[str, Any]:
    """Refit every DropCluster2d in ``model`` on its inputs for ``images`` (Algorithm 1).

    Returns the number of structured channels and of channels per layer, the layers' module
    names, and the time taken.
    """
    # Hooks added after torch.compile are not seen by the compiled graph: capture eagerly.
    model = getattr(model, "_orig_mod", model)
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, DropCluster2d)]
    layers = [m for _, m in named]
    if not layers:
        return {}
    start = time.perf_counter()
    captured: dict[int, list[Tensor]] = {id(layer): [] for layer in layers}

    def capture(module, inputs):
        captured[id(module)].append(inputs[0].detach().float())
        if all(len(batches) == len(captured[id(layers[0])]) for batches in captured.values()):
            # Every layer has its input for this batch: the rest of the forward is not needed.
            raise _AllCaptured

    hooks = [layer.register_forward_pre_hook(capture) for layer in layers]
    was_training = model.training
    model.eval()
    try:
        for offset in range(0, images.shape[0], batch_size):
            try:
                model(prepare(images[offset : offset + batch_size]))
            except _AllCaptured:
                pass
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    structured = []
    for layer in layers:
        activations = torch.cat(captured[id(layer)]).contiguous()
        layer.fit(activations)
        structured.append(int(layer.structured.sum()))
    return {"structured": structured, "channels": [int(layer.labels.shape[0]) for layer in layers],
            "layers": [name for name, _ in named],
            "refit_seconds": time.perf_counter() - start}  # fmt: skip


class _AllCaptured(Exception):
    """Raised by the capture hook to end a forward pass early."""


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
            f"train {record['train_top1']:.1f}%, test top-1 {record['top1']:.2f}% "
            f"top-5 {record['top5']:.2f}%, {record['images_per_s']:,.0f} img/s, "
            f"ETA {_clock(eta_s)}{clusters}\n"
        )
        self.stream.flush()


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

    Args:
        config: the run.
        out: folder for config.json, log.jsonl, checkpoint.pt and result.json.
        resume: continue from ``out/checkpoint.pt`` if it exists (a finished run returns its
            result at once). Without it, an existing checkpoint is an error (nothing is
            overwritten).
        stop_after_epoch: stop after this many epochs in total (for tests of resumption).
        progress_stream: where the progress display goes (default: stderr).

    Returns:
        The :class:`RunResult`.
    """
    from dropcluster.train.setup import build_run

    out = Path(out)
    checkpoint_path = out / CHECKPOINT_NAME
    if checkpoint_path.exists() and not resume:
        raise FileExistsError(
            f"{checkpoint_path} exists: pass resume=True (--resume) to continue that run, or "
            f"choose another output folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    device = config.resolved_device()
    torch.manual_seed(config.seed)
    run = build_run(config, device)
    model, optimizer, scheduler, loader = run.model, run.optimizer, run.scheduler, run.loader
    result = RunResult()
    start_epoch = 0
    if resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, map_location=device)
        saved = TrainConfig.from_dict(state["config"])
        if not saved.same_run_as(config):
            raise ValueError(
                f"{checkpoint_path} belongs to a different config; differences (saved, given): "
                f"{saved.run_differences(config)}"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        result.history = list(state["history"])
        start_epoch = int(state["epoch"]) + 1
        # The log may hold an epoch written after the last checkpoint: rewrite it.
        log_tmp = out / (LOG_NAME + ".tmp")
        log_tmp.write_text("".join(json.dumps(r) + "\n" for r in result.history))
        log_tmp.replace(out / LOG_NAME)
    else:
        config.save(out / "config.json")
        (out / LOG_NAME).unlink(missing_ok=True)

    last_epoch = config.epochs if stop_after_epoch is None else min(config.epochs, stop_after_epoch)
    progress = Progress(config.epochs, progress_stream)
    autocast = device.type == "cuda" and config.amp
    amp_dtype = getattr(torch, config.amp_dtype)
    # float16 needs loss scaling; bfloat16 has float32's range and does not.
    scaler = torch.amp.GradScaler(device.type, enabled=autocast and amp_dtype == torch.float16)
    if resume and checkpoint_path.exists() and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    for epoch in range(start_epoch, last_epoch):
        record: dict[str, Any] = {"epoch": epoch}
        if epoch > 0 and epoch % config.cluster_every == 0 and run.has_dropcluster:
            record.update(
                refit_clusters(model, run.cluster_images, run.prepare_eval, config.eval_batch_size)
            )
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
            elapsed = time.perf_counter() - epoch_start
            rate = seen / max(elapsed, 1e-9)
            remaining = (steps - step) * elapsed / step + (
                last_epoch - epoch - 1
            ) * elapsed * steps / step
            progress.step(epoch, step, steps, loss.detach(), rate, remaining)
        scheduler.step()
        train_seconds = time.perf_counter() - epoch_start
        top1, top5 = evaluate(
            model, run.test_images, run.test_labels, run.prepare_eval, config.eval_batch_size
        )
        record.update(
            loss=float(loss_sum) / max(seen, 1),
            train_top1=100.0 * float(correct) / max(seen, 1),
            top1=top1,
            top5=top5,
            lr=optimizer.param_groups[0]["lr"],
            seconds=train_seconds,
            images_per_s=seen / max(train_seconds, 1e-9),
        )
        result.history.append(record)
        _append_log(out / LOG_NAME, record)
        save_checkpoint(checkpoint_path, {
            "config": config.to_dict(), "epoch": epoch, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "loader": loader.state_dict(), "rng": rng_state(), "history": result.history,
            "scaler": scaler.state_dict(),
        })  # fmt: skip
        progress.epoch(record, (last_epoch - epoch - 1) * train_seconds)

    tail = result.history[-config.average_last :]
    if tail:
        result.top1 = sum(r["top1"] for r in tail) / len(tail)
        result.top5 = sum(r["top5"] for r in tail) / len(tail)
    if len(result.history) == config.epochs:
        summary = {"top1": result.top1, "top5": result.top5, "average_last": len(tail),
                   "epochs": config.epochs}  # fmt: skip
        result_path = out / RESULT_NAME
        if result_path.is_file():
            # Resuming a finished run: keep what later steps added (corrupted-test results).
            summary = {**json.loads(result_path.read_text()), **summary}
        tmp = out / (RESULT_NAME + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(out / RESULT_NAME)
    return result


def _append_log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
