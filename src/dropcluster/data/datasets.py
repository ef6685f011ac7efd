"""The paper's data sets as uint8 tensors: CIFAR-100, Tiny ImageNet, Fashion-MNIST, synthetic.

:func:`load_dataset` reads each data set from its official on-disk layout, with no download
and no conversion step, and returns an :class:`ImageDataset` on the CPU:

``"cifar100"`` (Krizhevsky 2009), the "python version" archive, extracted::

    root/cifar-100-python/train   pickle: b"data" (50000, 3072) uint8, b"fine_labels", ...
    root/cifar-100-python/test    the same with 10000 images
    root/cifar-100-python/meta    pickle: b"fine_label_names" (100 names), ...

    Each row of b"data" is one 32x32 image, row-major, the red plane, then green, then blue.
    ``root`` may also be the ``cifar-100-python`` folder itself. Labels are the 100 fine
    classes, the ones the paper reports.

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

Without ``root``, CIFAR-100 and Tiny ImageNet are looked up in ``$DROPCLUSTER_DATA``, else in
``~/.cache/dropcluster/data`` (where :func:`download_cifar100` and
:func:`download_tiny_imagenet` put them by default).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dropcluster.data import fashion_mnist

DATASET_NAMES = ("cifar100", "tiny-imagenet", "fashion-mnist", "synthetic")
SPLITS = ("train", "test")

CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_SPLIT_SIZES = {"train": 50000, "test": 10000}

TINY_IMAGENET_FOLDER = "tiny-imagenet-200"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
#: MD5 of the official zip, as published by torchvision-style loaders of the data set.
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINY_IMAGENET_SIZE = 64

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
        name: ``"cifar100"``, ``"tiny-imagenet"``, ``"fashion-mnist"`` or ``"synthetic"``.
        split: ``"train"`` or ``"test"`` (Tiny ImageNet: its validation set; ``"val"`` is
            accepted as a synonym).
        root: the folder holding the data set (see the module docstring for each layout);
            None: the default place of each data set.

    Returns:
        :class:`ImageDataset` with images of shape (N, 3, 32, 32) for CIFAR-100, (N, 3, 64, 64)
        for Tiny ImageNet, (N, 1, 28, 28) for Fashion-MNIST and (N, 3, 32, 32) for synthetic.

    Raises:
        ValueError: unknown name or split, or a malformed file.
        FileNotFoundError: missing files; the message gives the expected layout and what the
            folder holds.
        ImportError: Tiny ImageNet without Pillow.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"name should be one of {DATASET_NAMES}, but got {name!r}")
    if name == "tiny-imagenet" and split == "val":
        split = "test"
    if split not in SPLITS:
        raise ValueError(f"split should be one of {SPLITS}, but got {split!r}")
    if name == "cifar100":
        return _load_cifar100(split, _default_root() if root is None else Path(root))
    if name == "tiny-imagenet":
        return _load_tiny_imagenet(split, _default_root() if root is None else Path(root))
    if name == "fashion-mnist":
        images, labels = fashion_mnist.load_fashion_mnist(split, root)
        return ImageDataset(images, labels, list(fashion_mnist.FASHION_MNIST_CLASSES), name)
    images, labels = make_synthetic(SYNTHETIC_SIZES[split], seed=SYNTHETIC_SEEDS[split])
    return ImageDataset(images, labels, list(SYNTHETIC_CLASSES), name)


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
    if channels not in (1, 3):
        raise ValueError(f"channels should be 1 or 3, but got {channels}")
    if n_examples < 0 or size < 4:
        raise ValueError(f"expected n_examples >= 0 and size >= 4, but got {n_examples} and {size}")
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
# CIFAR-100


def _load_cifar100(split: str, root: Path) -> ImageDataset:
    folder = _cifar100_folder(root)
    entry = _read_pickle(folder / split, f"CIFAR-100 {split!r} split")
    meta = _read_pickle(folder / "meta", "CIFAR-100 meta file")
    data = _required_key(entry, "data", folder / split)
    fine_labels = _required_key(entry, "fine_labels", folder / split)
    names = _required_key(meta, "fine_label_names", folder / "meta")

    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{folder / split}: 'data' should be a uint8 array of shape (N, 3072), one "
            f"32x32 RGB image per row, but is {data.dtype} of shape {data.shape}"
        )
    labels = np.asarray(fine_labels, dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise ValueError(
            f"{folder / split}: 'fine_labels' should hold {data.shape[0]} labels, one per row "
            f"of 'data', but has shape {labels.shape}"
        )
    classes = [_as_text(label_name) for label_name in names]
    if labels.size and not 0 <= int(labels.min()) <= int(labels.max()) < len(classes):
        raise ValueError(
            f"{folder / split}: 'fine_labels' should be in 0..{len(classes) - 1} (the "
            f"{len(classes)} names of 'fine_label_names'), but span "
            f"{int(labels.min())}..{int(labels.max())}"
        )
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return ImageDataset(images, torch.from_numpy(labels), classes, "cifar100")


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
        f"(the extracted python version, {CIFAR100_URL}), but {_describe_folder(root)}{hint}"
    )


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
                f"a CIFAR-100 file should hold only lists and numpy arrays, but refers to "
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
            f"{what}: expected the file {path}, but {_describe_folder(path.parent)}"
        )
    try:
        with open(path, "rb") as handle:
            entry = _ArrayUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"{what}: {path} is not a readable CIFAR pickle ({error})") from error
    if not isinstance(entry, dict):
        raise ValueError(f"{what}: {path} should hold a dict, but holds a {type(entry).__name__}")
    return {_as_text(key): value for key, value in entry.items()}


def _required_key(entry: dict[str, object], key: str, path: Path) -> object:
    if key not in entry:
        raise ValueError(f"{path} should hold the key {key!r}, but holds {sorted(entry)}")
    return entry[key]


def _as_text(value: object) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------------------
# Tiny ImageNet


def tiny_imagenet_wnids(root: str | Path | None = None) -> list[str]:
    """Tiny ImageNet's class ids in label order (sorted ``wnids.txt``), as :func:`load_dataset`
    numbers them; ``root`` as for :func:`load_dataset`."""
    return _tiny_imagenet_folder_and_wnids(_default_root() if root is None else Path(root))[1]


def _load_tiny_imagenet(split: str, root: Path) -> ImageDataset:
    folder, wnids = _tiny_imagenet_folder_and_wnids(root)
    class_index = {wnid: index for index, wnid in enumerate(wnids)}
    if split == "train":
        paths, labels = _tiny_imagenet_train_files(folder, wnids)
    else:
        paths, labels = _tiny_imagenet_val_files(folder, class_index)
    images = _decode_jpegs(paths)
    return ImageDataset(
        images,
        torch.tensor(labels, dtype=torch.int64),
        _tiny_imagenet_class_names(folder, wnids),
        "tiny-imagenet",
    )


def _tiny_imagenet_folder_and_wnids(root: Path) -> tuple[Path, list[str]]:
    folder = root / TINY_IMAGENET_FOLDER
    if not folder.is_dir() and (root / "wnids.txt").is_file():
        folder = root
    wnids_path = folder / "wnids.txt"
    if not wnids_path.is_file():
        raise FileNotFoundError(
            f"Tiny ImageNet: expected {root / TINY_IMAGENET_FOLDER}/ holding wnids.txt, train/ "
            f"and val/ (the extracted {TINY_IMAGENET_URL}), but {_describe_folder(root)}; "
            f"download_tiny_imagenet({str(root)!r}) fetches and extracts it"
        )
    wnids = sorted(line.strip() for line in wnids_path.read_text().splitlines() if line.strip())
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"{wnids_path} should list distinct class ids, but repeats some")
    return folder, wnids


def _tiny_imagenet_train_files(folder: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    paths: list[Path] = []
    labels: list[int] = []
    for index, wnid in enumerate(wnids):
        class_folder = folder / "train" / wnid / "images"
        files = sorted(class_folder.glob("*.JPEG")) if class_folder.is_dir() else []
        if not files:
            raise FileNotFoundError(
                f"Tiny ImageNet 'train' split: expected JPEG files in {class_folder} for the "
                f"class {wnid} of wnids.txt, but {_describe_folder(class_folder)}"
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
            f"{_describe_folder(annotations.parent)}"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for line_number, line in enumerate(annotations.read_text().splitlines(), start=1):
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
                f"{_describe_folder(path.parent)}"
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
    for line in words_path.read_text().splitlines():
        wnid, _, names = line.partition("\t")
        words[wnid.strip()] = names.strip()
    return [words.get(wnid) or wnid for wnid in wnids]


def _decode_jpegs(paths: Sequence[Path]) -> Tensor:
    """(N, 3, 64, 64) uint8 from 64x64 JPEG files, decoded in threads (Pillow frees the GIL)."""
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(
            "Tiny ImageNet's JPEG files need Pillow: pip install pillow "
            "(or pip install 'dropcluster[data]')"
        ) from error
    size = TINY_IMAGENET_SIZE
    images = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def decode(item: tuple[int, Path]) -> None:
        index, path = item
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
        except OSError as error:
            raise ValueError(f"{path} is not a readable image ({error})") from error
        if pixels.shape != (size, size, 3):
            raise ValueError(
                f"{path} should be a {size}x{size} image, but is "
                f"{pixels.shape[1]}x{pixels.shape[0]}"
            )
        images[index] = pixels

    workers = min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # list() re-raises the first error of any image.
        list(pool.map(decode, enumerate(paths), chunksize=256))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# Downloads


def download_cifar100(
    root: str | Path | None = None, *, url: str = CIFAR100_URL, md5: str | None = CIFAR100_MD5
) -> Path:
    """Download and extract CIFAR-100 (python version) into ``root``, unless it is there.

    Args:
        root: destination folder (created); None: the default data folder.
        url: where the ``.tar.gz`` archive is (any URL urllib opens, ``file://`` included).
        md5: expected MD5 of the archive; None skips the check.

    Returns:
        The path of the ``cifar-100-python`` folder.

    Raises:
        ValueError: checksum mismatch (the download is deleted) or an archive without
            ``cifar-100-python/``.
    """
    root = _default_root() if root is None else Path(root)
    folder = root / CIFAR100_FOLDER
    if (folder / "meta").is_file():
        return folder
    archive = _download(url, root / (CIFAR100_FOLDER + ".tar.gz"), md5)
    with tarfile.open(archive, "r:gz") as tar:
        names = tar.getnames()
        if not any(name.split("/")[0] == CIFAR100_FOLDER for name in names):
            raise ValueError(
                f"{archive} should hold {CIFAR100_FOLDER}/, but holds {sorted(names)[:5]}"
            )
        if hasattr(tarfile, "data_filter"):
            tar.extractall(root, filter="data")
        else:  # Python < 3.10.12 has no extraction filters
            tar.extractall(root)
    return folder


def download_tiny_imagenet(
    root: str | Path | None = None,
    *,
    url: str = TINY_IMAGENET_URL,
    md5: str | None = TINY_IMAGENET_MD5,
) -> Path:
    """Download and extract Tiny ImageNet (about 240 MB) into ``root``, unless it is there.

    Args:
        root: destination folder (created); None: the default data folder.
        url: where the ``.zip`` archive is (any URL urllib opens, ``file://`` included).
        md5: expected MD5 of the archive; None skips the check.

    Returns:
        The path of the ``tiny-imagenet-200`` folder.
    """
    root = _default_root() if root is None else Path(root)
    folder = root / TINY_IMAGENET_FOLDER
    if (folder / "wnids.txt").is_file():
        return folder
    archive = _download(url, root / (TINY_IMAGENET_FOLDER + ".zip"), md5)
    with zipfile.ZipFile(archive) as zipped:
        names = zipped.namelist()
        if not any(name.split("/")[0] == TINY_IMAGENET_FOLDER for name in names):
            raise ValueError(
                f"{archive} should hold {TINY_IMAGENET_FOLDER}/, but holds {sorted(names)[:5]}"
            )
        zipped.extractall(root)  # zipfile drops absolute paths and ".." components
    return folder


def _download(url: str, destination: Path, md5: str | None) -> Path:
    """Fetch ``url`` into ``destination`` through a temporary file; verify its MD5."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.is_file() and (md5 is None or _md5(destination) == md5):
        return destination
    digest = hashlib.md5(usedforsecurity=False)
    handle, temporary = tempfile.mkstemp(dir=destination.parent, suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if md5 is not None and digest.hexdigest() != md5:
            raise ValueError(
                f"{url}: MD5 {digest.hexdigest()} differs from the expected {md5}; the "
                f"download was deleted"
            )
        os.replace(temporary, destination)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return destination


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Helpers


def _default_root() -> Path:
    return Path(os.environ.get(DATA_ENV) or Path.home() / ".cache" / "dropcluster" / "data")


def _describe_folder(folder: Path, limit: int = 10) -> str:
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
