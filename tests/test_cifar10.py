"""CIFAR-10 (``"cifar10"``): loading, downloading and refusing broken files.

Every file is generated small in tmp_path in the official on-disk format of the "python
version" archive: ``cifar-10-batches-py/`` holding ``data_batch_1`` to ``data_batch_5``,
``test_batch`` and ``batches.meta``, protocol 2 pickles with bytes keys. No network.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import re
import tarfile

import numpy as np
import pytest
import torch

from dropcluster.data import (
    AUGMENT_PRESETS,
    CIFAR_AUGMENT,
    DATASET_NAMES,
    datasets,
    download_cifar10,
    downloads,
)
from dropcluster.data.augment import CIFAR10_AUGMENT, augment_batch
from dropcluster.data.datasets import COMPLETE_MARKER, load_dataset, write_completion_marker

CIFAR10_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
BATCHES = [f"data_batch_{number}" for number in range(1, 6)]


def write_cifar10(root, n_per_batch=(3, 2, 3, 1, 2), n_test=4, seed=0, marked=True):
    """``root/cifar-10-batches-py`` as the python-version archive extracts it (fewer images).

    Returns the folder and, per split, the concatenated ``data`` (N, 3072) uint8 and labels.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    files = [*zip(BATCHES, n_per_batch, strict=True), ("test_batch", n_test)]
    arrays = {}
    for index, (name, n_examples) in enumerate(files):
        data = rng.integers(0, 256, size=(n_examples, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_examples).tolist()
        is_test = name == "test_batch"
        entry = {
            b"batch_label": (
                b"testing batch 1 of 1" if is_test else f"training batch {index + 1} of 5".encode()
            ),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"image_{index}_{i}.png".encode() for i in range(n_examples)],
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        split = "test" if is_test else "train"
        previous = arrays.get(split, (np.empty((0, 3072), np.uint8), []))
        arrays[split] = (np.concatenate([previous[0], data]), previous[1] + labels)
    meta = {
        b"num_cases_per_batch": 10000,
        b"label_names": [name.encode() for name in CIFAR10_NAMES],
        b"num_vis": 3072,
    }
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    if marked:
        # Smaller than the official set on purpose: the marker records the counts it holds.
        counts = {"classes": 10, "train": sum(n_per_batch), "test": n_test}
        write_completion_marker(folder, "cifar10", counts)
    return folder, arrays


def cifar10_archive(tmp_path, **options):
    """``cifar-10-python.tar.gz`` as released: the seven pickles, no completion marker."""
    folder, arrays = write_cifar10(tmp_path / "source", marked=False, **options)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return archive, arrays


def md5_of(path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def leftovers(root):
    """Temporary files and folders a download may leave in ``root``."""
    return sorted(
        path.name
        for path in root.iterdir()
        if ".partial-" in path.name or path.name.endswith(".part")
    )


# ---------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_loads_shapes_labels_and_exact_pixels(tmp_path, split):
    _, arrays = write_cifar10(tmp_path)
    data, labels = arrays[split]
    dataset = load_dataset("cifar10", split, tmp_path)
    assert dataset.name == "cifar10"
    assert dataset.images.shape == (len(labels), 3, 32, 32)
    assert dataset.images.dtype == torch.uint8
    assert dataset.labels.dtype == torch.int64
    assert dataset.labels.tolist() == labels
    assert dataset.num_classes == 10
    # The training split is data_batch_1 to data_batch_5, concatenated in this order.
    assert np.array_equal(dataset.images.reshape(len(labels), -1).numpy(), data)


def test_cifar10_rows_are_red_then_green_then_blue_planes(tmp_path):
    folder, _ = write_cifar10(tmp_path, n_per_batch=(1, 1, 1, 1, 1), n_test=2)
    # One image whose planes are told apart: red = 200, green = row, blue = column.
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    image = np.concatenate([np.full(1024, 200), rows.ravel(), cols.ravel()]).astype(np.uint8)
    entry = pickle.loads((folder / "test_batch").read_bytes())
    entry[b"data"] = np.stack([np.zeros(3072, np.uint8), image])
    (folder / "test_batch").write_bytes(pickle.dumps(entry, protocol=2))
    loaded = load_dataset("cifar10", "test", tmp_path).images[1]
    assert (loaded[0] == 200).all()  # channel 0 is the first plane: red
    assert torch.equal(loaded[1], torch.from_numpy(rows.astype(np.uint8)))  # (y, x) = y
    assert torch.equal(loaded[2], torch.from_numpy(cols.astype(np.uint8)))  # (y, x) = x
    assert int(loaded[2, 3, 4]) == 4 and int(loaded[1, 3, 4]) == 3


def test_cifar10_class_names_come_from_batches_meta(tmp_path):
    folder, _ = write_cifar10(tmp_path)
    names = [f"name-{k}" for k in range(10)]
    # Text, not bytes: a file pickled by Python 2, read with latin-1 as the loader does.
    meta = {"label_names": names, "num_cases_per_batch": 10000, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    assert load_dataset("cifar10", "train", tmp_path).classes == names
    assert load_dataset("cifar10", "test", folder).classes == names  # root: the folder itself


def test_cifar10_is_known_everywhere_a_data_set_name_is():
    assert "cifar10" in DATASET_NAMES
    assert AUGMENT_PRESETS["cifar10"] is CIFAR10_AUGMENT
    assert datasets.OFFICIAL_COUNTS["cifar10"] == {"classes": 10, "train": 50000, "test": 10000}
    from dropcluster.train.config import TrainConfig

    assert TrainConfig(dataset="cifar10").dataset == "cifar10"


def test_cifar10_augmentation_is_cifar100s_with_its_own_statistics():
    assert CIFAR10_AUGMENT.for_evaluation().mean == (0.4914, 0.4822, 0.4465)
    assert CIFAR10_AUGMENT.std == (0.2470, 0.2435, 0.2616)
    assert (CIFAR10_AUGMENT.crop_padding, CIFAR10_AUGMENT.flip) == (4, True)
    assert CIFAR10_AUGMENT.rotation_degrees == CIFAR_AUGMENT.rotation_degrees
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    output = augment_batch(images, CIFAR10_AUGMENT, torch.Generator().manual_seed(0))
    assert output.shape == (4, 3, 32, 32) and output.dtype == torch.float32
    # Test images are only normalised, with CIFAR-10's statistics: a pixel at the red mean is 0.
    grey = torch.full((1, 3, 32, 32), round(0.4914 * 255), dtype=torch.uint8)
    evaluated = augment_batch(grey, CIFAR10_AUGMENT.for_evaluation())
    assert abs(float(evaluated[0, 0, 0, 0])) < 0.01


def test_cifar10_missing_folder_names_the_layout_and_the_archive(tmp_path):
    (tmp_path / "something_else").mkdir()
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py") as info:
        load_dataset("cifar10", "train", tmp_path)
    message = str(info.value)
    assert "data_batch_1 to data_batch_5, test_batch and batches.meta" in message
    assert "something_else/" in message and "download_cifar10(" in message
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz is there: extract it"):
        load_dataset("cifar10", "train", tmp_path)


def test_cifar10_missing_batch_is_named(tmp_path):
    folder, _ = write_cifar10(tmp_path)
    (folder / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match=r"'train' split: expected the file .*data_batch_4"):
        load_dataset("cifar10", "train", tmp_path)
    assert len(load_dataset("cifar10", "test", tmp_path)) == 4


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_cifar10_pickle_cannot_run_code(tmp_path):
    folder, _ = write_cifar10(tmp_path)
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": _RunsCode()}))
    with pytest.raises(ValueError, match="only lists and numpy arrays"):
        load_dataset("cifar10", "train", tmp_path)


# ---------------------------------------------------------------------------------------------
# Incomplete files


def test_cifar10_batch_smaller_than_its_marker_says_is_refused(tmp_path):
    folder, _ = write_cifar10(tmp_path)  # 11 training images in the marker
    entry = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}
    (folder / "data_batch_3").write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(ValueError) as info:
        load_dataset("cifar10", "train", tmp_path)
    message = str(info.value)
    assert "expected 11 images in data_batch_1, " in message and "found 9" in message
    assert f"as its completion marker {folder / COMPLETE_MARKER} records" in message
    assert "look incomplete" in message and f"download_cifar10({str(tmp_path)!r})" in message
    assert "\n" not in message
    assert len(load_dataset("cifar10", "test", tmp_path)) == 4


def test_unmarked_cifar10_must_hold_the_official_counts(tmp_path, monkeypatch):
    write_cifar10(tmp_path, marked=False)
    with pytest.raises(
        ValueError, match=r"expected 50000 images .*\(the official release.*found 11.*incomplete"
    ):
        load_dataset("cifar10", "train", tmp_path)
    with pytest.raises(ValueError, match=r"expected 10000 images in test_batch .*found 4"):
        load_dataset("cifar10", "test", tmp_path)
    monkeypatch.setitem(datasets.CIFAR10_COUNTS, "train", 11)
    assert len(load_dataset("cifar10", "train", tmp_path)) == 11


def test_cifar10_with_too_few_class_names_is_refused(tmp_path):
    folder, _ = write_cifar10(tmp_path, marked=False)
    meta = {b"label_names": [name.encode() for name in CIFAR10_NAMES[:9]]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    # Labels 0..8 only, so that the count, not the label range, is what fails.
    for name in [*BATCHES, "test_batch"]:
        entry = pickle.loads((folder / name).read_bytes())
        entry[b"labels"] = [label % 9 for label in entry[b"labels"]]
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(ValueError, match=r"batches.meta: expected 10 class names .*found 9"):
        load_dataset("cifar10", "test", tmp_path)


# ---------------------------------------------------------------------------------------------
# Files of the wrong type


def wrong_type_variants():
    data = np.zeros((2, 3072), np.uint8)
    return {
        "meta-list": ("batches.meta", [b"label_names"], "should hold a dict, but holds a list"),
        "meta-no-names": ("batches.meta", {b"num_vis": 3072}, "should hold the key 'label_names'"),
        "names-int": ("batches.meta", {b"label_names": 7}, "'label_names' should be a list"),
        "names-items": ("batches.meta", {b"label_names": list(range(10))}, "item 0 is an int"),
        "batch-str": ("data_batch_1", "data", "should hold a dict, but holds a str"),
        "no-labels": ("data_batch_1", {b"data": data}, "should hold the key 'labels'"),
        "labels-dict": (
            "data_batch_2",
            {b"data": data, b"labels": {b"a": 1}},
            "'labels' should be a list of integer labels, but is a dict of 1 items",
        ),
        "labels-float": (
            "test_batch",
            {b"data": data, b"labels": [0.5, 1.5]},
            "'labels' should be a list of integer labels",
        ),
        "labels-count": ("data_batch_5", {b"data": data, b"labels": [1]}, "should hold 2 labels"),
        "labels-range": (
            "test_batch",
            {b"data": data, b"labels": [0, 10]},
            "'labels' should be in 0..9 (the 10 names of 'label_names'), but span 0..10",
        ),
        "data-float": (
            "data_batch_3",
            {b"data": data.astype(np.float32), b"labels": [0, 1]},
            "'data' should be a uint8 array of shape (N, 3072)",
        ),
        "data-images": (
            "test_batch",
            {b"data": np.zeros((2, 32, 32, 3), np.uint8), b"labels": [0, 1]},
            "but is uint8 of shape (2, 32, 32, 3)",
        ),
        "truncated": ("data_batch_1", None, "is not a readable CIFAR pickle"),
    }


@pytest.mark.parametrize("variant", list(wrong_type_variants()))
def test_cifar10_files_of_the_wrong_type_give_a_one_line_error(tmp_path, variant):
    file_name, content, expected = wrong_type_variants()[variant]
    folder, _ = write_cifar10(tmp_path)
    path = folder / file_name
    if content is None:
        path.write_bytes(path.read_bytes()[:50])
    else:
        path.write_bytes(pickle.dumps(content, protocol=2))
    split = "test" if file_name == "test_batch" else "train"
    with pytest.raises(ValueError) as info:
        load_dataset("cifar10", split, tmp_path)
    message = str(info.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------
# Downloads, from local file:// archives


def test_download_cifar10_extracts_marks_and_loads(tmp_path):
    archive, arrays = cifar10_archive(tmp_path)
    root = tmp_path / "data"
    folder = download_cifar10(root, url=archive.as_uri(), md5=md5_of(archive))
    assert folder == root / "cifar-10-batches-py"
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert marker["dataset"] == "cifar10"
    assert marker["counts"] == {"classes": 10, "train": 11, "test": 4}
    assert marker["archive_md5"] == md5_of(archive)
    assert marker["source"] == archive.as_uri()
    # Saved under the official archive name, next to the folder; nothing temporary is left.
    assert (root / "cifar-10-python.tar.gz").read_bytes() == archive.read_bytes()
    assert leftovers(root) == []
    train = load_dataset("cifar10", "train", root)
    assert np.array_equal(train.images.reshape(len(train), -1).numpy(), arrays["train"][0])
    assert train.classes == CIFAR10_NAMES
    # Present: no second download (an unreachable URL is not opened).
    assert download_cifar10(root, url="file:///nonexistent") == folder


def test_download_cifar10_reuses_an_archive_put_there_by_hand(tmp_path):
    archive, _ = cifar10_archive(tmp_path)
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(archive.read_bytes())
    folder = download_cifar10(root, url="file:///nonexistent", md5=md5_of(archive))
    assert len(load_dataset("cifar10", "test", folder)) == 4


def test_download_cifar10_with_wrong_checksum_leaves_nothing(tmp_path):
    archive, _ = cifar10_archive(tmp_path)
    root = tmp_path / "data"
    with pytest.raises(ValueError, match="MD5 .* differs from the expected 0+"):
        download_cifar10(root, url=archive.as_uri(), md5="0" * 32)
    assert list(root.iterdir()) == []


def test_archive_with_the_official_md5_must_hold_the_official_counts(tmp_path, monkeypatch):
    archive, _ = cifar10_archive(tmp_path)
    monkeypatch.setattr(downloads, "CIFAR10_MD5", md5_of(archive))
    root = tmp_path / "data"
    with pytest.raises(ValueError, match="has the official MD5 but holds"):
        download_cifar10(root, url=archive.as_uri(), md5=md5_of(archive))
    assert not (root / "cifar-10-batches-py").exists()
    assert leftovers(root) == []


def test_archive_missing_a_batch_is_refused(tmp_path):
    source = tmp_path / "source"
    folder, _ = write_cifar10(source, marked=False)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            if path.name != "data_batch_5":
                tar.add(path, arcname=f"cifar-10-batches-py/{path.name}")
    root = tmp_path / "data"
    with pytest.raises(ValueError, match=r"should hold a complete cifar-10-batches-py/.*batch_5"):
        download_cifar10(root, url=archive.as_uri(), md5=None)
    assert not (root / "cifar-10-batches-py").exists()
    assert leftovers(root) == []


def test_interrupted_cifar10_extraction_leaves_nothing_and_is_redone(tmp_path, monkeypatch):
    archive, _ = cifar10_archive(tmp_path)
    root = tmp_path / "data"
    extractall = tarfile.TarFile.extractall

    def fill_the_disk(self, path=".", members=None, **kwargs):
        for member in list(members)[:3]:  # the folder and two batches, then the disk is full
            self.extract(member, path, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "extractall", fill_the_disk)
    with pytest.raises(OSError, match="No space left"):
        download_cifar10(root, url=archive.as_uri(), md5=None)
    assert not (root / "cifar-10-batches-py").exists()
    assert leftovers(root) == []

    monkeypatch.setattr(tarfile.TarFile, "extractall", extractall)
    download_cifar10(root, url=archive.as_uri(), md5=None)
    assert len(load_dataset("cifar10", "train", root)) == 11


def test_stale_partial_download_of_the_archive_is_removed(tmp_path):
    archive, _ = cifar10_archive(tmp_path)
    root = tmp_path / "data"
    root.mkdir()
    # A killed process's temporary archive (named after the archive, not the folder).
    (root / ".cifar-10-python.tar.gz.abc123.part").write_bytes(b"half")
    download_cifar10(root, url=archive.as_uri(), md5=None)
    assert leftovers(root) == []


def test_incomplete_folder_is_refused_then_replaced(tmp_path):
    archive, _ = cifar10_archive(tmp_path)
    root = tmp_path / "data"
    partial, _ = write_cifar10(root, marked=False)  # as after an interrupted hand extraction
    (partial / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load_dataset("cifar10", "test", root)
    folder = download_cifar10(root, url=archive.as_uri(), md5=None)
    assert len(load_dataset("cifar10", "test", root)) == 4
    assert (folder / COMPLETE_MARKER).is_file()


def test_unmarked_folder_holding_the_official_counts_is_kept_and_marked(tmp_path, monkeypatch):
    folder, _ = write_cifar10(tmp_path, marked=False)
    # As if 11 + 4 images were the official sizes (the real ones are too big for a test).
    monkeypatch.setitem(
        datasets.OFFICIAL_COUNTS, "cifar10", {"classes": 10, "train": 11, "test": 4}
    )
    assert download_cifar10(tmp_path, url="file:///nonexistent") == folder
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert marker["counts"] == {"classes": 10, "train": 11, "test": 4}
    assert marker["source"] == "verified in place"


def test_unsafe_member_in_a_cifar10_archive_is_refused(tmp_path):
    archive, _ = cifar10_archive(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    name = "cifar-10-batches-py/../../outside/evil.txt"
    with tarfile.open(archive, "w:gz") as tar:  # rewritten: the pickles, then the member
        tar.add(tmp_path / "source" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        info = tarfile.TarInfo(name)
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    root = tmp_path / "data"
    with pytest.raises(ValueError, match=f"refusing the member {re.escape(repr(name))}"):
        download_cifar10(root, url=archive.as_uri(), md5=None)
    assert list(outside.iterdir()) == []
    assert not (root / "cifar-10-batches-py").exists()
    assert leftovers(root) == []
