"""Deterministic, class-balanced subsets of a training set (the paper's small-sample runs).

The paper trains on 100/90/80/50/20 % of CIFAR-100 and 100/90/70/50/30/10 % of Tiny ImageNet
(section "Experimental protocol"); :func:`stratified_subset` picks such a fraction of every
class, reproducibly from a seed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dropcluster.validation import check_float

__all__ = [
    "stratified_subset",
]


def stratified_subset(labels: Tensor, fraction: float, seed: int = 0) -> Tensor:
    """Indices of a class-balanced random subset holding ``fraction`` of every class.

    Class ``k`` with ``count_k`` examples keeps ``max(1, round(fraction * count_k))`` of them
    (Python's ``round``: halves go to the even number), chosen uniformly at random. The same
    labels, fraction and seed always give the same indices, on any device. For one seed the
    subsets are nested: the subset of a smaller fraction is contained in that of a larger one,
    so the small-sample runs of a sweep differ only by the examples they drop.

    Args:
        labels (Tensor[N], integer): class of each example, values >= 0.
        fraction: share of each class to keep, in (0, 1]; 1 keeps every example.
        seed: seeds the choice (a private ``torch.Generator``; the global RNG is untouched).

    Returns:
        Tensor[M] int64, sorted indices into ``labels``, on the device of ``labels``.

    Raises:
        ValueError: fraction outside (0, 1] (or not a real number), labels not one-dimensional,
            not integers, or negative.
    """
    fraction = check_float("fraction", fraction, above=0.0, maximum=1.0)
    if labels.dim() != 1:
        raise ValueError(f"labels should be 1 dimensional, but got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels should hold integers, but got dtype {labels.dtype}")
    n_examples = labels.numel()
    if n_examples and int(labels.min()) < 0:
        raise ValueError(f"labels should be >= 0, but the smallest is {int(labels.min())}")
    if fraction == 1.0:
        return torch.arange(n_examples, device=labels.device)

    # Work on the CPU so the indices do not depend on the device's random number generator.
    labels_cpu = labels.detach().to("cpu", torch.int64)
    counts = torch.bincount(labels_cpu)
    keep_per_class = torch.tensor(
        [max(1, round(fraction * int(count))) if count else 0 for count in counts],
        dtype=torch.int64,
    )
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n_examples, generator=generator)
    # A stable sort by class keeps the random order inside each class: the first
    # keep_per_class[k] examples of class k in that order are the subset, hence nesting.
    by_class = order[torch.sort(labels_cpu[order], stable=True).indices]
    class_start = torch.cumsum(counts, 0) - counts
    sorted_labels = labels_cpu[by_class]
    rank_in_class = torch.arange(n_examples) - class_start[sorted_labels]
    chosen = by_class[rank_in_class < keep_per_class[sorted_labels]]
    return torch.sort(chosen).values.to(labels.device)
