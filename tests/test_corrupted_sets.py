"""Tests of `dropcluster.data.corrupted_sets`: the released layouts, written small, and JPEG."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from dropcluster.data import corrupted_sets
from dropcluster.data.corrupted_sets import (
    RELEASED_COUNTS,
    available_released,
    cifar10_c_counts,
    cifar100_c_counts,
    jpeg_round_trip,
    load_cifar10_c,
    load_cifar100_c,
    load_released,
    load_tiny_imagenet_c,
    read_released_marker,
    tiny_imagenet_c_counts,
    write_released_marker,
)
from dropcluster.data.corruptions import BENCHMARK, CORRUPTIONS, EXTRA
from dropcluster.data.datasets import COMPLETE_MARKER

PER_SEVERITY = 4
CIFAR_FOLDERS = {"cifar10-c": "CIFAR-10-C", "cifar100-c": "CIFAR-100-C"}
CIFAR_CLASSES = {"cifar10-c": 10, "cifar100-c": 100}
CIFAR_LOADERS = {"cifar10-c": load_cifar10_c, "cifar100-c": load_cifar100_c}


@pytest.fixture
def release_counts_as_released():
    """Asked for by a test that needs the real RELEASED_COUNTS: small_cifar_c_release then
    leaves them alone."""


@pytest.fixture(autouse=True)
def small_cifar_c_release(request, monkeypatch):
    """The CIFAR-C files written here hold PER_SEVERITY images per severity: let the loaders take
    that for the release's count (an unmarked folder must hold the release's counts)."""
    if "release_counts_as_released" in request.fixturenames:
        return
    for dataset in ("cifar10-c", "cifar100-c"):
        counts = {**RELEASED_COUNTS[dataset], "per_severity": PER_SEVERITY}
        monkeypatch.setitem(RELEASED_COUNTS, dataset, counts)


def write_cifar_c(
    root,
    dataset="cifar100-c",
    corruptions=("gaussian_noise", "zoom_blur"),
    per_severity=PER_SEVERITY,
    seed=0,
    marked=False,
):
    """``root/CIFAR-10-C`` or ``root/CIFAR-100-C`` as released, small: one (5 x per_severity,
    32, 32, 3) uint8 .npy per corruption and labels.npy, the same labels for each severity."""
    folder = root / CIFAR_FOLDERS[dataset]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for corruption in corruptions:
        arrays[corruption] = rng.integers(0, 256, (5 * per_severity, 32, 32, 3), dtype=np.uint8)
        np.save(folder / f"{corruption}.npy", arrays[corruption])
    # As released: uint8 labels, the test labels repeated for each severity.
    labels = np.tile(rng.integers(0, CIFAR_CLASSES[dataset], per_severity), 5).astype(np.uint8)
    np.save(folder / "labels.npy", labels)
    if marked:
        counts = {"corruptions": len(corruptions), "per_severity": per_severity}
        write_released_marker(folder, dataset, counts)
    return folder, arrays, labels


def write_cifar100_c(root, corruptions=("gaussian_noise", "zoom_blur"), seed=0):
    return write_cifar_c(root, "cifar100-c", corruptions, seed=seed)


#: Class -> the constant colour of its images, so a decoded image shows its class.
CLASS_COLOURS = {"n01443537": (200, 30, 30), "n01629819": (30, 200, 30), "n09999999": (30, 30, 200)}


def write_tiny_imagenet_c(
    root, severities, per_class=2, wnids=tuple(CLASS_COLOURS), marked=True, shade=0
):
    """``root/Tiny-ImageNet-C/<corruption>/<severity>/<wnid>/*.JPEG``, Pillow quality 85.

    ``marked``: with a completion marker recording these counts (a deliberately small set).
    """
    folder = root / "Tiny-ImageNet-C"
    for corruption, levels in severities.items():
        for severity in levels:
            for wnid in wnids:
                class_folder = folder / corruption / str(severity) / wnid
                class_folder.mkdir(parents=True)
                for index in range(per_class):
                    # A colour per class, a brightness step per file (sorted order is checkable).
                    colour = np.array(CLASS_COLOURS[wnid]) + 20 * index + shade
                    pixels = np.broadcast_to(colour.astype(np.uint8), (64, 64, 3))
                    path = class_folder / f"ILSVRC2012_val_{index:08d}.JPEG"
                    Image.fromarray(np.ascontiguousarray(pixels)).save(path, quality=85)
    if marked:
        counts = {"corruptions": len(severities), "classes": len(wnids), "per_class": per_class}
        write_released_marker(folder, "tiny-imagenet-c", counts)
    return folder


def decode(path):
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def severity_block(array, severity, per_severity=PER_SEVERITY):
    return array[(severity - 1) * per_severity : severity * per_severity]


# ---------------------------------------------------------------------------------------------
# CIFAR-10-C and CIFAR-100-C


@pytest.mark.parametrize("dataset", ["cifar10-c", "cifar100-c"])
@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_cifar_c_returns_the_block_of_its_severity(tmp_path, dataset, severity):
    _, arrays, labels = write_cifar_c(tmp_path, dataset)
    images, loaded_labels = CIFAR_LOADERS[dataset](tmp_path, "zoom_blur", severity)
    assert images.shape == (PER_SEVERITY, 3, 32, 32) and images.dtype == torch.uint8
    expected = torch.from_numpy(severity_block(arrays["zoom_blur"], severity)).permute(0, 3, 1, 2)
    assert torch.equal(images, expected)
    assert loaded_labels.dtype == torch.int64
    assert loaded_labels.tolist() == severity_block(labels, severity).tolist()


def test_cifar_c_accepts_the_folder_itself_and_the_default_root(tmp_path, monkeypatch):
    folder, arrays, _ = write_cifar_c(tmp_path, "cifar10-c")
    from_folder, _ = load_cifar10_c(folder, "gaussian_noise", 2)
    monkeypatch.setenv("DROPCLUSTER_DATA", str(tmp_path))
    from_default, _ = load_cifar10_c(None, "gaussian_noise", 2)
    expected = torch.from_numpy(severity_block(arrays["gaussian_noise"], 2))
    assert torch.equal(from_folder, expected.permute(0, 3, 1, 2))
    assert torch.equal(from_default, from_folder)


def test_cifar10_c_and_cifar100_c_side_by_side_are_told_apart(tmp_path):
    _, arrays10, labels10 = write_cifar_c(tmp_path, "cifar10-c", ("fog",), seed=1)
    _, arrays100, labels100 = write_cifar_c(tmp_path, "cifar100-c", ("fog",), seed=2)
    images10, got10 = load_released(tmp_path, "cifar10-c", "fog", 3)
    images100, got100 = load_released(tmp_path, "cifar100-c", "fog", 3)
    assert torch.equal(
        images10, torch.from_numpy(severity_block(arrays10["fog"], 3)).permute(0, 3, 1, 2)
    )
    assert torch.equal(
        images100, torch.from_numpy(severity_block(arrays100["fog"], 3)).permute(0, 3, 1, 2)
    )
    assert got10.tolist() == severity_block(labels10, 3).tolist()
    assert got100.tolist() == severity_block(labels100, 3).tolist()
    assert not torch.equal(images10, images100)


def test_cifar_c_memory_maps_the_stacked_file(tmp_path, monkeypatch):
    write_cifar_c(tmp_path)
    modes = []
    original = np.load

    def recording_load(path, *args, **kwargs):
        modes.append(kwargs.get("mmap_mode"))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(corrupted_sets.np, "load", recording_load)
    load_cifar100_c(tmp_path, "gaussian_noise", 5)
    assert modes == ["r", "r"]


def test_cifar_c_missing_file_names_it_the_release_and_the_downloader(tmp_path):
    write_cifar_c(tmp_path, "cifar10-c", corruptions=("zoom_blur",))
    with pytest.raises(FileNotFoundError, match=r"no gaussian_noise\.npy in .*CIFAR-10-C") as info:
        load_cifar10_c(tmp_path, "gaussian_noise", 1)
    message = str(info.value)
    assert "zenodo.org/records/2535967" in message
    assert f"download_cifar10_c({str(tmp_path)!r})" in message
    assert "zoom_blur.npy" in message  # what the folder holds
    assert "\n" not in message
    (tmp_path / "CIFAR-10-C" / "labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"no labels\.npy in "):
        load_cifar10_c(tmp_path, "zoom_blur", 1)
    with pytest.raises(
        FileNotFoundError, match=r"CIFAR-100-C: expected .*download_cifar100_c\(.*elsewhere"
    ):
        load_cifar100_c(tmp_path / "elsewhere", "zoom_blur", 1)


def test_cifar_c_rejects_images_of_the_wrong_shape_or_dtype(tmp_path):
    folder, _, _ = write_cifar_c(tmp_path, "cifar10-c", corruptions=("zoom_blur",))
    np.save(folder / "fog.npy", np.zeros((5 * PER_SEVERITY, 32, 32), np.uint8))
    with pytest.raises(
        ValueError,
        match=r"fog\.npy should be uint8 of shape \(20, 32, 32, 3\), the five severities of the "
        r"4 test images stacked \(a smaller copy needs a completion marker: "
        r"write_released_marker\), but is uint8 of shape \(20, 32, 32\)$",
    ):
        load_cifar10_c(folder, "fog", 1)
    np.save(folder / "fog.npy", np.zeros((5 * PER_SEVERITY + 1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"write_released_marker\), but is uint8 of shape \(21, "):
        load_cifar10_c(folder, "fog", 1)
    np.save(folder / "fog.npy", np.zeros((5 * PER_SEVERITY, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"but is float32 of shape \(20, 32, 32, 3\)"):
        load_cifar10_c(folder, "fog", 1)
    np.save(folder / "fog.npy", np.zeros((5 * PER_SEVERITY, 3, 32, 32), np.uint8))  # CHW
    with pytest.raises(ValueError, match=r"but is uint8 of shape \(20, 3, 32, 32\)"):
        load_cifar10_c(folder, "fog", 1)


def test_cifar_c_rejects_a_truncated_file_naming_the_downloader(tmp_path):
    folder, _, _ = write_cifar_c(tmp_path, "cifar100-c", corruptions=("snow",))
    path = folder / "snow.npy"
    path.write_bytes(path.read_bytes()[:1000])  # as an interrupted extraction leaves it
    with pytest.raises(
        ValueError, match=r"snow\.npy is not a readable \.npy file .*download_cifar100_c"
    ):
        load_cifar100_c(folder, "snow", 1)


def test_cifar_c_rejects_labels_of_the_wrong_length_type_or_range(tmp_path):
    folder, _, labels = write_cifar_c(tmp_path, "cifar10-c", corruptions=("zoom_blur",))
    np.save(folder / "labels.npy", np.zeros(7, np.uint8))
    with pytest.raises(
        ValueError,
        match=r"labels\.npy should hold 20 integer labels, one per image of zoom_blur\.npy, "
        r"but is uint8 of shape \(7,\)",
    ):
        load_cifar10_c(folder, "zoom_blur", 1)
    np.save(folder / "labels.npy", labels.astype(np.float32))
    with pytest.raises(ValueError, match="should hold 20 integer labels.*float32"):
        load_cifar10_c(folder, "zoom_blur", 1)
    too_high = labels.copy()
    too_high[[3, 3 + PER_SEVERITY, 3 + 2 * PER_SEVERITY, 3 + 3 * PER_SEVERITY, 19]] = 10
    np.save(folder / "labels.npy", too_high)
    with pytest.raises(ValueError, match=r"CIFAR-10 labels in 0\.\.9, but they span \d+\.\.10"):
        load_cifar10_c(folder, "zoom_blur", 1)
    # CIFAR-100 fine labels (some >= 10) in a CIFAR-10-C folder are refused the same way.
    np.save(folder / "labels.npy", np.tile(np.array([5, 50, 99, 0], np.uint8), 5))
    with pytest.raises(ValueError, match=r"0\.\.9, but they span 0\.\.99"):
        load_released(folder, "cifar10", "zoom_blur", 2)
    # The same labels are fine for CIFAR-100-C.
    np.save(folder / "labels.npy", np.tile(np.array([5, 50, 99, 0], np.uint8), 5))
    assert load_released(folder, "cifar100-c", "zoom_blur", 2)[1].tolist() == [5, 50, 99, 0]


def test_cifar_c_labels_must_repeat_for_each_severity(tmp_path):
    folder, _, labels = write_cifar_c(tmp_path, "cifar100-c", corruptions=("zoom_blur",))
    shuffled = labels.copy()
    block = slice(2 * PER_SEVERITY, 3 * PER_SEVERITY)  # severity 3
    shuffled[block] = (labels[block] + 1) % 100
    shuffled[2 * PER_SEVERITY] = labels[2 * PER_SEVERITY]  # 3 of the 4 differ
    np.save(folder / "labels.npy", shuffled)
    with pytest.raises(
        ValueError,
        match=r"should repeat the same 4 test labels for each of the 5 severities, but "
        r"severity 3's differ from severity 1's at 3 positions",
    ):
        # Refused whatever severity is asked for: the file is wrong.
        load_cifar100_c(folder, "zoom_blur", 1)


def test_cifar_c_marker_holds_the_files_to_its_count(tmp_path):
    folder, arrays, _ = write_cifar_c(tmp_path, "cifar10-c", per_severity=3, marked=True)
    images, _ = load_cifar10_c(tmp_path, "zoom_blur", 2)
    assert torch.equal(
        images, torch.from_numpy(severity_block(arrays["zoom_blur"], 2, 3)).permute(0, 3, 1, 2)
    )
    write_released_marker(folder, "cifar10-c", {"corruptions": 2, "per_severity": 4})
    with pytest.raises(
        ValueError,
        match=r"zoom_blur\.npy should be uint8 of shape \(20, 32, 32, 3\), the five severities "
        r"of 4 test images stacked, as its completion marker .* records, but is uint8 of shape "
        r"\(15, 32, 32, 3\)",
    ):
        load_cifar10_c(tmp_path, "zoom_blur", 2)
    # A marker of the other CIFAR release: the folder was mixed up.
    write_released_marker(folder, "cifar100-c", {"corruptions": 2, "per_severity": 3})
    with pytest.raises(
        ValueError,
        match=r"unreadable completion marker .*'dataset': 'cifar10-c'.*download_cifar10_c",
    ):
        load_cifar10_c(tmp_path, "zoom_blur", 2)


# ---------------------------------------------------------------------------------------------
# Every corruption name, the data set names


def test_all_nineteen_corruptions_are_listed_and_read_from_cifar_c(tmp_path):
    # One image per severity: smaller than the release, so marked.
    folder, arrays, _ = write_cifar_c(
        tmp_path, "cifar10-c", CORRUPTIONS[::-1], per_severity=1, marked=True
    )
    np.save(folder / "glitch.npy", np.zeros((5, 32, 32, 3), np.uint8))  # not a corruption
    found = available_released(tmp_path, "cifar10-c")
    assert list(found) == list(CORRUPTIONS) and len(found) == 19
    assert all(severities == [1, 2, 3, 4, 5] for severities in found.values())
    for corruption in CORRUPTIONS:
        images, _ = load_released(tmp_path, "cifar10-c", corruption, 4)
        expected = torch.from_numpy(arrays[corruption][3:4]).permute(0, 3, 1, 2)
        assert torch.equal(images, expected), corruption
    assert cifar10_c_counts(folder) == {"corruptions": 19, "per_severity": 1}


def test_all_nineteen_corruptions_are_listed_and_read_from_tiny_imagenet_c(tmp_path):
    wnids = ["n01443537"]
    for number, corruption in enumerate(CORRUPTIONS):
        severity = number % 5 + 1
        # Each corruption's images a different shade, to check which folder was read.
        write_tiny_imagenet_c(
            tmp_path, {corruption: [severity]}, per_class=1, wnids=wnids, shade=number
        )
    found = available_released(tmp_path, "tiny-imagenet-c")
    assert list(found) == list(CORRUPTIONS)
    for number, corruption in enumerate(CORRUPTIONS):
        assert found[corruption] == [number % 5 + 1]
        images, labels = load_released(tmp_path, "tiny-imagenet-c", corruption, number % 5 + 1)
        assert images.shape == (1, 3, 64, 64) and labels.tolist() == [0]
        path = tmp_path / "Tiny-ImageNet-C" / corruption / str(number % 5 + 1) / wnids[0]
        assert torch.equal(images[0], decode(next(path.iterdir()))), corruption


@pytest.mark.parametrize(
    ("alias", "name"),
    [("cifar10", "cifar10-c"), ("cifar100", "cifar100-c"), ("tiny-imagenet", "tiny-imagenet-c")],
)
def test_the_clean_sets_names_are_aliases(tmp_path, alias, name):
    write_cifar_c(tmp_path, "cifar10-c", ("fog",), seed=1)
    write_cifar_c(tmp_path, "cifar100-c", ("fog",), seed=2)
    write_tiny_imagenet_c(tmp_path, {"fog": [2]}, per_class=1)
    by_alias = load_released(tmp_path, alias, "fog", 2)
    by_name = load_released(tmp_path, name, "fog", 2)
    assert torch.equal(by_alias[0], by_name[0]) and torch.equal(by_alias[1], by_name[1])
    assert available_released(tmp_path, alias) == available_released(tmp_path, name)
    assert available_released(tmp_path, name) == {
        "fog": [1, 2, 3, 4, 5] if "cifar" in name else [2]
    }


@pytest.mark.parametrize("severity", [0, 6, True, 2.0, "3"])
def test_severity_outside_one_to_five_is_rejected(tmp_path, severity):
    write_cifar_c(tmp_path)
    with pytest.raises(
        ValueError, match=r"severity should be an integer( >= 1 and <= 5)?, but got"
    ):
        load_cifar100_c(tmp_path, "zoom_blur", severity)
    with pytest.raises(
        ValueError, match=r"severity should be an integer( >= 1 and <= 5)?, but got"
    ):
        load_tiny_imagenet_c(tmp_path, "zoom_blur", severity, ["n01443537"])


def test_unknown_corruption_lists_the_known_ones(tmp_path):
    with pytest.raises(
        ValueError, match=r"corruption should be one of .*'fog'.*'saturate', but got 'glitch'"
    ):
        load_cifar10_c(tmp_path, "glitch", 1)
    with pytest.raises(ValueError, match="speckle_noise"):
        load_released(tmp_path, "tiny-imagenet-c", "glitch", 1)


@pytest.mark.parametrize("dataset", ["fashion-mnist", "synthetic"])
def test_data_sets_without_a_release_are_refused(tmp_path, dataset):
    with pytest.raises(ValueError, match="no released corrupted test set.*corrupt"):
        load_released(tmp_path, dataset, "zoom_blur", 1)
    with pytest.raises(ValueError, match="no released corrupted test set"):
        available_released(tmp_path, dataset)


def test_unknown_data_set_lists_the_names_and_aliases(tmp_path):
    with pytest.raises(
        ValueError,
        match="dataset should be one of 'cifar10-c', 'cifar100-c', 'tiny-imagenet-c', 'cifar10', "
        "'cifar100', 'tiny-imagenet', but got 'imagenet-c'",
    ):
        load_released(tmp_path, "imagenet-c", "zoom_blur", 1)


# ---------------------------------------------------------------------------------------------
# Tiny-ImageNet-C


def test_tiny_imagenet_c_labels_index_the_given_wnids_in_sorted_file_order(tmp_path):
    folder = write_tiny_imagenet_c(tmp_path, {"motion_blur": [3]})
    # Not sorted on purpose: labels follow the order given, files the sorted folder order.
    wnids = ["n09999999", "n01443537", "n01629819"]
    images, labels = load_tiny_imagenet_c(tmp_path, "motion_blur", 3, wnids)
    assert images.shape == (6, 3, 64, 64) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    assert labels.tolist() == [1, 1, 2, 2, 0, 0]
    expected_paths = sorted((folder / "motion_blur" / "3").glob("*/*.JPEG"))
    for image, path in zip(images, expected_paths, strict=True):
        assert torch.equal(image, decode(path))
    # Each image is its class colour (JPEG at 85 keeps a flat colour within a few levels).
    for image, label in zip(images[::2], labels[::2], strict=True):
        colour = torch.tensor(CLASS_COLOURS[wnids[label]], dtype=torch.float32)
        assert (image.float().mean(dim=(1, 2)) - colour).abs().max() <= 3


def test_tiny_imagenet_c_reads_only_the_requested_severity(tmp_path):
    write_tiny_imagenet_c(tmp_path, {"glass_blur": [1]}, per_class=1, shade=0)
    write_tiny_imagenet_c(tmp_path, {"glass_blur": [2]}, per_class=1, shade=40)
    folder = tmp_path / "Tiny-ImageNet-C"
    first = load_tiny_imagenet_c(folder, "glass_blur", 1, list(CLASS_COLOURS))[0]
    second = load_tiny_imagenet_c(folder, "glass_blur", 2, list(CLASS_COLOURS))[0]
    difference = second.float().mean(dim=(2, 3)) - first.float().mean(dim=(2, 3))
    assert ((difference - 40).abs() <= 3).all()


def test_tiny_imagenet_c_errors_say_what_was_expected(tmp_path):
    write_tiny_imagenet_c(tmp_path, {"zoom_blur": [1, 3]}, wnids=["n01443537", "n01629819"])
    with pytest.raises(
        FileNotFoundError,
        match=r"no zoom_blur/2/ .*expected the severity folders 1 to 5 in .*zoom_blur, each "
        r"holding <wnid>/\*\.JPEG, but it holds \[1, 3\].*download_tiny_imagenet_c\(.*md5=",
    ):
        load_tiny_imagenet_c(tmp_path, "zoom_blur", 2, ["n01443537", "n01629819"])
    with pytest.raises(
        FileNotFoundError, match=r"no fog/ in .*15 benchmark corruptions.*download_tiny_imagenet_c"
    ):
        load_tiny_imagenet_c(tmp_path, "fog", 2, ["n01443537", "n01629819"])
    with pytest.raises(ValueError, match=r"not in wnids: \['n01629819'\]"):
        load_tiny_imagenet_c(tmp_path, "zoom_blur", 1, ["n01443537", "n09999999"])
    with pytest.raises(FileNotFoundError, match=r"lacks \['n00000000'\] \(1 of 3\)"):
        load_tiny_imagenet_c(tmp_path, "zoom_blur", 1, ["n01443537", "n00000000", "n01629819"])
    with pytest.raises(ValueError, match="distinct"):
        load_tiny_imagenet_c(tmp_path, "zoom_blur", 1, ["n01443537", "n01443537"])
    with pytest.raises(
        FileNotFoundError, match="Tiny-ImageNet-C: expected .*download_tiny_imagenet_c"
    ):
        load_tiny_imagenet_c(tmp_path / "missing", "zoom_blur", 1, ["n01443537"])


def test_tiny_imagenet_c_missing_class_or_image_is_an_incomplete_folder(tmp_path):
    folder = write_tiny_imagenet_c(tmp_path, {"zoom_blur": [1]})
    wnids = list(CLASS_COLOURS)
    for path in (folder / "zoom_blur" / "1" / "n09999999").iterdir():
        path.unlink()
    (folder / "zoom_blur" / "1" / "n09999999").rmdir()
    with pytest.raises(
        ValueError,
        match=r"1: expected 3 class folders \(as its completion marker .* records\), but found "
        r"2: the files look incomplete, .*download_tiny_imagenet_c",
    ):
        load_tiny_imagenet_c(tmp_path, "zoom_blur", 1, wnids)
    write_tiny_imagenet_c(tmp_path, {"zoom_blur": [2]})
    (folder / "zoom_blur" / "2" / "n01629819" / "ILSVRC2012_val_00000001.JPEG").unlink()
    with pytest.raises(
        ValueError,
        match=r"n01629819: expected 2 JPEG images \(as its completion marker .*\), but found 1",
    ):
        load_tiny_imagenet_c(tmp_path, "zoom_blur", 2, wnids)


def test_tiny_imagenet_c_without_a_marker_must_hold_the_release(tmp_path, monkeypatch):
    write_tiny_imagenet_c(tmp_path, {"shot_noise": [4]}, marked=False)
    with pytest.raises(
        ValueError,
        match=r"expected 200 class folders \(the release; a folder without "
        + re.escape(COMPLETE_MARKER)
        + r" must hold all of it\), but found 3",
    ):
        load_tiny_imagenet_c(tmp_path, "shot_noise", 4, list(CLASS_COLOURS))
    # With the release's counts at the fixture's size, it loads.
    monkeypatch.setitem(
        RELEASED_COUNTS, "tiny-imagenet-c", {"corruptions": 15, "classes": 3, "per_class": 2}
    )
    images, labels = load_released(tmp_path, "tiny-imagenet-c", "shot_noise", 4)
    assert images.shape == (6, 3, 64, 64) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    monkeypatch.setitem(
        RELEASED_COUNTS, "tiny-imagenet-c", {"corruptions": 15, "classes": 3, "per_class": 50}
    )
    with pytest.raises(ValueError, match=r"expected 50 JPEG images \(the release; .*found 2"):
        load_released(tmp_path, "tiny-imagenet-c", "shot_noise", 4)


def test_tiny_imagenet_c_image_that_is_not_64x64_is_refused(tmp_path):
    folder = write_tiny_imagenet_c(tmp_path, {"pixelate": [5]})
    path = folder / "pixelate" / "5" / "n01629819" / "ILSVRC2012_val_00000000.JPEG"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(path, quality=85)
    with pytest.raises(
        ValueError, match=re.escape(str(path)) + " should be a 64x64 image, but is 32x32"
    ):
        load_released(tmp_path, "tiny-imagenet", "pixelate", 5)


# ---------------------------------------------------------------------------------------------
# Counts and the completion marker


def test_cifar_c_counts_check_every_file(tmp_path):
    folder, _, labels = write_cifar_c(tmp_path, "cifar100-c", ("fog", "snow", "saturate"))
    assert cifar100_c_counts(folder) == {"corruptions": 3, "per_severity": PER_SEVERITY}
    np.save(folder / "snow.npy", np.zeros((5 * 3, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"labels\.npy should hold 15 integer labels"):
        cifar100_c_counts(folder)
    np.save(folder / "snow.npy", np.zeros((5 * 3 + 1, 32, 32, 3), np.uint8))
    with pytest.raises(
        ValueError,
        match=r"snow\.npy should be uint8 of shape \(5 n, 32, 32, 3\), the five severities of "
        r"n >= 1 test images stacked, but is uint8 of shape \(16, 32, 32, 3\)",
    ):
        cifar100_c_counts(folder)
    np.save(folder / "snow.npy", np.zeros((5 * PER_SEVERITY, 32, 32, 3), np.uint8))
    np.save(folder / "labels.npy", labels + 100)
    with pytest.raises(ValueError, match=r"fine labels in 0\.\.99"):
        cifar100_c_counts(folder)
    empty = tmp_path / "empty" / "CIFAR-10-C"
    empty.mkdir(parents=True)
    np.save(empty / "labels.npy", labels)
    with pytest.raises(ValueError, match="should hold <corruption>.npy files"):
        cifar10_c_counts(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cifar10_c_counts(tmp_path / "nowhere")


def test_cifar_c_counts_measure_a_smaller_copy_that_the_loader_reads_once_marked(tmp_path):
    # 3 images per severity, not the (patched) release's PER_SEVERITY, and no marker.
    folder, arrays, _ = write_cifar_c(tmp_path, "cifar10-c", ("fog", "snow"), per_severity=3)
    counts = cifar10_c_counts(folder)
    assert counts == {"corruptions": 2, "per_severity": 3}
    with pytest.raises(ValueError, match=r"a smaller copy needs a completion marker"):
        load_cifar10_c(folder, "snow", 2)
    # The counts, recorded as the downloaders record them, are what the loader then expects.
    write_released_marker(folder, "cifar10-c", counts)
    images, _ = load_cifar10_c(folder, "snow", 2)
    assert torch.equal(images, torch.from_numpy(arrays["snow"][3:6]).permute(0, 3, 1, 2))


def test_tiny_imagenet_c_counts_check_every_folder(tmp_path):
    folder = write_tiny_imagenet_c(tmp_path, {"fog": [1, 2, 3, 4, 5], "snow": [1, 2, 3, 4, 5]})
    assert tiny_imagenet_c_counts(folder) == {"corruptions": 2, "classes": 3, "per_class": 2}
    (folder / "snow" / "3" / "n01629819" / "ILSVRC2012_val_00000000.JPEG").unlink()
    with pytest.raises(
        ValueError, match=r"snow/3/n01629819 holds 1 JPEG images, but .*snow/1/n01443537 holds 2"
    ):
        tiny_imagenet_c_counts(folder)
    for path in (folder / "snow" / "3" / "n01629819").iterdir():
        path.unlink()
    (folder / "snow" / "3" / "n01629819").rmdir()
    with pytest.raises(
        ValueError,
        match=r"snow/3 holds 2 class folders, but .*snow/1 holds 3: it lacks \['n01629819'\]",
    ):
        tiny_imagenet_c_counts(folder)
    write_tiny_imagenet_c(tmp_path / "other", {"fog": [1, 2, 4, 5]})
    with pytest.raises(
        ValueError, match=r"fog should hold the severity folders 1 to 5, but holds \[1, 2, 4, 5\]"
    ):
        tiny_imagenet_c_counts(tmp_path / "other" / "Tiny-ImageNet-C")
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="should hold <corruption>/<severity>/<wnid>"):
        tiny_imagenet_c_counts(tmp_path / "none")


def test_marker_round_trip_and_refusals(tmp_path):
    path = write_released_marker(
        tmp_path,
        "cifar10",
        {"corruptions": 19, "per_severity": 10000},
        archive_md5="ab",
        source="u",
    )
    assert path == tmp_path / COMPLETE_MARKER
    document = json.loads(path.read_text())
    assert document["dataset"] == "cifar10-c" and document["archive_md5"] == "ab"
    assert read_released_marker(tmp_path, "cifar10-c") == {"corruptions": 19, "per_severity": 10000}
    assert read_released_marker(tmp_path / "elsewhere", "cifar10-c") is None
    for counts in (
        {"corruptions": 19},
        {"corruptions": 19, "per_severity": 0},
        {"corruptions": True, "per_severity": 3},
    ):
        with pytest.raises(
            ValueError,
            match=r"should map each of \('corruptions', 'per_severity'\) to a count >= 1",
        ):
            write_released_marker(tmp_path, "cifar10-c", counts)
    with pytest.raises(ValueError, match=r"\('corruptions', 'classes', 'per_class'\)"):
        write_released_marker(tmp_path, "tiny-imagenet-c", {"corruptions": 1, "per_severity": 3})
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable completion marker"):
        read_released_marker(tmp_path, "cifar10-c")


# ---------------------------------------------------------------------------------------------
# available_released and load_released


def test_available_released_lists_what_each_folder_holds(tmp_path):
    folder, _, _ = write_cifar_c(tmp_path / "c", corruptions=("zoom_blur", "gaussian_noise"))
    np.save(folder / "glitch.npy", np.zeros((5, 32, 32, 3), np.uint8))  # not a corruption
    assert available_released(tmp_path / "c", "cifar100-c") == {
        "gaussian_noise": [1, 2, 3, 4, 5],
        "zoom_blur": [1, 2, 3, 4, 5],
    }
    assert available_released(tmp_path / "c", "cifar10-c") == {}  # no CIFAR-10-C there
    write_tiny_imagenet_c(tmp_path / "t", {"zoom_blur": [5], "shot_noise": [3, 1]}, per_class=1)
    (tmp_path / "t" / "Tiny-ImageNet-C" / "shot_noise" / "4").mkdir()  # empty: not there
    found = available_released(tmp_path / "t" / "Tiny-ImageNet-C", "tiny-imagenet-c")
    assert found == {"shot_noise": [1, 3], "zoom_blur": [5]}
    assert list(found) == [name for name in CORRUPTIONS if name in found]
    assert available_released(tmp_path / "t", "cifar100-c") == {}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        available_released(tmp_path / "nowhere", "tiny-imagenet-c")


def test_load_released_dispatches_on_the_data_set(tmp_path):
    write_cifar_c(tmp_path)
    write_tiny_imagenet_c(tmp_path, {"defocus_blur": [4]}, per_class=1)
    cifar_images, cifar_labels = load_released(tmp_path, "cifar100-c", "zoom_blur", 4)
    expected_images, expected_labels = load_cifar100_c(tmp_path, "zoom_blur", 4)
    assert torch.equal(cifar_images, expected_images)
    assert torch.equal(cifar_labels, expected_labels)
    # Without classes, the sorted class folders: the order of the Tiny ImageNet loader.
    tiny_images, tiny_labels = load_released(tmp_path, "tiny-imagenet-c", "defocus_blur", 4)
    assert tiny_images.shape == (3, 3, 64, 64)
    assert tiny_labels.tolist() == [0, 1, 2]
    _, given_order = load_released(
        tmp_path, "tiny-imagenet-c", "defocus_blur", 4, ["n09999999", "n01629819", "n01443537"]
    )
    assert given_order.tolist() == [2, 1, 0]


def test_released_counts_are_the_releases(release_counts_as_released):
    assert RELEASED_COUNTS["cifar10-c"] == {"corruptions": 19, "per_severity": 10000}
    assert RELEASED_COUNTS["cifar100-c"] == RELEASED_COUNTS["cifar10-c"]
    assert RELEASED_COUNTS["tiny-imagenet-c"] == {
        "corruptions": len(BENCHMARK),
        "classes": 200,
        "per_class": 50,
    }
    assert len(BENCHMARK) + len(EXTRA) == len(CORRUPTIONS) == 19


# ---------------------------------------------------------------------------------------------
# jpeg_round_trip


def textured_images(n_images=3, channels=3, seed=0):
    """Colour gradients plus brightness noise (the same in every channel, so 4:2:0 chroma
    subsampling does not dominate the error): detail that JPEG quantises."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, 64)
    tint = np.linspace(1.0, 0.5, channels)[None, :, None, None]
    base = (ramp[None, None, :, None] + ramp[None, None, None, :] * 0.2) * tint
    noise = rng.normal(0, 20, (n_images, 1, 64, 64))
    return torch.from_numpy(np.clip(base + noise, 0, 255).astype(np.uint8))


def test_jpeg_round_trip_keeps_shape_dtype_and_device():
    images = textured_images()
    out = jpeg_round_trip(images)
    assert out.shape == images.shape and out.dtype == torch.uint8 and out.device == images.device
    assert not torch.equal(out, images)  # lossy


def test_jpeg_round_trip_matches_the_released_file_pipeline(tmp_path):
    # Tiny-ImageNet-C: Image.fromarray(x).save(path, quality=85), read back as RGB.
    images = textured_images(2)
    for index, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / f"{index}.JPEG", quality=85)
    from_files = torch.stack([decode(tmp_path / f"{index}.JPEG") for index in range(2)])
    assert torch.equal(jpeg_round_trip(images), from_files)


def test_constant_image_survives_nearly_unchanged():
    images = torch.tensor([120, 60, 200], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 64, 64)
    out = jpeg_round_trip(images.contiguous())
    assert (out.int() - images.int()).abs().max() <= 2


def test_higher_quality_is_closer_to_the_original():
    images = textured_images()
    errors = {
        quality: (jpeg_round_trip(images, quality).float() - images.float()).abs().mean()
        for quality in (10, 50, 95)
    }
    assert errors[95] < errors[50] < errors[10]
    assert errors[95] < 0.25 * errors[10]


def test_greyscale_stays_greyscale():
    images = textured_images(2, channels=1)
    out = jpeg_round_trip(images, quality=85)
    assert out.shape == (2, 1, 64, 64)
    buffer = io.BytesIO()
    Image.fromarray(images[1, 0].numpy()).save(buffer, format="JPEG", quality=85)
    buffer.seek(0)
    with Image.open(buffer) as reloaded:
        assert reloaded.mode == "L"
        assert torch.equal(out[1, 0], torch.from_numpy(np.array(reloaded)))


@pytest.mark.parametrize("quality", [0, 96, 85.0, True])
def test_jpeg_quality_outside_one_to_ninety_five_is_rejected(quality):
    with pytest.raises(
        ValueError, match=r"quality should be an integer( >= 1 and <= 95)?, but got"
    ):
        jpeg_round_trip(textured_images(1), quality)


@pytest.mark.parametrize(
    "images",
    [
        torch.zeros(1, 3, 8, 8),  # float
        torch.zeros(1, 2, 8, 8, dtype=torch.uint8),  # two channels
        torch.zeros(3, 8, 8, dtype=torch.uint8),  # no batch dimension
    ],
)
def test_jpeg_round_trip_rejects_other_tensors(images):
    with pytest.raises(ValueError, match=r"4 dimensional uint8 tensor \(N, C, H, W\) with C = 1"):
        jpeg_round_trip(images)


def test_an_unmarked_cifar_c_copy_smaller_than_the_release_is_refused(
    tmp_path, release_counts_as_released
):
    write_cifar_c(tmp_path, "cifar10-c", per_severity=PER_SEVERITY)
    with pytest.raises(
        ValueError,
        match=r"should be uint8 of shape \(50000, 32, 32, 3\).*needs a completion marker",
    ):
        load_cifar10_c(tmp_path, "gaussian_noise", 1)
    write_released_marker(
        tmp_path / "CIFAR-10-C", "cifar10-c", {"corruptions": 2, "per_severity": PER_SEVERITY}
    )
    images, _ = load_cifar10_c(tmp_path, "gaussian_noise", 1)
    assert images.shape == (PER_SEVERITY, 3, 32, 32)
