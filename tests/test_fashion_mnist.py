"""Tests of `dropcluster.data.fashion_mnist`: IDX parsing, error reports and the real files."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from conftest import require_fashion_mnist

from dropcluster.data import fashion_mnist
from dropcluster.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    load_fashion_mnist,
    read_idx,
    write_idx,
)


def random_split(n_examples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n_examples, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n_examples, dtype=np.uint8)
    return images, labels


def write_split(folder, images, labels, split: str = "train", suffix: str = ".gz") -> None:
    image_stem, label_stem = fashion_mnist.SPLIT_FILES[split]
    write_idx(folder / (image_stem + suffix), images)
    write_idx(folder / (label_stem + suffix), labels)


# ---------------------------------------------------------------------------------------------
# IDX format


@pytest.mark.parametrize("name", ["data-idx3-ubyte", "data-idx3-ubyte.gz"])
def test_write_then_read_round_trips(tmp_path, name):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    path = write_idx(tmp_path / name, torch.from_numpy(array))
    np.testing.assert_array_equal(read_idx(path), array)


def test_written_file_has_the_idx_layout(tmp_path):
    images = np.full((2, 28, 28), 7, dtype=np.uint8)
    write_idx(tmp_path / "images", images)
    write_idx(tmp_path / "labels.gz", np.array([3, 4], dtype=np.uint8))
    raw = (tmp_path / "images").read_bytes()
    assert raw[:16] == bytes.fromhex("00000803 00000002 0000001c 0000001c")
    assert len(raw) == 16 + 2 * 28 * 28
    assert gzip.decompress((tmp_path / "labels.gz").read_bytes()) == bytes.fromhex(
        "00000801 00000002 03 04"
    )


def test_write_idx_rejects_other_dtypes(tmp_path):
    with pytest.raises(ValueError, match="uint8, but got int64"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="uint8, but got torch.float32"):
        write_idx(tmp_path / "x", torch.zeros(3))
    with pytest.raises(ValueError, match="1 to 255 dimensions"):
        write_idx(tmp_path / "x", np.uint8(3))


# ---------------------------------------------------------------------------------------------
# Loading generated splits


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize("split", ["train", "test"])
def test_generated_split_loads_exactly(tmp_path, split, suffix):
    images, labels = random_split(5)
    write_split(tmp_path, images, labels, split, suffix)
    loaded_images, loaded_labels = load_fashion_mnist(split, tmp_path)
    assert loaded_images.shape == (5, 1, 28, 28)
    assert loaded_images.dtype == torch.uint8
    assert loaded_labels.dtype == torch.int64
    np.testing.assert_array_equal(loaded_images[:, 0].numpy(), images)
    np.testing.assert_array_equal(loaded_labels.numpy(), labels)


def test_raw_file_is_preferred_over_gzip(tmp_path):
    images, labels = random_split(3, seed=1)
    write_split(tmp_path, images, labels, suffix="")
    write_split(tmp_path, 255 - images, labels, suffix=".gz")
    loaded_images, _ = load_fashion_mnist("train", str(tmp_path))
    np.testing.assert_array_equal(loaded_images[:, 0].numpy(), images)


def test_wrong_magic_number_is_rejected(tmp_path):
    images, labels = random_split(4)
    write_split(tmp_path, images, labels)
    # labels stored where the images belong: magic 0x00000801 instead of 0x00000803
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", labels)
    with pytest.raises(ValueError, match="0x00000803 of IDX images, but starts with 0x00000801"):
        load_fashion_mnist("train", tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x03" * 8))
    with pytest.raises(ValueError, match="magic number.*starts with 0x00000d03"):
        load_fashion_mnist("train", tmp_path)


def test_truncated_file_is_rejected(tmp_path):
    images, labels = random_split(4)
    write_split(tmp_path, images, labels, suffix="")
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"should have 3152 bytes.*has 3142 \(truncated\)"):
        load_fashion_mnist("train", tmp_path)
    path.write_bytes(path.read_bytes()[:9])
    with pytest.raises(ValueError, match="16-byte header"):
        load_fashion_mnist("train", tmp_path)


def test_truncated_gzip_is_rejected(tmp_path):
    images, labels = random_split(4)
    write_split(tmp_path, images, labels)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(ValueError, match="cannot be decompressed"):
        load_fashion_mnist("train", tmp_path)


def test_trailing_bytes_are_rejected(tmp_path):
    images, labels = random_split(4)
    write_split(tmp_path, images, labels, suffix="")
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(ValueError, match="trailing bytes"):
        load_fashion_mnist("train", tmp_path)


def test_count_mismatch_is_rejected(tmp_path):
    images, labels = random_split(6)
    write_split(tmp_path, images, labels[:5])
    with pytest.raises(ValueError, match="6 images but .* 5 labels"):
        load_fashion_mnist("train", tmp_path)


def test_wrong_image_size_is_rejected(tmp_path):
    write_split(tmp_path, np.zeros((2, 28, 27), dtype=np.uint8), np.zeros(2, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"shape \(N, 28, 28\).*\(2, 28, 27\)"):
        load_fashion_mnist("train", tmp_path)


def test_label_out_of_range_is_rejected(tmp_path):
    images, labels = random_split(3)
    labels[1] = 10
    write_split(tmp_path, images, labels)
    with pytest.raises(ValueError, match=r"labels in 0\.\.9, but holds 10"):
        load_fashion_mnist("train", tmp_path)


def test_missing_folder_names_the_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_fashion_mnist("test", tmp_path / "nowhere")
    message = str(error.value)
    assert "t10k-images-idx3-ubyte[.gz]" in message
    assert "t10k-labels-idx1-ubyte[.gz]" in message
    assert "does not exist" in message


def test_missing_file_lists_what_the_folder_holds(tmp_path):
    images, labels = random_split(2)
    write_split(tmp_path, images, labels)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"train-labels-idx1-ubyte\[\.gz\] is missing"):
        load_fashion_mnist("train", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"holds \['train-images-idx3-ubyte\.gz'\]"):
        load_fashion_mnist("train", tmp_path)


def test_missing_default_folder_says_how_to_get_the_data(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEFAULT_ROOT", tmp_path / "absent")
    monkeypatch.setenv("DROPCLUSTER_DATA", str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError) as error:
        load_fashion_mnist("train")
    message = str(error.value)
    assert f"in {tmp_path / 'absent'} or {tmp_path / 'data' / 'fashion-mnist'}, but" in message
    assert "get the data with `dropcluster download fashion-mnist` or" in message
    assert "`apt-get install dataset-fashion-mnist`" in message


def test_default_is_debians_folder_then_the_downloaded_one(tmp_path, monkeypatch):
    debian, downloaded = tmp_path / "debian", tmp_path / "data" / "fashion-mnist"
    monkeypatch.setattr(fashion_mnist, "DEFAULT_ROOT", debian)
    monkeypatch.setenv("DROPCLUSTER_DATA", str(tmp_path / "data"))
    assert fashion_mnist.fashion_mnist_folders() == [debian, downloaded]
    debian.mkdir()
    downloaded.mkdir(parents=True)
    write_split(downloaded, *random_split(3, seed=1))
    debian_images, debian_labels = random_split(2, seed=2)
    write_idx(debian / "train-images-idx3-ubyte.gz", debian_images)
    # Debian's folder without its labels: the downloaded folder holds the whole split.
    assert load_fashion_mnist("train")[1].tolist() == random_split(3, seed=1)[1].tolist()
    write_idx(debian / "train-labels-idx1-ubyte.gz", debian_labels)
    images, labels = load_fashion_mnist("train")  # now Debian's, first
    assert np.array_equal(images[:, 0].numpy(), debian_images)
    assert labels.tolist() == debian_labels.tolist()


def test_given_folder_or_its_fashion_mnist_subfolder(tmp_path):
    images, labels = random_split(3)
    (tmp_path / "fashion-mnist").mkdir()
    write_split(tmp_path / "fashion-mnist", images, labels)
    loaded, _ = load_fashion_mnist("train", tmp_path)
    assert np.array_equal(loaded[:, 0].numpy(), images)
    with pytest.raises(
        FileNotFoundError,
        match=r"t10k-images-idx3-ubyte\[\.gz\] is missing from .*; get the data with "
        r"`dropcluster download fashion-mnist --data-dir .*`",
    ):
        load_fashion_mnist("test", tmp_path)


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="split should be one of 'train', 'test', but got 'valid'"):
        load_fashion_mnist("valid")


def test_official_size_with_wrong_content_fails_verification(tmp_path):
    # 10000 examples is the official test size, so the checksum applies; random content fails.
    images, labels = random_split(10000, seed=3)
    write_split(tmp_path, images, labels, split="test", suffix="")
    with pytest.raises(ValueError, match="SHA-256"):
        load_fashion_mnist("test", tmp_path)
    loaded_images, _ = load_fashion_mnist("test", tmp_path, verify=False)
    assert loaded_images.shape == (10000, 1, 28, 28)


# ---------------------------------------------------------------------------------------------
# The real data (Debian's dataset-fashion-mnist)


def test_class_names():
    assert len(FASHION_MNIST_CLASSES) == 10
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top"
    assert FASHION_MNIST_CLASSES[9] == "Ankle boot"


@pytest.mark.parametrize(("split", "n_examples"), [("train", 60000), ("test", 10000)])
def test_real_split_loads_and_verifies(split, n_examples):
    require_fashion_mnist()
    images, labels = load_fashion_mnist(split, verify=True)
    assert images.shape == (n_examples, 1, 28, 28)
    assert images.dtype == torch.uint8
    assert labels.shape == (n_examples,)
    assert labels.dtype == torch.int64
    assert labels.bincount(minlength=10).tolist() == [n_examples // 10] * 10
    assert labels[0].item() == 9  # both splits start with an ankle boot
    assert images.max().item() == 255
    assert (images.flatten(1).amax(dim=1) > 0).all()  # no blank image
