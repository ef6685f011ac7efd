"""``evaluate_model``: any classifier's accuracy on CIFAR-10-C, CIFAR-100-C or Tiny-ImageNet-C."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import torch
from torch import Tensor, nn

from dropcluster.data.corruptions import FAMILIES
from dropcluster.data.datasets import ImageDataset
from dropcluster.experiments.corruption_eval import (
    CorruptionSettings,
    evaluate_corruptions,
    released_reader,
)
from dropcluster.robustness.result import RobustnessResult
from dropcluster.validation import MAX_SEED, check_choice, check_int, first_few

__all__ = ["CORRUPTED_DATASETS", "SOURCES", "evaluate_model", "make_prepare"]

#: Corrupted test set -> (its clean data set for ``load_dataset``, number of classes).
CORRUPTED_DATASETS: dict[str, tuple[str, int]] = {
    "cifar10-c": ("cifar10", 10),
    "cifar100-c": ("cifar100", 100),
    "tiny-imagenet-c": ("tiny-imagenet", 200),
}

#: ``released``: the published files; ``generated``: corrupted here from the clean test set.
SOURCES = ("released", "generated")


def make_prepare(
    normalize: tuple[Sequence[float], Sequence[float]] | None,
    transform: Callable[[Tensor], Tensor] | None,
    channels: int,
) -> Callable[[Tensor], Tensor]:
    """uint8 (N, C, H, W) -> the model's input: ``x / 255``, then ``(x - mean) / std`` per
    channel, then ``transform``.

    Raises:
        ValueError: ``normalize`` is not two sequences of ``channels`` numbers (std > 0).
    """
    mean = std = None
    if normalize is not None:
        try:
            mean, std = (torch.tensor([float(v) for v in part]) for part in normalize)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"normalize should be (mean, std), two sequences of {channels} numbers, but got "
                f"{normalize!r}"
            ) from error
        if mean.numel() != channels or std.numel() != channels or bool((std <= 0).any()):
            raise ValueError(
                f"normalize should give {channels} means and {channels} positive stds (one per "
                f"channel of the images), but got mean {mean.tolist()} and std {std.tolist()}"
            )
        mean, std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)

    def prepare(images: Tensor) -> Tensor:
        pixels = images.float() / 255
        if mean is not None:
            pixels = (pixels - mean.to(pixels.device)) / std.to(pixels.device)
        return transform(pixels) if transform is not None else pixels

    return prepare


def evaluate_model(
    model: nn.Module,
    dataset: str | ImageDataset | tuple[Tensor, Tensor],
    *,
    data_dir: str | Path | None = None,
    source: str | None = None,
    corruptions: str | Sequence[str] = "benchmark",
    severities: str | Sequence[int] = "1-5",
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    limit: int | None = None,
    seed: int = 0,
    family: str | None = None,
    progress: TextIO | None = None,
    description: str | None = None,
) -> RobustnessResult:
    """Score a classifier on the clean and corrupted test images of ``dataset``.

    The model sees float images in [0, 1], (N, 3, H, W) (32 px for CIFAR, 64 px for Tiny
    ImageNet), normalised with ``normalize`` and then passed through ``transform`` when given
    (e.g. a resize for a model trained at another size); it must return (N, classes) logits.
    It is put in eval mode for the evaluation (and restored after) and run under
    ``torch.no_grad``.

    Args:
        model: any ``nn.Module``; it stays on its device unless ``device`` is given.
        dataset: ``"cifar10-c"``, ``"cifar100-c"`` or ``"tiny-imagenet-c"``; or a clean test
            set of your own, an :class:`~dropcluster.data.datasets.ImageDataset` or a tuple
            (images Tensor[N, C, H, W] uint8, labels Tensor[N] int64), corrupted here
            (``source="generated"``; the severity family follows the image size).
        data_dir: the folder holding the released set (``CIFAR-10-C/`` ...) and the clean
            data set (``cifar-10-batches-py/`` ...), or those folders' parent; None: the
            default data folder (``$DROPCLUSTER_DATA``, else ``~/.cache/dropcluster/data``).
        source: ``"released"`` (the default for a named set) reads the published files
            (comparable with published numbers; the clean row is scored when the clean test set
            is there too); ``"generated"`` (the default for a test set of your own) corrupts
            the clean test set here, on the model's device, seeded by ``seed``.
        corruptions: a set (``"benchmark"``: the 15 of mCE; ``"paper"``, ``"extra"``,
            ``"all"``), names, or both (see :func:`dropcluster.data.corruptions.corruption_names`).
        severities: ``"1-5"``, ``"1,3,5"`` or a list of ints in 1..5.
        normalize: (mean, std) per channel, applied to pixels in [0, 1]; None: none.
        transform: applied to the normalised float batch last; None: none.
        batch_size: images per forward pass.
        device: where to run (the model is moved there); None: the model's device.
        limit: score a class-balanced subset of this many test images (None: all).
        seed: seeds the generated corruptions and the subset.
        family: severity table of generated corruptions (``"cifar"``, ``"tiny-imagenet"``,
            ``"imagenet"``); None: by image size.
        progress: where progress lines go (default: stderr).
        description: what to call the model in the result (e.g. its ``MODULE:FACTORY``).

    Returns:
        A :class:`~dropcluster.robustness.RobustnessResult` (rows, errors, mCE, ``to_json``).

    Raises:
        ValueError: an unknown data set, source, corruption, severity or family, bad
            ``normalize``, or a model whose output is not (N, classes) logits; each checked
            before the evaluation starts.
        FileNotFoundError: the released files or the clean test set are not in ``data_dir``.
    """
    own = not isinstance(dataset, str)
    if own:
        own_images, own_labels, classes, name = _own_test_set(dataset)
    else:
        check_choice("dataset", dataset, tuple(CORRUPTED_DATASETS))
    if source is None:
        source = "generated" if own else "released"
    check_choice("source", source, SOURCES)
    if own and source != "generated":
        raise ValueError(
            f"a test set of your own has no released copy: source should be 'generated', but "
            f"got {source!r}"
        )
    check_int("batch_size", batch_size, minimum=1)
    check_int("seed", seed, minimum=0, maximum=MAX_SEED)
    if family is not None:
        check_choice("family", family, FAMILIES)
    settings = CorruptionSettings(
        corruptions=corruptions if isinstance(corruptions, str) else list(corruptions),
        severities=severities,
        limit=limit,
        seed=seed,
        family=family,
        corrupted_from=None if data_dir is None else str(data_dir),
    )
    if device is not None:
        model = model.to(device)
    model_device = _model_device(model)
    released = None
    if own:
        clean, dataset = (own_images, own_labels), name
    else:
        clean_name, classes = CORRUPTED_DATASETS[dataset]
        if source == "released":
            released = _released_reader(data_dir, clean_name, settings)
        clean = _clean_test_set(clean_name, data_dir, required=source == "generated")
    if clean is None:
        if released is None:  # pragma: no cover - guarded above
            raise FileNotFoundError(f"no clean {clean_name} test set")
        images, labels = released(settings.corruptions[0], settings.severities[0])
        channels = images.shape[1]
    else:
        images, labels = clean
        channels = images.shape[1]
        if settings.limit is not None and settings.limit < images.shape[0]:
            from dropcluster.data.subsets import stratified_subset

            index = stratified_subset(labels, settings.limit / images.shape[0], seed=seed)
            images, labels = images[index], labels[index]
    prepare = make_prepare(normalize, transform, channels)
    _check_output(model, prepare(images[:2].to(model_device)), classes, dataset, exact=not own)
    stream = progress if progress is not None else sys.stderr
    if clean is None:
        stream.write(
            f"no clean {clean_name} test set in {data_dir or 'the data folder'}: the clean row "
            f"(and relative CE) is left out\n"
        )
        rows = _released_only(model, prepare, settings, released, batch_size, stream, model_device)
    else:
        rows = evaluate_corruptions(
            model,
            images.to(model_device),
            labels.to(model_device),
            prepare,
            settings,
            batch_size=batch_size,
            released=released,
            progress=stream,
        )
    recorded = settings.to_dict()
    recorded.update(
        source=source,
        normalize=None if normalize is None else [list(map(float, p)) for p in normalize],
        transform=None if transform is None else getattr(transform, "__name__", repr(transform)),
    )
    return RobustnessResult(dataset, source, tuple(rows), recorded, description)


def _own_test_set(dataset) -> tuple[Tensor, Tensor, int, str]:
    """(images, labels, number of classes, name) of a test set given as data."""
    if isinstance(dataset, ImageDataset):
        return dataset.images, dataset.labels, len(dataset.classes), f"{dataset.name} (own)"
    if not (isinstance(dataset, tuple) and len(dataset) == 2):
        raise ValueError(
            "dataset should be 'cifar10-c', 'cifar100-c', 'tiny-imagenet-c', an ImageDataset or "
            f"(images, labels), but got {type(dataset).__name__}"
        )
    images, labels = dataset
    checked = ImageDataset(images, labels, [], "own")  # its checks: uint8 NCHW, int64 labels
    if len(checked) == 0:
        raise ValueError("the test set is empty: there is nothing to evaluate")
    return images, labels, int(labels.max()) + 1, "own test set"


def _model_device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _check_output(
    model: nn.Module, batch: Tensor, classes: int, dataset: str, *, exact: bool
) -> None:
    """The model must map (N, C, H, W) to (N, classes) logits: checked on two images (for a
    test set of one's own, not ``exact``, ``classes`` is the largest label + 1: the output
    needs at least that many columns)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(batch)
    except Exception as error:  # the user's model: say what it was given
        raise ValueError(
            f"the model fails on a batch of {dataset} images of shape {tuple(batch.shape)}: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from error
    finally:
        model.train(was_training)
    shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
    fits = isinstance(output, Tensor) and output.dim() == 2 and output.shape[0] == batch.shape[0]
    if fits:
        fits = output.shape[1] == classes if exact else output.shape[1] >= classes
    if not fits:
        wanted = f"(N, {classes})" if exact else f"(N, K) with K >= {classes}"
        raise ValueError(
            f"the model's output should be {wanted} logits for {dataset}'s {classes} classes, "
            f"but for {batch.shape[0]} images it is {shape}"
        )


def _clean_test_set(name: str, data_dir, *, required: bool) -> tuple[Tensor, Tensor] | None:
    from dropcluster.data.datasets import load_dataset

    try:
        test_set = load_dataset(name, "test", data_dir)
    except (FileNotFoundError, ImportError):
        if required:
            raise
        return None
    return test_set.images, test_set.labels


def _released_reader(data_dir, clean_name: str, settings: CorruptionSettings):
    """``read(corruption, severity) -> (images, labels)`` for the released files, after
    checking that the folder holds every requested corruption and severity."""
    from dropcluster.data.corrupted_sets import available_released

    held = available_released(data_dir, clean_name)
    if not held:
        call = {"cifar10": "download_cifar10_c", "cifar100": "download_cifar100_c"}.get(
            clean_name, "download_tiny_imagenet_c"
        )
        raise FileNotFoundError(
            f"no released {clean_name} corrupted files in {data_dir or 'the data folder'}: "
            f"dropcluster.data.downloads.{call}() fetches them (or use source 'generated')"
        )
    missing = [
        f"{name} {severity}"
        for name in settings.corruptions
        for severity in settings.severities
        if severity not in held.get(name, [])
    ]
    if missing:
        raise FileNotFoundError(
            f"the released {clean_name} corrupted set in {data_dir or 'the data folder'} lacks "
            f"{first_few(missing)}: download it whole, or choose --corruptions among "
            f"{', '.join(held) or 'none'}"
        )
    classes = None
    if clean_name == "tiny-imagenet":
        from dropcluster.data.datasets import tiny_imagenet_wnids

        try:
            classes = tiny_imagenet_wnids(data_dir)
        except FileNotFoundError:
            classes = None  # the released folders' sorted wnids: the same order

    return released_reader(data_dir, clean_name, settings, classes)


def _released_only(model, prepare, settings, released, batch_size, stream, device):
    """Rows for the released files alone (no clean test set at hand)."""
    images, labels = released(settings.corruptions[0], settings.severities[0])
    return evaluate_corruptions(
        model,
        images.to(device),
        labels.to(device),
        prepare,
        settings,
        batch_size=batch_size,
        released=released,
        progress=stream,
        score_clean=False,
    )
