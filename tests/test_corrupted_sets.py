"""Tests of `dropcluster.data.corrupted_sets`: the released layouts, written small, and JPEG."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dropcluster.data import corrupted_sets
from dropcluster.data.corrupted_sets import (
    available_released,
    jpeg_round_trip,
    load_cifar100_c,
    load_released,
    load_tiny_imagenet_c,
)
from dropcluster.data.corruptions import CORRUPTIONS

PER_SEVERITY = 4


def write_cifar100_c(root, corruptions=("gaussian_noise", "zoom_blur"), seed=0):
    """``root/CIFAR-100-C`` with one (5 x 4, 32, 32, 3) uint8 .npy per corruption + labels.npy."""
    folder = root / "CIFAR-100-C"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for corruption in corruptions:
        arrays[corruption] = rng.integers(0, 256, (5 * PER_SEVERITY, 32, 32, 3), dtype=np.uint8)
        np.save(folder / f"{corruption}.npy", arrays[corruption])
    # As released: the same test labels repeated for each severity, stored as uint8.
    labels = np.tile(rng.integers(0, 100, PER_SEVERITY), 5).astype(np.uint8)
    np.save(folder / "labels.npy", labels)
    return folder, arrays, labels


#: Class -> the constant colour of its images, so a decoded image shows its class.
CLASS_COLOURS = {"n01443537": (200, 30, 30), "n01629819": (30, 200, 30), "n09999999": (30, 30, 200)}


def write_tiny_imagenet_c(root, severities, per_class=2, wnids=tuple(CLASS_COLOURS)):
    """``root/Tiny-ImageNet-C/<corruption>/<severity>/<wnid>/*.JPEG``, Pillow quality 85."""
    folder = root / "Tiny-ImageNet-C"
    for corruption, levels in severities.items():
        for severity in levels:
            for wnid in wnids:
                class_folder = folder / corruption / str(severity) / wnid
                class_folder.mkdir(parents=True)
                for index in range(per_class):
                    # A colour per class, a brightness step per file (sorted order is checkable).
                    colour = np.array(CLASS_COLOURS[wnid]) + 20 * index
                    pixels = np.broadcast_to(colour.astype(np.uint8), (64, 64, 3))
                    path = class_folder / f"ILSVRC2012_val_{index:08d}.JPEG"
                    Image.fromarray(np.ascontiguousarray(pixels)).save(path, quality=85)
    return folder


def decode(path):
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


# ---------------------------------------------------------------------------------------------
# CIFAR-100-C


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_cifar100_c_returns_the_block_of_its_severity(tmp_path, severity):
    _, arrays, labels = write_cifar100_c(tmp_path)
    images, loaded_labels = load_cifar100_c(tmp_path, "zoom_blur", severity)
    rows = slice((severity - 1) * PER_SEVERITY, severity * PER_SEVERITY)
    assert images.shape == (PER_SEVERITY, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images, torch.from_numpy(arrays["zoom_blur"][rows]).permute(0, 3, 1, 2))
    assert loaded_labels.dtype == torch.int64
    assert loaded_labels.tolist() == labels[rows].tolist()


def test_cifar100_c_accepts_the_folder_itself_and_the_default_root(tmp_path, monkeypatch):
    folder, arrays, _ = write_cifar100_c(tmp_path)
    from_folder, _ = load_cifar100_c(folder, "gaussian_noise", 2)
    monkeypatch.setenv("DROPCLUSTER_DATA", str(tmp_path))
    from_default, _ = load_cifar100_c(None, "gaussian_noise", 2)
    expected = torch.from_numpy(arrays["gaussian_noise"][PER_SEVERITY : 2 * PER_SEVERITY])
    assert torch.equal(from_folder, expected.permute(0, 3, 1, 2))
    assert torch.equal(from_default, from_folder)


def test_cifar100_c_memory_maps_the_stacked_file(tmp_path, monkeypatch):
    write_cifar100_c(tmp_path)
    modes = []
    original = np.load

    def recording_load(path, *args, **kwargs):
        modes.append(kwargs.get("mmap_mode"))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(corrupted_sets.np, "load", recording_load)
    load_cifar100_c(tmp_path, "gaussian_noise", 5)
    assert modes == ["r", "r"]


def test_cifar100_c_missing_file_names_it_and_the_release(tmp_path):
    write_cifar100_c(tmp_path, corruptions=("zoom_blur",))
    with pytest.raises(FileNotFoundError, match=r"no gaussian_noise\.npy in .*CIFAR-100-C") as info:
        load_cifar100_c(tmp_path, "gaussian_noise", 1)
    assert "zenodo.org/record/3555552" in str(info.value)
    assert "zoom_blur.npy" in str(info.value)  # what the folder holds
    with pytest.raises(FileNotFoundError, match="CIFAR-100-C: expected"):
        load_cifar100_c(tmp_path / "elsewhere", "zoom_blur", 1)


def test_cifar100_c_rejects_malformed_arrays(tmp_path):
    folder, _, _ = write_cifar100_c(tmp_path, corruptions=("zoom_blur",))
    np.save(folder / "gaussian_noise.npy", np.zeros((5 * PER_SEVERITY, 32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"should be uint8 of shape \(5 n, 32, 32, 3\)"):
        load_cifar100_c(folder, "gaussian_noise", 1)
    np.save(folder / "gaussian_noise.npy", np.zeros((5 * PER_SEVERITY + 1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"five severities stacked.*\(21, 32, 32, 3\)"):
        load_cifar100_c(folder, "gaussian_noise", 1)
    np.save(folder / "labels.npy", np.zeros(7, np.int64))
    with pytest.raises(ValueError, match="should hold 20 integer labels"):
        load_cifar100_c(folder, "zoom_blur", 1)
    np.save(folder / "labels.npy", np.full(5 * PER_SEVERITY, 100, np.int64))
    with pytest.raises(ValueError, match=r"fine labels in 0\.\.99.*spans 100\.\.100"):
        load_cifar100_c(folder, "zoom_blur", 1)


@pytest.mark.parametrize("severity", [0, 6, True, 2.0, "3"])
def test_severity_outside_one_to_five_is_rejected(tmp_path, severity):
    write_cifar100_c(tmp_path)
    with pytest.raises(
        ValueError, match=r"severity should be an integer( >= 1 and <= 5)?, but got"
    ):
        load_cifar100_c(tmp_path, "zoom_blur", severity)
    with pytest.raises(
        ValueError, match=r"severity should be an integer( >= 1 and <= 5)?, but got"
    ):
        load_tiny_imagenet_c(tmp_path, "zoom_blur", severity, ["n01443537"])


def test_unknown_corruption_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"corruption should be one of .*'fog'"):
        load_cifar100_c(tmp_path, "fog", 1)
    with pytest.raises(ValueError, match="gaussian_noise"):
        load_released(tmp_path, "tiny-imagenet", "fog", 1)


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
    write_tiny_imagenet_c(tmp_path, {"glass_blur": [1]}, per_class=1)
    write_tiny_imagenet_c(tmp_path, {"glass_blur": [2]}, per_class=2)
    folder = tmp_path / "Tiny-ImageNet-C"
    assert load_tiny_imagenet_c(folder, "glass_blur", 1, list(CLASS_COLOURS))[0].shape[0] == 3
    assert load_tiny_imagenet_c(folder, "glass_blur", 2, list(CLASS_COLOURS))[0].shape[0] == 6


def test_tiny_imagenet_c_errors_say_what_was_expected(tmp_path):
    write_tiny_imagenet_c(tmp_path, {"zoom_blur": [1]}, wnids=["n01443537", "n01629819"])
    with pytest.raises(FileNotFoundError, match=r"no zoom_blur/2/ .*<wnid>/\*\.JPEG"):
        load_tiny_imagenet_c(tmp_path, "zoom_blur", 2, ["n01443537", "n01629819"])
    with pytest.raises(ValueError, match=r"not in wnids: \['n01629819'\]"):
        load_tiny_imagenet_c(tmp_path, "zoom_blur", 1, ["n01443537"])
    with pytest.raises(FileNotFoundError, match=r"lacks \['n09999999'\]"):
        load_tiny_imagenet_c(tmp_path, "zoom_blur", 1, list(CLASS_COLOURS))
    with pytest.raises(ValueError, match="distinct"):
        load_tiny_imagenet_c(tmp_path, "zoom_blur", 1, ["n01443537", "n01443537"])
    with pytest.raises(FileNotFoundError, match="Tiny-ImageNet-C: expected"):
        load_tiny_imagenet_c(tmp_path / "missing", "zoom_blur", 1, ["n01443537"])
    empty = tmp_path / "Tiny-ImageNet-C" / "zoom_blur" / "1" / "n01443537"
    for path in empty.iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError, match="expected JPEG files in .*n01443537"):
        load_tiny_imagenet_c(tmp_path, "zoom_blur", 1, ["n01443537", "n01629819"])


# ---------------------------------------------------------------------------------------------
# available_released and load_released


def test_available_released_lists_what_each_folder_holds(tmp_path):
    folder, _, _ = write_cifar100_c(tmp_path / "c", corruptions=("zoom_blur", "gaussian_noise"))
    np.save(folder / "fog.npy", np.zeros((5, 32, 32, 3), np.uint8))  # not one of ours
    assert available_released(tmp_path / "c", "cifar100") == {
        "gaussian_noise": [1, 2, 3, 4, 5],
        "zoom_blur": [1, 2, 3, 4, 5],
    }
    write_tiny_imagenet_c(tmp_path / "t", {"zoom_blur": [5], "shot_noise": [3, 1]}, per_class=1)
    (tmp_path / "t" / "Tiny-ImageNet-C" / "shot_noise" / "4").mkdir()  # empty: not there
    found = available_released(tmp_path / "t" / "Tiny-ImageNet-C", "tiny-imagenet")
    assert found == {"shot_noise": [1, 3], "zoom_blur": [5]}
    assert list(found) == [name for name in CORRUPTIONS if name in found]
    assert available_released(tmp_path / "t", "cifar100") == {}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        available_released(tmp_path / "nowhere", "tiny-imagenet")


def test_load_released_dispatches_on_the_data_set(tmp_path):
    write_cifar100_c(tmp_path)
    write_tiny_imagenet_c(tmp_path, {"defocus_blur": [4]}, per_class=1)
    cifar_images, cifar_labels = load_released(tmp_path, "cifar100", "zoom_blur", 4)
    expected_images, expected_labels = load_cifar100_c(tmp_path, "zoom_blur", 4)
    assert torch.equal(cifar_images, expected_images)
    assert torch.equal(cifar_labels, expected_labels)
    # Without classes, the sorted class folders: the order of the Tiny ImageNet loader.
    tiny_images, tiny_labels = load_released(tmp_path, "tiny-imagenet", "defocus_blur", 4)
    assert tiny_images.shape == (3, 3, 64, 64)
    assert tiny_labels.tolist() == [0, 1, 2]
    _, given_order = load_released(
        tmp_path, "tiny-imagenet", "defocus_blur", 4, ["n09999999", "n01629819", "n01443537"]
    )
    assert given_order.tolist() == [2, 1, 0]


@pytest.mark.parametrize("dataset", ["fashion-mnist", "synthetic"])
def test_data_sets_without_a_release_are_refused(tmp_path, dataset):
    with pytest.raises(ValueError, match="no released corrupted test set.*corrupt"):
        load_released(tmp_path, dataset, "zoom_blur", 1)
    with pytest.raises(ValueError, match="no released corrupted test set"):
        available_released(tmp_path, dataset)
    with pytest.raises(
        ValueError, match="dataset should be one of 'cifar100', 'tiny-imagenet', but got 'imagenet'"
    ):
        load_released(tmp_path, "imagenet", "zoom_blur", 1)


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
