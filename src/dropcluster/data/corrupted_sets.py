"""The released corrupted test sets (CIFAR-10-C, CIFAR-100-C, Tiny-ImageNet-C) as uint8 tensors.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations" (ICLR 2019), released each corrupted set once, with fixed random draws; the
paper's robustness tables evaluate on those files. Their on-disk layouts, read as released
(no conversion step):

CIFAR-10-C (https://zenodo.org/records/2535967) and CIFAR-100-C
(https://zenodo.org/records/3555552), the extracted ``CIFAR-10-C.tar`` / ``CIFAR-100-C.tar``::

    root/CIFAR-10-C/<corruption>.npy    (50000, 32, 32, 3) uint8, HWC: severities 1 to 5
                                        stacked in order, 10000 test images each
    root/CIFAR-10-C/labels.npy          (50000,) uint8, the test labels (< 10), the same
                                        10000 repeated for each severity

    CIFAR-100-C is the same in ``root/CIFAR-100-C/``, with the CIFAR-100 fine labels (< 100).
    Both releases hold all 19 corruptions of :data:`~dropcluster.data.corruptions.CORRUPTIONS`.

Tiny-ImageNet-C (https://zenodo.org/records/2536630), the extracted ``Tiny-ImageNet-C.tar``::

    root/Tiny-ImageNet-C/<corruption>/<severity>/<wnid>/*.JPEG   64x64 RGB, 50 per class

    torchvision's ImageFolder layout under each severity, 200 classes, for the 15 benchmark
    corruptions. The reference script (``make_tinyimagenet_c.py``) saved every image with
    Pillow, ``quality=85``; its clean images are ImageNet validation crops of the 200 Tiny
    ImageNet classes resized to 64x64, not the Tiny ImageNet validation images themselves.
    :func:`jpeg_round_trip` applies the same JPEG step to images corrupted on the fly, so both
    go through the same compression.

Names. ``dataset`` is ``"cifar10-c"``, ``"cifar100-c"`` or ``"tiny-imagenet-c"``; the names
:func:`~dropcluster.data.datasets.load_dataset` uses for the clean sets (``"cifar10"``,
``"cifar100"``, ``"tiny-imagenet"``) are accepted as aliases of the same three
(:data:`RELEASED_ALIASES`). Every corruption of
:data:`~dropcluster.data.corruptions.CORRUPTIONS` (19) that a folder holds can be read.

``root`` may be the release's folder itself or the folder holding it; None means the default
data folder of :mod:`dropcluster.data.datasets` (``$DROPCLUSTER_DATA``, else
``~/.cache/dropcluster/data``), where :func:`~dropcluster.data.downloads.download_cifar10_c`,
:func:`~dropcluster.data.downloads.download_cifar100_c` and
:func:`~dropcluster.data.downloads.download_tiny_imagenet_c` put them.

Completeness. Everything is checked before anything is returned, each failure a one-line error
naming the file, what was expected and what was found. As for the clean sets, a folder
without the completion marker (:data:`~dropcluster.data.datasets.COMPLETE_MARKER`) must hold
the release's counts (:data:`RELEASED_COUNTS`): a CIFAR-C ``<corruption>.npy`` the five
severities of 10000 images stacked, with ``labels.npy`` holding as many labels, the same 10000
repeated for each severity; a Tiny-ImageNet-C severity 200 class folders of 50 JPEGs each,
since a copy cut short looks like a smaller set. A folder holding the marker (written by the
downloaders with the counts they found, or by :func:`write_released_marker` for a deliberately
smaller copy) must hold the counts it records instead: images per severity for CIFAR-C,
classes and images per class for Tiny-ImageNet-C. The count functions
(:func:`cifar10_c_counts`, ...) measure any copy, with the same checks of each file.
"""

from __future__ import annotations

import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from dropcluster.data.corruptions import BENCHMARK, CORRUPTIONS
from dropcluster.data.datasets import COMPLETE_MARKER, decode_jpegs, default_root, describe_folder
from dropcluster.files import atomic_write_json
from dropcluster.validation import check_choice, check_int

__all__ = [
    "CIFAR100_C_FOLDER",
    "CIFAR100_C_IMAGE_SHAPE",
    "CIFAR100_C_URL",
    "CIFAR100_NUM_CLASSES",
    "CIFAR10_C_FOLDER",
    "CIFAR10_C_URL",
    "CIFAR10_NUM_CLASSES",
    "CIFAR_C_IMAGE_SHAPE",
    "CIFAR_C_PER_SEVERITY",
    "RELEASED_ALIASES",
    "RELEASED_COUNTS",
    "RELEASED_DATASETS",
    "SEVERITIES",
    "TINY_IMAGENET_C_CLASSES",
    "TINY_IMAGENET_C_FOLDER",
    "TINY_IMAGENET_C_JPEG_QUALITY",
    "TINY_IMAGENET_C_PER_CLASS",
    "TINY_IMAGENET_C_URL",
    "available_released",
    "cifar100_c_counts",
    "cifar10_c_counts",
    "jpeg_round_trip",
    "load_cifar100_c",
    "load_cifar10_c",
    "load_released",
    "load_tiny_imagenet_c",
    "read_released_marker",
    "tiny_imagenet_c_counts",
    "write_released_marker",
]


#: The released corrupted test sets.
RELEASED_DATASETS = ("cifar10-c", "cifar100-c", "tiny-imagenet-c")
#: The clean data sets' names (as :func:`load_dataset` spells them) -> their released set.
RELEASED_ALIASES = {
    "cifar10": "cifar10-c",
    "cifar100": "cifar100-c",
    "tiny-imagenet": "tiny-imagenet-c",
}
SEVERITIES = (1, 2, 3, 4, 5)

CIFAR10_C_FOLDER = "CIFAR-10-C"
CIFAR10_C_URL = "https://zenodo.org/records/2535967"
CIFAR10_NUM_CLASSES = 10
CIFAR100_C_FOLDER = "CIFAR-100-C"
CIFAR100_C_URL = "https://zenodo.org/records/3555552"
CIFAR100_NUM_CLASSES = 100
CIFAR_C_IMAGE_SHAPE = (32, 32, 3)
#: The same shape, under its earlier name.
CIFAR100_C_IMAGE_SHAPE = CIFAR_C_IMAGE_SHAPE
#: Test images per severity in the CIFAR-10-C and CIFAR-100-C releases.
CIFAR_C_PER_SEVERITY = 10000

TINY_IMAGENET_C_FOLDER = "Tiny-ImageNet-C"
TINY_IMAGENET_C_URL = "https://zenodo.org/records/2536630"
#: The JPEG quality the Tiny-ImageNet-C files were saved with (make_tinyimagenet_c.py).
TINY_IMAGENET_C_JPEG_QUALITY = 85
TINY_IMAGENET_C_CLASSES = 200
#: Images per class in each severity folder of the release.
TINY_IMAGENET_C_PER_CLASS = 50

#: What each release holds, as the count functions (:func:`cifar10_c_counts`, ...) count it.
RELEASED_COUNTS = {
    "cifar10-c": {"corruptions": len(CORRUPTIONS), "per_severity": CIFAR_C_PER_SEVERITY},
    "cifar100-c": {"corruptions": len(CORRUPTIONS), "per_severity": CIFAR_C_PER_SEVERITY},
    "tiny-imagenet-c": {
        "corruptions": len(BENCHMARK),
        "classes": TINY_IMAGENET_C_CLASSES,
        "per_class": TINY_IMAGENET_C_PER_CLASS,
    },
}

_JPEG_SUFFIXES = (".jpeg", ".jpg")
_MARKER_FORMAT = 1
_DOWNLOADERS = {
    "cifar10-c": "download_cifar10_c",
    "cifar100-c": "download_cifar100_c",
    "tiny-imagenet-c": "download_tiny_imagenet_c",
}


class _CifarRelease(NamedTuple):
    folder: str
    url: str
    num_classes: int
    labels: str  # how messages name the labels


_CIFAR_RELEASES = {
    "cifar10-c": _CifarRelease(
        CIFAR10_C_FOLDER, CIFAR10_C_URL, CIFAR10_NUM_CLASSES, "CIFAR-10 labels"
    ),
    "cifar100-c": _CifarRelease(
        CIFAR100_C_FOLDER, CIFAR100_C_URL, CIFAR100_NUM_CLASSES, "CIFAR-100 fine labels"
    ),
}


def load_cifar10_c(
    root: str | Path | None, corruption: str, severity: int
) -> tuple[Tensor, Tensor]:
    """One corruption at one severity of CIFAR-10-C, reading only that severity from disk.

    The ``.npy`` file is memory-mapped, so of its five stacked severities only the requested
    block is read (and its header, to check its shape). ``labels.npy`` is read whole (50 kB)
    to check that it repeats the same labels for each severity.

    Args:
        root: the ``CIFAR-10-C`` folder or its parent (see the module docstring); None: the
            default data folder.
        corruption: one of :data:`~dropcluster.data.corruptions.CORRUPTIONS`.
        severity: 1 to 5.

    Returns:
        ``images`` Tensor[N, 3, 32, 32] uint8 and ``labels`` Tensor[N] int64 in 0..9 (the class
        order of ``load_dataset("cifar10")``); N = 10000 in the release.

    Raises:
        ValueError: unknown corruption, severity outside 1..5, a ``.npy`` file of the wrong
            shape or dtype or unreadable, labels of the wrong length or range or not repeated
            per severity, or a number of images other than the folder's completion marker
            records (without a marker: other than the release's 5 x 10000).
        FileNotFoundError: the folder or a file is missing; the message says what was expected
            and which download function fetches it.
    """
    return _load_cifar_c(root, "cifar10-c", corruption, severity)


def load_cifar100_c(
    root: str | Path | None, corruption: str, severity: int
) -> tuple[Tensor, Tensor]:
    """One corruption at one severity of CIFAR-100-C, as :func:`load_cifar10_c` for CIFAR-10-C.

    Args:
        root: the ``CIFAR-100-C`` folder or its parent; None: the default data folder.
        corruption: one of :data:`~dropcluster.data.corruptions.CORRUPTIONS`.
        severity: 1 to 5.

    Returns:
        ``images`` Tensor[N, 3, 32, 32] uint8 and ``labels`` Tensor[N] int64, the CIFAR-100
        fine labels (the class order of ``load_dataset("cifar100")``); N = 10000 in the
        release.

    Raises:
        ValueError, FileNotFoundError: as :func:`load_cifar10_c`.
    """
    return _load_cifar_c(root, "cifar100-c", corruption, severity)


def load_tiny_imagenet_c(
    root: str | Path | None, corruption: str, severity: int, wnids: list[str]
) -> tuple[Tensor, Tensor]:
    """One corruption at one severity of Tiny-ImageNet-C.

    Files are read class folder by class folder in sorted order of the folder names, and in
    sorted order of the file names within a class. The class folders and their files are
    counted before any image is decoded: 200 classes of 50 images (or what the folder's
    completion marker records).

    Args:
        root: the ``Tiny-ImageNet-C`` folder or its parent; None: the default data folder.
        corruption: one of :data:`~dropcluster.data.corruptions.CORRUPTIONS`.
        severity: 1 to 5.
        wnids: the class ids in the order of the labels to return: use the order of
            ``load_dataset("tiny-imagenet")`` (its sorted ``wnids.txt``). Every class folder
            must be one of them and each of them must have a folder.

    Returns:
        ``images`` Tensor[N, 3, 64, 64] uint8 and ``labels`` Tensor[N] int64, the index of each
        image's class in ``wnids``; N = 10000 in the release.

    Raises:
        ValueError: unknown corruption, severity outside 1..5, repeated wnids, a class folder
            not in ``wnids``, a count of class folders or of images per class other than
            expected, an unreadable image, or one that is not 64x64 (its size is read from
            the file's header and checked before decoding, so a decompression bomb is refused
            at no cost; the message names the file).
        FileNotFoundError: a missing folder, severity folder or class; the message says what
            was expected and which download function fetches it.
        ImportError: without Pillow.
    """
    check_choice("corruption", corruption, CORRUPTIONS)
    severity = check_int("severity", severity, minimum=1, maximum=5)
    wnids = list(wnids)
    if not wnids or not all(isinstance(wnid, str) for wnid in wnids):
        raise ValueError(f"wnids should be a non-empty list of class ids, but got {wnids!r}")
    if len(set(wnids)) != len(wnids):
        raise ValueError("wnids should be distinct class ids, but some repeat")
    folder = _tiny_imagenet_c_folder(_root_or_default(root))
    expected, source = _tiny_imagenet_c_expected(folder)
    severity_folder = _tiny_imagenet_c_severity_folder(folder, corruption, severity)
    class_folders = sorted(child for child in severity_folder.iterdir() if child.is_dir())
    if len(class_folders) != expected["classes"]:
        raise _incomplete(
            "tiny-imagenet-c",
            folder,
            f"{severity_folder}: expected {expected['classes']} class folders ({source}), but "
            f"found {len(class_folders)}",
        )
    class_index = {wnid: index for index, wnid in enumerate(wnids)}
    unknown = [child.name for child in class_folders if child.name not in class_index]
    if unknown:
        raise ValueError(
            f"{severity_folder} holds class folders that are not in wnids: {unknown[:5]}"
            f"{' ...' if len(unknown) > 5 else ''} ({len(unknown)} in all)"
        )
    missing = sorted(set(wnids) - {child.name for child in class_folders})
    if missing:
        raise FileNotFoundError(
            f"{severity_folder} should hold one folder per class of wnids, but lacks "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} of {len(wnids)})"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for class_folder in class_folders:
        files = _jpeg_files(class_folder)
        if len(files) != expected["per_class"]:
            raise _incomplete(
                "tiny-imagenet-c",
                folder,
                f"{class_folder}: expected {expected['per_class']} JPEG images ({source}), but "
                f"found {len(files)}",
            )
        paths.extend(files)
        labels.extend([class_index[class_folder.name]] * len(files))
    return decode_jpegs(paths), torch.tensor(labels, dtype=torch.int64)


def available_released(root: str | Path | None, dataset: str) -> dict[str, list[int]]:
    """Which corruptions and severities a released folder holds.

    Args:
        root: the release's folder or its parent; None: the default data folder.
        dataset: ``"cifar10-c"``, ``"cifar100-c"`` or ``"tiny-imagenet-c"`` (or the aliases
            ``"cifar10"``, ``"cifar100"``, ``"tiny-imagenet"``).

    Returns:
        corruption -> sorted severities present, for the corruptions of
        :data:`~dropcluster.data.corruptions.CORRUPTIONS` present (in that order); empty when
        the folder holds none. A CIFAR-C ``.npy`` file holds all five severities (it counts
        when ``labels.npy`` is there too; its shape is checked when it is loaded); a
        Tiny-ImageNet-C severity counts when its folder holds at least one class folder.

    Raises:
        ValueError: a data set without a released corrupted set.
        FileNotFoundError: ``root`` does not exist.
    """
    dataset = _released_dataset(dataset)
    root = _root_or_default(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"expected a folder holding the released {dataset} set, but {describe_folder(root)}"
        )
    available: dict[str, list[int]] = {}
    if dataset in _CIFAR_RELEASES:
        folder = _cifar_c_folder(root, dataset, required=False)
        if not (folder / "labels.npy").is_file():
            return available
        for corruption in CORRUPTIONS:
            if (folder / f"{corruption}.npy").is_file():
                available[corruption] = list(SEVERITIES)
        return available
    folder = _tiny_imagenet_c_folder(root, required=False)
    for corruption in CORRUPTIONS:
        severities = [
            severity
            for severity in SEVERITIES
            if (folder / corruption / str(severity)).is_dir()
            and any(child.is_dir() for child in (folder / corruption / str(severity)).iterdir())
        ]
        if severities:
            available[corruption] = severities
    return available


def load_released(
    root: str | Path | None,
    dataset: str,
    corruption: str,
    severity: int,
    classes: list[str] | None = None,
) -> tuple[Tensor, Tensor]:
    """The released corrupted test images of ``dataset``, as :func:`load_cifar10_c`,
    :func:`load_cifar100_c` or :func:`load_tiny_imagenet_c` return them.

    Args:
        root: the released folder or its parent; None: the default data folder.
        dataset: ``"cifar10-c"``, ``"cifar100-c"`` or ``"tiny-imagenet-c"``; the clean sets'
            names ``"cifar10"``, ``"cifar100"`` and ``"tiny-imagenet"`` are accepted aliases
            (``"fashion-mnist"`` and ``"synthetic"`` have no released set: corrupt them with
            :func:`dropcluster.data.corruptions.corrupt`).
        corruption: one of :data:`~dropcluster.data.corruptions.CORRUPTIONS`.
        severity: 1 to 5.
        classes: Tiny ImageNet: the wnids in label order; None takes the sorted class folders
            of the requested severity, which is the order of ``load_dataset("tiny-imagenet")``
            when all 200 classes are there. Ignored for CIFAR (their labels are stored).

    Returns:
        ``images`` Tensor[N, 3, H, W] uint8 and ``labels`` Tensor[N] int64.

    Raises:
        ValueError, FileNotFoundError: as the loader of ``dataset``; ValueError for a data
            set without a released set.
    """
    dataset = _released_dataset(dataset)
    if dataset in _CIFAR_RELEASES:
        return _load_cifar_c(root, dataset, corruption, severity)
    if classes is None:
        check_choice("corruption", corruption, CORRUPTIONS)
        severity = check_int("severity", severity, minimum=1, maximum=5)
        folder = _tiny_imagenet_c_folder(_root_or_default(root))
        severity_folder = _tiny_imagenet_c_severity_folder(folder, corruption, severity)
        classes = sorted(child.name for child in severity_folder.iterdir() if child.is_dir())
    return load_tiny_imagenet_c(root, corruption, severity, classes)


def jpeg_round_trip(images: Tensor, quality: int = TINY_IMAGENET_C_JPEG_QUALITY) -> Tensor:
    """Encode each image as JPEG with Pillow and decode it back, as the Tiny-ImageNet-C files.

    Pillow's defaults otherwise (4:2:0 chroma subsampling for colour, the standard tables),
    as in ``Image.fromarray(x).save(path, quality=85)`` of the reference script. Greyscale
    images are encoded as greyscale JPEGs.

    Args:
        images (Tensor[N, C, H, W], uint8): C is 1 (greyscale) or 3 (RGB); any device (the
            work happens on the CPU).
        quality: the JPEG quality, 1 to 95 (Pillow's useful range).

    Returns:
        Tensor[N, C, H, W] uint8 on the device of ``images``.

    Raises:
        ValueError: wrong rank, dtype or channel count, or a quality outside 1..95.
        ImportError: without Pillow.
    """
    if not isinstance(images, Tensor):
        raise ValueError(f"images should be a torch.Tensor, but got {type(images).__name__}")
    if images.dim() != 4 or images.dtype != torch.uint8 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images should be a 4 dimensional uint8 tensor (N, C, H, W) with C = 1 or 3, but "
            f"got shape {tuple(images.shape)} and dtype {images.dtype}"
        )
    quality = check_int("quality", quality, minimum=1, maximum=95)
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(
            "jpeg_round_trip needs Pillow: pip install pillow (or pip install -e '.[data]' in the "
            "dropcluster checkout)"
        ) from error
    greyscale = images.shape[1] == 1
    pixels = images.detach().to("cpu").permute(0, 2, 3, 1).contiguous().numpy()
    decoded = np.empty_like(pixels)

    def round_trip(index: int) -> None:
        image = Image.fromarray(pixels[index, :, :, 0] if greyscale else pixels[index])
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as reloaded:
            array = np.asarray(reloaded.convert("L" if greyscale else "RGB"))
        decoded[index] = array[:, :, None] if greyscale else array

    # Pillow releases the GIL while encoding and decoding.
    workers = min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(round_trip, range(len(pixels)), chunksize=256))
    return torch.from_numpy(decoded).permute(0, 3, 1, 2).contiguous().to(images.device)


# ---------------------------------------------------------------------------------------------
# Completeness: counts and the completion marker


def cifar10_c_counts(folder: str | Path) -> dict[str, int]:
    """What a ``CIFAR-10-C`` folder holds, every file checked as :func:`load_cifar10_c` checks it.

    The count of images is what this measures, so any ``5 n`` pass, marker or not (the
    downloaders record it in the marker); :func:`load_cifar10_c` then holds the folder to the
    marker's count, or without a marker to the release's.

    Args:
        folder: the ``CIFAR-10-C`` folder itself.

    Returns:
        ``{"corruptions": k, "per_severity": n}``: the number of ``<corruption>.npy`` files of
        :data:`~dropcluster.data.corruptions.CORRUPTIONS` there, and their common number of
        images per severity (:data:`RELEASED_COUNTS` for the release: 19 and 10000).

    Raises:
        ValueError: a file that fails a check, files of different lengths, or no corruption.
        FileNotFoundError: no folder or no ``labels.npy``.
    """
    return _cifar_c_counts(Path(folder), "cifar10-c")


def cifar100_c_counts(folder: str | Path) -> dict[str, int]:
    """What a ``CIFAR-100-C`` folder holds, as :func:`cifar10_c_counts` for CIFAR-10-C."""
    return _cifar_c_counts(Path(folder), "cifar100-c")


def tiny_imagenet_c_counts(folder: str | Path) -> dict[str, int]:
    """What a ``Tiny-ImageNet-C`` folder holds, counted as :func:`load_tiny_imagenet_c` counts.

    Every corruption folder of :data:`~dropcluster.data.corruptions.CORRUPTIONS` there must hold
    the five severity folders, each the same class folders, each class the same number of
    JPEG files (their content is not decoded).

    Args:
        folder: the ``Tiny-ImageNet-C`` folder itself.

    Returns:
        ``{"corruptions": k, "classes": c, "per_class": m}`` (:data:`RELEASED_COUNTS` for the
        release: 15, 200 and 50).

    Raises:
        ValueError: a missing severity folder, differing classes or counts, or no corruption.
        FileNotFoundError: no folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"expected a Tiny-ImageNet-C folder, but {describe_folder(folder)}")
    classes: list[str] | None = None
    classes_at: Path | None = None
    per_class: int | None = None
    per_class_at: Path | None = None
    corruptions = 0
    for corruption in CORRUPTIONS:
        corruption_folder = folder / corruption
        if not corruption_folder.is_dir():
            continue
        corruptions += 1
        present = _severities_present(corruption_folder)
        if present != list(SEVERITIES):
            raise ValueError(
                f"{corruption_folder} should hold the severity folders 1 to 5, but holds {present}"
            )
        for severity in SEVERITIES:
            severity_folder = corruption_folder / str(severity)
            names = sorted(child.name for child in severity_folder.iterdir() if child.is_dir())
            if classes is None:
                classes, classes_at = names, severity_folder
            elif names != classes:
                lacking = sorted(set(classes) - set(names))[:5]
                extra = sorted(set(names) - set(classes))[:5]
                raise ValueError(
                    f"{severity_folder} holds {len(names)} class folders, but {classes_at} "
                    f"holds {len(classes)}: it lacks {lacking} and adds {extra}"
                )
            for name in names:
                count = len(_jpeg_files(severity_folder / name))
                if per_class is None:
                    per_class, per_class_at = count, severity_folder / name
                elif count != per_class:
                    raise ValueError(
                        f"{severity_folder / name} holds {count} JPEG images, but "
                        f"{per_class_at} holds {per_class}"
                    )
    if not corruptions:
        raise ValueError(
            f"{folder} should hold <corruption>/<severity>/<wnid>/*.JPEG for corruptions of "
            f"{CORRUPTIONS[0]}, ..., but {describe_folder(folder)}"
        )
    if not classes or not per_class:
        raise ValueError(f"{classes_at} should hold class folders of JPEG images, but is empty")
    return {"corruptions": corruptions, "classes": len(classes), "per_class": per_class}


def write_released_marker(
    folder: str | Path,
    dataset: str,
    counts: dict[str, int],
    *,
    archive_md5: str | None = None,
    source: str | None = None,
) -> Path:
    """Mark ``folder`` as a complete copy of a released set holding ``counts`` (atomically).

    :mod:`dropcluster.data.downloads` calls this once an archive is fully extracted; the
    loaders then expect the recorded counts instead of the release's. Call it yourself only
    for a deliberately smaller set in the released layout (a subset, a test fixture).

    Args:
        folder: the ``CIFAR-10-C``, ``CIFAR-100-C`` or ``Tiny-ImageNet-C`` folder.
        dataset: ``"cifar10-c"``, ``"cifar100-c"`` or ``"tiny-imagenet-c"`` (or an alias).
        counts: as the count function of ``dataset`` returns them (:data:`RELEASED_COUNTS`
            has the keys), each an integer >= 1.
        archive_md5: MD5 of the archive the folder was extracted from, if any.
        source: where the files came from (a URL), for people reading the marker.

    Returns:
        The marker's path, ``folder / COMPLETE_MARKER``.
    """
    dataset = _released_dataset(dataset)
    _check_released_counts(counts, dataset, f"counts of {dataset}")
    document = {
        "format": _MARKER_FORMAT,
        "dataset": dataset,
        "counts": {key: int(counts[key]) for key in RELEASED_COUNTS[dataset]},
        "archive_md5": archive_md5,
        "source": source,
    }
    return atomic_write_json(Path(folder) / COMPLETE_MARKER, document)


def read_released_marker(folder: str | Path, dataset: str) -> dict[str, int] | None:
    """The counts the completion marker in ``folder`` records; None without a marker.

    Raises:
        ValueError: a marker that is unreadable, or of another data set.
    """
    dataset = _released_dataset(dataset)
    folder = Path(folder)
    path = folder / COMPLETE_MARKER
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(document, dict) or document.get("dataset") != dataset:
            raise ValueError(f"it should be a JSON object with 'dataset': {dataset!r}")
        _check_released_counts(document.get("counts"), dataset, "its 'counts'")
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{path}: unreadable completion marker ({error}); delete {folder} and call "
            f"{_download_call(dataset, folder.parent)} to download it again"
        ) from error
    return {key: document["counts"][key] for key in RELEASED_COUNTS[dataset]}


def _check_released_counts(counts: object, dataset: str, what: str) -> None:
    keys = tuple(RELEASED_COUNTS[dataset])
    if not isinstance(counts, dict) or not all(
        isinstance(counts.get(key), int)
        and not isinstance(counts.get(key), bool)
        and counts[key] >= 1
        for key in keys
    ):
        raise ValueError(f"{what} should map each of {keys} to a count >= 1, but is {counts!r}")


def _incomplete(dataset: str, folder: Path, found: str) -> ValueError:
    return ValueError(
        f"{found}: the files look incomplete, as after an interrupted download or extraction; "
        f"delete {folder} and call {_download_call(dataset, folder.parent)} to download it again"
    )


def _download_call(dataset: str, root: Path) -> str:
    """How to download ``dataset`` into ``root``, for error messages."""
    call = f"dropcluster.data.downloads.{_DOWNLOADERS[dataset]}({str(root)!r}"
    if dataset == "tiny-imagenet-c":
        # No published MD5 was found for Tiny-ImageNet-C.tar: the caller gives one.
        return call + ", md5=...) (md5: the MD5 Zenodo lists for Tiny-ImageNet-C.tar, or None)"
    return call + ")"


# ---------------------------------------------------------------------------------------------
# CIFAR-10-C and CIFAR-100-C


def _load_cifar_c(
    root: str | Path | None, dataset: str, corruption: str, severity: int
) -> tuple[Tensor, Tensor]:
    check_choice("corruption", corruption, CORRUPTIONS)
    severity = check_int("severity", severity, minimum=1, maximum=5)
    folder = _cifar_c_folder(_root_or_default(root), dataset)
    stacked_images, stacked_labels = _open_cifar_c(folder, dataset, corruption)
    per_severity = stacked_images.shape[0] // len(SEVERITIES)
    rows = slice((severity - 1) * per_severity, severity * per_severity)
    # Copying the slice reads just that block of the memory map.
    images = torch.from_numpy(np.ascontiguousarray(stacked_images[rows].transpose(0, 3, 1, 2)))
    labels = torch.from_numpy(stacked_labels[rows].astype(np.int64))
    return images, labels


def _cifar_c_counts(folder: Path, dataset: str) -> dict[str, int]:
    release = _CIFAR_RELEASES[dataset]
    if not folder.is_dir():
        raise FileNotFoundError(
            f"expected a {release.folder} folder, but {describe_folder(folder)}"
        )
    per_severity: dict[str, int] = {}
    for corruption in CORRUPTIONS:
        if (folder / f"{corruption}.npy").is_file():
            images, _ = _open_cifar_c(folder, dataset, corruption, counting=True)
            per_severity[corruption] = images.shape[0] // len(SEVERITIES)
    if not per_severity:
        raise ValueError(
            f"{folder} should hold <corruption>.npy files for corruptions of {CORRUPTIONS[0]}, "
            f"..., but {describe_folder(folder)}"
        )
    first = next(iter(per_severity))
    for corruption, count in per_severity.items():
        if count != per_severity[first]:
            raise ValueError(
                f"{folder / f'{corruption}.npy'} holds {count} images per severity, but "
                f"{first}.npy holds {per_severity[first]}"
            )
    return {"corruptions": len(per_severity), "per_severity": per_severity[first]}


def _cifar_c_folder(root: Path, dataset: str, required: bool = True) -> Path:
    """``root/CIFAR-10-C`` (or ``CIFAR-100-C``), or ``root`` itself when it holds the files."""
    release = _CIFAR_RELEASES[dataset]
    nested = root / release.folder
    if nested.is_dir():
        return nested
    if root.name == release.folder or (root / "labels.npy").is_file() or not required:
        return root
    raise FileNotFoundError(
        f"{release.folder}: expected {nested}/ (or {root} itself) holding <corruption>.npy "
        f"files and labels.npy, the extracted {release.folder}.tar ({release.url}; "
        f"{_download_call(dataset, root)} fetches it), but {describe_folder(root)}"
    )


def _open_cifar_c(
    folder: Path, dataset: str, corruption: str, counting: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The memory map of ``<corruption>.npy`` and the labels, after checking both.

    Args:
        counting: for the count functions, which measure what a folder holds: any ``5 n``
            images (n >= 1) pass. Otherwise, as the loaders read: the count the folder's
            completion marker records, or without a marker the release's.

    Returns:
        (5 n, 32, 32, 3) uint8 images, the five severities stacked, and (5 n,) labels.
    """
    release = _CIFAR_RELEASES[dataset]
    images_path = folder / f"{corruption}.npy"
    labels_path = folder / "labels.npy"
    for path in (images_path, labels_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"no {path.name} in {folder}; expected the {release.folder} files "
                f"({release.url}; {_download_call(dataset, folder.parent)} fetches them): one "
                f"<corruption>.npy of shape (50000, 32, 32, 3) uint8 per corruption, and "
                f"labels.npy; {describe_folder(folder)}"
            )
    recorded = None if counting else read_released_marker(folder, dataset)
    stacked_images = _load_npy(images_path, dataset)
    n_stacked = stacked_images.shape[0] if stacked_images.ndim else 0
    if counting:
        expected = "(5 n, 32, 32, 3), the five severities of n >= 1 test images stacked"
        fits = n_stacked > 0 and n_stacked % len(SEVERITIES) == 0
    elif recorded is None:
        # Without a marker, only the release's counts are trusted (as for the clean sets):
        # a smaller copy needs a marker written with write_released_marker.
        per_severity = RELEASED_COUNTS[dataset]["per_severity"]
        count = len(SEVERITIES) * per_severity
        expected = (
            f"({count}, 32, 32, 3), the five severities of the {per_severity} test images "
            f"stacked (a smaller copy needs a completion marker: write_released_marker)"
        )
        fits = n_stacked == count
    else:
        count = len(SEVERITIES) * recorded["per_severity"]
        expected = (
            f"({count}, 32, 32, 3), the five severities of {recorded['per_severity']} test "
            f"images stacked, as its completion marker {folder / COMPLETE_MARKER} records"
        )
        fits = n_stacked == count
    if (
        stacked_images.dtype != np.uint8
        or stacked_images.ndim != 4
        or stacked_images.shape[1:] != CIFAR_C_IMAGE_SHAPE
        or not fits
    ):
        raise ValueError(
            f"{images_path} should be uint8 of shape {expected}, but is {stacked_images.dtype} "
            f"of shape {stacked_images.shape}"
        )
    stacked_labels = _load_npy(labels_path, dataset)
    if stacked_labels.shape != (n_stacked,) or not np.issubdtype(stacked_labels.dtype, np.integer):
        raise ValueError(
            f"{labels_path} should hold {n_stacked} integer labels, one per image of "
            f"{images_path.name}, but is {stacked_labels.dtype} of shape {stacked_labels.shape}"
        )
    # 5 n labels (50 kB in the release): read whole, to check all of them.
    labels = np.asarray(stacked_labels)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= release.num_classes:
        raise ValueError(
            f"{labels_path} should hold {release.labels} in 0..{release.num_classes - 1}, but "
            f"they span {low}..{high}"
        )
    blocks = labels.reshape(len(SEVERITIES), -1)
    differing = (blocks != blocks[0]).sum(axis=1)
    if differing.any():
        severity = int(np.flatnonzero(differing)[0]) + 1
        raise ValueError(
            f"{labels_path} should repeat the same {blocks.shape[1]} test labels for each of "
            f"the 5 severities, but severity {severity}'s differ from severity 1's at "
            f"{int(differing[severity - 1])} positions"
        )
    return stacked_images, labels


def _load_npy(path: Path, dataset: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as error:
        # A file cut short (an interrupted extraction) is shorter than its header says.
        raise ValueError(
            f"{path} is not a readable .npy file ({error}); if it was cut short, delete "
            f"{path.parent} and call {_download_call(dataset, path.parent.parent)}"
        ) from error


# ---------------------------------------------------------------------------------------------
# Tiny-ImageNet-C


def _tiny_imagenet_c_folder(root: Path, required: bool = True) -> Path:
    """``root/Tiny-ImageNet-C``, or ``root`` itself when it holds the corruption folders."""
    nested = root / TINY_IMAGENET_C_FOLDER
    if nested.is_dir():
        return nested
    holds_corruption = any((root / corruption).is_dir() for corruption in CORRUPTIONS)
    if root.name == TINY_IMAGENET_C_FOLDER or holds_corruption or not required:
        return root
    raise FileNotFoundError(
        f"Tiny-ImageNet-C: expected {nested}/ (or {root} itself) holding "
        f"<corruption>/<severity>/<wnid>/*.JPEG, the extracted Tiny-ImageNet-C.tar "
        f"({TINY_IMAGENET_C_URL}; {_download_call('tiny-imagenet-c', root)} fetches it), but "
        f"{describe_folder(root)}"
    )


def _tiny_imagenet_c_expected(folder: Path) -> tuple[dict[str, int], str]:
    """The counts ``folder`` should hold, and where they come from (for error messages)."""
    recorded = read_released_marker(folder, "tiny-imagenet-c")
    if recorded is not None:
        return recorded, f"as its completion marker {folder / COMPLETE_MARKER} records"
    return RELEASED_COUNTS["tiny-imagenet-c"], (
        f"the release; a folder without {COMPLETE_MARKER} must hold all of it"
    )


def _tiny_imagenet_c_severity_folder(folder: Path, corruption: str, severity: int) -> Path:
    """``Tiny-ImageNet-C/<corruption>/<severity>``, or an error saying what was expected."""
    corruption_folder = folder / corruption
    if not corruption_folder.is_dir():
        raise FileNotFoundError(
            f"no {corruption}/ in {folder}; expected {corruption_folder}/<severity>/<wnid>/*.JPEG "
            f"({TINY_IMAGENET_C_URL}, which holds the 15 benchmark corruptions; "
            f"{_download_call('tiny-imagenet-c', folder.parent)} fetches it), but "
            f"{describe_folder(folder)}"
        )
    severity_folder = corruption_folder / str(severity)
    if not severity_folder.is_dir():
        raise FileNotFoundError(
            f"no {corruption}/{severity}/ in {folder}; expected the severity folders 1 to 5 in "
            f"{corruption_folder}, each holding <wnid>/*.JPEG, but it holds "
            f"{_severities_present(corruption_folder)}: the files look incomplete; delete "
            f"{folder} and call {_download_call('tiny-imagenet-c', folder.parent)}"
        )
    return severity_folder


def _severities_present(corruption_folder: Path) -> list[int]:
    return [severity for severity in SEVERITIES if (corruption_folder / str(severity)).is_dir()]


def _jpeg_files(class_folder: Path) -> list[Path]:
    return sorted(
        child
        for child in class_folder.iterdir()
        if child.is_file() and child.suffix.lower() in _JPEG_SUFFIXES
    )


# ---------------------------------------------------------------------------------------------
# Helpers


def _root_or_default(root: str | Path | None) -> Path:
    return default_root() if root is None else Path(root)


def _released_dataset(dataset: str) -> str:
    """The released set's name for ``dataset`` (an alias is resolved), or a ValueError."""
    if dataset in ("fashion-mnist", "synthetic"):
        raise ValueError(
            f"{dataset!r} has no released corrupted test set (only {RELEASED_DATASETS} do); "
            f"corrupt its test images with dropcluster.data.corruptions.corrupt instead"
        )
    if isinstance(dataset, str) and dataset in RELEASED_ALIASES:
        return RELEASED_ALIASES[dataset]
    return check_choice("dataset", dataset, (*RELEASED_DATASETS, *RELEASED_ALIASES))
