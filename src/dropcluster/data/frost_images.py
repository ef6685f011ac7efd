"""The six frost photographs of the frost corruption: where they are, and how to fetch them.

The reference scripts of Hendrycks & Dietterich (2019) read ``frost1.png`` .. ``frost6.jpg``
from their own folder (``ImageNet-C/create_c`` of hendrycks/robustness); they are data, not
code, and are not shipped with dropcluster. :func:`find_frost_folder` looks for them, in order:

1. ``<data root>/frost``, the data root being ``root`` when given, else ``$DROPCLUSTER_DATA``,
   else ``~/.cache/dropcluster/data`` (:func:`~dropcluster.data.datasets.default_root`), where
   :func:`download_frost_images` puts them;
2. the ``frost`` folder of the PyPI package ``imagecorruptions`` when it is installed (located
   with ``importlib.util.find_spec``, without importing it: its import fails on current
   numpy/scikit-image);
3. else it raises ``FileNotFoundError`` naming :func:`download_frost_images`.

A folder counts only when it holds all six files. Files found there are used as they are (no
hash check: a folder of one's own images works too); :func:`download_frost_images` checks the
SHA-256 of what it fetches.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from dropcluster.data.datasets import default_root

__all__ = [
    "FROST_COMMIT",
    "FROST_FILES",
    "FROST_FOLDER",
    "FROST_SHA256",
    "FROST_URL",
    "download_frost_images",
    "find_frost_folder",
    "load_frost_images",
]

#: The file names, in the reference's order (its ``np.random.randint(5)`` only ever picks one
#: of the first five).
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
#: The folder under the data root that holds them.
FROST_FOLDER = "frost"
#: The hendrycks/robustness commit the files are fetched from (the newest; the images were
#: last changed in e0377d46, 2018).
FROST_COMMIT = "8190fe329f5f072a06e3a2aea02bb5dda69aed9f"
#: Where each file is: ``FROST_URL + name``.
FROST_URL = (
    f"https://raw.githubusercontent.com/hendrycks/robustness/{FROST_COMMIT}/ImageNet-C/create_c/"
)
#: SHA-256 of each file at :data:`FROST_COMMIT`. The copies in the PyPI package
#: ``imagecorruptions`` 1.1.2 (``imagecorruptions/frost/``) are byte-identical.
FROST_SHA256: dict[str, str] = {
    "frost1.png": "ff9f907860bd7a835d459e32f9d588062b7f61ee267343cc7222b56753a14755",
    "frost2.png": "fe211a89b336999c207a852ce05818d4545d0b57c5beadd824b4cc9d9a9b6137",
    "frost3.png": "2d0d50b4a9bb213f38b024ef7768731bb83cc08d2f26b5766bbc167cdfa0e504",
    "frost4.jpg": "3f8b91ca1a9fa7167b09e773da53f5ae60d0a1fd88f02a783f6e328a72887f6e",
    "frost5.jpg": "5fc6a19df4a429ba68abdcc8f8a4278d4c9f81c9ccafd2c92ab0c8cf8992ebd2",
    "frost6.jpg": "1f92b2f48408748085b68dd81d816ef239f42cef3029c25d041fcb6760fb4f25",
}

#: (folder, device) -> the decoded images.
_DECODED: dict[tuple[str, torch.device], tuple[Tensor, ...]] = {}


def find_frost_folder(root: str | Path | None = None) -> Path:
    """The folder holding the six frost images (see the module docstring for the order).

    Args:
        root: the data root to look in first (its ``frost`` folder); None: the default one.

    Returns:
        The folder.

    Raises:
        FileNotFoundError: neither place holds all six files.
    """
    data_folder = Path(default_root() if root is None else root) / FROST_FOLDER
    candidates = [data_folder]
    package_folder = _imagecorruptions_folder()
    if package_folder is not None:
        candidates.append(package_folder)
    for folder in candidates:
        if all((folder / name).is_file() for name in FROST_FILES):
            return folder
    missing = [name for name in FROST_FILES if not (data_folder / name).is_file()]
    raise FileNotFoundError(
        f"frost needs the six frost images, but {data_folder} lacks {missing} and no installed "
        "imagecorruptions package has them; call "
        "dropcluster.data.frost_images.download_frost_images() (or set $DROPCLUSTER_DATA)"
    )


def _imagecorruptions_folder() -> Path | None:
    """``imagecorruptions/frost`` of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec("imagecorruptions")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / FROST_FOLDER


def load_frost_images(
    root: str | Path | None = None, device: str | torch.device | None = None
) -> tuple[Tensor, ...]:
    """The six frost images, decoded, in :data:`FROST_FILES` order; cached per folder and device.

    Decoded with Pillow as RGB (the alpha channel of the PNGs dropped, as ``cv2.imread`` drops
    it; the reference then swaps OpenCV's BGR to RGB, so these are the colours it uses).

    Args:
        root: as in :func:`find_frost_folder`.
        device: where the tensors go (default: the CPU).

    Returns:
        Six Tensor[3, H_i, W_i] uint8 (the originals: 600x900, 315x560, 315x560, 350x527,
        495x660, 323x485).

    Raises:
        FileNotFoundError: as :func:`find_frost_folder`.
        ImportError: Pillow is not installed.
    """
    folder = find_frost_folder(root)
    device = torch.device("cpu" if device is None else device)
    key = (str(folder.resolve()), device)
    if key not in _DECODED:
        if device.type != "cpu":
            images = tuple(image.to(device) for image in load_frost_images(root, "cpu"))
        else:
            images = tuple(_decode(folder / name) for name in FROST_FILES)
        _DECODED[key] = images
    return _DECODED[key]


def _decode(path: Path) -> Tensor:
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - Pillow is a dependency of the data extra
        raise ImportError("decoding the frost images needs Pillow (pip install pillow)") from error
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        return data.reshape(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()


def download_frost_images(
    root: str | Path | None = None,
    *,
    url: str = FROST_URL,
    sha256: Mapping[str, str] | None = None,
) -> Path:
    """Fetch the six frost images into ``<root>/frost``, checking each file's SHA-256.

    Files already there with the expected hash are kept. Each file is written to a temporary
    file in the folder and renamed into place only once its hash matches, one file at a time
    (no lock: concurrent calls write the same bytes, and each rename is atomic), so the folder
    never holds a partial or wrong file under a frost name.

    Args:
        root: the data root (created if needed); None: the default one.
        url: the base URL; each file is ``url + name`` (any URL urllib opens, ``file://``
            included).
        sha256: name -> expected SHA-256 (hex); None: :data:`FROST_SHA256`.

    Returns:
        The folder, ``<root>/frost``.

    Raises:
        ValueError: a fetched file's SHA-256 differs from the expected one (it is deleted).
        OSError: the download or the write fails (nothing is left behind).
    """
    expected = FROST_SHA256 if sha256 is None else sha256
    folder = Path(default_root() if root is None else root) / FROST_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for name in FROST_FILES:
        destination = folder / name
        if destination.is_file() and _sha256(destination) == expected[name]:
            continue
        _fetch(url + name, destination, expected[name])
    return folder


def _fetch(url: str, destination: Path, sha256: str) -> None:
    digest = hashlib.sha256()
    handle, temporary = tempfile.mkstemp(
        dir=destination.parent, prefix=f".{destination.name}.", suffix=".part"
    )
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise ValueError(
                f"{url}: SHA-256 {digest.hexdigest()} differs from the expected {sha256}; "
                "the download was deleted"
            )
        os.replace(temporary, destination)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
