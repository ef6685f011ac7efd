"""A 3-D convnet with DropCluster3d: volumes stacked from Fashion-MNIST images of one class.

A volume is ``--depth`` Fashion-MNIST images of the same class stacked along a depth axis, and
its label is that class. Exactly: of the first ``--train-images`` training images (the first
``--test-images`` test images for the test volumes), the images of each class are taken in the
order of the data set and cut into consecutive runs of ``--depth`` (a class's last, incomplete
run is left out); run ``k`` of class ``c``, images ``i_0 < i_1 < ... < i_{D-1}``, is the volume
(1, D, 28, 28) whose slice ``d`` is image ``i_d``. The volumes are ordered by their first
image. Slices of one volume are different garments of one kind, so along depth the volume is
correlated (the same silhouette, centred the same way) but not smooth, as a scan's slices
would be: a stand-in for volumetric data that runs offline, on real pixels.

The network: a stem Conv3d(1, 16, 3, stride (1, 2, 2))-BatchNorm-ReLU that halves height and
width (D x 28 x 28 -> D x 14 x 14), a DropCluster3d after the stem's ReLU (on its (16, D, 14,
14) maps), two conv blocks that halve every side, global average pooling and a linear head;
plain SGD with momentum. The clusters are fitted by ``fit_clusters`` from the training volumes
at the start of epoch ``--refit-every``, then every ``--refit-every`` epochs
(``RefitSchedule``); before the first fit the layer is the identity. The DropCluster paper is
2-D only: DropCluster on volumes, the 3-D grid graph (each voxel joined to its 6 face
neighbours) and this construction are this project's choices; 15 clusters and p = 0.1 are values
the paper uses in 2-D::

    python examples/volume_3d.py                    # DropCluster3d
    python examples/volume_3d.py --no-dropcluster   # the same network without it

Prints the training loss and the test accuracy (on the test volumes) after every epoch, and the
structured channels found at every refit.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dropcluster.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from dropcluster.nn import ClusterFit, DropCluster3d, RefitSchedule

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST's training-set pixel statistics


def stack_volumes(images: Tensor, labels: Tensor, depth: int) -> tuple[Tensor, Tensor]:
    """Stack same-class images into volumes (see the module's docstring for the exact rule).

    Args:
        images: (N, 1, 28, 28) uint8 images.
        labels: (N,) int64 classes.
        depth: images per volume, D >= 1.

    Returns:
        (V, 1, D, 28, 28) float32 normalised volumes and their (V,) int64 classes, ordered by
        their first image; V = sum over classes of floor(images of the class / D).
    """
    runs = []
    for label in range(len(FASHION_MNIST_CLASSES)):
        index = torch.nonzero(labels == label).flatten()  # increasing: the data set's order
        whole = index.numel() // depth * depth
        runs.append(index[:whole].reshape(-1, depth))
    run_index = torch.cat(runs)
    run_index = run_index[run_index[:, 0].argsort()]  # volumes in the order of their first image
    pixels = (images[run_index, 0].float() / 255 - MEAN) / STD  # (V, D, 28, 28)
    return pixels.unsqueeze(1), labels[run_index[:, 0]]


def conv_block(inputs: int, outputs: int, stride: int | tuple[int, int, int]) -> nn.Sequential:
    """Conv3d(3)-BatchNorm-ReLU; a stride of 2 halves a side (rounding up)."""
    return nn.Sequential(
        nn.Conv3d(inputs, outputs, 3, stride, 1, bias=False),
        nn.BatchNorm3d(outputs),
        nn.ReLU(inplace=True),
    )


class VolumeNet(nn.Module):
    """stem -> drop -> blocks -> global average pooling -> head.

    Args:
        width: channels of the stem; the blocks have 2x and 4x as many.
        drop: the layer after the stem's ReLU (a DropCluster3d, or nn.Identity for none).

    Shape:
        input (N, 1, D, 28, 28) float32 volumes -> (N, 10) logits.
    """

    def __init__(self, width: int, drop: nn.Module) -> None:
        super().__init__()
        self.stem = conv_block(1, width, (1, 2, 2))  # D x 28 x 28 -> D x 14 x 14
        self.drop = drop
        self.blocks = nn.Sequential(
            conv_block(width, 2 * width, 2), conv_block(2 * width, 4 * width, 2)
        )
        self.head = nn.Linear(4 * width, len(FASHION_MNIST_CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.drop(self.stem(x)))
        return self.head(x.mean(dim=(2, 3, 4)))


@dataclass
class Run:
    """What :func:`main` trained and measured.

    Attributes:
        model: the trained network.
        accuracy: test accuracy (%) after each epoch.
        loss: mean training loss of each epoch.
        refits: the epochs at whose start the clusters were refitted, and the fits.
    """

    model: VolumeNet
    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    refits: dict[int, ClusterFit] = field(default_factory=dict)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument(
        "--train-images", type=int, default=20000, help="stack the first N training images"
    )
    parser.add_argument(
        "--test-images", type=int, default=10000, help="stack the first N test images"
    )
    parser.add_argument("--depth", type=int, default=8, help="images per volume")
    parser.add_argument("--batch-size", type=int, default=64, help="volumes per batch")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--width", type=int, default=16, help="channels of the stem")
    parser.add_argument("--p", type=float, default=0.1, help="DropCluster3d drop rate")
    parser.add_argument("--n-clusters", type=int, default=15, help="clusters per channel")
    parser.add_argument("--refit-every", type=int, default=2, help="epochs between refits")
    parser.add_argument("--fit-images", type=int, default=256, help="volumes per refit")
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
    n_train, n_test = args.train_images, args.test_images
    train_x, train_y = stack_volumes(train_images[:n_train], train_labels[:n_train], args.depth)
    test_x, test_y = stack_volumes(test_images[:n_test], test_labels[:n_test], args.depth)
    train_x, train_y, test_x = train_x.to(device), train_y.to(device), test_x.to(device)

    shape = (args.width, args.depth, 14, 14)  # the stem's output
    drop = (
        nn.Identity()
        if args.no_dropcluster
        else DropCluster3d(args.p, args.n_clusters, input_shape=shape)
    )
    model = VolumeNet(args.width, drop).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    # The baseline has no layer to fit: no schedule (it would warn that nothing gets fitted).
    refits = None
    if not args.no_dropcluster:
        refits = RefitSchedule(
            every=args.refit_every, n_images=args.fit_images, epochs=args.epochs, seed=args.seed
        )
    generator = torch.Generator().manual_seed(args.seed)
    run = Run(model)
    print(f"{train_x.shape[0]} training volumes of {args.depth} x 28 x 28; {drop}")

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
    predictions = torch.cat([model(chunk).argmax(1) for chunk in inputs.split(250)])
    return 100.0 * float((predictions.cpu() == labels).float().mean())


if __name__ == "__main__":
    main()
