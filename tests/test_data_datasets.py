"""Tests of `dropcluster.data.datasets`: each loader on files generated in the official layout."""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import tarfile
import zipfile

import numpy as np
import pytest
import torch

from dropcluster.data import datasets
from dropcluster.data.datasets import ImageDataset, load_dataset, make_synthetic
from dropcluster.data.downloads import download_cifar100, download_tiny_imagenet
from dropcluster.data.fashion_mnist import FASHION_MNIST_CLASSES, SPLIT_FILES, write_idx

CIFAR_NAMES = [f"class_{k:03d}" for k in range(100)]


def write_cifar100(root, n_train=12, n_test=5, seed=0, str_keys=False, protocol=2):
    """The extracted python-version archive: pickles with the official keys, in ``root``."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    key = (lambda name: name) if str_keys else (lambda name: name.encode())
    arrays = {}
    for split, n_examples in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n_examples, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, size=n_examples).tolist()
        entry = {
            key("filenames"): [key(f"img_{i}.png") for i in range(n_examples)],
            key("batch_label"): key(f"{split} batch 1 of 1"),
            key("fine_labels"): fine,
            key("coarse_labels"): [label // 5 for label in fine],
            key("data"): data,
        }
        (folder / split).write_bytes(pickle.dumps(entry, protocol=protocol))
        arrays[split] = (data, fine)
    meta = {
        key("fine_label_names"): [key(name) for name in CIFAR_NAMES],
        key("coarse_label_names"): [key(f"super_{k}") for k in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    # Smaller than the official set on purpose: the marker records the counts it holds.
    counts = {"classes": len(CIFAR_NAMES), "train": n_train, "test": n_test}
    datasets.write_completion_marker(folder, "cifar100", counts)
    return folder, arrays


# ---------------------------------------------------------------------------------------------
# CIFAR-100


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar100_images_are_rows_of_rgb_planes(tmp_path, split):
    _, arrays = write_cifar100(tmp_path)
    data, fine = arrays[split]
    dataset = load_dataset("cifar100", split, tmp_path)
    assert dataset.name == "cifar100"
    assert dataset.images.shape == (len(fine), 3, 32, 32)
    assert dataset.images.dtype == torch.uint8
    assert dataset.labels.dtype == torch.int64
    assert dataset.labels.tolist() == fine
    assert dataset.classes == CIFAR_NAMES
    # data[i, c * 1024 + y * 32 + x] is channel c, row y, column x.
    assert int(dataset.images[1, 2, 3, 4]) == int(data[1, 2 * 1024 + 3 * 32 + 4])
    assert np.array_equal(dataset.images.reshape(len(fine), -1).numpy(), data)


def test_cifar100_root_may_be_the_extracted_folder(tmp_path):
    folder, arrays = write_cifar100(tmp_path)
    dataset = load_dataset("cifar100", "test", folder)
    assert dataset.labels.tolist() == arrays["test"][1]


@pytest.mark.parametrize("protocol", [4, 5])
def test_cifar100_reads_newer_pickle_protocols(tmp_path, protocol):
    _, arrays = write_cifar100(tmp_path, protocol=protocol)
    dataset = load_dataset("cifar100", "train", tmp_path)
    assert np.array_equal(dataset.images.reshape(len(dataset), -1).numpy(), arrays["train"][0])


def test_cifar100_reads_python2_style_text_keys(tmp_path):
    _, arrays = write_cifar100(tmp_path, str_keys=True)
    dataset = load_dataset("cifar100", "train", tmp_path)
    assert dataset.labels.tolist() == arrays["train"][1]
    assert dataset.classes == CIFAR_NAMES


def test_cifar100_missing_folder_names_the_layout_and_the_contents(tmp_path):
    (tmp_path / "something_else").mkdir()
    with pytest.raises(FileNotFoundError, match="cifar-100-python") as info:
        load_dataset("cifar100", "train", tmp_path)
    message = str(info.value)
    assert "train, test and meta" in message
    assert "something_else/" in message


def test_cifar100_unextracted_archive_is_pointed_out(tmp_path):
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="extract it"):
        load_dataset("cifar100", "train", tmp_path)


def test_cifar100_missing_split_file_is_reported(tmp_path):
    folder, _ = write_cifar100(tmp_path)
    (folder / "test").unlink()
    listing = r"\['.dropcluster-complete.json', 'meta', 'train'\]"
    with pytest.raises(FileNotFoundError, match=r"'test' split.*holds " + listing):
        load_dataset("cifar100", "test", tmp_path)


def test_cifar100_missing_key_is_named(tmp_path):
    folder, _ = write_cifar100(tmp_path)
    (folder / "train").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(ValueError, match="'fine_labels'"):
        load_dataset("cifar100", "train", tmp_path)


def test_cifar100_wrong_data_shape_is_reported(tmp_path):
    folder, _ = write_cifar100(tmp_path)
    entry = {b"data": np.zeros((2, 1024), np.uint8), b"fine_labels": [0, 1]}
    (folder / "train").write_bytes(pickle.dumps(entry))
    with pytest.raises(ValueError, match=r"shape \(N, 3072\).*\(2, 1024\)"):
        load_dataset("cifar100", "train", tmp_path)


def test_cifar100_labels_outside_the_names_are_reported(tmp_path):
    folder, _ = write_cifar100(tmp_path)
    entry = {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]}
    (folder / "train").write_bytes(pickle.dumps(entry))
    with pytest.raises(ValueError, match=r"0\.\.99"):
        load_dataset("cifar100", "train", tmp_path)


def test_cifar100_truncated_pickle_is_reported(tmp_path):
    folder, _ = write_cifar100(tmp_path)
    (folder / "meta").write_bytes((folder / "meta").read_bytes()[:20])
    with pytest.raises(ValueError, match="not a readable CIFAR pickle"):
        load_dataset("cifar100", "train", tmp_path)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_cifar100_pickle_cannot_run_code(tmp_path):
    folder, _ = write_cifar100(tmp_path)
    (folder / "train").write_bytes(pickle.dumps({b"data": _RunsCode()}))
    with pytest.raises(ValueError, match="only lists and numpy arrays"):
        load_dataset("cifar100", "train", tmp_path)


# ---------------------------------------------------------------------------------------------
# Tiny ImageNet

WNIDS = ["n02", "n01", "n03"]  # wnids.txt is not sorted; labels follow the sorted ids
COLOURS = {"n01": (250, 10, 10), "n02": (10, 250, 10), "n03": (10, 10, 250)}


@pytest.fixture
def tiny_imagenet(tmp_path):
    """A 3-class Tiny ImageNet in the official layout, 2 training images per class."""
    image_module = pytest.importorskip("PIL.Image")
    folder = tmp_path / "tiny-imagenet-200"
    folder.mkdir()
    (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    words = ["n00\tentity", "n01\tgoldfish, Carassius auratus", "n02\ttabby, tabby cat"]
    (folder / "words.txt").write_text("\n".join(words) + "\n")  # n03 has no entry
    for wnid in WNIDS:
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(2):
            image = image_module.new("RGB", (64, 64), COLOURS[wnid])
            image.save(images / f"{wnid}_{i}.JPEG", quality=95)
    val_images = folder / "val" / "images"
    val_images.mkdir(parents=True)
    annotations = [("val_0.JPEG", "n03"), ("val_1.JPEG", "n01"), ("val_2.JPEG", "n02")]
    for name, wnid in annotations:
        image_module.new("RGB", (64, 64), COLOURS[wnid]).save(val_images / name, quality=95)
    # A greyscale JPEG, as some official images are.
    image_module.new("L", (64, 64), 128).save(val_images / "val_3.JPEG", quality=95)
    annotations.append(("val_3.JPEG", "n02"))
    lines = [f"{name}\t{wnid}\t0\t1\t62\t63" for name, wnid in annotations]
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    test_images = folder / "test" / "images"  # unlabelled: ignored
    test_images.mkdir(parents=True)
    counts = {"classes": len(WNIDS), "train": 2 * len(WNIDS), "test": len(annotations)}
    datasets.write_completion_marker(folder, "tiny-imagenet", counts)
    return tmp_path


def test_tiny_imagenet_train_labels_follow_sorted_wnids(tiny_imagenet):
    dataset = load_dataset("tiny-imagenet", "train", tiny_imagenet)
    assert dataset.images.shape == (6, 3, 64, 64)
    assert dataset.images.dtype == torch.uint8
    assert dataset.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert dataset.classes == ["goldfish, Carassius auratus", "tabby, tabby cat", "n03"]
    mean_colour = dataset.images.float().mean(dim=(2, 3))
    expected = torch.tensor([COLOURS[w] for w in ("n01", "n01", "n02", "n02", "n03", "n03")])
    assert torch.allclose(mean_colour, expected.float(), atol=4)


@pytest.mark.parametrize("split", ["test", "val"])
def test_tiny_imagenet_test_split_is_the_validation_set(tiny_imagenet, split):
    dataset = load_dataset("tiny-imagenet", split, tiny_imagenet)
    assert dataset.images.shape == (4, 3, 64, 64)
    assert dataset.labels.tolist() == [2, 0, 1, 1]
    grey = dataset.images[3].float()
    assert torch.allclose(grey, torch.full_like(grey, 128), atol=2)  # greyscale -> RGB


def test_tiny_imagenet_root_may_be_the_extracted_folder(tiny_imagenet):
    dataset = load_dataset("tiny-imagenet", "test", tiny_imagenet / "tiny-imagenet-200")
    assert len(dataset) == 4


def test_tiny_imagenet_without_words_uses_wnids(tiny_imagenet):
    (tiny_imagenet / "tiny-imagenet-200" / "words.txt").unlink()
    assert load_dataset("tiny-imagenet", "test", tiny_imagenet).classes == ["n01", "n02", "n03"]


def test_tiny_imagenet_missing_folder_names_the_layout(tmp_path):
    (tmp_path / "tiny-imagenet-200.zip").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="wnids.txt, train/ and val/") as info:
        load_dataset("tiny-imagenet", "train", tmp_path)
    assert "tiny-imagenet-200.zip" in str(info.value)


def test_tiny_imagenet_missing_class_folder_is_reported(tiny_imagenet):
    folder = tiny_imagenet / "tiny-imagenet-200" / "train" / "n03" / "images"
    for path in folder.iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError, match=r"class n03.*is empty"):
        load_dataset("tiny-imagenet", "train", tiny_imagenet)


def test_tiny_imagenet_missing_annotations_are_reported(tiny_imagenet):
    (tiny_imagenet / "tiny-imagenet-200" / "val" / "val_annotations.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"val_annotations.txt.*holds \['images/'\]"):
        load_dataset("tiny-imagenet", "test", tiny_imagenet)


def test_tiny_imagenet_unknown_annotated_class_is_reported(tiny_imagenet):
    annotations = tiny_imagenet / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match=r"line 5: class 'n99' is not in wnids.txt"):
        load_dataset("tiny-imagenet", "test", tiny_imagenet)


def test_tiny_imagenet_missing_validation_image_is_reported(tiny_imagenet):
    (tiny_imagenet / "tiny-imagenet-200" / "val" / "images" / "val_2.JPEG").unlink()
    with pytest.raises(FileNotFoundError, match=r"line 3: expected the image .*val_2.JPEG"):
        load_dataset("tiny-imagenet", "test", tiny_imagenet)


def test_tiny_imagenet_wrong_image_size_is_reported(tiny_imagenet):
    image_module = pytest.importorskip("PIL.Image")
    path = tiny_imagenet / "tiny-imagenet-200" / "val" / "images" / "val_1.JPEG"
    image_module.new("RGB", (32, 48)).save(path)
    with pytest.raises(ValueError, match=r"val_1.JPEG should be a 64x64 image, but is 32x48"):
        load_dataset("tiny-imagenet", "test", tiny_imagenet)


def test_tiny_imagenet_corrupt_jpeg_is_reported(tiny_imagenet):
    path = tiny_imagenet / "tiny-imagenet-200" / "val" / "images" / "val_1.JPEG"
    path.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="val_1.JPEG is not a readable image"):
        load_dataset("tiny-imagenet", "test", tiny_imagenet)


def test_tiny_imagenet_without_pillow_says_how_to_install_it(tiny_imagenet, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="pip install pillow"):
        load_dataset("tiny-imagenet", "test", tiny_imagenet)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST and synthetic


def test_fashion_mnist_delegates_to_the_idx_loader(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    image_stem, label_stem = SPLIT_FILES["test"]
    write_idx(tmp_path / (image_stem + ".gz"), images)
    write_idx(tmp_path / (label_stem + ".gz"), labels)
    dataset = load_dataset("fashion-mnist", "test", tmp_path)
    assert dataset.images.shape == (7, 1, 28, 28)
    assert np.array_equal(dataset.images[:, 0].numpy(), images)
    assert dataset.labels.tolist() == labels.tolist()
    assert dataset.classes == list(FASHION_MNIST_CLASSES)


def test_synthetic_is_deterministic_balanced_and_split_dependent():
    first = load_dataset("synthetic", "train")
    again = load_dataset("synthetic", "train")
    test = load_dataset("synthetic", "test")
    assert first.images.shape == (datasets.SYNTHETIC_SIZES["train"], 3, 32, 32)
    assert torch.equal(first.images, again.images)
    assert torch.equal(first.labels, again.labels)
    assert len(test) == datasets.SYNTHETIC_SIZES["test"]
    assert not torch.equal(first.images[: len(test)], test.images)
    assert first.labels.bincount().tolist() == [len(first) // 10] * 10
    assert first.num_classes == 10


def test_synthetic_classes_are_gratings_of_their_orientation():
    images, labels = make_synthetic(200, seed=3, channels=1, size=28)
    assert images.shape == (200, 1, 28, 28)
    pixels = images[:, 0].float()
    # Vertical stripes vary along rows (x), horizontal ones along columns (y).
    variation_x = pixels.diff(dim=2).abs().mean(dim=(1, 2))
    variation_y = pixels.diff(dim=1).abs().mean(dim=(1, 2))
    vertical = labels % 2 == 0
    assert (variation_x[vertical] > variation_y[vertical]).all()
    assert (variation_y[~vertical] > variation_x[~vertical]).all()


def test_unknown_name_or_split_is_rejected():
    with pytest.raises(ValueError, match="name should be one of"):
        load_dataset("imagenet", "train")
    with pytest.raises(ValueError, match="split should be one of 'train', 'test', but got 'val'"):
        load_dataset("cifar100", "val")


def test_image_dataset_checks_shapes_and_subsets():
    with pytest.raises(ValueError, match="4 dimensional uint8"):
        ImageDataset(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.int64), ["a"], "x")
    with pytest.raises(ValueError, match=r"int64 of shape \(2,\)"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3), ["a"], "x")
    dataset = load_dataset("synthetic", "test")
    part = dataset.subset(torch.tensor([0, 5]))
    assert torch.equal(part.images, dataset.images[[0, 5]])
    assert part.classes == dataset.classes


# ---------------------------------------------------------------------------------------------
# Downloads, from local file:// archives


def md5_of(path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def test_download_cifar100_verifies_and_extracts(tmp_path):
    source = tmp_path / "source"
    write_cifar100(source, n_train=3, n_test=2)
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "cifar-100-python", arcname="cifar-100-python")
    root = tmp_path / "data"
    folder = download_cifar100(root, url=archive.as_uri(), md5=md5_of(archive))
    assert folder == root / "cifar-100-python"
    assert len(load_dataset("cifar100", "train", root)) == 3
    # Present: no second download (an unreachable URL is not opened).
    assert download_cifar100(root, url="file:///nonexistent") == folder


def test_download_with_wrong_checksum_leaves_nothing(tmp_path):
    archive = tmp_path / "cifar-100-python.tar.gz"
    archive.write_bytes(b"not the data set")
    root = tmp_path / "data"
    with pytest.raises(ValueError, match="MD5 .* differs from the expected 0+"):
        download_cifar100(root, url=archive.as_uri(), md5="0" * 32)
    assert list(root.iterdir()) == []


def test_download_tiny_imagenet_verifies_and_extracts(tiny_imagenet, tmp_path):
    archive = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted((tiny_imagenet / "tiny-imagenet-200").rglob("*")):
            zipped.write(path, path.relative_to(tiny_imagenet).as_posix())
    root = tmp_path / "data"
    folder = download_tiny_imagenet(root, url=archive.as_uri(), md5=md5_of(archive))
    assert folder == root / "tiny-imagenet-200"
    assert load_dataset("tiny-imagenet", "test", root).labels.tolist() == [2, 0, 1, 1]
