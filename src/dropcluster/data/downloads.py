"""Download and extract CIFAR-10/100, Tiny ImageNet and their released corrupted test sets.

:func:`download_cifar10`, :func:`download_cifar100` and :func:`download_tiny_imagenet` fetch an
official archive (any URL urllib opens, ``file://`` included), check its MD5, extract it into a
temporary folder next to the destination while refusing unsafe members (absolute paths, ``..``,
links, devices), count what it holds, mark it complete
(:func:`~dropcluster.data.datasets.write_completion_marker`) and only then rename it into place.
Concurrent calls on one folder wait for each other, and any failure leaves nothing partial
behind. See "Completeness" in :mod:`dropcluster.data.datasets` for what a loader then expects
of the folder.

:func:`download_cifar10_c`, :func:`download_cifar100_c` and :func:`download_tiny_imagenet_c` do
the same for the released corrupted sets of Hendrycks & Dietterich (2019) on Zenodo, counted by
the checks of their loaders (:mod:`dropcluster.data.corrupted_sets`, "Completeness") and marked
with :func:`~dropcluster.data.corrupted_sets.write_released_marker`.

:func:`download_fashion_mnist` fetches Fashion-MNIST's four gzipped IDX files into
``root/fashion-mnist`` (where :func:`~dropcluster.data.fashion_mnist.load_fashion_mnist` looks
when Debian's package is not installed), checks their MD5 and, independently, their
decompressed content.

Downloads resume. An ``http(s)://`` transfer that stops (a dropped connection, Ctrl-C) keeps
what it received in ``.NAME.part`` next to the file; the next call asks the server for the rest
(``Range: bytes=N-``), appends it when the server answers 206 and starts again from zero when it
answers 200. Other URLs (``file://``) start again. A download whose MD5 differs from the
expected one is deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PureWindowsPath

from dropcluster.data.corrupted_sets import (
    CIFAR10_C_FOLDER,
    CIFAR100_C_FOLDER,
    RELEASED_COUNTS,
    TINY_IMAGENET_C_FOLDER,
    cifar10_c_counts,
    cifar100_c_counts,
    read_released_marker,
    tiny_imagenet_c_counts,
    write_released_marker,
)
from dropcluster.data.datasets import (
    CIFAR10_ARCHIVE,
    CIFAR10_FOLDER,
    CIFAR10_URL,
    CIFAR100_FOLDER,
    CIFAR100_URL,
    OFFICIAL_COUNTS,
    TINY_IMAGENET_FOLDER,
    TINY_IMAGENET_URL,
    cifar10_counts,
    cifar100_counts,
    default_root,
    read_completion_marker,
    tiny_imagenet_counts,
    write_completion_marker,
)
from dropcluster.data.fashion_mnist import (
    DOWNLOAD_FOLDER,
    SPLIT_FILES,
    SPLIT_SIZES,
    load_fashion_mnist,
)

__all__ = [
    "CIFAR100_C_ARCHIVE_URL",
    "CIFAR100_C_MD5",
    "CIFAR100_MD5",
    "CIFAR10_C_ARCHIVE_URL",
    "CIFAR10_C_MD5",
    "CIFAR10_MD5",
    "FASHION_MNIST_MD5",
    "FASHION_MNIST_URL",
    "TINY_IMAGENET_C_ARCHIVE_URL",
    "TINY_IMAGENET_MD5",
    "download_cifar10",
    "download_cifar100",
    "download_cifar100_c",
    "download_cifar10_c",
    "download_fashion_mnist",
    "download_tiny_imagenet",
    "download_tiny_imagenet_c",
]


#: MD5 of the official archives, as published on https://www.cs.toronto.edu/~kriz/cifar.html.
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
#: MD5 of the official zip, as published by torchvision-style loaders of the data set.
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"

#: The released corrupted sets' archives on Zenodo (Hendrycks & Dietterich 2019).
CIFAR10_C_ARCHIVE_URL = "https://zenodo.org/records/2535967/files/CIFAR-10-C.tar"
CIFAR100_C_ARCHIVE_URL = "https://zenodo.org/records/3555552/files/CIFAR-100-C.tar"
TINY_IMAGENET_C_ARCHIVE_URL = "https://zenodo.org/records/2536630/files/Tiny-ImageNet-C.tar"
#: MD5 of ``CIFAR-10-C.tar`` (Zenodo record 2535967), as the dataset loaders of
#: mit-ll-responsible-ai/responsible-ai-toolbox (src/rai_toolbox/datasets/cifar_corruptions.py)
#: and ENSTA-U2IS-AI/torch-uncertainty (torch_uncertainty/datasets/classification/cifar/
#: cifar_c.py) check it.
CIFAR10_C_MD5 = "56bf5dcef84df0e2308c6dcbcbbd8499"
#: MD5 of ``CIFAR-100-C.tar`` (Zenodo record 3555552), as the same two loaders check it.
CIFAR100_C_MD5 = "11f0ed0f1191edbf9fa23466ae6021d3"
# Tiny-ImageNet-C.tar: no published MD5 could be verified, so download_tiny_imagenet_c has the
# caller give one (or None, to skip the check knowingly).

#: Zalando Research's official Fashion-MNIST files (the base URL of the four ``.gz`` files).
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
#: MD5 of the official gzipped files, as published in the README of
#: zalandoresearch/fashion-mnist (and checked by torchvision's FashionMNIST). Debian's package
#: re-compresses the files, so its ``.gz`` files differ; their decompressed bytes do not
#: (:data:`dropcluster.data.fashion_mnist.SHA256`).
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

#: Seconds between two progress lines of a download (``progress=True``).
_PROGRESS_SECONDS = 5.0
#: Seconds without an answer (connecting or reading) after which a download stops: resumable.
_TIMEOUT_SECONDS = 60
_CHUNK = 1 << 20


def download_cifar100(
    root: str | Path | None = None,
    *,
    url: str = CIFAR100_URL,
    md5: str | None = CIFAR100_MD5,
    progress: bool = False,
) -> Path:
    """Download and extract CIFAR-100 (python version) into ``root``, unless it is there.

    The archive is extracted into a temporary folder in ``root`` (``.cifar-100-python.partial-*``),
    checked, marked complete (:data:`~dropcluster.data.datasets.COMPLETE_MARKER`, recording its
    counts) and only then renamed to ``root/cifar-100-python``; any failure (a full disk
    included) removes the temporary folder, so an interrupted extraction never looks complete.
    An existing folder counts as complete when it holds the marker, or, without one (extracted
    by hand or by an older version), when it holds the official counts (100 classes, 50000 +
    10000 images; the marker is then added). Any other folder there is replaced. Concurrent
    calls on the same ``root`` wait for each other.

    Args:
        root: destination folder (created); None: the default data folder.
        url: where the ``.tar.gz`` archive is (any URL urllib opens, ``file://`` included).
        md5: expected MD5 of the archive; None skips the check. An archive whose MD5 is the
            official one must also hold the official counts.
        progress: print a line to stderr every few seconds while downloading.

    Returns:
        The path of the ``cifar-100-python`` folder.

    Raises:
        ValueError: checksum mismatch (the download is deleted), an unreadable archive (deleted
            too), an archive member that is not a plain file or folder inside the destination
            (absolute paths, ``..``, links, devices), or an archive without a complete
            ``cifar-100-python/``.
        ConnectionError: the transfer stopped before the end; for an ``http(s)://`` URL what
            arrived is kept in ``root/.cifar-100-python.tar.gz.part`` and the next call asks
            only for the rest (the message names the file; delete it to start over).
        OSError: the disk is full or read-only; nothing partial is left behind.
    """
    return _download_dataset(
        default_root() if root is None else Path(root),
        "cifar100",
        url,
        md5,
        official_md5=CIFAR100_MD5,
        folder_name=CIFAR100_FOLDER,
        suffix=".tar.gz",
        extract=_extract_tar,
        count=cifar100_counts,
        progress=progress,
    )


def download_cifar10(
    root: str | Path | None = None,
    *,
    url: str = CIFAR10_URL,
    md5: str | None = CIFAR10_MD5,
    progress: bool = False,
) -> Path:
    """Download and extract CIFAR-10 (python version, about 163 MB) into ``root``, unless it is
    there.

    As :func:`download_cifar100`: the archive is saved as ``root/cifar-10-python.tar.gz`` (its
    official name; one already there is reused when its MD5 is the expected one), extracted
    into a temporary folder, marked complete and renamed to ``root/cifar-10-batches-py`` only on
    success. An existing folder without the marker counts as complete when it holds the
    official counts (10 classes, 50000 training images in ``data_batch_1`` to ``data_batch_5``,
    10000 in ``test_batch``); any other is replaced.

    Args:
        root: destination folder (created); None: the default data folder.
        url: where the ``.tar.gz`` archive is (any URL urllib opens, ``file://`` included).
        md5: expected MD5 of the archive; None skips the check. An archive whose MD5 is the
            official one must also hold the official counts.
        progress: print a line to stderr every few seconds while downloading.

    Returns:
        The path of the ``cifar-10-batches-py`` folder.

    Raises:
        ValueError: as :func:`download_cifar100`, for an archive without a complete
            ``cifar-10-batches-py/``.
        ConnectionError: as :func:`download_cifar100` (the transfer stopped; resumable).
        OSError: the disk is full or read-only; nothing partial is left behind.
    """
    return _download_dataset(
        default_root() if root is None else Path(root),
        "cifar10",
        url,
        md5,
        official_md5=CIFAR10_MD5,
        folder_name=CIFAR10_FOLDER,
        suffix=".tar.gz",
        extract=_extract_tar,
        count=cifar10_counts,
        archive_name=CIFAR10_ARCHIVE,
        progress=progress,
    )


def download_tiny_imagenet(
    root: str | Path | None = None,
    *,
    url: str = TINY_IMAGENET_URL,
    md5: str | None = TINY_IMAGENET_MD5,
    progress: bool = False,
) -> Path:
    """Download and extract Tiny ImageNet (about 240 MB) into ``root``, unless it is there.

    As :func:`download_cifar100`: extracted into a temporary folder, marked complete and
    renamed into place only on success. An existing ``tiny-imagenet-200`` folder without the
    marker counts as complete when it holds the official counts (200 classes of 500 training
    images, 10000 validation images); any other is replaced.

    Args:
        root: destination folder (created); None: the default data folder.
        url: where the ``.zip`` archive is (any URL urllib opens, ``file://`` included).
        md5: expected MD5 of the archive; None skips the check.
        progress: print a line to stderr every few seconds while downloading.

    Returns:
        The path of the ``tiny-imagenet-200`` folder.

    Raises:
        ValueError: as :func:`download_cifar100`.
        OSError: the disk is full or read-only; nothing partial is left behind.
    """
    return _download_dataset(
        default_root() if root is None else Path(root),
        "tiny-imagenet",
        url,
        md5,
        official_md5=TINY_IMAGENET_MD5,
        folder_name=TINY_IMAGENET_FOLDER,
        suffix=".zip",
        extract=_extract_zip,
        count=tiny_imagenet_counts,
        progress=progress,
    )


def download_cifar10_c(
    root: str | Path | None = None,
    *,
    url: str = CIFAR10_C_ARCHIVE_URL,
    md5: str | None = CIFAR10_C_MD5,
    progress: bool = False,
) -> Path:
    """Download and extract CIFAR-10-C (about 2.9 GB) into ``root``, unless it is there.

    As :func:`download_cifar100`: the archive is saved as ``root/CIFAR-10-C.tar`` (one already
    there is reused when its MD5 is the expected one), extracted into a temporary folder,
    checked file by file as :func:`~dropcluster.data.corrupted_sets.load_cifar10_c` checks it
    (:func:`~dropcluster.data.corrupted_sets.cifar10_c_counts`), marked complete with its
    counts and renamed to ``root/CIFAR-10-C`` only on success. An existing folder without the
    marker counts as complete when it holds the release (all 19 corruptions of 5 x 10000
    images, and ``labels.npy``); any other is replaced. The archive is kept; delete it to save
    the space.

    Args:
        root: destination folder (created); None: the default data folder.
        url: where ``CIFAR-10-C.tar`` is (any URL urllib opens, ``file://`` included).
        md5: expected MD5 of the archive (default: the published one, :data:`CIFAR10_C_MD5`);
            None skips the check. An archive whose MD5 is the official one must also hold the
            release.
        progress: print a line to stderr every few seconds while downloading.

    Returns:
        The path of the ``CIFAR-10-C`` folder.

    Raises:
        ValueError: checksum mismatch (the download is deleted), an unreadable archive
            (deleted too), an unsafe member, or an archive without a complete
            ``CIFAR-10-C/``.
        OSError: the disk is full or read-only; nothing partial is left behind.
    """
    return _download_dataset(
        default_root() if root is None else Path(root),
        "cifar10-c",
        url,
        md5,
        official_md5=CIFAR10_C_MD5,
        folder_name=CIFAR10_C_FOLDER,
        suffix=".tar",
        extract=_extract_tar,
        count=cifar10_c_counts,
        progress=progress,
    )


def download_cifar100_c(
    root: str | Path | None = None,
    *,
    url: str = CIFAR100_C_ARCHIVE_URL,
    md5: str | None = CIFAR100_C_MD5,
    progress: bool = False,
) -> Path:
    """Download and extract CIFAR-100-C (about 2.9 GB) into ``root``, unless it is there.

    As :func:`download_cifar10_c`, into ``root/CIFAR-100-C`` from ``CIFAR-100-C.tar``; the
    labels must be CIFAR-100 fine labels (< 100).

    Args:
        root: destination folder (created); None: the default data folder.
        url: where ``CIFAR-100-C.tar`` is (any URL urllib opens, ``file://`` included).
        md5: expected MD5 of the archive (default: the published one, :data:`CIFAR100_C_MD5`);
            None skips the check.
        progress: print a line to stderr every few seconds while downloading.

    Returns:
        The path of the ``CIFAR-100-C`` folder.

    Raises:
        ValueError, OSError: as :func:`download_cifar10_c`.
    """
    return _download_dataset(
        default_root() if root is None else Path(root),
        "cifar100-c",
        url,
        md5,
        official_md5=CIFAR100_C_MD5,
        folder_name=CIFAR100_C_FOLDER,
        suffix=".tar",
        extract=_extract_tar,
        count=cifar100_c_counts,
        progress=progress,
    )


def download_tiny_imagenet_c(
    root: str | Path | None = None,
    *,
    md5: str | None,
    url: str = TINY_IMAGENET_C_ARCHIVE_URL,
    progress: bool = False,
) -> Path:
    """Download and extract Tiny-ImageNet-C into ``root``, unless it is there.

    As :func:`download_cifar10_c`, into ``root/Tiny-ImageNet-C`` from ``Tiny-ImageNet-C.tar``,
    counted as :func:`~dropcluster.data.corrupted_sets.load_tiny_imagenet_c` counts
    (:func:`~dropcluster.data.corrupted_sets.tiny_imagenet_c_counts`: every corruption with its
    five severity folders, the same classes in each, the same number of JPEGs per class). An
    existing folder without the marker counts as complete when it holds at least the 15
    benchmark corruptions, each of 200 classes of 50 images per severity.

    Args:
        root: destination folder (created); None: the default data folder.
        md5: required: the MD5 of ``Tiny-ImageNet-C.tar`` (as Zenodo lists it on
            https://zenodo.org/records/2536630), or None to skip the check knowingly. No
            published value could be verified for this project, so there is no default.
        url: where ``Tiny-ImageNet-C.tar`` is (any URL urllib opens, ``file://`` included).
        progress: print a line to stderr every few seconds while downloading.

    Returns:
        The path of the ``Tiny-ImageNet-C`` folder.

    Raises:
        ValueError, OSError: as :func:`download_cifar10_c`.
    """
    return _download_dataset(
        default_root() if root is None else Path(root),
        "tiny-imagenet-c",
        url,
        md5,
        official_md5=None,
        folder_name=TINY_IMAGENET_C_FOLDER,
        suffix=".tar",
        extract=_extract_tar,
        count=tiny_imagenet_c_counts,
        progress=progress,
    )


def download_fashion_mnist(
    root: str | Path | None = None,
    *,
    url: str = FASHION_MNIST_URL,
    md5: dict[str, str] | None = FASHION_MNIST_MD5,
    progress: bool = False,
) -> Path:
    """Download Fashion-MNIST's four gzipped IDX files (about 30 MB) into ``root/fashion-mnist``.

    :func:`~dropcluster.data.fashion_mnist.load_fashion_mnist` reads them from there: with no
    ``root`` it looks in Debian's folder (:data:`~dropcluster.data.fashion_mnist.DEFAULT_ROOT`)
    first, then in the default data folder's ``fashion-mnist``; given a folder, it looks in the
    folder, then in its ``fashion-mnist``. Each file is downloaded through ``.NAME.part``
    (resumed after an interruption, as :func:`download_cifar100`), checked against its MD5 and
    renamed into place; each split is then read back and checked (IDX headers, 28x28 images,
    as many labels as images, labels 0..9; files of the official size must have the official
    decompressed SHA-256, :data:`~dropcluster.data.fashion_mnist.SHA256`), and a split that
    fails is deleted. Files already there are reused when their MD5 is the expected one.
    Concurrent calls on the same folder wait for each other.

    Args:
        root: the data folder (created); None: the default data folder
            (:func:`~dropcluster.data.datasets.default_root`).
        url: the base URL of the four files (``http(s)://`` or ``file://``; the file names are
            appended), e.g. a mirror.
        md5: the expected MD5 of each ``.gz`` file, by file name (default: the published ones,
            :data:`FASHION_MNIST_MD5`); None skips the MD5 check (for a mirror that
            re-compresses the files, as Debian does); the content is checked either way. Files
            with the official MD5 must also hold the official counts (60000 and 10000).

    Returns:
        The folder that holds the four files, ``root/fashion-mnist``.

    Raises:
        ValueError: ``md5`` without the four file names, a checksum mismatch (the file is
            deleted; the message names it), or a split whose files are not valid Fashion-MNIST
            IDX files (deleted too).
        ConnectionError: a transfer stopped; as :func:`download_cifar100`, what arrived is kept
            in ``.NAME.part`` and the next call resumes.
        OSError: the disk is full or read-only.
    """
    names = [stem + ".gz" for stems in SPLIT_FILES.values() for stem in stems]
    if md5 is not None and sorted(md5) != sorted(names):
        raise ValueError(f"md5 should map the file names {names} to MD5s, but has {sorted(md5)}")
    folder = (default_root() if root is None else Path(root)) / DOWNLOAD_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    base = url if url.endswith("/") else url + "/"
    with _download_lock(folder):
        for split, stems in SPLIT_FILES.items():
            digests = {}
            for stem in stems:
                name = stem + ".gz"
                expected = None if md5 is None else md5[name]
                _, digests[name] = _download(
                    base + name, folder / name, expected, dataset="fashion-mnist", progress=progress
                )
            _check_fashion_mnist_split(folder, split, digests)
    return folder


def _download_dataset(
    root: Path,
    dataset: str,
    url: str,
    md5: str | None,
    *,
    official_md5: str | None,
    folder_name: str,
    suffix: str,
    extract: Callable[[Path, Path, str], None],
    count: Callable[[Path], dict[str, int]],
    archive_name: str | None = None,
    progress: bool = False,
) -> Path:
    """Download, extract into a temporary folder, check, mark complete, rename into place.

    The archive is saved as ``root/archive_name`` (None: ``folder_name + suffix``).
    ``official_md5`` None: no published checksum to hold the counts to.
    """
    root.mkdir(parents=True, exist_ok=True)
    folder = root / folder_name
    archive_name = archive_name or folder_name + suffix
    with _download_lock(root):
        # Holding the lock, any temporary file or folder left here is a killed process's; the
        # fixed-name partial download is kept (the next transfer resumes it). The random-name
        # .part files are older versions' temporary downloads. (A set: for CIFAR-100 the two
        # .part patterns match the same files.)
        resumable = _partial_path(root / archive_name)
        stale_paths = {
            *root.glob(f".{folder_name}.partial-*"),
            *root.glob(f".{folder_name}*.part"),
            *root.glob(f".{archive_name}*.part"),
        } - {resumable}
        for stale in sorted(stale_paths):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        if _is_complete(folder, dataset, count):
            return folder
        archive, digest = _download(
            url, root / archive_name, md5, dataset=dataset, progress=progress
        )
        partial = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder_name}.partial-"))
        try:
            extract(archive, partial, folder_name)
            extracted = partial / folder_name
            try:
                counts = count(extracted)
            except (FileNotFoundError, ValueError) as error:
                raise ValueError(
                    f"{archive} should hold a complete {folder_name}/, but: {error}"
                ) from error
            official = _official_counts(dataset)
            if digest == official_md5 and not _holds_official(counts, official):
                raise ValueError(
                    f"{archive} has the official MD5 but holds {counts}, not the official "
                    f"{official}: delete it and download it again"
                )
            _write_marker(extracted, dataset, counts, archive_md5=digest, source=url)
            if os.path.lexists(folder):
                # Incomplete (_is_complete said so): moved into the temporary folder, so that
                # it is deleted with it once the complete one is in place.
                os.rename(folder, partial / "incomplete")
            os.rename(extracted, folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return folder


def _check_fashion_mnist_split(folder: Path, split: str, digests: dict[str, str]) -> None:
    """Read a downloaded split back as the loader does; delete its files if they fail."""
    try:
        _, labels = load_fashion_mnist(split, folder, verify=True)
        official = all(FASHION_MNIST_MD5[name] == digest for name, digest in digests.items())
        if official and len(labels) != SPLIT_SIZES[split]:
            raise ValueError(
                f"the files have the official MD5s but hold {len(labels)} examples, not the "
                f"official {SPLIT_SIZES[split]}"
            )
    except ValueError as error:
        for name in digests:
            (folder / name).unlink(missing_ok=True)
        raise ValueError(
            f"the downloaded Fashion-MNIST {split!r} files {sorted(digests)} in {folder} are "
            f"not valid ({error}); they were deleted: run `dropcluster download fashion-mnist` "
            f"again to download them again"
        ) from error


def _is_complete(folder: Path, dataset: str, count: Callable[[Path], dict[str, int]]) -> bool:
    """Whether ``folder`` is a complete copy: marked, or holding the official counts."""
    if not folder.is_dir():
        return False
    try:
        if _read_marker(folder, dataset) is not None:
            return True
    except ValueError:  # an unreadable marker: extract again
        return False
    try:
        counts = count(folder)
    except (OSError, ValueError):
        return False
    if not _holds_official(counts, _official_counts(dataset)):
        return False
    try:
        _write_marker(folder, dataset, counts, source="verified in place")
    except OSError:
        pass  # a read-only folder: without the marker the loaders check the official counts
    return True


# The clean data sets' markers are datasets.py's, the released corrupted sets' corrupted_sets.py's.


def _official_counts(dataset: str) -> dict[str, int]:
    return OFFICIAL_COUNTS[dataset] if dataset in OFFICIAL_COUNTS else RELEASED_COUNTS[dataset]


def _read_marker(folder: Path, dataset: str) -> dict[str, int] | None:
    if dataset in OFFICIAL_COUNTS:
        return read_completion_marker(folder, dataset)
    return read_released_marker(folder, dataset)


def _write_marker(
    folder: Path,
    dataset: str,
    counts: dict[str, int],
    *,
    archive_md5: str | None = None,
    source: str | None = None,
) -> None:
    if dataset in OFFICIAL_COUNTS:
        write_completion_marker(folder, dataset, counts, archive_md5=archive_md5, source=source)
    else:
        write_released_marker(folder, dataset, counts, archive_md5=archive_md5, source=source)


def _holds_official(counts: dict[str, int], official: dict[str, int]) -> bool:
    """Whether ``counts`` are the official ones; "corruptions" is a minimum (a release that
    also holds the extra corruptions is complete too)."""
    if counts.keys() != official.keys():
        return False
    return all(
        counts[key] >= official[key] if key == "corruptions" else counts[key] == official[key]
        for key in official
    )


@contextlib.contextmanager
def _download_lock(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder ``root`` itself (no lock file is left behind)."""
    descriptor = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing drops the lock


def _download(
    url: str, destination: Path, md5: str | None, *, dataset: str, progress: bool = False
) -> tuple[Path, str]:
    """Fetch ``url`` into ``destination`` through ``.NAME.part``, resuming; verify its MD5.

    Returns the path and the file's MD5 (a file already there is reused when its MD5 is the
    expected one, or when no MD5 is expected). ``dataset`` names the data set in messages.

    Raises:
        ConnectionError: the server could not be reached, or the transfer stopped (a dropped
            connection, fewer bytes than the server announced); for an ``http(s)://`` URL the
            partial file is kept.
        ValueError: MD5 mismatch; the download is deleted.
        OSError: writing failed (full or read-only disk); the partial file is deleted.
        KeyboardInterrupt: as it came; for an ``http(s)://`` URL the partial file is kept.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.is_file():
        existing = _md5(destination)
        if md5 is None or existing == md5:
            return destination, existing
    partial = _partial_path(destination)
    # Only an http(s) server can send the rest of a file; anything else starts again.
    keep = urllib.parse.urlsplit(url).scheme.lower() in ("http", "https")
    offset = partial.stat().st_size if keep and partial.is_file() else 0
    digest = hashlib.md5(usedforsecurity=False)
    try:
        response, offset, total = _open(url, offset, dataset)
        with response:
            _receive(
                response,
                partial,
                offset,
                digest,
                keep=keep,
                url=url,
                total=total,
                dataset=dataset,
                progress=progress,
                destination=destination,
            )
        if md5 is not None and digest.hexdigest() != md5:
            keep = False
            raise ValueError(
                f"{destination.name} from {url}: MD5 {digest.hexdigest()} differs from the "
                f"expected {md5}; the download was deleted: run `dropcluster download "
                f"{dataset}` again to download it again"
            )
        os.replace(partial, destination)
    except OSError as error:
        # A local failure (a full or read-only disk): the partial file goes too.
        if not isinstance(error, ConnectionError):
            keep = False
        raise
    finally:
        if os.path.exists(partial) and (not keep or os.path.getsize(partial) == 0):
            os.remove(partial)
    return destination, digest.hexdigest()


def _receive(
    response,
    partial: Path,
    offset: int,
    digest,
    *,
    keep: bool,
    url: str,
    total: int | None,
    dataset: str,
    progress: bool,
    destination: Path,
) -> int:
    """Write the body of ``response`` to ``partial`` (appended after its first ``offset``
    bytes, which are hashed first); return the size of ``partial``.

    A failed read, or fewer bytes than ``total``, raises a ConnectionError that says whether
    ``partial`` is kept (``keep``) for the next call to resume.
    """
    if offset:
        with open(partial, "rb") as received:
            while chunk := received.read(_CHUNK):
                digest.update(chunk)
    report = _Progress(url, destination, offset, total) if progress else None
    size = offset
    with open(partial, "ab" if offset else "wb") as out:
        while True:
            try:
                chunk = response.read(_CHUNK)
            except (OSError, http.client.HTTPException) as error:
                raise ConnectionError(
                    _stopped(url, dataset, partial, size, total, error, keep and size > 0)
                ) from error
            if not chunk:
                break
            out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
            if report is not None:
                report.update(size)
    if total is not None and size < total:
        # http.client ends a body cut short without an error; the length tells.
        raise ConnectionError(
            _stopped(url, dataset, partial, size, total, "connection closed", keep and size > 0)
        )
    if report is not None:
        report.done(size)
    return size


def _partial_path(destination: Path) -> Path:
    """Where the download of ``destination`` is written until it is complete and checked."""
    return destination.parent / f".{destination.name}.part"


def _open(url: str, offset: int, dataset: str):
    """Open ``url``, asking for the bytes from ``offset`` on when it is above 0.

    Returns the response, the offset its body starts at (0 when the server sent the whole file:
    an answer 200, or a 206 for another range) and the file's total size (None: unknown).
    """
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT_SECONDS)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and offset:
            # Range Not Satisfiable: the partial file is as long as the file, or longer
            # (another file now has the name); start again.
            return _open(url, 0, dataset)
        raise ConnectionError(
            f"{url}: the server answered HTTP {error.code} {error.reason}; check the URL, then "
            f"run `dropcluster download {dataset}` again"
        ) from error
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise ConnectionError(
            f"{url}: cannot download it ({reason}); check the URL and the network, then run "
            f"`dropcluster download {dataset}` again"
        ) from error
    headers = getattr(response, "headers", None) or {}
    if offset:
        content_range = re.fullmatch(
            r"bytes (\d+)-\d+/(\d+|\*)", str(headers.get("Content-Range", "")).strip()
        )
        if getattr(response, "status", None) == 206 and content_range:
            if int(content_range[1]) == offset:
                total = content_range[2]
                return response, offset, int(total) if total.isdigit() else None
        if getattr(response, "status", None) == 206:
            response.close()  # another range than the one asked for: start again
            return _open(url, 0, dataset)
    length = str(headers.get("Content-Length", ""))
    return response, 0, int(length) if length.isdigit() else None


def _stopped(
    url: str,
    dataset: str,
    partial: Path,
    size: int,
    total: int | None,
    error: object,
    kept: bool,
) -> str:
    """The message of a transfer that stopped before the end."""
    of_total = f" of {total}" if total is not None else ""
    where = f"{url}: the download stopped after {size}{of_total} bytes ({error})"
    if not kept:
        return f"{where}; run `dropcluster download {dataset}` again to download it again"
    return (
        f"{where}; {partial} keeps them: run `dropcluster download {dataset}` (or this call) "
        f"again to download the rest, or delete {partial} to start over"
    )


class _Progress:
    """Prints a line to stderr every :data:`_PROGRESS_SECONDS` seconds of a download."""

    def __init__(self, url: str, destination: Path, offset: int, total: int | None) -> None:
        self.total = total
        self.last = time.monotonic()
        size = f" ({_size(total)})" if total is not None else ""
        resume = f", resuming after {_size(offset)}" if offset else ""
        print(f"downloading {url}{size} to {destination}{resume}", file=sys.stderr, flush=True)

    def update(self, size: int) -> None:
        now = time.monotonic()
        if now - self.last >= _PROGRESS_SECONDS:
            self.last = now
            self._line(size)

    def done(self, size: int) -> None:
        self._line(size)

    def _line(self, size: int) -> None:
        if self.total:
            line = f"{_size(size)} of {_size(self.total)} ({100 * size // self.total} %)"
        else:
            line = _size(size)
        print(f"  {line}", file=sys.stderr, flush=True)


def _size(n_bytes: int) -> str:
    return f"{n_bytes} bytes" if n_bytes < 10**6 else f"{n_bytes / 1e6:.1f} MB"


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


_UNREADABLE_ARCHIVE = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error)
#: tarfile.FilterError exists where tarfile has extraction filters (Python 3.10.12+, 3.11.4+).
_TAR_FILTER_ERRORS: tuple[type[Exception], ...] = (
    (tarfile.FilterError,) if hasattr(tarfile, "FilterError") else ()
)


def _extract_tar(archive: Path, target: Path, folder_name: str) -> None:
    """Extract a (compressed) tar archive into ``target``, refusing unsafe members first.

    Every member is checked whatever the Python version (:func:`_check_member_names`, and only
    regular files and folders), so the rule is the same where ``tarfile`` lacks extraction
    filters (Python 3.10.0-3.10.11, 3.11.0-3.11.3); where it has them, the ``"data"`` filter
    checks again.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            _check_member_names(archive, [member.name for member in members], folder_name)
            for member in members:
                if member.issym() or member.islnk():
                    kind = "symbolic" if member.issym() else "hard"
                    raise ValueError(
                        f"{archive}: refusing the member {member.name!r}, a {kind} link to "
                        f"{member.linkname!r}: a data set archive should hold only files and "
                        f"folders"
                    )
                if not (member.isreg() or member.isdir()):
                    raise ValueError(
                        f"{archive}: refusing the member {member.name!r}, a device, FIFO or "
                        f"other special file: a data set archive should hold only files and "
                        f"folders"
                    )
            if hasattr(tarfile, "data_filter"):
                tar.extractall(target, members=members, filter="data")
            else:
                # No filters here: drop the permission bits the "data" filter drops too.
                for member in members:
                    member.mode = _data_filter_mode(member)
                tar.extractall(target, members=members)
    except _TAR_FILTER_ERRORS as error:
        raise ValueError(f"{archive}: refusing an unsafe member ({error})") from error
    except _UNREADABLE_ARCHIVE as error:
        _unreadable_archive(archive, error)


def _extract_zip(archive: Path, target: Path, folder_name: str) -> None:
    """Extract a zip archive into ``target``, refusing unsafe member names first.

    zipfile itself drops absolute paths and ``..`` components; refusing them gives an error
    instead of files written somewhere unexpected. Symbolic links (which zipfile would write
    as small text files) are refused as in tar archives.
    """
    try:
        with zipfile.ZipFile(archive) as zipped:
            infos = zipped.infolist()
            _check_member_names(archive, [info.filename for info in infos], folder_name)
            for info in infos:
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise ValueError(
                        f"{archive}: refusing the member {info.filename!r}, a symbolic link: "
                        f"a data set archive should hold only files and folders"
                    )
            zipped.extractall(target, members=infos)
    except _UNREADABLE_ARCHIVE as error:
        _unreadable_archive(archive, error)


def _check_member_names(archive: Path, names: list[str], folder_name: str) -> None:
    """Refuse an archive without ``folder_name/``, or with a member path that is absolute or
    climbs out of the extraction folder."""
    if not any(name.replace("\\", "/").split("/")[0] == folder_name for name in names):
        raise ValueError(f"{archive} should hold {folder_name}/, but holds {sorted(names)[:5]}")
    for name in names:
        posix = name.replace("\\", "/")
        if posix.startswith("/") or PureWindowsPath(name).drive or ".." in posix.split("/"):
            raise ValueError(
                f"{archive}: refusing the member {name!r}: a member path should be relative and "
                f"stay inside the extraction folder (no leading '/', drive or '..')"
            )


def _data_filter_mode(member: tarfile.TarInfo) -> int:
    """The permissions tarfile's "data" filter keeps: no setuid/setgid/sticky, no group or
    other write, owner read/write always, executable only when the owner could execute."""
    if member.isdir():
        return 0o755
    mode = (member.mode & 0o755) | 0o600
    if not member.mode & 0o100:
        mode &= ~0o111
    return mode


def _unreadable_archive(archive: Path, error: BaseException) -> None:
    # A damaged archive would otherwise be reused by every later call (with md5=None).
    archive.unlink(missing_ok=True)
    raise ValueError(
        f"{archive} is not a readable archive ({error}); it was deleted, so the next call "
        f"downloads it again"
    ) from error
