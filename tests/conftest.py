"""Shared fixtures and helpers: real Fashion-MNIST data and the activations of a first conv layer.

The real-data tests need Debian's ``dataset-fashion-mnist`` package (``make data`` installs
it). Without it they fail with that instruction instead of being skipped, so a green run always
means the real data were checked.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dropcluster.data import fashion_mnist

#: Images taken from the start of the Fashion-MNIST test split by the activation fixture.
N_ACTIVATION_IMAGES = 128


def require_fashion_mnist() -> None:
    """Fail the calling test, with the install command, when the real files are missing."""
    names = [stem + ".gz" for stems in fashion_mnist.SPLIT_FILES.values() for stem in stems]
    missing = [name for name in names if not (fashion_mnist.DEFAULT_ROOT / name).is_file()]
    if missing:
        pytest.fail(
            f"Fashion-MNIST is missing from {fashion_mnist.DEFAULT_ROOT} ({missing}); run "
            f"`apt-get install dataset-fashion-mnist` (or `make data`)",
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
