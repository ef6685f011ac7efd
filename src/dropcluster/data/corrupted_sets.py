"""The released corrupted test sets (CIFAR-100-C, Tiny-ImageNet-C) as uint8 tensors.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations" (ICLR 2019), released each corrupted set once, with fixed random draws; the
paper's robustness tables evaluate on those files. Their on-disk layouts, read as released
(no conversion step):

CIFAR-100-C (https://zenodo.org/record/3555552), the extracted ``CIFAR-100-C.tar``::

    root/CIFAR-100-C/<corruption>.npy   (50000, 32, 32, 3) uint8, HWC: severities 1 to 5
                                        stacked in order, 10000 test images each
    root/CIFAR-100-C/labels.npy         (50000,) the CIFAR-100 fine labels, the same 10000
                                        repeated for each severity

Tiny-ImageNet-C (https://zenodo.org/record/2536630), the extracted ``Tiny-ImageNet-C.tar``::

    root/Tiny-ImageNet-C/<corruption>/<severity>/<wnid>/*.JPEG   64x64 RGB, 50 per class

    torchvision's ImageFolder layout under each severity. The reference script
    (``make_tinyimagenet_c.py``) saved every image with Pillow, ``quality=85``; its clean
    images are ImageNet validation crops of the 200 Tiny ImageNet classes resized to 64x64,
    not the Tiny ImageNet validation images themselves. :func:`jpeg_round_trip` applies the
    same JPEG step to images corrupted on the fly, so both go through the same compression.

``root`` may be the ``CIFAR-100-C`` / ``Tiny-ImageNet-C`` folder itself or the folder holding
it; None means the default data folder of :mod:`dropcluster.data.datasets` (``$DROPCLUSTER_DATA``,
else ``~/.cache/dropcluster/data``). Only the corruptions of
:data:`dropcluster.data.corruptions.CORRUPTIONS` are read (the releases hold more).
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dropcluster.data.corruptions import CORRUPTIONS
from dropcluster.data.datasets import decode_jpegs, default_root, describe_folder
from dropcluster.validation import check_choice, check_int

__all__ = [
    "CIFAR100_C_FOLDER",
    "CIFAR100_C_IMAGE_SHAPE",
    "CIFAR100_C_URL",
    "CIFAR100_NUM_CLASSES",
    "RELEASED_DATASETS",
    "SEVERITIES",
    "TINY_IMAGENET_C_FOLDER",
    "TINY_IMAGENET_C_JPEG_QUALITY",
    "TINY_IMAGENET_C_URL",
    "available_released",
    "jpeg_round_trip",
    "load_cifar100_c",
    "load_released",
    "load_tiny_imagenet_c",
]


#: The data sets with a released corrupted test set, as named by :func:`load_dataset`.
RELEASED_DATASETS = ("cifar100", "tiny-imagenet")
SEVERITIES = (1, 2, 3, 4, 5)

CIFAR100_C_FOLDER = "CIFAR-100-C"
CIFAR100_C_URL = "https://zenodo.org/record/3555552"
CIFAR100_C_IMAGE_SHAPE = (32, 32, 3)
CIFAR100_NUM_CLASSES = 100

TINY_IMAGENET_C_FOLDER = "Tiny-ImageNet-C"
TINY_IMAGENET_C_URL = "https://zenodo.org/record/2536630"
#: The JPEG quality the Tiny-ImageNet-C files were saved with (make_tinyimagenet_c.py).
TINY_IMAGENET_C_JPEG_QUALITY = 85
_JPEG_SUFFIXES = (".jpeg", ".jpg")


def load_cifar100_c(
    root: str | Path | None, corruption: str, severity: int
) -> tuple[Tensor, Tensor]:
    """One corruption at one severity of CIFAR-100-C, reading only that severity from disk.

    The ``.npy`` file is memory-mapped, so of its five stacked severities only the requested
    block is read. The number of images per severity is the file's length / 5 (10000 in the
    release).

    Args:
        root: the ``CIFAR-100-C`` folder or its parent (see the module docstring); None: the
            default data folder.
        corruption: one of :data:`~dropcluster.data.corruptions.CORRUPTIONS`.
        severity: 1 to 5.

    Returns:
        ``images`` Tensor[N, 3, 32, 32] uint8 and ``labels`` Tensor[N] int64, the CIFAR-100
        fine labels (the class order of ``load_dataset("cifar100")``).

    Raises:
        ValueError: unknown corruption, severity outside 1..5, or files of the wrong shape or
            dtype.
        FileNotFoundError: the folder or a file is missing; the message says what was expected.
    """
    check_choice("corruption", corruption, CORRUPTIONS)
    severity = check_int("severity", severity, minimum=1, maximum=5)
    folder = _cifar100_c_folder(_root_or_default(root))
    stacked_images, stacked_labels = _open_cifar100_c(folder, corruption)
    per_severity = stacked_images.shape[0] // len(SEVERITIES)
    rows = slice((severity - 1) * per_severity, severity * per_severity)
    # Copying the slice reads just that block of the memory map.
    images = torch.from_numpy(np.ascontiguousarray(stacked_images[rows].transpose(0, 3, 1, 2)))
    # np.array copies: int64 labels would otherwise stay a read-only view of the map.
    labels = torch.from_numpy(np.array(stacked_labels[rows], dtype=np.int64))
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < CIFAR100_NUM_CLASSES:
        raise ValueError(
            f"{folder / 'labels.npy'} should hold CIFAR-100 fine labels in "
            f"0..{CIFAR100_NUM_CLASSES - 1}, but severity {severity} spans "
            f"{int(labels.min())}..{int(labels.max())}"
        )
    return images, labels


def load_tiny_imagenet_c(
    root: str | Path | None, corruption: str, severity: int, wnids: list[str]
) -> tuple[Tensor, Tensor]:
    """One corruption at one severity of Tiny-ImageNet-C.

    Files are read class folder by class folder in sorted order of the folder names, and in
    sorted order of the file names within a class.

    Args:
        root: the ``Tiny-ImageNet-C`` folder or its parent; None: the default data folder.
        corruption: one of :data:`~dropcluster.data.corruptions.CORRUPTIONS`.
        severity: 1 to 5.
        wnids: the class ids in the order of the labels to return: use the order of
            ``load_dataset("tiny-imagenet")`` (its sorted ``wnids.txt``). Every class folder
            must be one of them and each of them must have a folder.

    Returns:
        ``images`` Tensor[N, 3, 64, 64] uint8 and ``labels`` Tensor[N] int64, the index of each
        image's class in ``wnids``.

    Raises:
        ValueError: unknown corruption, severity outside 1..5, repeated wnids, a class folder
            not in ``wnids``, an unreadable image, or one that is not 64x64 (its size is read
            from the file's header and checked before decoding, so a decompression bomb is
            refused at no cost; the message names the file).
        FileNotFoundError: a missing folder, class or image; the message says what was
            expected.
        ImportError: without Pillow.
    """
    check_choice("corruption", corruption, CORRUPTIONS)
    severity = check_int("severity", severity, minimum=1, maximum=5)
    wnids = list(wnids)
    if not wnids or not all(isinstance(wnid, str) for wnid in wnids):
        raise ValueError(f"wnids should be a non-empty list of class ids, but got {wnids!r}")
    if len(set(wnids)) != len(wnids):
        raise ValueError("wnids should be distinct class ids, but some repeat")
    severity_folder = _tiny_imagenet_c_severity_folder(root, corruption, severity)
    class_folders = sorted(child for child in severity_folder.iterdir() if child.is_dir())
    class_index = {wnid: index for index, wnid in enumerate(wnids)}
    unknown = [folder.name for folder in class_folders if folder.name not in class_index]
    if unknown:
        raise ValueError(
            f"{severity_folder} holds class folders that are not in wnids: {unknown[:5]}"
            f"{' ...' if len(unknown) > 5 else ''} ({len(unknown)} in all)"
        )
    missing = sorted(set(wnids) - {folder.name for folder in class_folders})
    if missing:
        raise FileNotFoundError(
            f"{severity_folder} should hold one folder per class of wnids, but lacks "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} of {len(wnids)})"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for folder in class_folders:
        files = sorted(
            child
            for child in folder.iterdir()
            if child.is_file() and child.suffix.lower() in _JPEG_SUFFIXES
        )
        if not files:
            raise FileNotFoundError(
                f"expected JPEG files in {folder}, but {describe_folder(folder)}"
            )
        paths.extend(files)
        labels.extend([class_index[folder.name]] * len(files))
    return decode_jpegs(paths), torch.tensor(labels, dtype=torch.int64)


def available_released(root: str | Path | None, dataset: str) -> dict[str, list[int]]:
    """Which corruptions and severities a released folder holds.

    Args:
        root: the ``CIFAR-100-C`` / ``Tiny-ImageNet-C`` folder or its parent; None: the
            default data folder.
        dataset: ``"cifar100"`` or ``"tiny-imagenet"``.

    Returns:
        corruption -> sorted severities present, for the corruptions of
        :data:`~dropcluster.data.corruptions.CORRUPTIONS` present (in that order); empty when
        the folder holds none. A CIFAR-100-C ``.npy`` file holds all five severities (its
        shape is checked when it is loaded); a Tiny-ImageNet-C severity counts when its
        folder holds at least one class folder.

    Raises:
        ValueError: a data set without a released corrupted set.
        FileNotFoundError: ``root`` does not exist.
    """
    _check_released_dataset(dataset)
    root = _root_or_default(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"expected a folder holding the released {dataset} corrupted set, but "
            f"{describe_folder(root)}"
        )
    available: dict[str, list[int]] = {}
    if dataset == "cifar100":
        folder = _cifar100_c_folder(root, required=False)
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
    """The released corrupted test images of ``dataset``, as :func:`load_cifar100_c` or
    :func:`load_tiny_imagenet_c` return them.

    Args:
        root: the released folder or its parent; None: the default data folder.
        dataset: ``"cifar100"`` or ``"tiny-imagenet"`` (``"fashion-mnist"`` and
            ``"synthetic"`` have no released set: corrupt them with
            :func:`dropcluster.data.corruptions.corrupt`).
        corruption: one of :data:`~dropcluster.data.corruptions.CORRUPTIONS`.
        severity: 1 to 5.
        classes: Tiny ImageNet: the wnids in label order; None takes the sorted class folders
            of the requested severity, which is the order of ``load_dataset("tiny-imagenet")``
            when all 200 classes are there. Ignored for CIFAR-100 (its labels are stored).

    Returns:
        ``images`` Tensor[N, 3, H, W] uint8 and ``labels`` Tensor[N] int64.
    """
    _check_released_dataset(dataset)
    if dataset == "cifar100":
        return load_cifar100_c(root, corruption, severity)
    if classes is None:
        check_choice("corruption", corruption, CORRUPTIONS)
        severity = check_int("severity", severity, minimum=1, maximum=5)
        severity_folder = _tiny_imagenet_c_severity_folder(root, corruption, severity)
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
# Helpers


def _root_or_default(root: str | Path | None) -> Path:
    return default_root() if root is None else Path(root)


def _cifar100_c_folder(root: Path, required: bool = True) -> Path:
    """``root/CIFAR-100-C``, or ``root`` itself when it holds the files."""
    nested = root / CIFAR100_C_FOLDER
    if nested.is_dir():
        return nested
    if root.name == CIFAR100_C_FOLDER or (root / "labels.npy").is_file() or not required:
        return root
    raise FileNotFoundError(
        f"CIFAR-100-C: expected {nested}/ (or {root} itself) holding <corruption>.npy files "
        f"and labels.npy, the extracted CIFAR-100-C.tar ({CIFAR100_C_URL}), but "
        f"{describe_folder(root)}"
    )


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
        f"({TINY_IMAGENET_C_URL}), but {describe_folder(root)}"
    )


def _tiny_imagenet_c_severity_folder(
    root: str | Path | None, corruption: str, severity: int
) -> Path:
    """``Tiny-ImageNet-C/<corruption>/<severity>``, or an error saying what was expected."""
    severity_folder = _tiny_imagenet_c_folder(_root_or_default(root)) / corruption / str(severity)
    if not severity_folder.is_dir():
        raise FileNotFoundError(
            f"no {corruption}/{severity}/ in the Tiny-ImageNet-C folder; expected "
            f"{severity_folder}/<wnid>/*.JPEG ({TINY_IMAGENET_C_URL}), but "
            f"{describe_folder(severity_folder.parent)}"
        )
    return severity_folder


def _open_cifar100_c(folder: Path, corruption: str) -> tuple[np.ndarray, np.ndarray]:
    """Memory maps of ``<corruption>.npy`` and ``labels.npy``, after checking their shapes.

    Returns:
        (5 n, 32, 32, 3) uint8 images, the five severities stacked, and (5 n,) integer labels.
    """
    images_path = folder / f"{corruption}.npy"
    labels_path = folder / "labels.npy"
    for path in (images_path, labels_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"no {path.name} in {folder}; expected the CIFAR-100-C files "
                f"({CIFAR100_C_URL}): one <corruption>.npy of shape (50000, 32, 32, 3) uint8 "
                f"per corruption, and labels.npy; {describe_folder(folder)}"
            )
    stacked_images = _load_npy(images_path)
    stacked_labels = _load_npy(labels_path)
    n_stacked = stacked_images.shape[0] if stacked_images.ndim else 0
    if (
        stacked_images.dtype != np.uint8
        or stacked_images.ndim != 4
        or stacked_images.shape[1:] != CIFAR100_C_IMAGE_SHAPE
        or n_stacked == 0
        or n_stacked % len(SEVERITIES)
    ):
        raise ValueError(
            f"{images_path} should be uint8 of shape (5 n, 32, 32, 3), the five severities "
            f"stacked, but is {stacked_images.dtype} of shape {stacked_images.shape}"
        )
    if stacked_labels.shape != (n_stacked,) or not np.issubdtype(stacked_labels.dtype, np.integer):
        raise ValueError(
            f"{labels_path} should hold {n_stacked} integer labels, one per image of "
            f"{images_path.name}, but is {stacked_labels.dtype} of shape {stacked_labels.shape}"
        )
    return stacked_images, stacked_labels


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(f"{path} is not a readable .npy file ({error})") from error


def _check_released_dataset(dataset: str) -> None:
    if dataset in ("fashion-mnist", "synthetic"):
        raise ValueError(
            f"{dataset!r} has no released corrupted test set (only {RELEASED_DATASETS} do); "
            f"corrupt its test images with dropcluster.data.corruptions.corrupt instead"
        )
    check_choice("dataset", dataset, RELEASED_DATASETS)
