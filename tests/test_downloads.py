"""Reliability of `dropcluster.data.downloads` and the loaders on hostile or broken input.

Interrupted extractions, unsafe archive members, files of the wrong type and decompression
bombs, all generated small in tmp_path in the official on-disk formats.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import http.server
import io
import json
import os
import pickle
import re
import stat
import struct
import tarfile
import threading
import urllib.parse
import urllib.request
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image
from test_corrupted_sets import CLASS_COLOURS, write_cifar_c, write_tiny_imagenet_c
from test_data_datasets import CIFAR_NAMES, write_cifar100

from dropcluster.cli import main
from dropcluster.data import datasets, downloads, fashion_mnist
from dropcluster.data.corrupted_sets import (
    RELEASED_COUNTS,
    load_cifar10_c,
    load_cifar100_c,
    load_released,
    load_tiny_imagenet_c,
)
from dropcluster.data.datasets import (
    COMPLETE_MARKER,
    load_dataset,
    tiny_imagenet_wnids,
    write_completion_marker,
)
from dropcluster.data.downloads import (
    download_cifar10_c,
    download_cifar100,
    download_cifar100_c,
    download_fashion_mnist,
    download_tiny_imagenet,
    download_tiny_imagenet_c,
)
from dropcluster.data.fashion_mnist import SPLIT_FILES, load_fashion_mnist, write_idx

TINY_WNIDS = ("n01", "n02")


def cifar_archive(tmp_path, n_train=3, n_test=2):
    """``cifar-100-python.tar.gz`` as released: the three pickles, no completion marker."""
    source = tmp_path / "source"
    folder, _ = write_cifar100(source, n_train=n_train, n_test=n_test)
    (folder / COMPLETE_MARKER).unlink()
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-100-python")
    return archive


def write_tiny_imagenet(root, per_class=2, marked=True):
    """``root/tiny-imagenet-200``: 2 classes of ``per_class`` 64x64 JPEGs, 2 validation images."""
    folder = root / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    lines = []
    for index, wnid in enumerate(TINY_WNIDS):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (64, 64), (40 * index, 90, 10 * i)).save(images / f"{wnid}_{i}.JPEG")
        Image.new("RGB", (64, 64), (40 * index, 0, 0)).save(
            folder / "val" / "images" / f"v{index}.JPEG"
        )
        lines.append(f"v{index}.JPEG\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    if marked:
        counts = {"classes": len(TINY_WNIDS), "train": per_class * len(TINY_WNIDS), "test": 2}
        write_completion_marker(folder, "tiny-imagenet", counts)
    return folder


def tiny_archive(tmp_path):
    """``tiny-imagenet-200.zip`` as released: folders and files, no completion marker."""
    source = tmp_path / "source"
    folder = write_tiny_imagenet(source, marked=False)
    archive = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(folder.rglob("*")):
            zipped.write(path, path.relative_to(source).as_posix())
    return archive


def leftovers(root):
    """Temporary files and folders a download may leave in ``root``."""
    return sorted(
        path.name
        for path in root.iterdir()
        if ".partial-" in path.name or path.name.endswith(".part")
    )


def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# ---------------------------------------------------------------------------------------------
# Interrupted extraction, full or read-only disk


def test_interrupted_cifar100_extraction_leaves_nothing_and_is_redone(tmp_path, monkeypatch):
    archive = cifar_archive(tmp_path)
    root = tmp_path / "data"
    extractall = tarfile.TarFile.extractall

    def fill_the_disk(self, path=".", members=None, **kwargs):
        # Writes the folder and its first file, then the disk is full.
        for member in list(members)[:2]:
            self.extract(member, path, **kwargs)
        assert any(path_.is_file() for path_ in root.rglob("*") if ".partial-" in str(path_))
        enospc()

    monkeypatch.setattr(tarfile.TarFile, "extractall", fill_the_disk)
    with pytest.raises(OSError, match="No space left"):
        download_cifar100(root, url=archive.as_uri(), md5=None)
    assert not (root / "cifar-100-python").exists()
    assert leftovers(root) == []

    monkeypatch.setattr(tarfile.TarFile, "extractall", extractall)
    folder = download_cifar100(root, url=archive.as_uri(), md5=None)
    assert len(load_dataset("cifar100", "train", root)) == 3
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert marker["counts"] == {"classes": 100, "train": 3, "test": 2}
    assert marker["archive_md5"] == downloads._md5(archive)
    assert leftovers(root) == []


def test_interrupted_tiny_imagenet_extraction_leaves_nothing_and_is_redone(tmp_path, monkeypatch):
    archive = tiny_archive(tmp_path)
    root = tmp_path / "data"
    extractall = zipfile.ZipFile.extractall

    def fill_the_disk(self, path=None, members=None, pwd=None):
        for member in list(members)[:6]:
            self.extract(member, path, pwd)
        enospc()

    monkeypatch.setattr(zipfile.ZipFile, "extractall", fill_the_disk)
    with pytest.raises(OSError, match="No space left"):
        download_tiny_imagenet(root, url=archive.as_uri(), md5=None)
    assert not (root / "tiny-imagenet-200").exists()
    assert leftovers(root) == []

    monkeypatch.setattr(zipfile.ZipFile, "extractall", extractall)
    download_tiny_imagenet(root, url=archive.as_uri(), md5=None)
    assert load_dataset("tiny-imagenet", "train", root).labels.tolist() == [0, 0, 1, 1]
    assert leftovers(root) == []


def test_read_only_destination_leaves_nothing(tmp_path, monkeypatch):
    archive = cifar_archive(tmp_path)
    root = tmp_path / "data"

    def read_only(*_args):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(downloads.os, "rename", read_only)
    with pytest.raises(OSError, match="Read-only"):
        download_cifar100(root, url=archive.as_uri(), md5=None)
    assert not (root / "cifar-100-python").exists()
    assert leftovers(root) == []


def test_download_that_fills_the_disk_leaves_no_part_file(tmp_path, monkeypatch):
    archive = cifar_archive(tmp_path)
    real_open = open

    class FullDisk:
        """A file being written on a full disk: every write fails."""

        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *_exc):
            self.handle.close()

        def write(self, _data):
            enospc()

    def full_disk_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        return FullDisk(handle) if set(mode) & set("wa") else handle

    monkeypatch.setattr(downloads, "open", full_disk_open, raising=False)
    root = tmp_path / "data"
    # Even over HTTP, where a dropped connection keeps the partial file, a full disk does not.
    with range_server(tmp_path, monkeypatch) as server:
        with pytest.raises(OSError, match="No space left"):
            download_cifar100(root, url=f"{server.base}/{archive.name}", md5=None)
    assert list(root.iterdir()) == []


def test_folder_left_incomplete_by_an_older_version_is_refused_then_replaced(tmp_path):
    archive = tiny_archive(tmp_path)
    root = tmp_path / "data"
    # As an older version left it: wnids.txt and part of the images, no marker.
    partial = write_tiny_imagenet(root, marked=False)
    (partial / "train" / "n02" / "images" / "n02_1.JPEG").unlink()
    (partial / "leftover.txt").write_text("from the interrupted extraction")
    with pytest.raises(
        ValueError, match=r"expected 200 classes \(the official release.*found 2.*look incomplete"
    ):
        load_dataset("tiny-imagenet", "train", root)
    with pytest.raises(ValueError, match="look incomplete"):
        tiny_imagenet_wnids(root)

    folder = download_tiny_imagenet(root, url=archive.as_uri(), md5=None)
    assert not (folder / "leftover.txt").exists()
    assert len(load_dataset("tiny-imagenet", "train", root)) == 4
    assert leftovers(root) == []


def test_unmarked_folder_holding_the_official_counts_is_kept_and_marked(tmp_path, monkeypatch):
    folder, _ = write_cifar100(tmp_path, n_train=4, n_test=2)
    (folder / COMPLETE_MARKER).unlink()
    # As if 4 + 2 images were the official sizes (the real ones are too big for a test).
    monkeypatch.setitem(
        datasets.OFFICIAL_COUNTS, "cifar100", {"classes": 100, "train": 4, "test": 2}
    )
    assert download_cifar100(tmp_path, url="file:///nonexistent") == folder
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert marker["counts"] == {"classes": 100, "train": 4, "test": 2}


def test_concurrent_downloads_wait_for_each_other(tmp_path):
    archive = cifar_archive(tmp_path)
    root = tmp_path / "data"
    results, errors = [], []

    def download():
        try:
            results.append(download_cifar100(root, url=archive.as_uri(), md5=None))
        except Exception as error:  # reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=download) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == [root / "cifar-100-python"] * 3
    assert leftovers(root) == []


# ---------------------------------------------------------------------------------------------
# Expected counts


def test_cifar100_split_smaller_than_its_marker_says_is_refused(tmp_path):
    folder, _ = write_cifar100(tmp_path, n_train=12, n_test=5)
    entry = {b"data": np.zeros((7, 3072), np.uint8), b"fine_labels": [0] * 7}
    (folder / "train").write_bytes(pickle.dumps(entry))
    with pytest.raises(ValueError) as info:
        load_dataset("cifar100", "train", tmp_path)
    message = str(info.value)
    assert "expected 12 images" in message and "found 7" in message
    assert "look incomplete" in message and f"download_cifar100({str(tmp_path)!r})" in message
    assert len(load_dataset("cifar100", "test", tmp_path)) == 5


def test_unmarked_cifar100_must_hold_the_official_counts(tmp_path, monkeypatch):
    folder, _ = write_cifar100(tmp_path, n_train=12, n_test=5)
    (folder / COMPLETE_MARKER).unlink()
    with pytest.raises(ValueError, match=r"expected 50000 images \(the official release.*found 12"):
        load_dataset("cifar100", "train", tmp_path)
    monkeypatch.setitem(datasets.CIFAR100_COUNTS, "train", 12)
    assert len(load_dataset("cifar100", "train", tmp_path)) == 12


def test_tiny_imagenet_images_missing_from_its_marker_are_refused_before_decoding(
    tmp_path, monkeypatch
):
    folder = write_tiny_imagenet(tmp_path)
    (folder / "train" / "n01" / "images" / "n01_0.JPEG").unlink()
    monkeypatch.setattr(datasets, "decode_jpegs", pytest.fail)
    with pytest.raises(ValueError, match=r"train: expected 4 images .*found 3.*look incomplete"):
        load_dataset("tiny-imagenet", "train", tmp_path)


@pytest.mark.parametrize("content", ["{not json", '{"dataset": "cifar100", "counts": {}}'])
def test_unreadable_marker_is_reported(tmp_path, content):
    folder = write_tiny_imagenet(tmp_path)
    (folder / COMPLETE_MARKER).write_text(content)
    with pytest.raises(ValueError, match="unreadable completion marker.*download_tiny_imagenet"):
        load_dataset("tiny-imagenet", "test", tmp_path)


# ---------------------------------------------------------------------------------------------
# Unsafe archive members


def add_file(tar, name, data=b"evil", mode=0o644):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def unsafe_tar(tmp_path, kind, outside):
    """A CIFAR-100 archive with one unsafe member; returns it and that member's name."""
    source = tmp_path / "source"
    folder, _ = write_cifar100(source, n_train=2, n_test=1)
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-100-python")
        if kind == "absolute":
            name = str(outside / "evil.txt")
            add_file(tar, name)
        elif kind == "traversal":
            name = "cifar-100-python/../../../outside/evil.txt"
            add_file(tar, name)
        elif kind in ("symlink", "hardlink"):
            name = "cifar-100-python/link"
            link = tarfile.TarInfo(name)
            link.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            link.linkname = str(outside if kind == "symlink" else outside / "victim.txt")
            tar.addfile(link)
            # Then written through the link: outside/evil.txt, or the victim's content.
            add_file(tar, name + ("/evil.txt" if kind == "symlink" else ""))
        else:
            name = "cifar-100-python/null"
            device = tarfile.TarInfo(name)
            device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 1, 3
            tar.addfile(device)
    return archive, name


@pytest.mark.parametrize("has_filter", [True, False], ids=["data-filter", "no-filter"])
@pytest.mark.parametrize("kind", ["absolute", "traversal", "symlink", "hardlink", "device"])
def test_unsafe_tar_members_are_refused(tmp_path, monkeypatch, kind, has_filter):
    if not has_filter:  # as on Python 3.10.0-3.10.11 and 3.11.0-3.11.3
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    elif not hasattr(tarfile, "data_filter"):
        pytest.skip("this Python's tarfile has no extraction filters")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("untouched")
    archive, name = unsafe_tar(tmp_path, kind, outside)
    root = tmp_path / "data"
    with pytest.raises(ValueError, match=f"refusing the member {re.escape(repr(name))}"):
        download_cifar100(root, url=archive.as_uri(), md5=None)
    assert sorted(path.name for path in outside.iterdir()) == ["victim.txt"]
    assert (outside / "victim.txt").read_text() == "untouched"
    assert not (tmp_path / "evil.txt").exists()
    assert not (root / "cifar-100-python").exists()
    assert leftovers(root) == []


@pytest.mark.skipif(not hasattr(tarfile, "data_filter"), reason="no extraction filters")
def test_data_filter_still_refuses_when_the_own_checks_are_bypassed(tmp_path, monkeypatch):
    monkeypatch.setattr(downloads, "_check_member_names", lambda archive, names, folder: None)
    outside = tmp_path / "outside"
    outside.mkdir()
    archive, _ = unsafe_tar(tmp_path, "traversal", outside)
    with pytest.raises(ValueError, match="refusing an unsafe member"):
        download_cifar100(tmp_path / "data", url=archive.as_uri(), md5=None)
    assert list(outside.iterdir()) == []


def test_extraction_without_filters_drops_unsafe_permissions(tmp_path, monkeypatch):
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    source = tmp_path / "source"
    folder, _ = write_cifar100(source, n_train=2, n_test=1)
    (folder / COMPLETE_MARKER).unlink()
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("train", "test"):
            tar.add(folder / name, arcname=f"cifar-100-python/{name}")
        add_file(tar, "cifar-100-python/meta", (folder / "meta").read_bytes(), mode=0o6777)
    extracted = download_cifar100(tmp_path / "data", url=archive.as_uri(), md5=None)
    assert stat.S_IMODE((extracted / "meta").stat().st_mode) == 0o755  # no setuid, no o+w
    assert load_dataset("cifar100", "test", tmp_path / "data").classes == CIFAR_NAMES


@pytest.mark.parametrize("kind", ["traversal", "absolute", "symlink"])
def test_unsafe_zip_members_are_refused(tmp_path, kind):
    source = tmp_path / "source"
    folder = write_tiny_imagenet(source, marked=False)
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(folder.rglob("*")):
            zipped.write(path, path.relative_to(source).as_posix())
        if kind == "traversal":
            name = "tiny-imagenet-200/../../../outside/evil.txt"
            zipped.writestr(zipfile.ZipInfo(name), b"evil")
        elif kind == "absolute":
            name = str(outside / "evil.txt")
            zipped.writestr(zipfile.ZipInfo(name), b"evil")
        else:
            name = "tiny-imagenet-200/link"
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zipped.writestr(info, str(outside))
    root = tmp_path / "data"
    with pytest.raises(ValueError, match=f"refusing the member {re.escape(repr(name))}"):
        download_tiny_imagenet(root, url=archive.as_uri(), md5=None)
    assert list(outside.iterdir()) == []
    assert not (root / "tiny-imagenet-200").exists()
    assert leftovers(root) == []


def test_damaged_archive_is_reported_and_deleted(tmp_path):
    archive = cifar_archive(tmp_path)
    archive.write_bytes(archive.read_bytes()[:-100])  # truncated
    root = tmp_path / "data"
    with pytest.raises(ValueError, match="not a readable archive.*downloads it again"):
        download_cifar100(root, url=archive.as_uri(), md5=None)
    assert list(root.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Files of the wrong type


def cifar_meta_variants():
    names = [name.encode() for name in CIFAR_NAMES]
    return {
        "meta-list": ("meta", [b"fine_label_names"], "should hold a dict, but holds a list"),
        "names-int": ("meta", {b"fine_label_names": 7}, "should be a list of class names"),
        "names-items": ("meta", {b"fine_label_names": list(range(100))}, "item 0 is an int"),
        "labels-dict": (
            "train",
            {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": {b"a": 1}},
            "'fine_labels' should be a list of integer labels",
        ),
        "labels-float": (
            "train",
            {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0.5, 1.5]},
            "'fine_labels' should be a list of integer labels",
        ),
        "names-ok": ("meta", {b"fine_label_names": names}, None),
    }


@pytest.mark.parametrize("variant", list(cifar_meta_variants()))
def test_cifar100_files_of_the_wrong_type_give_a_one_line_error(tmp_path, variant):
    file_name, content, expected = cifar_meta_variants()[variant]
    folder, _ = write_cifar100(tmp_path)
    (folder / file_name).write_bytes(pickle.dumps(content, protocol=2))
    if expected is None:
        assert load_dataset("cifar100", "train", tmp_path).classes == CIFAR_NAMES
        return
    with pytest.raises(ValueError) as info:
        load_dataset("cifar100", "train", tmp_path)
    message = str(info.value)
    assert expected in message
    assert str(folder / file_name) in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------
# Decompression bombs


def png_header(width, height):
    """A tiny 1-bit PNG that claims width x height pixels (its pixel data is a few bytes)."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(
    ("width", "expected"),
    [
        (20000, "is not a readable image .*decompression bomb"),  # Pillow refuses to open it
        (10000, "should be a 64x64 image, but is 10000x10000"),  # Pillow only warns
        (9000, "should be a 64x64 image, but is 9000x9000"),  # under Pillow's limit
    ],
)
def test_decompression_bomb_in_tiny_imagenet_is_refused_without_decoding(tmp_path, width, expected):
    folder = write_tiny_imagenet(tmp_path)
    bomb = folder / "val" / "images" / "v1.JPEG"
    bomb.write_bytes(png_header(width, width))
    assert bomb.stat().st_size < 200
    # Decoding the 9000x9000 one would fail as truncated: the size is refused before.
    with pytest.raises(ValueError, match=re.escape(str(bomb)) + " " + expected):
        load_dataset("tiny-imagenet", "test", tmp_path)


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_warning_as_error_is_a_clear_error(tmp_path):
    folder = write_tiny_imagenet(tmp_path)
    bomb = folder / "train" / "n02" / "images" / "n02_0.JPEG"
    bomb.write_bytes(png_header(10000, 10000))
    with pytest.raises(ValueError, match=re.escape(str(bomb)) + " is not a readable image"):
        load_dataset("tiny-imagenet", "train", tmp_path)


def test_images_over_pillows_pixel_limit_are_a_clear_error(tmp_path, monkeypatch):
    write_tiny_imagenet(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000
    with pytest.raises(ValueError, match=r"v0.JPEG is not a readable image .*exceeds limit"):
        load_dataset("tiny-imagenet", "test", tmp_path)


def test_decompression_bomb_in_tiny_imagenet_c_is_refused(tmp_path):
    folder = write_tiny_imagenet_c(tmp_path, {"zoom_blur": [2]})
    bomb = folder / "zoom_blur" / "2" / "n01629819" / "ILSVRC2012_val_00000001.JPEG"
    bomb.write_bytes(png_header(20000, 20000))
    with pytest.raises(ValueError, match=re.escape(str(bomb)) + " is not a readable image"):
        load_tiny_imagenet_c(
            tmp_path, "zoom_blur", 2, sorted(path.name for path in bomb.parents[1].iterdir())
        )
    bomb.write_bytes(png_header(9000, 9000))
    with pytest.raises(ValueError, match=re.escape(str(bomb)) + " should be a 64x64 image"):
        load_tiny_imagenet_c(
            tmp_path, "zoom_blur", 2, sorted(path.name for path in bomb.parents[1].iterdir())
        )


# ---------------------------------------------------------------------------------------------
# The released corrupted sets: CIFAR-10-C, CIFAR-100-C, Tiny-ImageNet-C


def released_tar(directory, folder, name):
    """``directory/<name>.tar``, uncompressed as on Zenodo, holding ``folder`` as ``name/``."""
    directory.mkdir(parents=True, exist_ok=True)
    archive = directory / f"{name}.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(folder, arcname=name)
    return archive


def md5_of(path):
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


@contextlib.contextmanager
def serve(directory, monkeypatch):
    """A local HTTP server for ``directory`` in a thread: (base URL, list of requested paths)."""
    # A proxy from the environment must not take the local requests.
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    requested = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(directory), **kwargs)

        def do_GET(self):
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *_args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_cifar10_c_is_downloaded_over_http_checked_marked_and_loaded(tmp_path, monkeypatch):
    source, arrays, labels = write_cifar_c(tmp_path / "source", "cifar10-c", ("fog", "zoom_blur"))
    archive = released_tar(tmp_path / "served", source, "CIFAR-10-C")
    digest = md5_of(archive)
    root = tmp_path / "data"
    with serve(tmp_path / "served", monkeypatch) as (base, requested):
        url = f"{base}/CIFAR-10-C.tar"
        folder = download_cifar10_c(root, url=url, md5=digest)
        assert download_cifar10_c(root, url=url, md5=digest) == folder
    assert requested == ["/CIFAR-10-C.tar"]  # the second call found it complete
    assert folder == root / "CIFAR-10-C"
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert marker["dataset"] == "cifar10-c"
    assert marker["counts"] == {"corruptions": 2, "per_severity": 4}
    assert (marker["archive_md5"], marker["source"]) == (digest, url)
    images, loaded = load_cifar10_c(root, "fog", 3)
    assert np.array_equal(images.permute(0, 2, 3, 1).numpy(), arrays["fog"][8:12])
    assert loaded.tolist() == labels[8:12].tolist()
    assert (root / "CIFAR-10-C.tar").is_file()  # kept, as for the other archives
    assert leftovers(root) == []


@pytest.mark.parametrize(
    ("download", "dataset", "name", "official"),
    [
        (download_cifar10_c, "cifar10-c", "CIFAR-10-C", "56bf5dcef84df0e2308c6dcbcbbd8499"),
        (download_cifar100_c, "cifar100-c", "CIFAR-100-C", "11f0ed0f1191edbf9fa23466ae6021d3"),
    ],
)
def test_cifar_c_archive_whose_md5_differs_is_refused(tmp_path, download, dataset, name, official):
    source, _, _ = write_cifar_c(tmp_path / "source", dataset)
    archive = released_tar(tmp_path / "served", source, name)
    root = tmp_path / "data"
    # By default the MD5 Zenodo lists is expected: this small archive is not the release.
    with pytest.raises(
        ValueError, match=f"MD5 {md5_of(archive)} differs from the expected {official}"
    ):
        download(root, url=archive.as_uri())
    with pytest.raises(
        ValueError, match="differs from the expected 0{32}; the download was deleted"
    ):
        download(root, url=archive.as_uri(), md5="0" * 32)
    assert list(root.iterdir()) == []


def test_tiny_imagenet_c_md5_is_the_callers(tmp_path, monkeypatch):
    source = write_tiny_imagenet_c(tmp_path / "source", {"fog": range(1, 6)}, marked=False)
    archive = released_tar(tmp_path / "served", source, "Tiny-ImageNet-C")
    root = tmp_path / "data"
    with pytest.raises(TypeError, match="md5"):
        download_tiny_imagenet_c(root, url=archive.as_uri())  # no default to fall back on
    with pytest.raises(ValueError, match="differs from the expected 0{32}"):
        download_tiny_imagenet_c(root, url=archive.as_uri(), md5="0" * 32)
    assert list(root.iterdir()) == []
    with serve(tmp_path / "served", monkeypatch) as (base, _):
        folder = download_tiny_imagenet_c(
            root, url=f"{base}/Tiny-ImageNet-C.tar", md5=md5_of(archive)
        )
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert marker["counts"] == {"corruptions": 1, "classes": 3, "per_class": 2}
    images, labels = load_released(root, "tiny-imagenet-c", "fog", 4)
    assert images.shape == (6, 3, 64, 64) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    # md5=None skips the check, knowingly.
    other = download_tiny_imagenet_c(tmp_path / "other", url=archive.as_uri(), md5=None)
    assert json.loads((other / COMPLETE_MARKER).read_text())["archive_md5"] == md5_of(archive)


def break_labels(folder):
    np.save(folder / "labels.npy", np.tile(np.array([1, 20, 3, 4], np.uint8), 5))


def truncate_file(folder):
    path = folder / "zoom_blur.npy"
    path.write_bytes(path.read_bytes()[:5000])


def drop_severity(folder):
    for path in (folder / "fog" / "4").rglob("*.JPEG"):
        path.unlink()
    for path in sorted((folder / "fog" / "4").iterdir()):
        path.rmdir()
    (folder / "fog" / "4").rmdir()


@pytest.mark.parametrize(
    ("dataset", "breakage", "expected"),
    [
        ("cifar10-c", break_labels, r"CIFAR-10 labels in 0\.\.9, but they span 1\.\.20"),
        ("cifar100-c", truncate_file, r"zoom_blur\.npy is not a readable \.npy file"),
        ("tiny-imagenet-c", drop_severity, r"fog should hold the severity folders 1 to 5"),
    ],
)
def test_archive_of_an_incomplete_release_is_refused(tmp_path, dataset, breakage, expected):
    if dataset == "tiny-imagenet-c":
        source = write_tiny_imagenet_c(tmp_path / "source", {"fog": range(1, 6)}, marked=False)
        download = functools.partial(download_tiny_imagenet_c, md5=None)
    else:
        source, _, _ = write_cifar_c(tmp_path / "source", dataset)
        download = {"cifar10-c": download_cifar10_c, "cifar100-c": download_cifar100_c}[dataset]
    breakage(source)
    archive = released_tar(tmp_path / "served", source, source.name)
    root = tmp_path / "data"
    with pytest.raises(
        ValueError, match=f"should hold a complete {source.name}/, but: .*{expected}"
    ):
        download(root, url=archive.as_uri(), md5=None)
    assert not (root / source.name).exists()
    assert leftovers(root) == []


def test_archive_with_the_official_md5_must_hold_the_release(tmp_path, monkeypatch):
    source, _, _ = write_cifar_c(tmp_path / "source", "cifar100-c")
    archive = released_tar(tmp_path / "served", source, "CIFAR-100-C")
    monkeypatch.setattr(downloads, "CIFAR100_C_MD5", md5_of(archive))
    with pytest.raises(
        ValueError,
        match=r"has the official MD5 but holds \{'corruptions': 2, 'per_severity': 4\}, not the "
        r"official \{'corruptions': 19, 'per_severity': 10000\}",
    ):
        download_cifar100_c(tmp_path / "data", url=archive.as_uri(), md5=md5_of(archive))


def test_unmarked_release_in_place_is_kept_and_a_partial_one_replaced(tmp_path, monkeypatch):
    root = tmp_path / "data"
    folder, arrays, _ = write_cifar_c(root, "cifar100-c", seed=1)
    # As if two corruptions of 4 images per severity were the release (it is too big for a test).
    monkeypatch.setitem(RELEASED_COUNTS, "cifar100-c", {"corruptions": 2, "per_severity": 4})
    assert download_cifar100_c(root, url=(tmp_path / "absent.tar").as_uri()) == folder
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert marker["counts"] == {"corruptions": 2, "per_severity": 4}
    assert marker["source"] == "verified in place"
    # Unmarked and short of the release: replaced by the archive's copy.
    (folder / COMPLETE_MARKER).unlink()
    (folder / "zoom_blur.npy").unlink()
    source, fresh, _ = write_cifar_c(tmp_path / "source", "cifar100-c", seed=2)
    archive = released_tar(tmp_path / "served", source, "CIFAR-100-C")
    assert download_cifar100_c(root, url=archive.as_uri(), md5=None) == folder
    images, _ = load_cifar100_c(root, "zoom_blur", 5)
    assert np.array_equal(images.permute(0, 2, 3, 1).numpy(), fresh["zoom_blur"][16:])
    assert leftovers(root) == []


def test_unmarked_tiny_imagenet_c_with_more_corruptions_than_the_release_is_kept(
    tmp_path, monkeypatch
):
    root = tmp_path / "data"
    folder = write_tiny_imagenet_c(
        root, {"fog": range(1, 6), "speckle_noise": range(1, 6)}, marked=False
    )
    # The release's count of corruptions is a minimum: the extra ones may be there too.
    monkeypatch.setitem(
        RELEASED_COUNTS, "tiny-imagenet-c", {"corruptions": 1, "classes": 3, "per_class": 2}
    )
    assert (
        download_tiny_imagenet_c(root, url=(tmp_path / "absent.tar").as_uri(), md5=None) == folder
    )
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert marker["counts"] == {"corruptions": 2, "classes": 3, "per_class": 2}
    monkeypatch.setitem(
        RELEASED_COUNTS, "tiny-imagenet-c", {"corruptions": 3, "classes": 3, "per_class": 2}
    )
    (folder / COMPLETE_MARKER).unlink()
    # Not the release: it tries to download it.
    with pytest.raises(ConnectionError, match=r"absent\.tar: cannot download it \(\[Errno 2\]"):
        download_tiny_imagenet_c(root, url=(tmp_path / "absent.tar").as_uri(), md5=None)


def test_interrupted_tiny_imagenet_c_extraction_leaves_nothing_and_is_redone(tmp_path, monkeypatch):
    source = write_tiny_imagenet_c(tmp_path / "source", {"fog": range(1, 6)}, marked=False)
    archive = released_tar(tmp_path / "served", source, "Tiny-ImageNet-C")
    root = tmp_path / "data"
    extractall = tarfile.TarFile.extractall

    def fill_the_disk(self, path=".", members=None, **kwargs):
        for member in list(members)[:8]:
            self.extract(member, path, **kwargs)
        enospc()

    monkeypatch.setattr(tarfile.TarFile, "extractall", fill_the_disk)
    with pytest.raises(OSError, match="No space left"):
        download_tiny_imagenet_c(root, url=archive.as_uri(), md5=None)
    assert not (root / "Tiny-ImageNet-C").exists()
    assert leftovers(root) == []
    monkeypatch.setattr(tarfile.TarFile, "extractall", extractall)
    download_tiny_imagenet_c(root, url=archive.as_uri(), md5=None)
    assert load_tiny_imagenet_c(root, "fog", 5, sorted(CLASS_COLOURS))[0].shape == (6, 3, 64, 64)


# ---------------------------------------------------------------------------------------------
# Resumable downloads, Fashion-MNIST and `dropcluster download`


class RangeServerState:
    """What the server of :func:`range_server` saw, and how it misbehaves."""

    def __init__(self, directory, ranges):
        self.directory = directory
        self.ranges = ranges  # False: Range headers are ignored (200, the whole file)
        self.base = ""
        self.requests = []  # (path, Range header or None, bytes of body sent)
        self.cut = {}  # path: bytes of the body sent before the connection drops (once)


@contextlib.contextmanager
def range_server(directory, monkeypatch, ranges=True):
    """A local HTTP server for ``directory`` that answers ``Range: bytes=N-`` with 206 (the
    stdlib's SimpleHTTPRequestHandler does not) and can drop a connection half-way once."""
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    state = RangeServerState(directory, ranges)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            wanted = self.headers.get("Range")
            file = state.directory / urllib.parse.unquote(self.path).lstrip("/")
            if not file.is_file():
                state.requests.append((self.path, wanted, 0))
                self.send_error(404)
                return
            data = file.read_bytes()
            match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
            start = int(match[1]) if state.ranges and match else 0
            if start >= len(data) > 0:
                state.requests.append((self.path, wanted, 0))
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = data[start:]
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(body)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            cut = state.cut.pop(self.path, None)
            sent = body if cut is None else body[:cut]
            self.wfile.write(sent)  # HTTP/1.0: the connection closes after it, cut or not
            state.requests.append((self.path, wanted, len(sent)))

        def log_message(self, *_args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_dropped_download_is_kept_and_the_next_call_fetches_only_the_rest(tmp_path, monkeypatch):
    archive = cifar_archive(tmp_path)
    data, digest = archive.read_bytes(), md5_of(archive)
    cut = len(data) // 2
    root = tmp_path / "data"
    partial = root / ".cifar-100-python.tar.gz.part"
    path = "/" + archive.name
    with range_server(tmp_path, monkeypatch) as server:
        server.cut[path] = cut
        with pytest.raises(ConnectionError) as info:
            download_cifar100(root, url=server.base + path, md5=digest)
        message = str(info.value)
        assert f"the download stopped after {cut} of {len(data)} bytes" in message
        assert f"{partial} keeps them: run `dropcluster download cifar100`" in message
        assert f"delete {partial} to start over" in message
        assert partial.read_bytes() == data[:cut]
        assert sorted(path_.name for path_ in root.iterdir()) == [partial.name]
        # A failed call in between (here a wrong URL) keeps what arrived.
        with pytest.raises(ConnectionError, match="the server answered HTTP 404"):
            download_cifar100(root, url=server.base + "/moved.tar.gz", md5=digest)
        assert partial.read_bytes() == data[:cut]

        folder = download_cifar100(root, url=server.base + path, md5=digest)
    assert server.requests == [
        (path, None, cut),
        ("/moved.tar.gz", f"bytes={cut}-", 0),
        (path, f"bytes={cut}-", len(data) - cut),
    ]
    assert (root / archive.name).read_bytes() == data
    assert folder == root / "cifar-100-python"
    assert len(load_dataset("cifar100", "train", root)) == 3
    assert leftovers(root) == []


def test_resumed_download_whose_md5_differs_is_deleted_then_downloaded_again(tmp_path, monkeypatch):
    archive = cifar_archive(tmp_path)
    data, digest = archive.read_bytes(), md5_of(archive)
    root = tmp_path / "data"
    root.mkdir()
    partial = root / ".cifar-100-python.tar.gz.part"
    partial.write_bytes(b"\0" * 100)  # a damaged first part: the MD5 of the whole tells
    path = "/" + archive.name
    with range_server(tmp_path, monkeypatch) as server:
        with pytest.raises(
            ValueError,
            match=f"cifar-100-python.tar.gz from {server.base}{path}: MD5 [0-9a-f]{{32}} differs "
            f"from the expected {digest}; the download was deleted",
        ):
            download_cifar100(root, url=server.base + path, md5=digest)
        assert list(root.iterdir()) == []
        download_cifar100(root, url=server.base + path, md5=digest)
    assert server.requests == [(path, "bytes=100-", len(data) - 100), (path, None, len(data))]
    assert (root / archive.name).read_bytes() == data


@pytest.mark.parametrize(
    ("ranges", "stale_size", "expected"),
    [
        (False, 30, [("bytes=30-", "size")]),  # a server without ranges answers 200: restart
        (True, 10**6, [("bytes=1000000-", 0), (None, "size")]),  # 416: longer than the file
    ],
)
def test_partial_file_the_server_cannot_continue_is_downloaded_again(
    tmp_path, monkeypatch, ranges, stale_size, expected
):
    archive = cifar_archive(tmp_path)
    data = archive.read_bytes()
    root = tmp_path / "data"
    root.mkdir()
    (root / ".cifar-100-python.tar.gz.part").write_bytes(b"x" * stale_size)
    path = "/" + archive.name
    with range_server(tmp_path, monkeypatch, ranges=ranges) as server:
        download_cifar100(root, url=server.base + path, md5=md5_of(archive))
    sizes = {"size": len(data), 0: 0}
    assert server.requests == [(path, wanted, sizes[sent]) for wanted, sent in expected]
    assert (root / archive.name).read_bytes() == data
    assert leftovers(root) == []


def test_interrupted_download_command_resumes(tmp_path, monkeypatch, capsys):
    archive = cifar_archive(tmp_path)
    data = archive.read_bytes()
    root = tmp_path / "data"
    real_urlopen = urllib.request.urlopen

    class CtrlC:
        """The response of a download that the user stops after its first 100 bytes."""

        def __init__(self, response):
            self.response, self.reads = response, 0
            self.headers, self.status = response.headers, response.status

        def __enter__(self):
            return self

        def __exit__(self, *_exc):
            self.response.close()

        def read(self, _size):
            self.reads += 1
            if self.reads > 1:
                raise KeyboardInterrupt
            return self.response.read(100)

    path = "/" + archive.name
    with range_server(tmp_path, monkeypatch) as server:
        argv = ["download", "cifar100", "--data-dir", str(root), "--url", server.base + path]
        argv += ["--md5", md5_of(archive)]
        monkeypatch.setattr(
            urllib.request, "urlopen", lambda *args, **kwargs: CtrlC(real_urlopen(*args, **kwargs))
        )
        assert main(argv) == 130
        err = capsys.readouterr().err
        assert "download interrupted" in err and "`dropcluster download cifar100` again" in err
        assert (root / ".cifar-100-python.tar.gz.part").read_bytes() == data[:100]

        monkeypatch.setattr(urllib.request, "urlopen", real_urlopen)
        assert main(argv) == 0
    assert capsys.readouterr().out == f"cifar100: {root / 'cifar-100-python'}\n"
    assert server.requests[-1] == (path, "bytes=100-", len(data) - 100)
    assert (root / archive.name).read_bytes() == data


FASHION_MNIST_NAMES = [stem + ".gz" for stems in SPLIT_FILES.values() for stem in stems]


def fashion_mnist_files(folder, n_train=6, n_test=4):
    """The four gzipped IDX files, small: {split: (images (N, 28, 28), labels (N,))}."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n_examples in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n_examples, 28, 28), dtype=np.uint8)
        labels = (np.arange(n_examples) % 10).astype(np.uint8)
        image_stem, label_stem = SPLIT_FILES[split]
        write_idx(folder / f"{image_stem}.gz", images)
        write_idx(folder / f"{label_stem}.gz", labels)
        arrays[split] = (images, labels)
    return arrays


def test_download_fashion_mnist_command_then_the_loader_reads_the_files(
    tmp_path, monkeypatch, capsys
):
    served = tmp_path / "served"
    arrays = fashion_mnist_files(served)
    monkeypatch.setattr(fashion_mnist, "DEFAULT_ROOT", tmp_path / "no-debian-package")
    monkeypatch.setenv("DROPCLUSTER_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(downloads, "_PROGRESS_SECONDS", 0.0)
    with range_server(served, monkeypatch) as server:
        argv = ["download", "fashion-mnist", "--url", server.base + "/", "--no-md5-check"]
        assert main(argv) == 0
        assert main(argv) == 0  # the files are there: nothing is fetched again
    folder = tmp_path / "data" / "fashion-mnist"
    out, err = capsys.readouterr()
    assert out == f"fashion-mnist: {folder}\n" * 2
    size = (served / "train-images-idx3-ubyte.gz").stat().st_size
    assert f"  {size} bytes of {size} bytes (100 %)\n" in err
    assert sorted(request[0] for request in server.requests) == sorted(
        "/" + name for name in FASHION_MNIST_NAMES
    )
    assert sorted(path.name for path in folder.iterdir()) == sorted(FASHION_MNIST_NAMES)
    for split, (images, labels) in arrays.items():
        loaded_images, loaded_labels = load_fashion_mnist(split)  # Debian's folder is absent
        assert np.array_equal(loaded_images[:, 0].numpy(), images)
        assert loaded_labels.tolist() == labels.tolist()
    # Given the data folder, the loader finds the files in its fashion-mnist subfolder.
    assert load_dataset("fashion-mnist", "test", tmp_path / "data").labels.tolist() == [0, 1, 2, 3]


def test_fashion_mnist_file_whose_md5_differs_is_named_and_deleted(tmp_path, monkeypatch, capsys):
    served = tmp_path / "served"
    fashion_mnist_files(served)
    root = tmp_path / "data"
    with range_server(served, monkeypatch) as server:
        # The published MD5s are expected by default: these small files are not the release.
        assert (
            main(["download", "fashion-mnist", "--data-dir", str(root), "--url", server.base]) == 2
        )
    # Progress lines, then the error in one line.
    *progress, error = capsys.readouterr().err.splitlines()
    name = "train-images-idx3-ubyte.gz"
    assert progress[0].startswith(f"downloading {server.base}/{name} (")
    assert error + "\n" == (
        f"dropcluster: error: {name} from {server.base}/{name}: MD5 {md5_of(served / name)} "
        f"differs from the expected {downloads.FASHION_MNIST_MD5[name]}; the download was "
        f"deleted: run `dropcluster download fashion-mnist` again to download it again\n"
    )
    assert list((root / "fashion-mnist").iterdir()) == []


def test_fashion_mnist_with_the_official_md5_must_hold_the_official_counts(tmp_path, monkeypatch):
    served = tmp_path / "served"
    fashion_mnist_files(served)
    digests = {name: md5_of(served / name) for name in FASHION_MNIST_NAMES}
    monkeypatch.setattr(downloads, "FASHION_MNIST_MD5", digests)  # as if these were the release
    root = tmp_path / "data"
    with pytest.raises(
        ValueError,
        match=r"'train' files .* not valid \(the files have the official MD5s but hold 6 "
        r"examples, not the official 60000\); they were deleted",
    ):
        download_fashion_mnist(root, url=served.as_uri(), md5=digests)
    assert list((root / "fashion-mnist").iterdir()) == []


def test_fashion_mnist_split_with_bad_content_is_deleted(tmp_path):
    served = tmp_path / "served"
    fashion_mnist_files(served)
    write_idx(served / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 12], np.uint8))
    root = tmp_path / "data"
    with pytest.raises(ValueError, match=r"'test' files .* labels in 0\.\.9, but holds 12"):
        download_fashion_mnist(root, url=served.as_uri(), md5=None)
    # The training split was valid and stays; the test split's files are gone.
    assert sorted(path.name for path in (root / "fashion-mnist").iterdir()) == [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    ]


def test_download_fashion_mnist_is_not_needed_where_debians_package_is(
    tmp_path, monkeypatch, capsys
):
    fashion_mnist_files(tmp_path / "debian")
    monkeypatch.setattr(fashion_mnist, "DEFAULT_ROOT", tmp_path / "debian")
    monkeypatch.setenv("DROPCLUSTER_DATA", str(tmp_path / "data"))
    assert main(["download", "fashion-mnist"]) == 0
    out, err = capsys.readouterr()
    assert out == f"fashion-mnist: {tmp_path / 'debian'}\n"
    assert "nothing to download" in err
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["mnist"], "dataset should be one of 'fashion-mnist', 'cifar10', 'cifar100'"),
        (["tiny-imagenet-c"], "tiny-imagenet-c has no published MD5 that could be verified"),
        (["cifar10", "--md5", "0" * 32, "--no-md5-check"], "give --md5 or --no-md5-check, not"),
        (["cifar10", "--md5", "abc"], "--md5 should be 32 hexadecimal digits, but got 'abc'"),
        (["fashion-mnist", "--md5", "0" * 32], "--md5 does not apply: give --no-md5-check"),
        (["cifar10", "--data-dir", "{file}"], "--data-dir should be a folder, but"),
        (["cifar10", "--data-dir", "{file}/data"], "a file is where a folder was expected"),
    ],
)
def test_bad_download_command_is_one_line_and_status_2(
    tmp_path, monkeypatch, capsys, argv, expected
):
    monkeypatch.setenv("DROPCLUSTER_DATA", str(tmp_path / "data"))
    (tmp_path / "file").write_text("not a folder")
    argv = [arg.format(file=tmp_path / "file") for arg in argv]
    assert main(["download", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dropcluster: error: ") and err.count("\n") == 1
    assert expected in err
    assert not (tmp_path / "data").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any folder")
def test_download_into_a_read_only_folder_is_one_line(tmp_path, capsys):
    root = tmp_path / "read-only"
    root.mkdir(mode=0o555)
    assert main(["download", "cifar10", "--data-dir", str(root)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"dropcluster: error: {root} is not writable: choose a folder you may write to with "
        f"--data-dir\n"
    )
