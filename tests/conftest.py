"""Shared fixtures and helpers: real Fashion-MNIST data and the activations of a first conv layer.

The real-data tests need the Fashion-MNIST files: Debian's ``dataset-fashion-mnist`` package or
``dropcluster download fashion-mnist`` (``make data`` takes the first, else the second). Without
them they fail with that instruction instead of being skipped, so a green run always means the
real data were checked.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from dropcluster.data import fashion_mnist

# Under pytest-xdist (`make test` runs two workers on a two-core machine) each worker and the
# processes it starts take one thread: two workers of two threads each on two cores run torch
# 10x slower, not 2x faster.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

#: Images taken from the start of the Fashion-MNIST test split by the activation fixture.
N_ACTIVATION_IMAGES = 128


def require_fashion_mnist() -> None:
    """Fail the calling test, with the install command, when no folder the loader looks in
    (Debian's, then the downloaded one) holds the real files."""
    names = [stem + ".gz" for stems in fashion_mnist.SPLIT_FILES.values() for stem in stems]
    folders = fashion_mnist.fashion_mnist_folders()
    if not any(all((folder / name).is_file() for name in names) for folder in folders):
        pytest.fail(
            f"Fashion-MNIST is missing from {' and '.join(map(str, folders))}; run `make data` "
            f"(Debian's dataset-fashion-mnist, else `dropcluster download fashion-mnist`)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def fashion_mnist_activations() -> torch.Tensor:
    """(128, 16, 28, 28) float32 ReLU outputs of a seeded, untrained first conv layer.

    The first 128 Fashion-MNIST test images, scaled to [0, 1], go through
    ``nn.Conv2d(1, 16, 5, padding=2)`` with its default initialisation after
    ``torch.manual_seed(0)``, then ReLU: the layer where DropCluster clusters (paper, section 3).
    The global RNG state is restored afterwards so the fixture does not reseed other tests.
    """
    require_fashion_mnist()
    images, _ = fashion_mnist.load_fashion_mnist("test")
    pixels = images[:N_ACTIVATION_IMAGES].to(torch.float32) / 255
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        conv = nn.Conv2d(1, 16, 5, padding=2)
    with torch.no_grad():
        return torch.relu(conv(pixels))


def compile_counting_graphs(module: nn.Module):
    """``torch.compile(module)`` with a backend that runs graphs eagerly and counts them.

    Returns (compiled module, list that grows by one per compiled graph).
    """
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    return torch.compile(module, backend=counting_backend), graphs
