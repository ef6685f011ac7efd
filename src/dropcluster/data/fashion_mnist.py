"""Fashion-MNIST from local IDX files (Xiao, Rasul & Vollgraf 2017).

The four files keep their official names, gzipped or raw::

    root/train-images-idx3-ubyte[.gz]   60000 images, 28x28, uint8
    root/train-labels-idx1-ubyte[.gz]   60000 labels, 0..9
    root/t10k-images-idx3-ubyte[.gz]    10000 images
    root/t10k-labels-idx1-ubyte[.gz]    10000 labels

With no root given, the files are looked for where Debian's ``dataset-fashion-mnist`` package
installs them (:data:`DEFAULT_ROOT`; ``apt-get install dataset-fashion-mnist``), then in the
default data folder's ``fashion-mnist`` (:data:`DOWNLOAD_FOLDER`), where
:func:`~dropcluster.data.downloads.download_fashion_mnist` (``dropcluster download
fashion-mnist``) puts them. An IDX file is a big-endian header, the magic number
``0x0000 08 nd`` (08: unsigned bytes, nd: number of dimensions), then ``nd`` uint32 sizes,
then the row-major data.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dropcluster.validation import check_choice

__all__ = [
    "DEFAULT_ROOT",
    "DOWNLOAD_FOLDER",
    "FASHION_MNIST_CLASSES",
    "IDX_UBYTE",
    "IMAGE_SIZE",
    "SHA256",
    "SPLIT_FILES",
    "SPLIT_SIZES",
    "fashion_mnist_folders",
    "load_fashion_mnist",
    "read_idx",
    "write_idx",
]


#: Where Debian's ``dataset-fashion-mnist`` installs the files: the first place looked in.
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
#: The subfolder of a data folder that ``dropcluster download fashion-mnist`` fills.
DOWNLOAD_FOLDER = "fashion-mnist"

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

IMAGE_SIZE = 28

#: File stem (without ``.gz``) of the images and the labels of each split.
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

#: Number of examples in the official splits.
SPLIT_SIZES = {"train": 60000, "test": 10000}

#: SHA-256 of the *decompressed* official files. Debian re-compresses them, so the checksums of
#: the ``.gz`` files published with the data set do not apply; the decompressed bytes are the
#: same everywhere. Measured on Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1.
SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

#: Third byte of the magic number of unsigned-byte data, the only IDX type used here.
IDX_UBYTE = 0x08

_DEBIAN_HINT = "`apt-get install dataset-fashion-mnist` (Debian's package; or `make data`)"


def load_fashion_mnist(
    split: str = "train", root: str | Path | None = None, *, verify: bool = True
) -> tuple[Tensor, Tensor]:
    """Load one split of Fashion-MNIST from IDX files.

    Args:
        split: ``"train"`` (60000 examples) or ``"test"`` (10000, the ``t10k`` files).
        root: folder that holds the files, or whose ``fashion-mnist`` subfolder holds them
            (where ``dropcluster download fashion-mnist --data-dir ROOT`` puts them); ``None``:
            :data:`DEFAULT_ROOT`, where Debian's ``dataset-fashion-mnist`` installs them, then
            the default data folder's ``fashion-mnist`` (:func:`fashion_mnist_folders`). The
            first of these folders that holds both files of the split is read. Each file may
            be gzipped (``name.gz``) or raw (``name``); the raw file is read when both exist.
        verify: check the SHA-256 of the decompressed bytes against :data:`SHA256` when a file
            holds the official number of examples.
            Smaller files, such as the ones tests generate with :func:`write_idx`, cannot be
            the official data and skip the check for that reason only; every file still gets
            the full format checks.

    Returns:
        ``images``: (N, 1, 28, 28) uint8 tensor, 0 = background, and ``labels``: (N,) int64
        tensor of class indices into :data:`FASHION_MNIST_CLASSES`, both on the CPU.

    Raises:
        ValueError: unknown split, malformed or truncated file, wrong magic number, image size
            not 28x28, image and label counts that disagree, labels outside 0..9, or a
            checksum mismatch.
        FileNotFoundError: no folder holds the two files of the split; the message lists the
            expected layout, what each folder holds and how to get the data.
    """
    check_choice("split", split, SPLIT_FILES)
    image_path, label_path = _find_split(fashion_mnist_folders(root), split, root)
    image_stem, label_stem = SPLIT_FILES[split]

    images = _read_checked(image_path, image_stem, 3, SPLIT_SIZES[split], verify)
    labels = _read_checked(label_path, label_stem, 1, SPLIT_SIZES[split], verify)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"{image_path} should hold images of shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}), "
            f"but holds an array of shape {images.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{image_path} holds {images.shape[0]} images but {label_path} holds "
            f"{labels.shape[0]} labels; the counts should agree"
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(
            f"{label_path} should hold labels in 0..{len(FASHION_MNIST_CLASSES) - 1}, "
            f"but holds {int(labels.max())}"
        )
    images_tensor = torch.from_numpy(images).unsqueeze(1)
    labels_tensor = torch.from_numpy(labels).to(torch.int64)
    return images_tensor, labels_tensor


def read_idx(path: str | Path) -> np.ndarray:
    """Read an unsigned-byte IDX file (gzipped when the name ends in ``.gz``).

    Args:
        path: the file.

    Returns:
        uint8 array with the shape stored in the header.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not gzip data although named ``.gz``, wrong magic number, or a size that
            disagrees with the header (truncated or trailing bytes).
    """
    array, _ = _read_idx_bytes(Path(path))
    return array


def write_idx(path: str | Path, array: np.ndarray | Tensor) -> Path:
    """Write a uint8 array as an IDX file, gzipped when the name ends in ``.gz``.

    The inverse of :func:`read_idx`; tests use it to generate files in the exact format of the
    data set (images: shape (N, 28, 28), labels: shape (N,)).

    Args:
        path: destination file; its folder must exist.
        array: numpy array or CPU/GPU tensor of dtype uint8, 1 to 255 dimensions.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: dtype other than uint8, 0 or more than 255 dimensions, or a size that does
            not fit the uint32 of the header.
    """
    if isinstance(array, Tensor):
        if array.dtype != torch.uint8:
            raise ValueError(f"array should have dtype uint8, but got {array.dtype}")
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"array should have dtype uint8, but got {array.dtype}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"array should have 1 to 255 dimensions, but got {array.ndim}")
    if max(array.shape) >= 2**32:
        raise ValueError(f"every size should fit in 32 bits, but got shape {array.shape}")
    header = bytes([0, 0, IDX_UBYTE, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array).tobytes()
    path = Path(path)
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    path.write_bytes(payload)
    return path


def fashion_mnist_folders(root: str | Path | None = None) -> list[Path]:
    """The folders :func:`load_fashion_mnist` looks in, in order.

    Args:
        root: None: :data:`DEFAULT_ROOT` (Debian's package), then ``DATA/fashion-mnist`` where
            DATA is the default data folder (:func:`~dropcluster.data.datasets.default_root`:
            ``$DROPCLUSTER_DATA``, else ``~/.cache/dropcluster/data``); a folder: the folder,
            then its ``fashion-mnist`` subfolder.

    Returns:
        The two folders, whether they exist or not.
    """
    if root is not None:
        return [Path(root), Path(root) / DOWNLOAD_FOLDER]
    # Imported here: datasets imports this module.
    from dropcluster.data.datasets import default_root

    return [DEFAULT_ROOT, default_root() / DOWNLOAD_FOLDER]


def _find_split(folders: list[Path], split: str, root: str | Path | None) -> tuple[Path, Path]:
    """The image and label files of ``split`` in the first folder holding both, or a
    FileNotFoundError that says what each folder holds and how to get the data."""
    stems = SPLIT_FILES[split]
    for folder in folders:
        found = [_find_file(folder, stem) for stem in stems]
        if found[0] is not None and found[1] is not None:
            return found[0], found[1]
    # Report on the first folder that holds anything (the one the user meant), else the first.
    folder = next((f for f in folders if f.is_dir() and any(f.iterdir())), folders[0])
    missing = next(stem for stem in stems if _find_file(folder, stem) is None)
    described = []
    for candidate in folders:
        if not candidate.is_dir():
            described.append(f"{candidate} does not exist")
        else:
            names = sorted(child.name for child in candidate.iterdir())
            described.append(f"{candidate} holds {names}" if names else f"{candidate} is empty")
    expected = " and ".join(f"{stem}[.gz]" for stem in stems)
    data_dir = "" if root is None else f" --data-dir {root}"
    raise FileNotFoundError(
        f"Fashion-MNIST {split!r} split: expected {expected} in {' or '.join(map(str, folders))}, "
        f"but {missing}[.gz] is missing from {folder} ({'; '.join(described)}); get the data "
        f"with `dropcluster download fashion-mnist{data_dir}` or {_DEBIAN_HINT}"
    )


def _find_file(folder: Path, stem: str) -> Path | None:
    """The raw or gzipped file ``stem`` in ``folder`` (raw first), or None."""
    for name in (stem, stem + ".gz"):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def _read_checked(
    path: Path, stem: str, n_dims: int, official_count: int, verify: bool
) -> np.ndarray:
    """Read ``path``, require ``n_dims`` dimensions, and verify the official-size files."""
    array, raw = _read_idx_bytes(path)
    if array.ndim != n_dims:
        kind = "images" if n_dims == 3 else "labels"
        raise ValueError(
            f"{path} should start with the magic number 0x000008{n_dims:02x} of IDX {kind}, "
            f"but starts with 0x{raw[:4].hex()} ({array.ndim} dimensions)"
        )
    if verify and array.shape[0] == official_count:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != SHA256[stem]:
            raise ValueError(
                f"{path} holds {official_count} examples, the size of the official file, but "
                f"its decompressed SHA-256 is {digest}, not {SHA256[stem]}: the file is "
                f"corrupt or another data set (load with verify=False to skip this check)"
            )
    return array


def _read_idx_bytes(path: Path) -> tuple[np.ndarray, bytes]:
    """Parse an unsigned-byte IDX file; return the array and the decompressed bytes."""
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise ValueError(
                f"{path} should be gzip data, but cannot be decompressed: {error}"
            ) from error
    if len(raw) < 4:
        raise ValueError(f"{path} should start with a 4-byte IDX magic number, but has {len(raw)}")
    zeros, data_type, n_dims = raw[:2], raw[2], raw[3]
    if zeros != b"\x00\x00" or data_type != IDX_UBYTE or n_dims == 0:
        raise ValueError(
            f"{path} should start with the IDX magic number 0x000008nd of unsigned-byte data "
            f"(0x00000803 for images, 0x00000801 for labels), but starts with 0x{raw[:4].hex()}"
        )
    header_size = 4 + 4 * n_dims
    if len(raw) < header_size:
        raise ValueError(
            f"{path} should have a {header_size}-byte header for {n_dims} dimensions, "
            f"but has {len(raw)} bytes"
        )
    shape = tuple(int(size) for size in np.frombuffer(raw, dtype=">u4", count=n_dims, offset=4))
    expected_size = header_size + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected_size:
        raise ValueError(
            f"{path} should have {expected_size} bytes for data of shape {shape}, but has "
            f"{len(raw)} ({'truncated' if len(raw) < expected_size else 'trailing bytes'})"
        )
    array = np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape).copy()
    return array, raw
