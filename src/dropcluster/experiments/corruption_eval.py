"""Accuracy on corrupted test sets (Hendrycks & Dietterich 2019; the paper's Table 5, Figs 9-10).

The corrupted images are made on the fly, one chunk of the test set at a time, so memory holds
one chunk, never the 35 corrupted copies of the test set. Each chunk's randomness comes from a
generator seeded by (seed, corruption, severity, chunk index) with a fixed chunk size, so the
corrupted set does not depend on the evaluation batch size, the device's order of work or on
which other corruptions are evaluated. Released sets (CIFAR-10-C, CIFAR-100-C,
Tiny-ImageNet-C) are read instead when the caller gives their folder.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor, nn

from dropcluster.data.corruptions import (
    CORRUPTIONS,
    FAMILIES,
    PAPER,
    check_corruption,
    corrupt,
    corruption_names,
    family_for_size,
)
from dropcluster.files import FolderLock, atomic_write_json
from dropcluster.train.config import resolve_device
from dropcluster.train.loop import RESULT_NAME, RUN_LOCK_NAME, autocast_context, topk_hits
from dropcluster.validation import MAX_SEED, check_choice, check_int

__all__ = [
    "CHUNK_IMAGES",
    "CORRUPTIONS_NAME",
    "CorruptionSettings",
    "chunk_generator",
    "evaluate_corruptions",
    "evaluate_run",
    "evaluation_identity",
    "format_table",
    "mean_over_corruptions",
    "parse_corruptions",
    "parse_severities",
    "released_reader",
    "stored_identity",
    "write_corruption_results",
]


#: Images corrupted together (and seeded together): fixed, so results never depend on batch size.
CHUNK_IMAGES = 1000
CORRUPTIONS_NAME = "corruptions.json"


@dataclass
class CorruptionSettings:
    """What a corrupted-test evaluation runs.

    Attributes:
        corruptions: corruption names (a subset of ``CORRUPTIONS``; default: the paper's 7).
        severities: severities in 1..5.
        limit: evaluate on a class-balanced subset of this many test images (None: all).
        seed: seeds the corruptions' randomness (and the subset).
        jpeg_quality: after corrupting, round-trip each image through JPEG at this quality
            (85 is what the released Tiny-ImageNet-C files went through); None: no JPEG.
        family: severity table ("cifar", "tiny-imagenet", "imagenet"); None: by image size.
        corrupted_from: folder of a released corrupted set (CIFAR-100-C / Tiny-ImageNet-C) to
            read instead of generating; None: generate.
    """

    corruptions: list[str] = field(default_factory=lambda: list(PAPER))
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    limit: int | None = None
    seed: int = 0
    jpeg_quality: int | None = None
    family: str | None = None
    corrupted_from: str | None = None

    def __post_init__(self) -> None:
        self.corruptions = parse_corruptions(self.corruptions)
        self.severities = parse_severities(self.severities)
        if self.limit is not None:
            check_int("limit", self.limit, minimum=1)
        check_int("seed", self.seed, minimum=0, maximum=MAX_SEED)
        if self.jpeg_quality is not None:
            check_int("jpeg_quality", self.jpeg_quality, minimum=1, maximum=95)
        if self.family is not None:
            check_choice("family", self.family, FAMILIES)

    def to_dict(self) -> dict[str, Any]:
        return {
            "corruptions": list(self.corruptions),
            "severities": list(self.severities),
            "limit": self.limit,
            "seed": self.seed,
            "jpeg_quality": self.jpeg_quality,
            "family": self.family,
            "corrupted_from": self.corrupted_from,
        }


def parse_corruptions(value: str | Sequence[str]) -> list[str]:
    """A set name (``"paper"``, ``"benchmark"``, ``"extra"``, ``"all"``), corruption names, or
    both, comma-separated or as a list -> the named corruptions in the canonical order (see
    :func:`dropcluster.data.corruptions.corruption_names`)."""
    return list(corruption_names(value if isinstance(value, str) else list(value)))


def parse_severities(value: str | Sequence[int]) -> list[int]:
    """``"1-5"``, ``"1,3,5"``, ``"2"`` or a list of ints -> sorted severities in 1..5."""
    if isinstance(value, str):
        severities: list[int] = []
        try:
            for part in value.split(","):
                low, dash, high = part.strip().partition("-")
                low, high = int(low), int(high if dash else low)
                if not 1 <= low <= high <= 5:
                    raise ValueError(f"severities should be ints in 1..5, but got {value!r}")
                severities.extend(range(low, high + 1))
        except ValueError as error:
            if "1..5" in str(error):
                raise
            raise ValueError(
                f"severities should look like 1-5 or 1,3,5, but got {value!r}"
            ) from error
    else:
        severities = list(value)
    bad = [
        s for s in severities if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 5
    ]
    if bad or not severities:
        raise ValueError(f"severities should be ints in 1..5, but got {value!r}")
    return sorted(set(severities))


def chunk_generator(
    seed: int, corruption: str, severity: int, chunk: int, device: torch.device
) -> torch.Generator:
    """The generator of one chunk: a function of its coordinates only."""
    key = ((seed * 1_000_003 + CORRUPTIONS.index(corruption)) * 7 + severity) * 1_000_033 + chunk
    return torch.Generator(device).manual_seed(key % (2**63 - 1))


@torch.no_grad()
def evaluate_corruptions(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    prepare: Callable[[Tensor], Tensor],
    settings: CorruptionSettings,
    *,
    batch_size: int = 500,
    released: Callable[[str, int], tuple[Tensor, Tensor]] | None = None,
    progress: TextIO | None = None,
    amp_dtype: torch.dtype | None = None,
    score_clean: bool = True,
) -> list[dict[str, Any]]:
    """Top-1/top-5 (%) on the clean images and on every corruption x severity.

    Args:
        model: the trained network (put in eval mode here, restored after).
        images: (N, C, H, W) uint8 clean test images, on the model's device.
        labels: (N,) int64.
        prepare: uint8 images -> the model's input (normalisation, memory format).
        settings: corruptions, severities, seed, JPEG round trip, family.
        batch_size: images per forward pass.
        released: when given, ``released(corruption, severity)`` returns the released corrupted
            set (uint8 images, labels) to use instead of generating one.
        progress: where progress lines go (default stderr).
        amp_dtype: evaluate under autocast to this dtype (as the run trained on CUDA); None:
            in the model's precision.
        score_clean: score ``images`` as the clean row; False leaves it out (``images`` then
            only gives the device, the image size and the severity family).

    Returns:
        One dict per row: ``{"corruption", "severity", "top1", "top5", "images"}``; the first is
        the clean baseline (``"clean"``, severity 0) unless ``score_clean`` is False.
    """
    check_int("batch_size", batch_size, minimum=1)
    if images.shape[0] == 0:
        raise ValueError("the test set is empty: there is nothing to evaluate")
    stream = progress if progress is not None else sys.stderr
    was_training = model.training
    model.eval()
    family = settings.family or family_for_size(images.shape[-2], images.shape[-1])

    def score(batches) -> tuple[float, float, int]:
        counts = torch.zeros(2, dtype=torch.int64, device=images.device)
        total = 0
        for batch_images, batch_labels in batches:
            for start in range(0, batch_images.shape[0], batch_size):
                with autocast_context(images.device.type, amp_dtype):
                    logits = model(prepare(batch_images[start : start + batch_size]))
                counts += topk_hits(logits, batch_labels[start : start + batch_size])
            total += batch_images.shape[0]
        correct1, correct5 = counts.tolist()
        if total == 0:
            # Never report 0 % for "no predictions": that would overwrite good results.
            raise ValueError("an evaluation produced no predictions (no images were scored)")
        return 100.0 * correct1 / total, 100.0 * correct5 / total, total

    def generated(corruption: str, severity: int):
        for chunk, start in enumerate(range(0, images.shape[0], CHUNK_IMAGES)):
            clean = images[start : start + CHUNK_IMAGES]
            generator = chunk_generator(settings.seed, corruption, severity, chunk, images.device)
            corrupted = corrupt(clean, corruption, severity, family=family, generator=generator)
            if settings.jpeg_quality is not None:
                from dropcluster.data.corrupted_sets import jpeg_round_trip

                corrupted = jpeg_round_trip(corrupted.cpu(), settings.jpeg_quality).to(
                    images.device
                )
            yield corrupted, labels[start : start + CHUNK_IMAGES]

    def from_release(corruption: str, severity: int):
        release_images, release_labels = released(corruption, severity)
        for start in range(0, release_images.shape[0], CHUNK_IMAGES):
            yield (
                release_images[start : start + CHUNK_IMAGES].to(images.device),
                release_labels[start : start + CHUNK_IMAGES].to(images.device),
            )

    if released is None:
        # Every corruption this evaluation makes is checked first (channels, sizes, frost's
        # files): a problem is one line before any scoring, not after an hour of it.
        for corruption in settings.corruptions:
            for severity in settings.severities:
                check_corruption(corruption, severity, images.shape, family=family)
    try:
        rows = []
        if score_clean:
            top1, top5, total = score([(images, labels)])
            rows.append(
                {"corruption": "clean", "severity": 0, "top1": top1, "top5": top5, "images": total}
            )
        tasks = [(c, s) for c in settings.corruptions for s in settings.severities]
        source = from_release if released is not None else generated
        start_time = time.perf_counter()
        for index, (corruption, severity) in enumerate(tasks, start=1):
            top1, top5, total = score(source(corruption, severity))
            rows.append(
                {
                    "corruption": corruption,
                    "severity": severity,
                    "top1": top1,
                    "top5": top5,
                    "images": total,
                }
            )
            elapsed = time.perf_counter() - start_time
            eta = elapsed / index * (len(tasks) - index)
            stream.write(
                f"corruptions {index}/{len(tasks)}: {corruption} severity {severity}: "
                f"top-1 {top1:.2f}% top-5 {top5:.2f}% (ETA {eta:.0f} s)\n"
            )
            stream.flush()
    finally:
        model.train(was_training)
    return rows


def mean_over_corruptions(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per severity, the mean top-1/top-5 over the corruptions evaluated at that severity."""
    by_severity: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        if row["corruption"] != "clean":
            by_severity.setdefault(row["severity"], []).append(row)
    return [
        {
            "severity": severity,
            "top1": sum(r["top1"] for r in group) / len(group),
            "top5": sum(r["top5"] for r in group) / len(group),
            "corruptions": len(group),
        }
        for severity, group in sorted(by_severity.items())
    ]


def format_table(rows: list[dict[str, Any]], metric: str = "top1") -> str:
    """A text table: one line per corruption, one column per severity, then the mean line."""
    severities = sorted({r["severity"] for r in rows if r["corruption"] != "clean"})
    corruptions = list(dict.fromkeys(r["corruption"] for r in rows if r["corruption"] != "clean"))
    value = {(r["corruption"], r["severity"]): r[metric] for r in rows}
    label = "top-1" if metric == "top1" else "top-5"
    width = max([len("mean over corruptions")] + [len(c) for c in corruptions])
    lines = [f"{label} (%)".ljust(width) + "".join(f"{'sev ' + str(s):>9}" for s in severities)]
    for corruption in corruptions:
        cells = "".join(
            f"{value[(corruption, s)]:>9.2f}" if (corruption, s) in value else f"{'-':>9}"
            for s in severities
        )
        lines.append(corruption.ljust(width) + cells)
    means = {m["severity"]: m[metric] for m in mean_over_corruptions(rows)}
    lines.append(
        "mean over corruptions".ljust(width) + "".join(f"{means[s]:>9.2f}" for s in severities)
    )
    clean = [r for r in rows if r["corruption"] == "clean"]
    if clean:
        lines.append(f"clean: {clean[0][metric]:.2f}")
    return "\n".join(lines)


def evaluation_identity(
    settings: CorruptionSettings, checkpoint_epochs: int, device: torch.device | str
) -> dict[str, Any]:
    """What makes two corrupted-test evaluations of a run equal: the settings, the checkpoint
    they scored (epochs trained) and the device type (CPU and CUDA generators draw different
    noise for the same seed)."""
    return {
        "settings": settings.to_dict(),
        "checkpoint_epochs": int(checkpoint_epochs),
        "device_type": torch.device(device).type,
    }


def stored_identity(run_dir: str | Path) -> dict[str, Any] | None:
    """The :func:`evaluation_identity` of the run's ``corruptions.json`` (None: none stored)."""
    path = Path(run_dir) / CORRUPTIONS_NAME
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return None  # damaged: evaluated again
    if not isinstance(document, dict):
        return None
    return {key: document.get(key) for key in ("settings", "checkpoint_epochs", "device_type")}


def write_corruption_results(
    run_dir: str | Path,
    rows: list[dict[str, Any]],
    settings: CorruptionSettings,
    source: str,
    *,
    checkpoint_epochs: int,
    device: torch.device | str,
    seconds: float | None = None,
    amp_dtype: torch.dtype | None = None,
) -> Path:
    """Write ``corruptions.json`` in the run folder and add a summary to its ``result.json``.

    Both files are replaced atomically; evaluating again with other settings overwrites the
    previous corruption results (the settings, the checkpoint's epoch count and the device type
    are stored with them, and ``seconds``, the evaluation's wall time, when given, and the
    autocast dtype it ran under, None for full precision).
    """
    run_dir = Path(run_dir)
    empty = [(r["corruption"], r["severity"]) for r in rows if not r.get("images")]
    if not rows or empty:
        raise ValueError(f"refusing to store corruption results with no scored images: {empty}")
    document = {
        **evaluation_identity(settings, checkpoint_epochs, device),
        "source": source,
        "rows": rows,
        "mean_over_corruptions": mean_over_corruptions(rows),
    }
    document["amp_dtype"] = None if amp_dtype is None else str(amp_dtype).removeprefix("torch.")
    if seconds is not None:
        document["seconds"] = seconds
    path = run_dir / CORRUPTIONS_NAME
    atomic_write_json(path, document)
    result_path = run_dir / RESULT_NAME
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    result["corruptions"] = {
        "clean": next((r for r in rows if r["corruption"] == "clean"), None),
        "mean_over_corruptions": document["mean_over_corruptions"],
        "file": CORRUPTIONS_NAME,
    }
    atomic_write_json(result_path, result)
    return path


def evaluate_run(
    run_dir: str | Path,
    settings: CorruptionSettings,
    *,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    progress: TextIO | None = None,
) -> list[dict[str, Any]]:
    """Evaluate the trained run in ``run_dir`` on corrupted test sets and store the results.

    Writes ``run_dir/corruptions.json`` (every row, the settings, the source) and adds the clean
    baseline and the per-severity means to ``run_dir/result.json``.

    Args:
        device: where the model runs ("auto": CUDA when there is one, else the CPU).

    Returns:
        The rows (see :func:`evaluate_corruptions`).
    """
    if batch_size is not None:
        check_int("batch_size", batch_size, minimum=1)
    device = resolve_device(device)
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"no run folder at {run_dir}")
    # The run's lock: a training process or another evaluation must not write beside us.
    with FolderLock(run_dir, RUN_LOCK_NAME, "training run"):
        return _evaluate_run_locked(Path(run_dir), settings, device, batch_size, progress)


def _evaluate_run_locked(
    run_dir: Path, settings: CorruptionSettings, device, batch_size, progress
) -> list[dict[str, Any]]:
    from dropcluster.data.subsets import stratified_subset
    from dropcluster.train.restore import load_run

    start = time.perf_counter()
    loaded = load_run(run_dir, device=device)
    if not loaded.finished:
        warnings.warn(
            f"{run_dir} is not finished ({loaded.epochs_done} of {loaded.config.epochs} epochs): "
            f"evaluating its last checkpoint",
            stacklevel=3,
        )
    test_set = loaded.test_set
    images, labels = test_set.images, test_set.labels
    if settings.limit is not None and settings.limit < images.shape[0]:
        index = stratified_subset(labels, settings.limit / images.shape[0], seed=settings.seed)
        images, labels = images[index], labels[index]
    released = None
    source = "generated"
    if settings.corrupted_from is not None:
        dataset = loaded.config.dataset
        root = settings.corrupted_from
        classes = None
        if dataset == "tiny-imagenet":
            from dropcluster.data.datasets import tiny_imagenet_wnids

            # The released folders are named by wnid; our labels index the sorted wnids.
            classes = tiny_imagenet_wnids(loaded.config.data_dir)

        released = released_reader(root, dataset, settings, classes)

        source = "released"
    model_device = next(loaded.model.parameters()).device
    amp_dtype = _amp_dtype(loaded.config, model_device)
    rows = evaluate_corruptions(
        loaded.model,
        images.to(model_device),
        labels.to(model_device),
        loaded.prepare_eval,
        settings,
        batch_size=batch_size or loaded.config.eval_batch_size,
        released=released,
        progress=progress,
        amp_dtype=amp_dtype,
    )
    write_corruption_results(
        run_dir,
        rows,
        settings,
        source,
        checkpoint_epochs=loaded.epochs_done,
        device=model_device,
        seconds=time.perf_counter() - start,
        amp_dtype=amp_dtype,
    )
    return rows


def released_reader(
    root, dataset: str, settings: CorruptionSettings, classes: list[str] | None = None
) -> Callable[[str, int], tuple[Tensor, Tensor]]:
    """``read(corruption, severity) -> (images, labels)`` from the released files of
    ``dataset`` in ``root`` (see :func:`dropcluster.data.corrupted_sets.load_released`), cut
    to the class-balanced subset of ``settings.limit`` images (seeded by ``settings.seed``)."""
    from dropcluster.data.corrupted_sets import load_released
    from dropcluster.data.subsets import stratified_subset

    def read(corruption: str, severity: int) -> tuple[Tensor, Tensor]:
        images, labels = load_released(root, dataset, corruption, severity, classes)
        if settings.limit is not None and settings.limit < images.shape[0]:
            index = stratified_subset(labels, settings.limit / images.shape[0], seed=settings.seed)
            images, labels = images[index], labels[index]
        return images, labels

    return read


def _amp_dtype(config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype the run trained with on ``device`` (None: full precision)."""
    if device.type == "cuda" and config.amp:
        return getattr(torch, config.amp_dtype)
    return None
