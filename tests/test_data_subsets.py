"""Tests of `dropcluster.data.subsets`: deterministic, class-balanced, nested fractions."""

from __future__ import annotations

import pytest
import torch

from dropcluster.data.subsets import stratified_subset


def unbalanced_labels() -> torch.Tensor:
    """Classes of 100, 37, 8 and 1 examples, interleaved."""
    labels = torch.cat([torch.full((count,), k) for k, count in enumerate((100, 37, 8, 1))])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]


def test_same_seed_same_indices_other_seed_other_indices():
    labels = unbalanced_labels()
    first = stratified_subset(labels, 0.5, seed=3)
    assert torch.equal(first, stratified_subset(labels, 0.5, seed=3))
    assert not torch.equal(first, stratified_subset(labels, 0.5, seed=4))


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5, 0.9])
def test_every_class_keeps_its_rounded_share_and_at_least_one(fraction):
    labels = unbalanced_labels()
    indices = stratified_subset(labels, fraction, seed=0)
    counts = torch.bincount(labels)
    kept = torch.bincount(labels[indices], minlength=len(counts))
    expected = [max(1, round(fraction * int(count))) for count in counts]
    assert kept.tolist() == expected


def test_indices_are_sorted_unique_int64():
    labels = unbalanced_labels()
    indices = stratified_subset(labels, 0.3, seed=1)
    assert indices.dtype == torch.int64
    assert torch.equal(indices, torch.sort(indices).values)
    assert len(torch.unique(indices)) == len(indices)
    assert 0 <= int(indices.min()) and int(indices.max()) < len(labels)


def test_fraction_one_keeps_everything():
    labels = unbalanced_labels()
    assert torch.equal(stratified_subset(labels, 1.0, seed=5), torch.arange(len(labels)))
    assert torch.equal(stratified_subset(labels, 1, seed=5), torch.arange(len(labels)))


def test_smaller_fractions_are_nested_in_larger_ones():
    labels = unbalanced_labels()
    previous = set(range(len(labels)))
    for fraction in (0.9, 0.7, 0.5, 0.3, 0.1):
        current = set(stratified_subset(labels, fraction, seed=2).tolist())
        assert current <= previous
        previous = current


def test_tiny_fraction_still_keeps_one_per_class():
    labels = unbalanced_labels()
    indices = stratified_subset(labels, 1e-6, seed=0)
    assert sorted(labels[indices].tolist()) == [0, 1, 2, 3]


def test_missing_class_ids_are_fine():
    labels = torch.tensor([0, 0, 5, 5, 5, 5])
    kept = torch.bincount(labels[stratified_subset(labels, 0.5, seed=0)])
    assert kept.tolist() == [1, 0, 0, 0, 0, 2]


def test_choice_within_a_class_is_random():
    labels = torch.zeros(1000, dtype=torch.int64)
    indices = stratified_subset(labels, 0.1, seed=0).float()
    assert 300 < float(indices.mean()) < 700  # not the first 100


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.01, float("nan"), True, "0.5", None])
def test_fraction_outside_zero_one_is_rejected(fraction):
    with pytest.raises(
        ValueError, match=r"fraction should be a (finite )?number( > 0.0| <= 1.0)?, but got"
    ):
        stratified_subset(unbalanced_labels(), fraction, seed=0)


def test_bad_labels_are_rejected():
    with pytest.raises(ValueError, match="1 dimensional"):
        stratified_subset(torch.zeros(2, 2, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="integers"):
        stratified_subset(torch.zeros(4), 0.5)
    with pytest.raises(ValueError, match=">= 0"):
        stratified_subset(torch.tensor([0, -1]), 0.5)
