"""The paper's data sets as uint8 tensors: CIFAR-10/100, Tiny ImageNet, Fashion-MNIST, synthetic.

:func:`load_dataset` reads each data set from its official on-disk layout, with no download
and no conversion step, and returns an :class:`ImageDataset` on the CPU:

``"cifar100"`` (Krizhevsky 2009), the "python version" archive, extracted::

    root/cifar-100-python/train   pickle: b"data" (50000, 3072) uint8, b"fine_labels", ...
    root/cifar-100-python/test    the same with 10000 images
    root/cifar-100-python/meta    pickle: b"fine_label_names" (100 names), ...

    Each row of b"data" is one 32x32 image, row-major, the red plane, then green, then blue.
    ``root`` may also be the ``cifar-100-python`` folder itself. Labels are the 100 fine
    classes, the ones the paper reports.

``"cifar10"`` (Krizhevsky 2009; the paper's Figure 1), the "python version" archive
``cifar-10-python.tar.gz``, extracted::

    root/cifar-10-batches-py/data_batch_1   pickle: b"data" (10000, 3072) uint8, b"labels", ...
    ...                                     (data_batch_1 to data_batch_5: the training set)
    root/cifar-10-batches-py/test_batch     the same, the 10000 test images
    root/cifar-10-batches-py/batches.meta   pickle: b"label_names" (10 names), ...

    Rows of b"data" as in CIFAR-100. The training split is the five batches concatenated in
    order. ``root`` may also be the ``cifar-10-batches-py`` folder itself.

``"tiny-imagenet"`` (the CS231n release), the official zip, extracted::

    root/tiny-imagenet-200/wnids.txt                     the 200 class ids, one per line
    root/tiny-imagenet-200/words.txt                     optional: "wnid<TAB>names" lines
    root/tiny-imagenet-200/train/<wnid>/images/*.JPEG    500 images of 64x64 per class
    root/tiny-imagenet-200/val/images/*.JPEG             10000 images
    root/tiny-imagenet-200/val/val_annotations.txt       "file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1"

    The official test images have no labels, so split ``"test"`` is the validation set
    (as in the paper, which reports "test (validation)" accuracy). Labels index the sorted
    wnids (the order of torchvision's ``ImageFolder`` on ``train/``); class names come from
    ``words.txt`` when present, else they are the wnids. Greyscale JPEGs become RGB.
    Decoding the JPEGs needs Pillow (``pip install pillow``, the ``data`` extra).

``"fashion-mnist"``: :func:`dropcluster.data.fashion_mnist.load_fashion_mnist` (IDX files).

``"synthetic"``: :func:`make_synthetic`, generated from a fixed seed; ``root`` is ignored.

Other names: data sets registered by plugins (:func:`dropcluster.plugins.register_dataset`),
loaded by their ``loader(split, root)``; see :func:`dataset_names`.

Without ``root``, CIFAR-10, CIFAR-100 and Tiny ImageNet are looked up in ``$DROPCLUSTER_DATA``,
else in ``~/.cache/dropcluster/data`` (where :func:`~dropcluster.data.downloads.download_cifar10`,
:func:`~dropcluster.data.downloads.download_cifar100` and
:func:`~dropcluster.data.downloads.download_tiny_imagenet` put them by default).

Completeness. An interrupted download or extraction must never load as a smaller data set, so
CIFAR-10, CIFAR-100 and Tiny ImageNet are counted before they are used:

- A folder holding the completion marker :data:`COMPLETE_MARKER` (``.dropcluster-complete.json``)
  must hold the numbers of classes and of images per split that it records. The downloaders
  write it after extracting a whole archive (into a temporary folder, renamed into place only
  then), with the counts they found; :func:`write_completion_marker` marks a deliberately
  smaller set in the official layout (a subset, a test fixture).
- A folder without it (extracted by hand, or by an older dropcluster) must hold the official
  counts, :data:`OFFICIAL_COUNTS`: CIFAR-10 10 classes, 50000 training and 10000 test images
  (5000 and 1000 per class); CIFAR-100 100 classes, 50000 training and 10000 test images;
  Tiny ImageNet 200 classes, 100000 training images (500 per class) and 10000 validation images.

Any other count is a ValueError saying the files look incomplete and how to download them again.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dropcluster.data import fashion_mnist
from dropcluster.data.augment import AUGMENT_PRESETS, AugmentConfig
from dropcluster.files import atomic_write_json
from dropcluster.plugins import plugin_dataset, plugin_names
from dropcluster.validation import check_choice, check_int

__all__ = [
    "CIFAR100_COUNTS",
    "CIFAR100_FOLDER",
    "CIFAR100_SPLIT_SIZES",
    "CIFAR100_URL",
    "CIFAR10_ARCHIVE",
    "CIFAR10_COUNTS",
    "CIFAR10_FOLDER",
    "CIFAR10_META",
    "CIFAR10_SPLIT_FILES",
    "CIFAR10_TEST_PER_CLASS",
    "CIFAR10_TRAIN_PER_CLASS",
    "CIFAR10_URL",
    "COMPLETE_MARKER",
    "DATASET_NAMES",
    "DATA_ENV",
    "OFFICIAL_COUNTS",
    "SPLITS",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_FREQUENCIES",
    "SYNTHETIC_SEEDS",
    "SYNTHETIC_SIZES",
    "TINY_IMAGENET_COUNTS",
    "TINY_IMAGENET_FOLDER",
    "TINY_IMAGENET_SIZE",
    "TINY_IMAGENET_TRAIN_PER_CLASS",
    "TINY_IMAGENET_URL",
    "ImageDataset",
    "cifar100_counts",
    "cifar10_counts",
    "augment_preset",
    "dataset_names",
    "decode_jpegs",
    "default_root",
    "describe_folder",
    "load_dataset",
    "make_synthetic",
    "read_completion_marker",
    "tiny_imagenet_counts",
    "tiny_imagenet_wnids",
    "write_completion_marker",
]


# "cifar10", added last: error messages listing the names still begin as before.
DATASET_NAMES = ("cifar100", "tiny-imagenet", "fashion-mnist", "synthetic", "cifar10")
SPLITS = ("train", "test")


def dataset_names(wanted: str | None = None) -> tuple[str, ...]:
    """:data:`DATASET_NAMES`, then the data sets registered by plugins (given ``wanted``, a
    name not known yet, the installed plugins are loaded first)."""
    wanted = None if wanted in DATASET_NAMES else wanted
    return DATASET_NAMES + plugin_names("dataset", wanted)


CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_SPLIT_SIZES = {"train": 50000, "test": 10000}

CIFAR10_FOLDER = "cifar-10-batches-py"
#: The official archive's name, not ``CIFAR10_FOLDER + ".tar.gz"`` as for CIFAR-100.
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/" + CIFAR10_ARCHIVE
#: The pickles of each split, concatenated in this order.
CIFAR10_SPLIT_FILES = {
    "train": tuple(f"data_batch_{number}" for number in range(1, 6)),
    "test": ("test_batch",),
}
CIFAR10_META = "batches.meta"

TINY_IMAGENET_FOLDER = "tiny-imagenet-200"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_SIZE = 64

#: Numbers of classes and of images per split of the official releases (see "Completeness").
CIFAR100_COUNTS = {"classes": 100, **CIFAR100_SPLIT_SIZES}
CIFAR10_TRAIN_PER_CLASS = 5000
CIFAR10_TEST_PER_CLASS = 1000
CIFAR10_COUNTS = {
    "classes": 10,
    "train": 10 * CIFAR10_TRAIN_PER_CLASS,
    "test": 10 * CIFAR10_TEST_PER_CLASS,
}
TINY_IMAGENET_TRAIN_PER_CLASS = 500
TINY_IMAGENET_COUNTS = {"classes": 200, "train": 200 * TINY_IMAGENET_TRAIN_PER_CLASS, "test": 10000}
OFFICIAL_COUNTS = {
    "cifar10": CIFAR10_COUNTS,
    "cifar100": CIFAR100_COUNTS,
    "tiny-imagenet": TINY_IMAGENET_COUNTS,
}
#: The file, inside an extracted data set folder, that marks it complete (see "Completeness").
COMPLETE_MARKER = ".dropcluster-complete.json"
_MARKER_FORMAT = 1
_COUNT_KEYS = ("classes", "train", "test")
_DOWNLOADERS = {
    "cifar10": "download_cifar10",
    "cifar100": "download_cifar100",
    "tiny-imagenet": "download_tiny_imagenet",
}

#: Environment variable naming the default data folder.
DATA_ENV = "DROPCLUSTER_DATA"

SYNTHETIC_SIZES = {"train": 2000, "test": 500}
#: Seeds of the synthetic splits: different images, the same classes.
SYNTHETIC_SEEDS = {"train": 0, "test": 1}
#: Cycles per image of the synthetic gratings; class k is frequency k // 2, orientation k % 2.
SYNTHETIC_FREQUENCIES = (1.5, 2.5, 3.5, 5.0, 7.0)
SYNTHETIC_CLASSES = tuple(
    f"{orientation}-{frequency:g}"
    for frequency in SYNTHETIC_FREQUENCIES
    for orientation in ("vertical", "horizontal")
)


@dataclass
class ImageDataset:
    """One split of a data set, whole, as tensors.

    Attributes:
        images (Tensor[N, C, H, W], uint8): the images.
        labels (Tensor[N], int64): class indices into ``classes``.
        classes: the class names.
        name: the data set's name, as given to :func:`load_dataset`.
    """

    images: Tensor
    labels: Tensor
    classes: list[str]
    name: str

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.dtype != torch.uint8:
            raise ValueError(
                f"images should be a 4 dimensional uint8 tensor (N, C, H, W), but got shape "
                f"{tuple(self.images.shape)} and dtype {self.images.dtype}"
            )
        if self.labels.shape != (self.images.shape[0],) or self.labels.dtype != torch.int64:
            raise ValueError(
                f"labels should be int64 of shape ({self.images.shape[0]},), but got "
                f"{self.labels.dtype} of shape {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: Tensor) -> ImageDataset:
        """The examples at ``indices`` (e.g. from :func:`~dropcluster.data.stratified_subset`)."""
        return ImageDataset(self.images[indices], self.labels[indices], self.classes, self.name)

    def to(self, device: torch.device | str) -> ImageDataset:
        """The same data set on ``device``."""
        return ImageDataset(self.images.to(device), self.labels.to(device), self.classes, self.name)


def load_dataset(name: str, split: str = "train", root: str | Path | None = None) -> ImageDataset:
    """Load one split of a data set as uint8 tensors on the CPU.

    Args:
        name: ``"cifar10"``, ``"cifar100"``, ``"tiny-imagenet"``, ``"fashion-mnist"``,
            ``"synthetic"``, or a name registered by a plugin.
        split: ``"train"`` or ``"test"`` (Tiny ImageNet: its validation set; ``"val"`` is
            accepted as a synonym).
        root: the folder holding the data set (see the module docstring for each layout);
            None: the default place of each data set.

    Returns:
        :class:`ImageDataset` with uint8 images of shape (N, 3, 32, 32) for CIFAR-10 and
        CIFAR-100, (N, 3, 64, 64) for Tiny ImageNet, (N, 1, 28, 28) for Fashion-MNIST and
        (N, 3, 32, 32) for synthetic, and (N,) int64 labels.

    Raises:
        ValueError: unknown name or split, a malformed file, or CIFAR-10 / CIFAR-100 / Tiny
            ImageNet files that look incomplete (other counts than expected: see "Completeness"
            in the module docstring).
        FileNotFoundError: missing files; the message gives the expected layout and what the
            folder holds.
        ImportError: Tiny ImageNet without Pillow.
    """
    check_choice("name", name, dataset_names(name))
    if name == "tiny-imagenet" and split == "val":
        split = "test"
    check_choice("split", split, SPLITS)
    if name not in DATASET_NAMES:
        return _load_plugin_dataset(name, split, root)
    if name == "cifar10":
        return _load_cifar10(split, default_root() if root is None else Path(root))
    if name == "cifar100":
        return _load_cifar100(split, default_root() if root is None else Path(root))
    if name == "tiny-imagenet":
        return _load_tiny_imagenet(split, default_root() if root is None else Path(root))
    if name == "fashion-mnist":
        images, labels = fashion_mnist.load_fashion_mnist(split, root)
        return ImageDataset(images, labels, list(fashion_mnist.FASHION_MNIST_CLASSES), name)
    images, labels = make_synthetic(SYNTHETIC_SIZES[split], seed=SYNTHETIC_SEEDS[split])
    return ImageDataset(images, labels, list(SYNTHETIC_CLASSES), name)


def augment_preset(name: str) -> AugmentConfig:
    """The training augmentation of data set ``name``: its entry of
    :data:`~dropcluster.data.augment.AUGMENT_PRESETS`, or the one a plugin registered."""
    if name in AUGMENT_PRESETS:
        return AUGMENT_PRESETS[name]
    check_choice("dataset", name, dataset_names(name))
    return plugin_dataset(name).augment


def _load_plugin_dataset(name: str, split: str, root: str | Path | None) -> ImageDataset:
    entry = plugin_dataset(name)
    loaded = entry.loader(split, root)
    if not isinstance(loaded, ImageDataset):
        raise ValueError(
            f"the loader of data set {name!r} ({entry.module}) should return an ImageDataset, "
            f"but returned {type(loaded).__name__}"
        )
    return loaded


def make_synthetic(
    n_examples: int, *, seed: int = 0, channels: int = 3, size: int = 32
) -> tuple[Tensor, Tensor]:
    """A small, learnable image classification set: noisy gratings in 10 classes.

    Class ``k`` is a sinusoidal grating of ``SYNTHETIC_FREQUENCIES[k // 2]`` cycles per image,
    vertical stripes for even ``k`` and horizontal ones for odd ``k``, with a random phase,
    contrast, brightness and colour tint, plus Gaussian pixel noise. Horizontal flips, shifts
    and small rotations keep the class, so the usual augmentations apply; the structure is
    spatial, so convolutional features are clustered as on natural images. Classes are
    balanced (``n_examples // 10`` or one more each) and shuffled.

    Args:
        n_examples: number of images.
        seed: seeds a private generator; the same arguments give the same tensors.
        channels: 1 (greyscale) or 3 (colour).
        size: height and width in pixels.

    Returns:
        ``images`` Tensor[N, channels, size, size] uint8 and ``labels`` Tensor[N] int64.
    """
    check_int("n_examples", n_examples, minimum=0)
    check_choice("channels", channels, (1, 3))
    check_int("size", size, minimum=4)
    generator = torch.Generator().manual_seed(seed)
    n_classes = len(SYNTHETIC_CLASSES)
    labels = (torch.arange(n_examples) % n_classes)[torch.randperm(n_examples, generator=generator)]
    frequency = torch.tensor(SYNTHETIC_FREQUENCIES)[labels // 2].view(-1, 1, 1)
    vertical = (labels % 2 == 0).view(-1, 1, 1)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    position = torch.where(vertical, coords.view(1, 1, size), coords.view(1, size, 1))
    phase = torch.rand(n_examples, 1, 1, generator=generator) * 2 * torch.pi
    grating = torch.sin(2 * torch.pi * frequency * position + phase)  # (N, size, size)
    contrast = 0.25 + 0.15 * torch.rand(n_examples, 1, 1, 1, generator=generator)
    brightness = 0.35 + 0.3 * torch.rand(n_examples, 1, 1, 1, generator=generator)
    tint = 0.6 + 0.4 * torch.rand(n_examples, channels, 1, 1, generator=generator)
    noise = 0.08 * torch.randn(n_examples, channels, size, size, generator=generator)
    pixels = brightness + contrast * tint * grating.unsqueeze(1) + noise
    images = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels


# ---------------------------------------------------------------------------------------------
# Completeness: the completion marker and the expected counts


def write_completion_marker(
    folder: str | Path,
    dataset: str,
    counts: dict[str, int],
    *,
    archive_md5: str | None = None,
    source: str | None = None,
) -> Path:
    """Mark ``folder`` as a complete copy of ``dataset`` holding ``counts`` (atomically).

    :mod:`dropcluster.data.downloads` calls this once an archive is fully extracted;
    :func:`load_dataset` then expects each split to hold the recorded counts instead of the
    official ones. Call it yourself only for a deliberately smaller set in the official layout
    (a subset, a test fixture).

    Args:
        folder: the ``cifar-10-batches-py``, ``cifar-100-python`` or ``tiny-imagenet-200``
            folder.
        dataset: ``"cifar10"``, ``"cifar100"`` or ``"tiny-imagenet"``.
        counts: ``{"classes": ..., "train": ..., "test": ...}``, numbers of classes and images.
        archive_md5: MD5 of the archive the folder was extracted from, if any.
        source: where the files came from (a URL), for people reading the marker.

    Returns:
        The marker's path, ``folder / COMPLETE_MARKER``.
    """
    check_choice("dataset", dataset, OFFICIAL_COUNTS)
    _check_count_dict(counts, f"counts of {dataset}")
    document = {
        "format": _MARKER_FORMAT,
        "dataset": dataset,
        "counts": {key: int(counts[key]) for key in _COUNT_KEYS},
        "archive_md5": archive_md5,
        "source": source,
    }
    return atomic_write_json(Path(folder) / COMPLETE_MARKER, document)


def _check_count_dict(counts: object, what: str) -> None:
    if not isinstance(counts, dict) or not all(
        isinstance(counts.get(key), int)
        and not isinstance(counts.get(key), bool)
        and counts[key] >= 0
        for key in _COUNT_KEYS
    ):
        raise ValueError(
            f"{what} should map each of {_COUNT_KEYS} to a count >= 0, but is {counts!r}"
        )


def read_completion_marker(folder: Path, dataset: str) -> dict[str, int] | None:
    """The counts the marker in ``folder`` records; None without a marker."""
    path = folder / COMPLETE_MARKER
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(document, dict) or document.get("dataset") != dataset:
            raise ValueError(f"it should be a JSON object with 'dataset': {dataset!r}")
        _check_count_dict(document.get("counts"), "its 'counts'")
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{path}: unreadable completion marker ({error}); delete {folder} and call "
            f"{_DOWNLOADERS[dataset]}({str(folder.parent)!r}) to download it again"
        ) from error
    return {key: document["counts"][key] for key in _COUNT_KEYS}


def _expected_counts(folder: Path, dataset: str) -> tuple[dict[str, int], str]:
    """The counts ``folder`` should hold, and where they come from (for error messages)."""
    recorded = read_completion_marker(folder, dataset)
    if recorded is not None:
        return recorded, f"as its completion marker {folder / COMPLETE_MARKER} records"
    return OFFICIAL_COUNTS[dataset], (
        f"the official release; a folder without {COMPLETE_MARKER} must hold all of it"
    )


def _check_count(
    dataset: str, folder: Path, where: Path, what: str, found: int, expected: int, source: str
) -> None:
    if found != expected:
        raise ValueError(
            f"{where}: expected {expected} {what} ({source}), but found {found}: the files look "
            f"incomplete, as after an interrupted download or extraction; delete {folder} and "
            f"call {_DOWNLOADERS[dataset]}({str(folder.parent)!r}) to download it again"
        )


# ---------------------------------------------------------------------------------------------
# CIFAR-100


def _load_cifar100(split: str, root: Path) -> ImageDataset:
    folder = _cifar100_folder(root)
    expected, source = _expected_counts(folder, "cifar100")
    data, labels, classes = _read_cifar100_split(folder, split)
    # Checked after the format, so that a malformed file gets the more specific message.
    meta = folder / "meta"
    _check_count("cifar100", folder, meta, "class names", len(classes), expected["classes"], source)
    _check_count("cifar100", folder, folder / split, "images", len(data), expected[split], source)
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return ImageDataset(images, torch.from_numpy(labels), classes, "cifar100")


def _read_cifar100_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One split's ``data`` (N, 3072) uint8, fine labels (N,) int64 and the class names."""
    path = folder / split
    meta_path = folder / "meta"
    entry = _read_pickle(path, f"CIFAR-100 {split!r} split")
    meta = _read_pickle(meta_path, "CIFAR-100 meta file")
    data = _required_key(entry, "data", path)
    fine_labels = _required_key(entry, "fine_labels", path)
    names = _required_key(meta, "fine_label_names", meta_path)
    classes = _cifar_class_names(names, "fine_label_names", meta_path)
    data = _cifar_data(data, path)
    labels = _cifar_labels(
        fine_labels, "fine_labels", "fine_label_names", data.shape[0], len(classes), path
    )
    return data, labels, classes


def cifar100_counts(folder: Path) -> dict[str, int]:
    """Classes and images per split that a CIFAR-100 folder holds; reads every file."""
    counts = {"classes": 0}
    for split in SPLITS:
        data, _, classes = _read_cifar100_split(folder, split)
        counts["classes"] = len(classes)
        counts[split] = len(data)
    return counts


def _cifar100_folder(root: Path) -> Path:
    """``root/cifar-100-python``, or ``root`` itself when it holds the files."""
    nested = root / CIFAR100_FOLDER
    if nested.is_dir():
        return nested
    if root.name == CIFAR100_FOLDER or (root / "meta").is_file():
        return root
    archive = root / (CIFAR100_FOLDER + ".tar.gz")
    hint = (
        f"; {archive.name} is there: extract it (tar xzf) or call download_cifar100({str(root)!r})"
        if archive.is_file()
        else f"; download_cifar100({str(root)!r}) fetches and extracts it"
    )
    raise FileNotFoundError(
        f"CIFAR-100: expected {root / CIFAR100_FOLDER}/ holding the files train, test and meta "
        f"(the extracted python version, {CIFAR100_URL}), but {describe_folder(root)}{hint}"
    )


# ---------------------------------------------------------------------------------------------
# CIFAR-10


def _load_cifar10(split: str, root: Path) -> ImageDataset:
    folder = _cifar10_folder(root)
    expected, source = _expected_counts(folder, "cifar10")
    classes, batches = _read_cifar10_split(folder, split)
    # Checked after the format, as for CIFAR-100: a malformed file gets the specific message.
    meta = folder / CIFAR10_META
    _check_count("cifar10", folder, meta, "class names", len(classes), expected["classes"], source)
    found = sum(len(data) for data, _ in batches)
    files = ", ".join(CIFAR10_SPLIT_FILES[split])
    what = f"images in {files}"
    _check_count("cifar10", folder, folder, what, found, expected[split], source)
    # np.concatenate copies, so the tensor owns writable memory (the pickles' may be read-only).
    data = np.concatenate([data for data, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32))
    return ImageDataset(images, torch.from_numpy(labels), classes, "cifar10")


def _read_cifar10_split(
    folder: Path, split: str
) -> tuple[list[str], list[tuple[np.ndarray, np.ndarray]]]:
    """The class names, and ``data`` (n, 3072) uint8 and labels (n,) int64 of each of the
    split's files, in the order of :data:`CIFAR10_SPLIT_FILES`."""
    meta_path = folder / CIFAR10_META
    meta = _read_pickle(meta_path, "CIFAR-10 meta file")
    names = _required_key(meta, "label_names", meta_path)
    classes = _cifar_class_names(names, "label_names", meta_path)
    batches = []
    for file_name in CIFAR10_SPLIT_FILES[split]:
        path = folder / file_name
        entry = _read_pickle(path, f"CIFAR-10 {split!r} split")
        data = _cifar_data(_required_key(entry, "data", path), path)
        raw_labels = _required_key(entry, "labels", path)
        labels = _cifar_labels(
            raw_labels, "labels", "label_names", data.shape[0], len(classes), path
        )
        batches.append((data, labels))
    return classes, batches


def cifar10_counts(folder: Path) -> dict[str, int]:
    """Classes and images per split that a CIFAR-10 folder holds; reads every file."""
    counts = {"classes": 0}
    for split in SPLITS:
        classes, batches = _read_cifar10_split(folder, split)
        counts["classes"] = len(classes)
        counts[split] = sum(len(data) for data, _ in batches)
    return counts


def _cifar10_folder(root: Path) -> Path:
    """``root/cifar-10-batches-py``, or ``root`` itself when it holds the files."""
    nested = root / CIFAR10_FOLDER
    if nested.is_dir():
        return nested
    if root.name == CIFAR10_FOLDER or (root / CIFAR10_META).is_file():
        return root
    archive = root / CIFAR10_ARCHIVE
    hint = (
        f"; {archive.name} is there: extract it (tar xzf) or call download_cifar10({str(root)!r})"
        if archive.is_file()
        else f"; download_cifar10({str(root)!r}) fetches and extracts it"
    )
    raise FileNotFoundError(
        f"CIFAR-10: expected {root / CIFAR10_FOLDER}/ holding the files data_batch_1 to "
        f"data_batch_5, test_batch and batches.meta (the extracted python version, "
        f"{CIFAR10_URL}), but {describe_folder(root)}{hint}"
    )


# ---------------------------------------------------------------------------------------------
# CIFAR pickles (both data sets)


def _cifar_data(data: object, path: Path) -> np.ndarray:
    """The ``data`` of a CIFAR pickle as (N, 3072) uint8, after checking what it is."""
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: 'data' should be a uint8 array of shape (N, 3072), one 32x32 RGB image "
            f"per row, but is {data.dtype} of shape {data.shape}"
        )
    return data


def _cifar_class_names(names: object, key: str, meta_path: Path) -> list[str]:
    """The class names stored under ``key`` in a CIFAR meta file, as text, after checking."""
    if not isinstance(names, (list, tuple, np.ndarray)) or np.ndim(names) != 1:
        raise ValueError(
            f"{meta_path}: {key!r} should be a list of class names, but is {_describe_value(names)}"
        )
    for index, label_name in enumerate(names):
        if not isinstance(label_name, (str, bytes)):
            raise ValueError(
                f"{meta_path}: {key!r} should hold str or bytes names, but item "
                f"{index} is {_describe_value(label_name)}"
            )
    return [_as_text(label_name) for label_name in names]


def _cifar_labels(
    raw: object, key: str, names_key: str, n_rows: int, n_classes: int, path: Path
) -> np.ndarray:
    """The labels stored under ``key`` as (N,) int64, one per row of ``data``, each indexing
    the ``n_classes`` names of ``names_key`` in the meta file."""
    raw_labels = np.asarray(raw) if isinstance(raw, (list, tuple, np.ndarray)) else None
    if raw_labels is None or (raw_labels.size and not np.issubdtype(raw_labels.dtype, np.integer)):
        raise ValueError(
            f"{path}: {key!r} should be a list of integer labels, but is {_describe_value(raw)}"
        )
    labels = raw_labels.astype(np.int64)
    if labels.shape != (n_rows,):
        raise ValueError(
            f"{path}: {key!r} should hold {n_rows} labels, one per row of 'data', "
            f"but has shape {labels.shape}"
        )
    if labels.size and not 0 <= int(labels.min()) <= int(labels.max()) < n_classes:
        raise ValueError(
            f"{path}: {key!r} should be in 0..{n_classes - 1} (the {n_classes} "
            f"names of {names_key!r}), but span {int(labels.min())}..{int(labels.max())}"
        )
    return labels


_NUMPY_MAJOR = int(np.__version__.split(".")[0])


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a data file cannot run code."""

    # _codecs.encode rebuilds bytes in protocol 2 files written by Python 3.
    _ALLOWED = {
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"a CIFAR file should hold only lists and numpy arrays, but refers to "
                f"{module}.{name}"
            )
        if module.startswith("numpy.core.") and _NUMPY_MAJOR >= 2:
            # NumPy 2 renamed numpy.core to numpy._core; files written by NumPy 1 (like the
            # official ones) name the old module, which NumPy 2 reaches with a warning.
            module = "numpy._core." + module.removeprefix("numpy.core.")
        elif module.startswith("numpy._core.") and _NUMPY_MAJOR < 2:
            module = "numpy.core." + module.removeprefix("numpy._core.")
        return super().find_class(module, name)


def _read_pickle(path: Path, what: str) -> dict[str, object]:
    """A CIFAR pickle as a dict with str keys (Python 2 files: latin-1, as torchvision)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{what}: expected the file {path}, but {describe_folder(path.parent)}"
        )
    try:
        with open(path, "rb") as handle:
            entry = _ArrayUnpickler(handle, encoding="latin1").load()
    except OSError:
        raise
    except Exception as error:  # any failure on these bytes means a bad file
        raise ValueError(f"{what}: {path} is not a readable CIFAR pickle ({error})") from error
    if not isinstance(entry, dict):
        raise ValueError(f"{what}: {path} should hold a dict, but holds {_describe_value(entry)}")
    return {_as_text(key): value for key, value in entry.items()}


def _required_key(entry: dict[str, object], key: str, path: Path) -> object:
    if key not in entry:
        raise ValueError(f"{path} should hold the key {key!r}, but holds {sorted(entry)}")
    return entry[key]


def _as_text(value: object) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _describe_value(value: object) -> str:
    """``a list of 3 items``, ``an int (7)``, ...: what a file holds, for error messages."""
    kind = type(value).__name__
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    if isinstance(value, (list, tuple, dict)):
        return f"{article} {kind} of {len(value)} items"
    if isinstance(value, np.ndarray):
        return f"an array of {value.dtype} and shape {value.shape}"
    text = repr(value)
    return f"{article} {kind} ({text[:40]}{'...' if len(text) > 40 else ''})"


# ---------------------------------------------------------------------------------------------
# Tiny ImageNet


def tiny_imagenet_wnids(root: str | Path | None = None) -> list[str]:
    """Tiny ImageNet's class ids in label order (sorted ``wnids.txt``), as :func:`load_dataset`
    numbers them; ``root`` as for :func:`load_dataset`.

    Raises:
        ValueError: ``wnids.txt`` does not list the expected number of classes (200, or the
            number its completion marker records; see the module docstring).
    """
    folder = _tiny_imagenet_folder(default_root() if root is None else Path(root))
    expected, source = _expected_counts(folder, "tiny-imagenet")
    wnids = _read_wnids(folder)
    _check_classes(folder, wnids, expected, source)
    return wnids


def _load_tiny_imagenet(split: str, root: Path) -> ImageDataset:
    folder = _tiny_imagenet_folder(root)
    expected, source = _expected_counts(folder, "tiny-imagenet")
    wnids = _read_wnids(folder)
    _check_classes(folder, wnids, expected, source)
    class_index = {wnid: index for index, wnid in enumerate(wnids)}
    if split == "train":
        paths, labels = _tiny_imagenet_train_files(folder, wnids)
        where = folder / "train"
    else:
        paths, labels = _tiny_imagenet_val_files(folder, class_index)
        where = folder / "val" / "val_annotations.txt"
    # Counted before decoding: an incomplete folder fails at once, not after minutes of JPEGs.
    _check_count("tiny-imagenet", folder, where, "images", len(paths), expected[split], source)
    images = decode_jpegs(paths)
    return ImageDataset(
        images,
        torch.tensor(labels, dtype=torch.int64),
        _tiny_imagenet_class_names(folder, wnids),
        "tiny-imagenet",
    )


def _tiny_imagenet_folder(root: Path) -> Path:
    """``root/tiny-imagenet-200``, or ``root`` itself when it holds ``wnids.txt``."""
    folder = root / TINY_IMAGENET_FOLDER
    if not folder.is_dir() and (root / "wnids.txt").is_file():
        folder = root
    if not (folder / "wnids.txt").is_file():
        raise FileNotFoundError(
            f"Tiny ImageNet: expected {root / TINY_IMAGENET_FOLDER}/ holding wnids.txt, train/ "
            f"and val/ (the extracted {TINY_IMAGENET_URL}), but {describe_folder(root)}; "
            f"download_tiny_imagenet({str(root)!r}) fetches and extracts it"
        )
    return folder


def _read_wnids(folder: Path) -> list[str]:
    """The sorted class ids of ``folder/wnids.txt``."""
    wnids_path = folder / "wnids.txt"
    if not wnids_path.is_file():
        raise FileNotFoundError(
            f"Tiny ImageNet: expected the file {wnids_path}, but {describe_folder(folder)}"
        )
    try:
        text = wnids_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{wnids_path} should be text, one class id per line ({error})") from error
    wnids = sorted(line.strip() for line in text.splitlines() if line.strip())
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"{wnids_path} should list distinct class ids, but repeats some")
    return wnids


def _check_classes(folder: Path, wnids: list[str], expected: dict[str, int], source: str) -> None:
    where = folder / "wnids.txt"
    _check_count("tiny-imagenet", folder, where, "classes", len(wnids), expected["classes"], source)


def tiny_imagenet_counts(folder: Path) -> dict[str, int]:
    """Classes and images per split that a Tiny ImageNet folder holds (lists, no decoding)."""
    wnids = _read_wnids(folder)
    train, _ = _tiny_imagenet_train_files(folder, wnids)
    val, _ = _tiny_imagenet_val_files(folder, {wnid: index for index, wnid in enumerate(wnids)})
    return {"classes": len(wnids), "train": len(train), "test": len(val)}


def _tiny_imagenet_train_files(folder: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    paths: list[Path] = []
    labels: list[int] = []
    for index, wnid in enumerate(wnids):
        class_folder = folder / "train" / wnid / "images"
        files = sorted(class_folder.glob("*.JPEG")) if class_folder.is_dir() else []
        if not files:
            raise FileNotFoundError(
                f"Tiny ImageNet 'train' split: expected JPEG files in {class_folder} for the "
                f"class {wnid} of wnids.txt, but {describe_folder(class_folder)}"
            )
        paths.extend(files)
        labels.extend([index] * len(files))
    return paths, labels


def _tiny_imagenet_val_files(
    folder: Path, class_index: dict[str, int]
) -> tuple[list[Path], list[int]]:
    annotations = folder / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise FileNotFoundError(
            f"Tiny ImageNet 'test' split (the validation set; the official test set has no "
            f"labels): expected {annotations} and val/images/*.JPEG, but "
            f"{describe_folder(annotations.parent)}"
        )
    try:
        text = annotations.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{annotations} should be text ({error})") from error
    paths: list[Path] = []
    labels: list[int] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise ValueError(
                f"{annotations}, line {line_number}: expected 'file<TAB>wnid<TAB>x0<TAB>y0"
                f"<TAB>x1<TAB>y1', but got {line!r}"
            )
        file_name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in class_index:
            raise ValueError(
                f"{annotations}, line {line_number}: class {wnid!r} is not in wnids.txt"
            )
        path = folder / "val" / "images" / file_name
        if not path.is_file():
            raise FileNotFoundError(
                f"{annotations}, line {line_number}: expected the image {path}, but "
                f"{describe_folder(path.parent)}"
            )
        paths.append(path)
        labels.append(class_index[wnid])
    if not paths:
        raise ValueError(f"{annotations} should list the validation images, but is empty")
    return paths, labels


def _tiny_imagenet_class_names(folder: Path, wnids: list[str]) -> list[str]:
    """Names from words.txt ("wnid<TAB>names" for all of ImageNet) when present, else wnids."""
    words_path = folder / "words.txt"
    if not words_path.is_file():
        return list(wnids)
    words: dict[str, str] = {}
    for line in words_path.read_text(encoding="utf-8", errors="replace").splitlines():
        wnid, _, names = line.partition("\t")
        words[wnid.strip()] = names.strip()
    return [words.get(wnid) or wnid for wnid in wnids]


def decode_jpegs(paths: Sequence[Path]) -> Tensor:
    """(N, 3, 64, 64) uint8 from 64x64 image files, decoded in threads (Pillow frees the GIL).

    Each file's size is read from its header and anything but 64x64 is refused before any
    pixel is decoded, so a decompression bomb (a small file claiming a huge image) costs
    nothing. Pillow itself refuses images over twice ``PIL.Image.MAX_IMAGE_PIXELS`` when
    opening them (``DecompressionBombError``) and warns above it; both end as a ValueError
    naming the file.
    """
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(
            "Tiny ImageNet's JPEG files need Pillow: pip install pillow "
            "(or pip install -e '.[data]' in the dropcluster checkout)"
        ) from error
    size = TINY_IMAGENET_SIZE
    images = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def decode(item: tuple[int, Path]) -> None:
        index, path = item
        try:
            with Image.open(path) as image:
                width, height = image.size  # from the header: nothing is decoded yet
                if (width, height) == (size, size):
                    pixels = np.asarray(image.convert("RGB"))
        except Exception as error:  # OSError, DecompressionBombError, SyntaxError, ...
            raise ValueError(f"{path} is not a readable image ({error})") from error
        if (width, height) != (size, size):
            raise ValueError(f"{path} should be a {size}x{size} image, but is {width}x{height}")
        images[index] = pixels

    workers = min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # list() re-raises the first error of any image.
        list(pool.map(decode, enumerate(paths), chunksize=256))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# Helpers


def default_root() -> Path:
    return Path(os.environ.get(DATA_ENV) or Path.home() / ".cache" / "dropcluster" / "data")


def describe_folder(folder: Path, limit: int = 10) -> str:
    """What a folder holds, for error messages: "it holds [...]", "it is empty", ..."""
    if not folder.exists():
        return f"{folder} does not exist"
    if not folder.is_dir():
        return f"{folder} is not a folder"
    names = sorted(child.name + ("/" if child.is_dir() else "") for child in folder.iterdir())
    if not names:
        return f"{folder} is empty"
    shown = names[:limit] + ([f"... ({len(names) - limit} more)"] if len(names) > limit else [])
    return f"{folder} holds {shown}"
