"""Parity of `dropcluster.rena` with nilearn's ReNA, the reference the paper ran.

Every channel of every case of `nilearn_reference.parity_battery()` is clustered by both, nilearn
one channel at a time as it ships (numpy's default argsort in the cut) and once more with the
cut's index-gap ties broken by a stable sort, the deterministic rule `dropcluster.rena` documents
(docs/design.md, "ReNA, exactly"). nilearn's own tie order depends on the CPU's SIMD sort, so
exact equality with it is only expected where no tie decides the cut; elsewhere the partitions
are compared by ARI and reconstruction error. `parity_battery_nd()` adds 1-D chains and 3-D
volumes, our extension beyond the paper: nilearn clusters 3-D masks natively, and every test
below holds for them unchanged.
"""

from __future__ import annotations

import math
import warnings
from functools import cache
from typing import NamedTuple

import numpy as np
import pytest
from nilearn_reference import (
    NilearnRun,
    ParityCase,
    adjusted_rand,
    grid_mask,
    level0_components,
    parity_battery,
    parity_battery_nd,
    reconstruction_error,
    reference_rena,
)

from dropcluster.rena import grid_edges, rena

pytest.importorskip("nilearn")

# The paper's 2-D battery, then our 1-D chains and 3-D volumes.
PAPER_CASES = {case.name: case for case in parity_battery()}
ND_CASES = {case.name: case for case in parity_battery_nd()}
CASES = {**PAPER_CASES, **ND_CASES}
# c0 per channel: components of the grid without edges between identical neighbours. ReNA
# converges to k clusters iff c0 <= k, and otherwise ends at c0 (docs/design.md, "Unstructured
# channels").
C0 = {
    name: [level0_components(case.x[:, c].numpy()) for c in range(case.x.shape[1])]
    for name, case in CASES.items()
}
CONVERGING = [
    name
    for name, case in CASES.items()
    if min(C0[name]) <= min(case.k, math.prod(case.x.shape[2:]))
]
GROUPS = sorted({CASES[name].group for name in CONVERGING})
MIN_MEAN_ARI = 0.95
MAX_ERROR_RATIO = 1.02


class CaseParity(NamedTuple):
    case: ParityCase
    k: int
    ours_n_found: np.ndarray  # (C,)
    ours_structured: np.ndarray  # (C,)
    ours_labels: np.ndarray  # (C, *spatial)
    default_labels: np.ndarray  # (C, *spatial), rena() with its default options
    nilearn: list[NilearnRun]  # per channel, numpy's default argsort in the cut
    nilearn_stable: list[NilearnRun]  # per channel, ties broken by the deterministic rule

    def channel(self, c: int) -> np.ndarray:
        return self.case.x[:, c].numpy()

    def converged(self) -> list[int]:
        return [c for c, run in enumerate(self.nilearn) if run.n_found <= self.k]


@cache
def parity(name: str) -> CaseParity:
    case = CASES[name]
    n_channels, *spatial = case.x.shape[1:]
    with warnings.catch_warnings():
        # k above H*W is clamped with a warning, which test_rena.py covers.
        warnings.filterwarnings(
            "ignore", message="n_clusters=.* is larger than", category=UserWarning
        )
        ours = rena(case.x, case.k, unstructured="rena", identical_neighbours="split")
        default = rena(case.x, case.k)
    channels = [case.x[:, c].numpy() for c in range(n_channels)]
    return CaseParity(
        case=case,
        k=min(case.k, math.prod(spatial)),
        ours_n_found=ours.n_found.numpy(),
        ours_structured=ours.structured.numpy(),
        ours_labels=ours.labels.numpy(),
        default_labels=default.labels.numpy(),
        nilearn=[reference_rena(x, case.k) for x in channels],
        nilearn_stable=[reference_rena(x, case.k, stable_ties=True) for x in channels],
    )


def _label_mismatch(ours: np.ndarray, ref: np.ndarray) -> str:
    wrong = np.argwhere(ours != ref)
    site = tuple(int(i) for i in wrong[0])
    return (
        f"{len(wrong)} of {ours.size} sites differ, first at {site}: ours {ours[site]} "
        f"vs nilearn {ref[site]}; ARI {adjusted_rand(ours, ref):.4f}"
    )


def _has_identical_neighbours(x: np.ndarray) -> bool:
    """Whether two grid neighbours of the (S, *spatial) channel are equal in every sample."""
    for axis in range(1, x.ndim):
        length = x.shape[axis] - 1
        head = np.take(x, np.arange(length), axis=axis)
        tail = np.take(x, np.arange(1, length + 1), axis=axis)
        if (head == tail).all(axis=0).any():
            return True
    return False


def test_nilearn_feature_index_is_row_major_pixel():
    """The reference's graph is the 4-grid with feature j = pixel h*W + w (mask (H, W, 1))."""
    from nilearn.regions.rena_clustering import _make_edges_and_weights
    from nilearn_reference import grid_mask

    height, width = 3, 5
    x = np.random.default_rng(0).random((4, height * width))
    edges, weights = _make_edges_and_weights(x, grid_mask(height, width))
    pixel = np.arange(height * width).reshape(height, width)
    expected = {(int(p), int(p) + 1) for p in pixel[:, :-1].ravel()}
    expected |= {(int(p), int(p) + width) for p in pixel[:-1].ravel()}
    assert {(int(a), int(b)) for a, b in edges.T} == expected
    np.testing.assert_allclose(weights, ((x[:, edges[0]] - x[:, edges[1]]) ** 2).sum(axis=0))


@pytest.mark.parametrize("sizes", [(7,), (3, 5), (2, 4, 3), (4, 1, 5)])
def test_nilearn_graph_of_a_grid_is_grid_edges(sizes):
    """The reference's graph of a chain (mask (L, 1, 1)) or a volume (mask (D, H, W)) is
    `grid_edges`: 2 neighbours per axis, feature j = row-major site index."""
    from nilearn.regions.rena_clustering import _make_edges_and_weights

    x = np.random.default_rng(1).random((3, math.prod(sizes)))
    edges, _ = _make_edges_and_weights(x, grid_mask(*sizes))
    u, v = grid_edges(*sizes)
    ours = list(zip(u.tolist(), v.tolist(), strict=True))
    assert len(ours) == len(set(ours)) == edges.shape[1]
    assert {(int(a), int(b)) for a, b in edges.T} == set(ours)


@pytest.mark.parametrize("name", CASES)
def test_n_found_matches_nilearn_on_every_channel(name):
    result = parity(name)
    for c, run in enumerate(result.nilearn):
        assert result.ours_n_found[c] == run.n_found, (
            f"{name} channel {c}: ours n_found={result.ours_n_found[c]}, "
            f"nilearn n_found={run.n_found} (k={result.k})"
        )


@pytest.mark.parametrize("name", CASES)
def test_nilearn_ends_at_max_of_c0_and_k(name):
    """The reference itself: the convergence rule the battery's expectations rest on."""
    result = parity(name)
    for c, run in enumerate(result.nilearn):
        assert run.n_found == max(C0[name][c], result.k), (
            f"{name} channel {c}: nilearn n_found={run.n_found}, c0={C0[name][c]}, k={result.k}"
        )


@pytest.mark.parametrize("name", CASES)
def test_structured_iff_n_found_at_most_k_under_rena_rule(name):
    result = parity(name)
    expected = result.ours_n_found <= result.k
    for c in range(len(expected)):
        assert result.ours_structured[c] == expected[c], (
            f"{name} channel {c}: structured={result.ours_structured[c]} but "
            f"n_found={result.ours_n_found[c]}, k={result.k}"
        )


@pytest.mark.parametrize("name", CASES)
def test_labels_identical_to_nilearn_with_deterministic_tie_rule(name):
    """Bit-for-bit the reference, once nilearn's cut breaks index-gap ties stably."""
    result = parity(name)
    for c, run in enumerate(result.nilearn_stable):
        ours = result.ours_labels[c]
        assert result.ours_n_found[c] == run.n_found and np.array_equal(ours, run.labels), (
            f"{name} channel {c} (n_found ours {result.ours_n_found[c]}, nilearn {run.n_found}): "
            + _label_mismatch(ours, run.labels)
        )


@pytest.mark.parametrize("name", CASES)
def test_labels_identical_to_nilearn_where_no_tie_decides_the_cut(name):
    """nilearn as shipped, on every channel whose cut has no index-gap tie at its boundary."""
    result = parity(name)
    for c, run in enumerate(result.nilearn):
        if run.ambiguous_cut:
            continue
        ours = result.ours_labels[c]
        assert np.array_equal(ours, run.labels), (
            f"{name} channel {c} (n_found ours {result.ours_n_found[c]}, nilearn {run.n_found}): "
            + _label_mismatch(ours, run.labels)
        )


def test_tie_detection_explains_every_nilearn_tie_order_difference():
    """Guards the test above: nilearn's two tie orders differ only where a cut tie was seen,
    and float-valued (tie-free) cases still leave channels to compare exactly."""
    compared = total = 0
    for name, case in CASES.items():
        result = parity(name)
        for c, (run, stable) in enumerate(zip(result.nilearn, result.nilearn_stable, strict=True)):
            differs = run.n_found != stable.n_found or not np.array_equal(run.labels, stable.labels)
            assert run.ambiguous_cut or not differs, f"{name} channel {c}: undetected tie"
            if case.tie_free:
                total += 1
                compared += not run.ambiguous_cut
    # Measured: 29 of 78 in 2-D, 7 of 23 in 1-D and 3-D. Equal gaps are common in a cut of a
    # few dozen nodes, even when all distances are distinct, so most of the exact comparison
    # rests on the test above it.
    assert 4 * compared >= total, f"only {compared} of {total} float channels have no cut tie"


@pytest.mark.parametrize("name", CASES)
def test_default_options_match_nilearn_on_channels_without_identical_neighbours(name):
    """identical_neighbours="merge" only changes channels where some neighbours are identical."""
    result = parity(name)
    for c, run in enumerate(result.nilearn_stable):
        if _has_identical_neighbours(result.channel(c)):
            continue
        ours = result.default_labels[c]
        assert np.array_equal(ours, run.labels), f"{name} channel {c}: " + _label_mismatch(
            ours, run.labels
        )


def _converged_aris(names) -> tuple[list[float], list[float], list[str]]:
    """ARI with nilearn, for ours and for nilearn's stable tie order, on converged channels."""
    ours, stable, where = [], [], []
    for name in names:
        result = parity(name)
        for c in result.converged():
            reference = result.nilearn[c].labels
            ours.append(adjusted_rand(result.ours_labels[c], reference))
            stable.append(adjusted_rand(result.nilearn_stable[c].labels, reference))
            where.append(f"{name}[{c}]")
    return ours, stable, where


def _assert_mean_ari(label: str, names) -> None:
    ours, stable, where = _converged_aris(names)
    # Where nilearn's tie order alone already moves the partition further than the budget
    # (docs/design.md, "ReNA, exactly": 0.94 between two CPUs), the bar is that variation, not 0.95.
    bound = min(MIN_MEAN_ARI, float(np.mean(stable))) - 1e-12
    worst = sorted(zip(ours, where, strict=True))[:3]
    assert np.mean(ours) >= bound, (
        f"{label}: mean ARI with nilearn {np.mean(ours):.4f} over {len(ours)} converged "
        f"channels < {bound:.4f} (nilearn vs itself with stable ties: {np.mean(stable):.4f}); "
        f"worst: " + ", ".join(f"{w} {a:.3f}" for a, w in worst)
    )


@pytest.mark.parametrize("group", GROUPS)
def test_mean_ari_with_nilearn_on_converged_channels_per_group(group):
    _assert_mean_ari(f"group {group}", [n for n in CONVERGING if CASES[n].group == group])


def test_mean_ari_with_nilearn_on_converged_channels_overall():
    # The bar, literally: the mean over every converged channel of the 2-D battery.
    ours, _, where = _converged_aris(list(PAPER_CASES))
    worst = sorted(zip(ours, where, strict=True))[:3]
    assert np.mean(ours) >= MIN_MEAN_ARI, (
        f"mean ARI with nilearn {np.mean(ours):.4f} over {len(ours)} converged channels; "
        f"worst: " + ", ".join(f"{w} {a:.3f}" for a, w in worst)
    )


def test_mean_ari_with_nilearn_on_converged_channels_of_chains_and_volumes():
    # Not the literal 0.95: in a chain every level-0 link has index gap 1, so the cut's ties are
    # the rule there, and nilearn's unstable sort alone moves its partition (measured: ARI 0.92
    # between its two tie orders on the chains, on an AVX-512 CPU). The bar is that variation.
    _assert_mean_ari("1-D and 3-D cases", [n for n in CONVERGING if n in ND_CASES])


def test_total_reconstruction_error_within_2_percent_of_nilearn():
    # The bar, literally, over every converged channel of the battery.
    ours = ref = 0.0
    for name in CONVERGING:
        result = parity(name)
        for c in result.converged():
            ours += reconstruction_error(result.channel(c), result.ours_labels[c])
            ref += reconstruction_error(result.channel(c), result.nilearn[c].labels)
    assert ours <= MAX_ERROR_RATIO * ref, f"total error {ours:.6g} vs nilearn {ref:.6g}"


@pytest.mark.parametrize("name", CONVERGING)
def test_reconstruction_error_within_2_percent_of_nilearn(name):
    result = parity(name)
    channels = result.converged()
    ours = sum(reconstruction_error(result.channel(c), result.ours_labels[c]) for c in channels)
    ref = sum(reconstruction_error(result.channel(c), result.nilearn[c].labels) for c in channels)
    stable = sum(
        reconstruction_error(result.channel(c), result.nilearn_stable[c].labels) for c in channels
    )
    # As for ARI: never stricter than nilearn's own tie-order variation.
    bound = max(MAX_ERROR_RATIO * ref, stable) * (1 + 1e-9)
    assert ours <= bound, (
        f"{name}: reconstruction error over channels {channels} is {ours:.6g}, nilearn's "
        f"{ref:.6g} (ratio {ours / ref if ref else float('inf'):.4f}); nilearn with stable ties "
        f"{stable:.6g}"
    )
