"""Behaviour of dropcluster.rena on cases worked by hand and on designed fields.

Parity with nilearn lives in test_rena_parity.py; these tests pin the semantics directly.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dropcluster.rena import connected_components, grid_edges, rena


def _line(values, n_samples=2):
    """A 1 x W map whose pixels hold `values` in every sample: (N, 1, 1, W) float32."""
    row = torch.tensor(values, dtype=torch.float32)
    return row.expand(n_samples, 1, 1, row.numel()).clone()


def _smooth_fields(n_samples, n_channels, height, width, seed=0, blur=5):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(n_samples, n_channels, height + blur, width + blur, generator=generator)
    kernel = torch.ones(n_channels, 1, blur, blur) / blur**2
    return F.conv2d(noise, kernel, groups=n_channels)[:, :, :height, :width].contiguous()


def _identical_neighbour_pairs(x):
    """(C, E) bool: grid edges whose two pixels are equal in every sample."""
    n_samples, n_channels, height, width = x.shape
    u, v = grid_edges(height, width)
    flat = x.reshape(n_samples, n_channels, -1)
    return (flat[:, :, u] == flat[:, :, v]).all(dim=0)


# ---------------------------------------------------------------- cases worked by hand


def test_two_pairs_of_close_pixels_form_two_clusters():
    # Level-0 weights: (0,1) = 0.5*(1+1) = 1, (1,2) = 16, (2,3) = 1. Nearest neighbours link
    # 0-1 and 2-3; 4 nodes - 2 links = 2 components = k, so no cut.
    result = rena(_line([0.0, 1.0, 5.0, 6.0]), 2, unstructured="rena", identical_neighbours="split")
    assert result.labels.tolist() == [[[0, 0, 1, 1]]]
    assert result.n_found.tolist() == [2]
    assert result.structured.tolist() == [True]
    assert result.sizes.tolist() == [[2, 2]]
    assert result.n_rounds == 1


def test_cut_keeps_largest_gap_then_smallest_lower_index():
    # Same links as above but k = 3: the estimate 2 < 3, so keep 4 - 3 = 1 link. Both links
    # have gap 1; the tie goes to the smaller lower index, the link 0-1.
    result = rena(_line([0.0, 1.0, 5.0, 6.0]), 3, unstructured="rena", identical_neighbours="split")
    assert result.labels.tolist() == [[[0, 0, 1, 2]]]
    assert result.n_found.tolist() == [3]


def test_cut_prefers_larger_index_gap():
    # A 2x2 map: pixels 0 1 / 2 3. Pixel 0 is close to pixel 2 (below, gap 2); pixels 1 and 3 are
    # close to each other (gap 2); 0-1 and 2-3 are far apart. With k = 3 one link is kept: both
    # have gap 2, the tie goes to the lower index 0, so {0, 2} merge.
    x = torch.tensor([[0.0, 10.0], [0.5, 10.5]]).expand(2, 1, 2, 2).clone()
    x[1] += torch.tensor([[0.0, 3.0], [0.0, 3.0]])
    result = rena(x, 3, unstructured="rena", identical_neighbours="split")
    assert result.labels.tolist() == [[[0, 1], [0, 2]]]


def test_identical_neighbours_are_split_in_reference_mode_and_merged_by_default():
    # Pixels 1, 2, 3 are equal in every sample: their level-0 edges have weight 0 and are
    # deleted, which leaves the pieces {0, 1}, {2}, {3, 4}: pixel 2 can only stay a singleton.
    x = _line([0.0, 4.0, 4.0, 4.0, 9.0])
    split = rena(x, 2, unstructured="rena", identical_neighbours="split")
    assert split.labels.tolist() == [[[0, 0, 1, 2, 2]]]
    assert split.n_found.tolist() == [3]
    assert split.structured.tolist() == [False]  # 3 > k: the paper's "unstructured"

    merged = rena(x, 2, unstructured="dead")
    labels = merged.labels[0, 0].tolist()
    assert labels[1] == labels[2] == labels[3]
    assert merged.n_found.tolist() == [2]
    assert merged.structured.tolist() == [True]


def test_k_equal_to_pixel_count_gives_identity_labels():
    x = _smooth_fields(4, 2, 3, 3)
    result = rena(x, 9, unstructured="rena", identical_neighbours="split")
    assert result.labels.reshape(2, 9).tolist() == [list(range(9))] * 2
    assert result.n_found.tolist() == [9, 9]


def test_k_one_gives_one_cluster():
    result = rena(_smooth_fields(8, 3, 6, 7), 1)
    assert result.n_found.tolist() == [1, 1, 1]
    assert int(result.labels.abs().sum()) == 0
    assert result.sizes.tolist() == [[42], [42], [42]]


# ---------------------------------------------------------------- general properties


@pytest.mark.parametrize("n_clusters", [2, 15, 40])
def test_labels_are_compact_and_numbered_by_smallest_pixel(n_clusters):
    x = _smooth_fields(16, 4, 12, 20, seed=1)
    result = rena(x, n_clusters)
    for channel in range(4):
        flat = result.labels[channel].reshape(-1).tolist()
        first_seen = list(dict.fromkeys(flat))
        assert first_seen == list(range(int(result.n_found[channel])))
    assert result.n_found.tolist() == [n_clusters] * 4
    counts = torch.stack(
        [torch.bincount(lab.reshape(-1), minlength=n_clusters) for lab in result.labels]
    )
    assert torch.equal(result.sizes, counts)


def test_each_channel_is_clustered_as_if_alone():
    # Lock-step batching must not let channels interact.
    x = _smooth_fields(12, 6, 10, 10, seed=2)
    x[:, 1] = 0.0  # a dead channel between live ones
    x[:, 3] = torch.relu(x[:, 3] - 0.2)
    together = rena(x, 7, unstructured="rena", identical_neighbours="split")
    for channel in range(6):
        alone = rena(
            x[:, channel : channel + 1], 7, unstructured="rena", identical_neighbours="split"
        )
        assert torch.equal(alone.labels[0], together.labels[channel]), channel
        assert int(alone.n_found[0]) == int(together.n_found[channel])


def test_white_noise_reaches_the_requested_count():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(32, 5, 16, 16, generator=generator)
    result = rena(x, 15, unstructured="rena", identical_neighbours="split")
    assert result.n_found.tolist() == [15] * 5
    assert result.structured.all()


def test_early_exit_matches_long_run():
    x = _smooth_fields(16, 4, 16, 16, seed=4)
    x[:, 0] = 0.0
    short = rena(x, 15, max_rounds=10, unstructured="rena", identical_neighbours="split")
    long = rena(x, 15, max_rounds=1000, unstructured="rena", identical_neighbours="split")
    assert torch.equal(short.labels, long.labels)
    assert long.n_rounds < 10  # the dead channel has no edges, so nothing keeps the loop going


def test_too_few_rounds_leave_more_clusters():
    x = _smooth_fields(16, 1, 32, 32, seed=5)
    result = rena(x, 15, max_rounds=1, unstructured="rena", identical_neighbours="split")
    assert int(result.n_found[0]) > 15
    assert result.structured.tolist() == [False]
    assert result.n_rounds == 1


# ---------------------------------------------------------------- unstructured channels


def _field_with_zero_patch(patch, n_samples=32, size=16, seed=6):
    x = _smooth_fields(n_samples, 1, size, size, seed=seed) + 5.0  # positive: no accidental zeros
    x[:, :, 4 : 4 + patch, 4 : 4 + patch] = 0.0
    return x


def test_dead_channel_is_unstructured_in_every_mode_but_none():
    x = _smooth_fields(16, 3, 16, 16)
    x[:, 1] = 0.0
    for mode in ("rena", "dead", "hopkins"):
        result = rena(x, 5, unstructured=mode, generator=torch.Generator().manual_seed(0))
        assert result.structured.tolist() == [True, False, True], mode
    kept = rena(x, 5, unstructured="none")
    assert kept.structured.tolist() == [True, True, True]
    assert int(kept.n_found[1]) == 1  # merged: a constant map is one region
    assert rena(x, 5, unstructured="rena", identical_neighbours="split").n_found[1] == 256


def test_channel_constant_in_each_image_is_dead_even_if_images_differ():
    x = _smooth_fields(8, 2, 6, 6)
    x[:, 1] = torch.arange(8.0).view(8, 1, 1)  # one constant per image: no spatial variation
    assert rena(x, 4).structured.tolist() == [True, False]
    assert rena(x, 4, unstructured="rena").structured.tolist() == [True, False]


def test_one_pixel_maps_are_dead_only_without_variation_across_the_batch():
    x = torch.zeros(5, 2, 1, 1)
    x[:, 0, 0, 0] = torch.arange(5.0)
    result = rena(x, 1)
    assert result.structured.tolist() == [True, False]
    assert result.n_found.tolist() == [1, 1]


def test_zero_patch_of_7x7_breaks_the_paper_rule_but_not_the_default():
    # The patch's 5x5 interior pixels are isolated in the reference graph (all 4 neighbours
    # identical): 25 singletons + the rest = 26 pieces > 15 (docs/design.md, "Unstructured
    # channels").
    x = _field_with_zero_patch(7)
    paper = rena(x, 15, unstructured="rena", identical_neighbours="split")
    assert paper.n_found.tolist() == [26]
    assert paper.structured.tolist() == [False]

    default = rena(x, 15)
    assert default.structured.tolist() == [True]
    assert default.n_found.tolist() == [15]
    patch_labels = default.labels[0, 4:11, 4:11]
    assert bool((patch_labels == patch_labels[0, 0]).all())


def test_zero_patch_of_5x5_converges_under_the_paper_rule():
    x = _field_with_zero_patch(5)
    paper = rena(x, 15, unstructured="rena", identical_neighbours="split")
    assert paper.n_found.tolist() == [15]
    assert paper.structured.tolist() == [True]
    # Under "merge" the same channel is re-clustered with the patch held together.
    merged = rena(x, 15, unstructured="rena")
    assert merged.structured.tolist() == [True]
    patch_labels = merged.labels[0, 4:9, 4:9]
    assert bool((patch_labels == patch_labels[0, 0]).all())


def test_kept_channels_keep_identical_neighbours_together():
    x = torch.relu(_smooth_fields(24, 8, 16, 16, seed=7) - 0.1)
    x = (x * 4).round() / 4  # ties and always-zero regions
    identical = _identical_neighbour_pairs(x)
    assert identical.any()
    result = rena(x, 15, unstructured="none")
    u, v = grid_edges(16, 16)
    labels = result.labels.reshape(8, -1)
    same = labels[:, u] == labels[:, v]
    assert bool(same[identical].all())
    assert (result.n_found <= 15).all()


def test_paper_rule_depends_on_batch_size_and_default_does_not():
    field = torch.relu(_smooth_fields(128, 1, 16, 16, seed=8))  # half the pixels zero per image
    small, large = field[:2], field
    assert not rena(small, 15, unstructured="rena").structured.item()
    assert rena(large, 15, unstructured="rena").structured.item()
    assert rena(small, 15).structured.item()
    assert rena(large, 15).structured.item()


def test_hopkins_rule_flags_noise_and_keeps_smooth_maps():
    generator = torch.Generator().manual_seed(9)
    x = torch.cat(
        [_smooth_fields(16, 2, 16, 16, seed=9), torch.randn(16, 2, 16, 16, generator=generator)],
        dim=1,
    )
    result = rena(x, 15, unstructured="hopkins", generator=torch.Generator().manual_seed(0))
    assert result.structured.tolist() == [True, True, False, False]


# ---------------------------------------------------------------- dtypes and inputs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64])
def test_other_dtypes_give_valid_clusters(dtype):
    x = (_smooth_fields(8, 2, 8, 8) * 10).to(dtype)
    result = rena(x, 6)
    assert result.labels.dtype == torch.int64
    assert result.n_found.tolist() == [6, 6]


def test_float64_input_of_float32_values_matches_float32_on_distinct_weights():
    x = _smooth_fields(16, 3, 10, 10, seed=10)
    assert torch.equal(rena(x, 8).labels, rena(x.double(), 8).labels)


def test_too_many_clusters_are_clamped_with_a_warning():
    x = _smooth_fields(4, 1, 3, 3)
    with pytest.warns(UserWarning, match="larger than the 9 pixels"):
        result = rena(x, 50)
    assert result.n_clusters == 9
    assert result.n_found.tolist() == [9]


def test_no_channels_gives_an_empty_result():
    result = rena(torch.zeros(4, 0, 5, 5), 3)
    assert result.labels.shape == (0, 5, 5)
    assert result.n_found.shape == (0,)
    assert result.n_structured == 0


@pytest.mark.parametrize(
    ("x", "kwargs", "message"),
    [
        (torch.zeros(4, 5), {}, "3 or 4 or 5 dimensional"),
        (torch.zeros(2, 1, 2, 2, 2, 2), {}, r"\(N, C, L\), \(N, C, H, W\) or \(N, C, D, H, W\)"),
        (torch.zeros(1, 2, 5, 5), {}, "at least 2 samples"),
        (torch.zeros(0, 2, 5, 5), {}, "at least 2 samples"),
        (torch.zeros(3, 2, 0, 5), {}, "no pixels"),
        (torch.full((3, 1, 4, 4), float("nan")), {}, "NaN"),
        (torch.full((3, 1, 4, 4), float("inf")), {}, "infinite"),
        (torch.zeros(3, 1, 4, 4), {"n_clusters": 0}, "should be an integer >= 1, but got 0"),
        (torch.zeros(3, 1, 4, 4), {"n_clusters": 2.5}, "should be an integer, but got 2.5"),
        (torch.zeros(3, 1, 4, 4), {"max_rounds": 0}, "max_rounds"),
        (torch.zeros(3, 1, 4, 4), {"threshold": 1.5}, "threshold"),
        (torch.zeros(3, 1, 4, 4), {"unstructured": "paper"}, "unstructured should be one of"),
        (torch.zeros(3, 1, 4, 4), {"identical_neighbours": "x"}, "identical_neighbours"),
        (torch.zeros(3, 1, 2, 2), {"unstructured": "hopkins"}, "at least 3x3"),
    ],
)
def test_bad_input_raises_a_clear_error(x, kwargs, message):
    kwargs = {"n_clusters": 2, **kwargs}
    n_clusters = kwargs.pop("n_clusters")
    with pytest.raises(ValueError, match=message):
        rena(x, n_clusters, **kwargs)


# ---------------------------------------------------------------- data scale


def _assert_same_result(result, expected):
    assert torch.equal(result.labels, expected.labels)
    assert torch.equal(result.n_found, expected.n_found)
    assert torch.equal(result.structured, expected.structured)


@pytest.mark.parametrize("scale", [1e20, 2.0**66, 1e30, 1e37])
@pytest.mark.parametrize("options", [{}, {"unstructured": "rena", "identical_neighbours": "split"}])
def test_huge_float32_values_give_the_clusters_of_the_unscaled_input(scale, options):
    # Unscaled, float32 squared distances overflowed above ~1e19: at 1e20 every channel ended
    # with dozens of clusters. Channels are now scaled by a power of two, which is exact.
    x = _smooth_fields(16, 3, 12, 12, seed=11)
    expected = rena(x, 6, **options)
    assert expected.n_found.tolist() == [6, 6, 6]
    _assert_same_result(rena(x * scale, 6, **options), expected)


def test_huge_float64_values_give_the_clusters_of_the_unscaled_input():
    x = _smooth_fields(16, 3, 12, 12, seed=11).double()
    expected = rena(x, 6)
    assert expected.n_found.tolist() == [6, 6, 6]
    _assert_same_result(rena(x * 1e200, 6), expected)
    _assert_same_result(rena(x * 2.0**900, 6), expected)


def test_tiny_float64_values_are_not_mistaken_for_a_dead_channel():
    # The floor (threshold) is absolute, as in nilearn (the parity case tiny_scale_16x16_k15
    # pins it): below it every later edge ties, so c * x matches x only where the floor does
    # not decide, and 1e-20 * x is not expected to give x's clusters. But float64 level-0
    # weights of values below ~1e-154 used to underflow to 0 and make every channel "dead";
    # scaled, they match the float32 input of the same values, for which float64 weights
    # never underflow.
    x = _smooth_fields(16, 3, 12, 12, seed=11)
    tiny64 = rena(x.double() * 2.0**-700, 6)
    assert tiny64.structured.tolist() == [True, True, True]
    assert tiny64.n_found.tolist() == [6, 6, 6]
    _assert_same_result(tiny64, rena(x * 2.0**-70, 6))
    _assert_same_result(rena(x.double() * 1e-200, 6), rena(x * 1e-20, 6))


def test_channels_of_different_scales_are_each_clustered_as_if_alone():
    # The per-channel floors follow the channels through both passes of the paper's rule with
    # "merge" (a constant patch makes identical neighbours, which are contracted on a re-run).
    x = _smooth_fields(24, 4, 12, 12, seed=12)
    x[:, :, 3:6, 3:6] = 0.0
    scales = torch.tensor([1.0, 1e20, 2.0**-70, 1e-3]).view(1, 4, 1, 1)
    options = {"unstructured": "rena", "identical_neighbours": "merge"}
    together = rena(x * scales, 5, **options)
    for c in range(4):
        alone = rena(x[:, c : c + 1] * scales[:, c : c + 1], 5, **options)
        assert torch.equal(together.labels[c], alone.labels[0]), c
        assert together.n_found[c] == alone.n_found[0], c
    unscaled = rena(x, 5, **options)
    assert torch.equal(together.labels[1], unscaled.labels[1])
    assert together.n_found.tolist()[:2] == unscaled.n_found.tolist()[:2]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_single_non_finite_value_is_refused_naming_its_channel(value):
    x = _smooth_fields(4, 3, 6, 6)
    x[2, 1, 3, 4] = value
    with pytest.raises(ValueError, match=r"finite values.*NaN or infinite.*channel\(s\) \[1\]"):
        rena(x, 3)


# ---------------------------------------------------------------- building blocks


def test_grid_edges_of_a_2x3_map():
    u, v = grid_edges(2, 3)
    assert list(zip(u.tolist(), v.tolist(), strict=True)) == [
        (0, 1),
        (1, 2),
        (3, 4),
        (4, 5),
        (0, 3),
        (1, 4),
        (2, 5),
    ]


def test_connected_components_match_scipy():
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as scipy_components

    rng = np.random.default_rng(0)
    n_nodes = 500
    a = rng.integers(0, n_nodes, 400)
    b = rng.integers(0, n_nodes, 400)
    ours = connected_components(n_nodes, torch.from_numpy(a), torch.from_numpy(b)).numpy()
    graph = coo_matrix((np.ones(400), (a, b)), shape=(n_nodes, n_nodes))
    _, theirs = scipy_components(graph, directed=False)
    # Same partition, and our label is the smallest node of the component.
    for component in np.unique(theirs):
        members = np.flatnonzero(theirs == component)
        assert (ours[members] == members.min()).all()


# ---------------------------------------------------------------- 1-D chains and 3-D volumes


def _smooth_nd(n_samples, n_channels, *spatial, seed=0, blur=3):
    """Box-blurred noise on a 1-D or 3-D grid: (N, C, *spatial) float32."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(
        n_samples, n_channels, *(s + blur - 1 for s in spatial), generator=generator
    )
    pool = F.avg_pool1d if len(spatial) == 1 else F.avg_pool3d
    return pool(noise, blur, stride=1).contiguous()


def test_grid_edges_of_a_chain_of_4():
    u, v = grid_edges(4)
    assert list(zip(u.tolist(), v.tolist(), strict=True)) == [(0, 1), (1, 2), (2, 3)]


def test_grid_edges_of_a_2x2x3_volume_go_axis_by_axis_last_first():
    # Sites (d, h, w) -> d*6 + h*3 + w. Along w (step 1), then h (step 3), then d (step 6).
    u, v = grid_edges(2, 2, 3)
    along_w = [(0, 1), (1, 2), (3, 4), (4, 5), (6, 7), (7, 8), (9, 10), (10, 11)]
    along_h = [(0, 3), (1, 4), (2, 5), (6, 9), (7, 10), (8, 11)]
    along_d = [(p, p + 6) for p in range(6)]
    assert list(zip(u.tolist(), v.tolist(), strict=True)) == along_w + along_h + along_d


@pytest.mark.parametrize(
    ("sizes", "count"),
    # E = sum over axes of P * (n - 1) / n: 6x6x6 -> 3 * 216 * 5/6; 8x8x4 -> 224 + 224 + 192.
    [((1,), 0), ((7,), 6), ((200,), 199), ((1, 1, 1), 0), ((6, 6, 6), 540), ((8, 8, 4), 640)],
)
def test_grid_edge_count_is_the_sum_over_axes(sizes, count):
    u, v = grid_edges(*sizes)
    assert u.numel() == v.numel() == count
    assert bool((u < v).all())
    assert len(set(zip(u.tolist(), v.tolist(), strict=True))) == count


def test_grid_edges_device_is_keyword_only():
    assert grid_edges(2, 3, device="cpu")[0].device.type == "cpu"
    with pytest.raises(ValueError, match="grid size should be an integer"):
        grid_edges(2, 3, "cpu")
    with pytest.raises(ValueError, match="at least one size"):
        grid_edges()


def test_chain_of_six_merges_close_pairs_then_cuts_by_index():
    # Two identical samples. Level-0 weights 0.5 * 2 * d^2: (0,1) 1, (1,2) 81, (2,3) 1,
    # (3,4) 361, (4,5) 1. Round 1 links the pairs: 6 nodes - 3 links = 3 nodes, means 0.5,
    # 10.5, 30.5. For k = 3 that is the end. For k = 2, round 2 weights are full squared
    # distances over both samples, 200 and 800; the middle node's nearest neighbour is the
    # first, the last node's is the middle one: 2 links, 3 - 2 = 1 < 2, so the cut keeps
    # 3 - 2 = 1 link; both have index gap 1, the tie goes to the lower index: {0, 1}.
    x = torch.tensor([0.0, 1.0, 10.0, 11.0, 30.0, 31.0]).expand(2, 1, 6).clone()
    three = rena(x, 3, unstructured="rena", identical_neighbours="split")
    assert three.labels.tolist() == [[0, 0, 1, 1, 2, 2]]
    assert three.n_rounds == 1
    two = rena(x, 2, unstructured="rena", identical_neighbours="split")
    assert two.labels.tolist() == [[0, 0, 0, 0, 1, 1]]
    assert two.n_found.tolist() == [2]
    assert two.sizes.tolist() == [[4, 2]]
    assert two.n_rounds == 2
    assert torch.equal(rena(x, 2).labels, two.labels)  # no identical neighbours: defaults agree


def test_2x2x2_volume_merges_along_depth():
    # Columns (h, w) hold 100 * (2h + w) at depth 0 and that + 1 at depth 1: the depth edges
    # (weight 1) are every voxel's nearest neighbour, 8 - 4 links = 4 = k, so no cut. Labels
    # follow the smallest voxel d*4 + h*2 + w of each column, i.e. 2h + w.
    column = 100.0 * torch.arange(4.0).view(1, 2, 2)
    x = torch.cat([column, column + 1]).expand(2, 1, 2, 2, 2).clone()
    x[1] *= 2  # the second sample differs, so nothing is identical
    result = rena(x, 4, unstructured="rena", identical_neighbours="split")
    assert result.labels.tolist() == [[[[0, 1], [2, 3]], [[0, 1], [2, 3]]]]
    assert result.n_rounds == 1
    assert result.sizes.tolist() == [[2, 2, 2, 2]]


@pytest.mark.parametrize("options", [{}, {"unstructured": "rena", "identical_neighbours": "split"}])
def test_singleton_axes_give_the_2d_and_1d_results(options):
    # A grid with a size-1 axis has exactly the edges, in the same order, of the grid without it.
    x = _smooth_fields(12, 4, 6, 9, seed=13)
    x[:, 1] = 0.0
    x[:, 2, :, :3] = 0.0  # identical neighbours: "merge" contracts them
    flat = rena(x, 7, **options)
    for volume in (x[:, :, None], x[:, :, :, None], x[..., None]):
        result = rena(volume, 7, **options)
        assert torch.equal(result.labels.reshape(4, 6, 9), flat.labels)
        assert torch.equal(result.n_found, flat.n_found)
        assert torch.equal(result.structured, flat.structured)
    chain = x[:, :, 2]  # (N, C, 9)
    line = rena(chain, 3, **options)
    assert line.labels.shape == (4, 9)
    for grid in (chain[:, :, None], chain[..., None], chain[:, :, None, None]):
        assert torch.equal(rena(grid, 3, **options).labels.reshape(4, 9), line.labels)


@pytest.mark.parametrize("spatial", [(120,), (6, 6, 6), (8, 8, 4)])
def test_nd_channels_reach_k_with_compact_labels_each_as_if_alone(spatial):
    x = _smooth_nd(16, 3, *spatial, seed=14)
    x[:, 1] = 0.0  # dead
    together = rena(x, 9, unstructured="rena", identical_neighbours="split")
    assert together.labels.shape == (3, *spatial)
    assert together.n_found.tolist() == [9, math.prod(spatial), 9]
    assert together.structured.tolist() == [True, False, True]
    for channel in range(3):
        alone = rena(
            x[:, channel : channel + 1], 9, unstructured="rena", identical_neighbours="split"
        )
        assert torch.equal(alone.labels[0], together.labels[channel])
        flat = together.labels[channel].reshape(-1).tolist()
        assert list(dict.fromkeys(flat)) == list(range(int(together.n_found[channel])))
        counts = torch.bincount(together.labels[channel].reshape(-1))
        assert torch.equal(together.sizes[channel, : counts.numel()], counts)


@pytest.mark.parametrize("spatial", [(60,), (7, 7, 7)])
def test_nd_dead_channels_and_unstructured_rules(spatial):
    x = _smooth_nd(16, 3, *spatial, seed=15)
    x[:, 1] = 0.0
    for mode in ("rena", "dead"):
        assert rena(x, 5, unstructured=mode).structured.tolist() == [True, False, True], mode
    kept = rena(x, 5, unstructured="none")
    assert kept.structured.tolist() == [True, True, True]
    assert kept.n_found.tolist() == [5, 1, 5]  # merged: a constant map is one region


def test_hopkins_rule_flags_noise_and_keeps_smooth_maps_in_1d_and_3d():
    generator = torch.Generator().manual_seed(16)
    for spatial in ((200,), (9, 9, 9)):
        noise = torch.randn(16, 2, *spatial, generator=generator)
        x = torch.cat([_smooth_nd(16, 2, *spatial, seed=16), noise], dim=1)
        result = rena(x, 15, unstructured="hopkins", generator=torch.Generator().manual_seed(0))
        assert result.structured.tolist() == [True, True, False, False], spatial


def test_zero_block_in_a_volume_stays_together_by_default():
    # A 3x3x3 always-zero block: its centre voxel has 6 identical neighbours, so the reference
    # graph isolates it (c0 = 2 > k = 1 under the paper's rule); "merge" contracts the block.
    x = _smooth_nd(16, 1, 6, 6, 6, seed=17) + 5.0
    x[:, :, 1:4, 1:4, 1:4] = 0.0
    paper = rena(x, 1, unstructured="rena", identical_neighbours="split")
    assert paper.n_found.tolist() == [2]
    assert paper.structured.tolist() == [False]
    default = rena(x, 4)
    assert default.n_found.tolist() == [4]
    block = default.labels[0, 1:4, 1:4, 1:4]
    assert bool((block == block[0, 0, 0]).all())


@pytest.mark.parametrize("spatial", [(50,), (5, 6, 4)])
def test_nd_huge_and_tiny_values_are_scaled_exactly(spatial):
    x = _smooth_nd(16, 2, *spatial, seed=18)
    expected = rena(x, 6)
    assert expected.n_found.tolist() == [6, 6]
    _assert_same_result(rena(x * 1e30, 6), expected)
    _assert_same_result(rena(x.double() * 2.0**-700, 6), rena(x * 2.0**-70, 6))


@pytest.mark.parametrize(
    ("x", "kwargs", "message"),
    [
        (torch.zeros(1, 2, 5), {}, "at least 2 samples per position"),
        (torch.zeros(3, 2, 2, 0, 2), {}, "no voxels: spatial shape 2x0x2"),
        (torch.zeros(3, 1, 2), {"unstructured": "hopkins"}, "at least 3, but got 2"),
        (torch.zeros(3, 1, 3, 2, 3), {"unstructured": "hopkins"}, "at least 3x3x3, but got 3x2x3"),
    ],
)
def test_bad_nd_input_raises_a_clear_error(x, kwargs, message):
    with pytest.raises(ValueError, match=message):
        rena(x, 2, **kwargs)


def test_nd_clamping_and_empty_inputs():
    with pytest.warns(UserWarning, match="larger than the 6 positions of a 6 map"):
        assert rena(_smooth_nd(4, 1, 6), 9).n_found.tolist() == [6]
    with pytest.warns(UserWarning, match="larger than the 8 voxels of a 2x2x2 map"):
        assert rena(_smooth_nd(4, 1, 2, 2, 2), 9).n_clusters == 8
    assert rena(torch.zeros(4, 0, 3, 4, 5), 2).labels.shape == (0, 3, 4, 5)
    one = torch.zeros(5, 2, 1)
    one[:, 0, 0] = torch.arange(5.0)
    assert rena(one, 1).structured.tolist() == [True, False]
