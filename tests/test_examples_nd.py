"""The 1-D and 3-D examples (examples/sequence_1d.py, examples/volume_3d.py) at a tiny size.

Each runs through its ``main([...])`` on the real Fashion-MNIST files, with a fixed seed, and
must learn (test accuracy far above the 10 % of chance after two epochs), fit its DropCluster
layer at the scheduled epoch and no other, and leave it fitted with structured channels.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from conftest import require_fashion_mnist
from torch import nn

from dropcluster.nn import DropCluster1d, DropCluster3d

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    """The example script ``examples/NAME.py`` as a module (registered in ``sys.modules``:
    its dataclass looks its module up there while it is being built)."""
    key = f"example_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def test_sequences_are_the_rows_of_the_images():
    sequence_1d = load_example("sequence_1d")
    images = torch.arange(2 * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8)
    images = images.reshape(2, 1, 28, 28)
    sequences = sequence_1d.as_sequences(images)
    assert sequences.shape == (2, 28, 28) and sequences.dtype == torch.float32
    # Feature c of step t of image n is the pixel in row t, column c.
    expected = (images[1, 0, 5, 3].float() / 255 - sequence_1d.MEAN) / sequence_1d.STD
    assert sequences[1, 3, 5] == expected


def test_volumes_stack_consecutive_images_of_one_class():
    volume_3d = load_example("volume_3d")
    labels = torch.tensor([0, 1, 0, 0, 1, 1, 0, 2])
    images = torch.arange(8, dtype=torch.uint8).reshape(8, 1, 1, 1).expand(8, 1, 28, 28)
    volumes, classes = volume_3d.stack_volumes(images, labels, depth=2)
    # Class 0: images 0, 2, 3, 6 -> runs (0, 2), (3, 6); class 1: 1, 4, 5 -> (1, 4) and 5 is
    # left over; class 2: image 7 alone, no volume. Ordered by the first image.
    assert volumes.shape == (3, 1, 2, 28, 28)
    assert classes.tolist() == [0, 1, 0]
    raw = volumes[:, 0, :, 0, 0] * volume_3d.STD + volume_3d.MEAN  # undo the normalisation
    assert torch.allclose(raw * 255, torch.tensor([[0.0, 2.0], [1.0, 4.0], [3.0, 6.0]]), atol=1e-4)


def test_sequence_example_learns_and_refits_on_schedule(capsys):
    require_fashion_mnist()
    sequence_1d = load_example("sequence_1d")
    tiny = ["--train-images", "1000", "--test-images", "500", "--width", "16"]
    tiny += ["--batch-size", "32", "--fit-images", "64", "--seed", "0"]
    run = sequence_1d.main(["--epochs", "2", "--refit-every", "1", *tiny])

    assert run.accuracy[-1] > 50.0  # 66.6 % measured; chance is 10 %
    assert run.loss[1] < run.loss[0]
    assert list(run.refits) == [1]  # every=1: first at the start of epoch 1, not epoch 0
    fit = run.refits[1]
    assert fit.layers == ["drop"] and fit.channels == [16] and fit.images == 64
    layer = run.model.drop
    assert isinstance(layer, DropCluster1d) and layer.fitted
    assert layer.labels.shape == (16, 28)
    assert 0 < int(layer.structured.sum()) == fit.structured[0] <= 16
    assert "refit: " in capsys.readouterr().out

    baseline = sequence_1d.main(["--epochs", "2", "--refit-every", "1", "--no-dropcluster", *tiny])
    assert isinstance(baseline.model.drop, nn.Identity) and baseline.refits == {}
    assert baseline.accuracy[-1] > 50.0


def test_volume_example_learns_and_refits_on_schedule():
    require_fashion_mnist()
    volume_3d = load_example("volume_3d")
    run = volume_3d.main(
        ["--epochs", "2", "--refit-every", "1", "--train-images", "1600", "--test-images", "800"]
        + ["--depth", "4", "--width", "4", "--batch-size", "16", "--fit-images", "32"]
    )

    assert run.accuracy[-1] > 45.0  # 66.8 % measured; chance is 10 %
    assert run.loss[1] < run.loss[0]
    assert list(run.refits) == [1]
    fit = run.refits[1]
    assert fit.layers == ["drop"] and fit.channels == [4] and fit.images == 32
    layer = run.model.drop
    assert isinstance(layer, DropCluster3d) and layer.fitted
    assert layer.labels.shape == (4, 4, 14, 14)
    assert 0 < int(layer.structured.sum()) == fit.structured[0] <= 4
