"""A 1-D convnet with DropCluster1d: rows of Fashion-MNIST images read as sequences.

Each 28 x 28 image is read top to bottom as a sequence of 28 steps, one step per row; the 28
pixels of a row are the step's 28 features. The input of the network is therefore (N, 28, 28)
= (N, C = 28 features, L = 28 steps): the 28 columns are the channels, the rows are time. This
reading, not the 784 pixels as one single-channel sequence, is the one where a Conv1d makes
sense: consecutive rows of a garment change smoothly, so a kernel along the steps sees a smooth
signal and the clusters ReNA finds on the 1-D chain of the stem's output are contiguous
stretches of the garment (a collar, a waist, the hem). A 784-long sequence jumps from a row's
right edge to the next row's left edge every 28 steps: a seam that a 1-D kernel and the 1-D
chain graph would straddle.

The network: a stem Conv1d(28, 32, 3)-BatchNorm-ReLU on the 28 steps, a DropCluster1d after
the stem's ReLU (on its (32, 28) maps), two conv blocks that halve the length (28 -> 14 -> 7),
global average pooling and a linear head; plain SGD with momentum. The clusters are fitted by
``fit_clusters`` from the training sequences at the start of epoch ``--refit-every``, then every
``--refit-every`` epochs (``RefitSchedule``); before the first fit the layer is the identity.
The DropCluster paper is 2-D only: DropCluster on sequences, the 1-D grid graph (each step
joined to the previous and the next), and the defaults below (7 clusters on 28 steps, p = 0.15,
one cluster dropped per structured channel) are this project's choices::

    python examples/sequence_1d.py                    # DropCluster1d
    python examples/sequence_1d.py --no-dropcluster   # the same network without it

Prints the training loss and the test accuracy (the whole test split) after every epoch, and
the structured channels found at every refit.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dropcluster.data.fashion_mnist import load_fashion_mnist
from dropcluster.nn import ClusterFit, DropCluster1d, RefitSchedule

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST's training-set pixel statistics
FEATURES = STEPS = 28  # a row of 28 pixels per step, 28 rows per image


def as_sequences(images: Tensor) -> Tensor:
    """(N, 1, 28, 28) uint8 images -> (N, 28 features, 28 steps) float32 sequences.

    Step ``t`` is row ``t`` of the image; feature ``c`` of a step is the pixel in column ``c``
    (normalised with the training set's mean and standard deviation).
    """
    pixels = (images[:, 0].float() / 255 - MEAN) / STD  # (N, row, column)
    return pixels.transpose(1, 2).contiguous()  # (N, column = feature, row = step)


def conv_block(inputs: int, outputs: int, stride: int) -> nn.Sequential:
    """Conv1d(3)-BatchNorm-ReLU; ``stride`` 2 halves the length."""
    return nn.Sequential(
        nn.Conv1d(inputs, outputs, 3, stride, 1, bias=False),
        nn.BatchNorm1d(outputs),
        nn.ReLU(inplace=True),
    )


class SequenceNet(nn.Module):
    """stem -> drop -> blocks -> global average pooling -> head.

    Args:
        width: channels of the stem; the blocks have 2x and 4x as many.
        drop: the layer after the stem's ReLU (a DropCluster1d, or nn.Identity for none).

    Shape:
        input (N, 28, 28) float32 sequences -> (N, 10) logits.
    """

    def __init__(self, width: int, drop: nn.Module) -> None:
        super().__init__()
        self.stem = conv_block(FEATURES, width, 1)
        self.drop = drop
        self.blocks = nn.Sequential(
            conv_block(width, 2 * width, 2), conv_block(2 * width, 4 * width, 2)
        )
        self.head = nn.Linear(4 * width, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.drop(self.stem(x)))
        return self.head(x.mean(dim=2))


@dataclass
class Run:
    """What :func:`main` trained and measured.

    Attributes:
        model: the trained network.
        accuracy: test accuracy (%) after each epoch.
        loss: mean training loss of each epoch.
        refits: the epochs at whose start the clusters were refitted, and the fits.
    """

    model: SequenceNet
    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    refits: dict[int, ClusterFit] = field(default_factory=dict)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-images", type=int, default=20000, help="first N training images")
    parser.add_argument("--test-images", type=int, default=10000, help="first N test images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--width", type=int, default=32, help="channels of the stem")
    parser.add_argument("--p", type=float, default=0.15, help="DropCluster1d drop rate")
    parser.add_argument("--n-clusters", type=int, default=7, help="clusters per channel")
    parser.add_argument("--refit-every", type=int, default=2, help="epochs between refits")
    parser.add_argument("--fit-images", type=int, default=512, help="sequences per refit")
    parser.add_argument("--no-dropcluster", action="store_true", help="the baseline: no layer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST files")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Run:
    """Train and evaluate; ``argv`` as on the command line (None: ``sys.argv[1:]``)."""
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)  # initial weights and the layer's cluster draws

    train_images, train_labels = load_fashion_mnist("train", args.data_dir)
    test_images, test_labels = load_fashion_mnist("test", args.data_dir)
    train_x = as_sequences(train_images[: args.train_images]).to(device)
    train_y = train_labels[: args.train_images].to(device)
    test_x = as_sequences(test_images[: args.test_images]).to(device)
    test_y = test_labels[: args.test_images]

    drop = (
        nn.Identity()
        if args.no_dropcluster
        else DropCluster1d(args.p, args.n_clusters, input_shape=(args.width, STEPS))
    )
    model = SequenceNet(args.width, drop).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    # The baseline has no layer to fit: no schedule (it would warn that nothing gets fitted).
    refits = None
    if not args.no_dropcluster:
        refits = RefitSchedule(
            every=args.refit_every, n_images=args.fit_images, epochs=args.epochs, seed=args.seed
        )
    generator = torch.Generator().manual_seed(args.seed)
    run = Run(model)
    print(f"{train_x.shape[0]} training sequences of {STEPS} steps x {FEATURES} features; {drop}")

    for epoch in range(args.epochs):
        start = time.perf_counter()
        fit = refits.step(model, train_x, epoch) if refits is not None else None
        if fit is not None:  # a refit was due
            run.refits[epoch] = fit
        model.train()
        losses = []
        order = torch.randperm(train_x.shape[0], generator=generator).to(device)
        for batch in order.split(args.batch_size):
            loss = nn.functional.cross_entropy(model(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        run.loss.append(sum(losses) / len(losses))
        run.accuracy.append(evaluate(model, test_x, test_y))
        refitted = ""
        if epoch in run.refits:
            refitted = f", refit: {run.refits[epoch].structured[0]}/{args.width} structured"
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {run.loss[-1]:.3f}, test top-1 "
            f"{run.accuracy[-1]:.2f}% ({time.perf_counter() - start:.0f} s){refitted}",
            flush=True,
        )
    print(f"after training: {drop}")
    return run


@torch.no_grad()
def evaluate(model: nn.Module, inputs: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy (%) of ``model`` in evaluation mode on ``inputs`` (N, ...)."""
    model.eval()
    predictions = torch.cat([model(chunk).argmax(1) for chunk in inputs.split(1000)])
    return 100.0 * float((predictions.cpu() == labels).float().mean())


if __name__ == "__main__":
    main()
