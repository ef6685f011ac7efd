"""DropCluster1d/3d and drop_cluster1d/3d: the 2-D layer's algorithm and guarantees on grids of
one and three axes (this project's extension; the paper is 2-D)."""

import inspect
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dropcluster.nn import (
    Clusters,
    DropCluster1d,
    DropCluster2d,
    DropCluster3d,
    attach,
    drop_cluster1d,
    drop_cluster3d,
    fit_clusters,
)

# Channel 0 of a (C=2, L=6) layer: three clusters of two sites; channel 1 unstructured.
PAIRS = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0]])
# Channel 0 of a 2x2x3 volume: four clusters of three voxels, one per (depth, row).
ROWS = torch.tensor([[[0, 0, 0], [1, 1, 1]], [[2, 2, 2], [3, 3, 3]]])


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _smooth(shape, seed=0):
    """Smooth noise of (N, C, *grid) = ``shape``: a box average over 5 sites per axis."""
    grid = len(shape) - 2
    padded = (*shape[:2], *(size + 4 for size in shape[2:]))
    noise = torch.randn(padded, generator=_generator(seed))
    return (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[grid - 1](noise, 5, 1)


def _pairs_clusters():
    return Clusters.from_labels(PAIRS, torch.tensor([True, False]))


def _rows_clusters():
    labels = torch.stack([ROWS, torch.zeros_like(ROWS)])
    return Clusters.from_labels(labels, torch.tensor([True, False]))


# ---------------------------------------------------------------- cases worked by hand


def test_1d_drops_one_pair_and_the_unstructured_channel_and_rescales_by_12_over_4():
    x = torch.arange(1.0, 13.0).view(1, 2, 6)
    seen = set()
    for seed in range(20):
        out, mask = drop_cluster1d(
            x, 0.34, _pairs_clusters(), generator=_generator(seed), return_mask=True
        )
        # floor(0.34 * 3) = 1 of the 3 pairs dropped; channel 1 zeroed: 4 of 12 sites kept.
        assert mask[0, 1].sum() == 0
        dropped = [pair for pair in range(3) if mask[0, 0, 2 * pair : 2 * pair + 2].sum() == 0]
        assert len(dropped) == 1 and mask[0, 0].sum() == 4
        assert torch.equal(out, x * mask * 3.0)  # count(M) / count_ones(M) = 12 / 4
        seen.add(dropped[0])
    assert seen == {0, 1, 2}
    # Evaluation: only the unstructured channel is zeroed, scale 12 / 6.
    kept = torch.tensor([[[1.0] * 6, [0.0] * 6]])
    assert torch.equal(drop_cluster1d(x, 0.34, _pairs_clusters(), training=False), x * kept * 2)


def test_1d_scale_counts_the_sites_of_the_dropped_clusters():
    labels = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    x = torch.ones(1, 2, 6)
    kept_counts = set()
    for seed in range(30):
        out, mask = drop_cluster1d(
            x, 0.5, Clusters.from_labels(labels), generator=_generator(seed), return_mask=True
        )
        kept = int(mask.sum())
        # One cluster per channel: 1 or 5 sites in channel 0, 3 in channel 1.
        assert kept in (8, 4)
        assert torch.equal(out, mask * (12 / kept))
        kept_counts.add(kept)
    assert kept_counts == {8, 4}


def test_3d_drops_two_of_four_rows_and_rescales_by_24_over_6():
    x = torch.arange(1.0, 25.0).view(1, 2, 2, 2, 3)
    seen = set()
    for seed in range(20):
        out, mask = drop_cluster3d(
            x, 0.5, _rows_clusters(), generator=_generator(seed), return_mask=True
        )
        assert mask[0, 1].sum() == 0  # unstructured channel zeroed
        kept_rows = mask[0, 0].amax(dim=2)  # (2, 2): is each row kept
        assert torch.equal(mask[0, 0], kept_rows.unsqueeze(2).expand(2, 2, 3))  # whole rows
        assert int(kept_rows.sum()) == 2  # floor(0.5 * 4) = 2 rows dropped
        assert torch.equal(out, x * mask * 4.0)  # 24 / 6
        seen.add(tuple(kept_rows.flatten().tolist()))
    assert len(seen) >= 4  # several of the 6 pairs of rows
    kept = torch.stack([torch.ones(2, 2, 3), torch.zeros(2, 2, 3)])[None]
    assert torch.equal(drop_cluster3d(x, 0.5, _rows_clusters(), training=False), x * kept * 2)


@pytest.mark.parametrize(
    ("function", "clusters", "shape"),
    [
        (drop_cluster1d, _pairs_clusters, (64, 2, 6)),
        (drop_cluster3d, _rows_clusters, (64, 2, 2, 2, 3)),
    ],
)
def test_a_shared_mask_is_one_draw_and_per_sample_masks_differ(function, clusters, shape):
    x = torch.ones(shape)
    _, shared = function(
        x, 0.5, clusters(), per_sample=False, generator=_generator(), return_mask=True
    )
    assert shared.shape == (1, *shape[1:])
    _, each = function(x, 0.5, clusters(), generator=_generator(), return_mask=True)
    assert each.shape == shape
    assert len({tuple(mask.flatten().tolist()) for mask in each}) > 1


def test_functional_forms_take_x_p_clusters_training_then_keywords():
    for function in (drop_cluster1d, drop_cluster3d):
        parameters = inspect.signature(function).parameters.values()
        positional = [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
        keywords = [p.name for p in parameters if p.kind is p.KEYWORD_ONLY]
        assert positional == ["x", "p", "clusters", "training"]
        assert keywords == ["per_sample", "generator", "return_mask"]


def test_gradient_flows_through_kept_sites_times_the_scale():
    x = torch.ones(3, 2, 2, 2, 3, requires_grad=True)
    out, mask = drop_cluster3d(x, 0.5, _rows_clusters(), generator=_generator(), return_mask=True)
    out.sum().backward()
    assert torch.equal(x.grad, mask * 4.0)


def test_channels_last_3d_input_gives_the_same_values_in_channels_last_3d():
    clusters = _rows_clusters()
    x = torch.randn(4, 2, 2, 2, 3, generator=_generator(3))
    dense = drop_cluster3d(x, 0.5, clusters, generator=_generator(1))
    channels_last = x.to(memory_format=torch.channels_last_3d)
    out = drop_cluster3d(channels_last, 0.5, clusters, generator=_generator(1))
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(out, dense)


# ---------------------------------------------------------------- the layers


@pytest.mark.parametrize(
    ("layer_class", "clusters", "shape"),
    [(DropCluster1d, _pairs_clusters, (5, 2, 6)), (DropCluster3d, _rows_clusters, (5, 2, 2, 2, 3))],
)
def test_a_layer_with_loaded_clusters_is_the_functional_form(layer_class, clusters, shape):
    x = torch.randn(shape, generator=_generator(4))
    width = clusters().n_clusters
    layer = layer_class(0.5, width, generator=_generator(7))
    assert torch.equal(layer(x), x) and layer.input_shape == shape[1:]  # unfitted: identity
    labels = layer.labels
    layer.load_clusters(clusters())
    assert layer.labels is labels  # written in place: the buffers keep their identity
    functional = (drop_cluster1d if layer_class is DropCluster1d else drop_cluster3d)(
        x, 0.5, clusters(), generator=_generator(7)
    )
    assert torch.equal(layer(x), functional)
    layer.eval()
    expected = x * (torch.arange(2) == 0).view(1, 2, *(1,) * (len(shape) - 2)) * 2.0
    assert torch.equal(layer(x), expected)  # unstructured channel masked in inference too
    # Strict state round trip into a fresh layer, which takes the stored shapes.
    twin = layer_class(0.5, width)
    twin.load_state_dict(layer.state_dict())
    assert twin.fitted and torch.equal(twin.eval()(x), expected)
    layer.reset()
    assert not layer.fitted and layer.labels is labels and layer.input_shape == shape[1:]


@pytest.mark.parametrize(
    ("layer", "shape", "expected"),
    [
        (DropCluster1d(0.1), (8, 3, 10, 10), "(N, C, L)"),
        (DropCluster2d(0.1), (8, 3, 10), "(N, C, H, W)"),
        (DropCluster3d(0.1), (8, 3, 10, 10), "(N, C, D, H, W)"),
    ],
)
def test_each_layer_refuses_another_rank_naming_the_expected_shape(layer, shape, expected):
    message = f"{type(layer).__name__} takes {expected} feature maps, but got input of shape "
    with pytest.raises(ValueError, match=re.escape(message + str(shape))):
        layer(torch.ones(shape))
    with pytest.raises(ValueError, match=re.escape(f"dimensional {expected}")):
        layer.fit(torch.ones(shape))
    assert layer.input_shape is None


def test_clusters_and_states_of_another_rank_are_refused():
    layer = DropCluster1d(0.5, 4)
    with pytest.raises(ValueError, match=r"DropCluster1d takes clusters of \(C, L\), but got"):
        layer.load_clusters(_rows_clusters())
    volume = DropCluster3d(0.5, 4)
    volume.load_clusters(_rows_clusters())
    with pytest.raises(ValueError, match=r"'labels': DropCluster1d holds \(C, L\) labels"):
        layer.load_state_dict(volume.state_dict())
    assert not layer.fitted
    with pytest.raises(ValueError, match=r"input_shape should be \(C, D, H, W\)"):
        DropCluster3d(0.1, input_shape=(2, 6))
    with pytest.raises(ValueError, match=r"clusters fit \(C, L\) = \(2, 6\), but the input"):
        drop_cluster3d(torch.ones(1, 2, 1, 1, 6), 0.1, _pairs_clusters())
    with pytest.raises(ValueError, match=r"clusters.resample\(8\) puts them on the input"):
        drop_cluster1d(torch.ones(1, 2, 8), 0.1, _pairs_clusters())


def test_a_state_with_tables_a_fit_cannot_make_is_refused_naming_the_key():
    layer = DropCluster1d(0.5, 3)
    layer.load_clusters(_pairs_clusters())
    state = layer.state_dict()
    state["labels"] = state["labels"].masked_fill(state["labels"] == 2, 3)
    fresh = DropCluster1d(0.5, 3)
    message = r"cannot load DropCluster1d state: 'labels': channel 0 is structured with 3 clusters"
    with pytest.raises(ValueError, match=message):
        fresh.load_state_dict(state)
    assert not fresh.fitted


def test_labels_resample_by_nearest_neighbour_on_1d_and_3d_grids_as_interpolate():
    pairs = _pairs_clusters()
    assert pairs.resample(12).labels[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert pairs.resample(3).labels[0].tolist() == [0, 1, 2]
    assert pairs.resample(6) is pairs
    for size in (4, 7, 13):
        expected = F.interpolate(PAIRS[None].float(), size=size, mode="nearest")[0].long()
        assert torch.equal(pairs.resample(size).labels, expected * torch.tensor([[1], [0]]))
    rows = _rows_clusters()
    for size in ((3, 3, 5), (1, 4, 2)):
        expected = F.interpolate(ROWS[None, None].float(), size=size, mode="nearest")[0, 0]
        assert torch.equal(rows.resample(*size).labels[0], expected.long())
    with pytest.raises(ValueError, match="one size per axis of the clusters' 1-d grid"):
        pairs.resample(3, 3)


def test_a_resampling_1d_layer_drops_the_fitted_number_of_clusters_at_another_length():
    layer = DropCluster1d(0.34, 3, other_sizes="resample", generator=_generator())
    layer.load_clusters(_pairs_clusters())
    layer.record_mask = True
    x = torch.ones(4, 2, 12)
    out = layer(x)
    mask = layer.last_mask
    # One of the three runs of four sites dropped per image: 8 of 24 sites kept, scale 3.
    assert mask[:, 0].sum(dim=1).tolist() == [8.0] * 4
    assert torch.equal(out, mask * 3.0)
    assert layer.input_shape == (2, 6)  # the state keeps the fitted size
    refusing = DropCluster1d(0.34, 3)
    refusing.load_clusters(_pairs_clusters())
    with pytest.raises(ValueError, match=r"resample its labels to each input's \(L\)$"):
        refusing(x)


# ---------------------------------------------------------------- fits


def test_a_1d_fit_gives_runs_of_consecutive_sites_and_drops_floor_p_n_of_them():
    layer = DropCluster1d(0.2, 5, max_rounds=200)
    layer.fit(_smooth((16, 3, 40)))
    assert layer.labels.shape == (3, 40) and bool(layer.structured.all())
    assert layer.cluster_counts.tolist() == [5, 5, 5]
    # 1-D clusters are runs: the label changes exactly count - 1 times along each channel.
    changes = (layer.labels[:, 1:] != layer.labels[:, :-1]).sum(dim=1)
    assert changes.tolist() == [4, 4, 4]
    layer.record_mask = True
    layer(torch.ones(8, 3, 40))
    for c in range(3):
        kept = sum(layer.last_mask[:, c, layer.labels[c] == k].amax(dim=1) for k in range(5))
        assert kept.tolist() == [4.0] * 8  # floor(0.2 * 5) = 1 of the 5 runs dropped


def test_a_3d_fit_has_the_volume_shape_and_drops_whole_clusters():
    layer = DropCluster3d(0.3, 6, max_rounds=200)
    activations = _smooth((8, 2, 4, 6, 6))
    layer.fit(activations)
    assert layer.labels.shape == (2, 4, 6, 6) and layer.cluster_counts.tolist() == [6, 6]
    reference = Clusters.fit(activations, 6, max_rounds=200)
    assert torch.equal(layer.labels, reference.labels)
    layer.record_mask = True
    layer(torch.ones(5, 2, 4, 6, 6))
    for c in range(2):
        per_cluster = [layer.last_mask[:, c][:, layer.labels[c] == k] for k in range(6)]
        assert all(bool((m == m[:, :1]).all()) for m in per_cluster)  # a cluster is all or none
        dropped = sum((m[:, 0] == 0).long() for m in per_cluster)
        assert dropped.tolist() == [1] * 5  # floor(0.3 * 6) = 1


class _Sequence(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.conv = nn.Conv1d(1, 3, 5, padding=2)
        self.drop = layer
        self.head = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(3, 2))

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.conv(x))))


def test_fit_clusters_captures_1d_and_3d_inputs_and_fits_attached_layers():
    torch.manual_seed(0)
    model = _Sequence(DropCluster1d(0.25, 4, max_rounds=200))
    data = _smooth((12, 1, 30), seed=1)
    fit = fit_clusters(model, data, 12, batch_size=5)
    assert fit.layers == ["drop"] and fit.channels == [3] and fit.images == 12
    alone = DropCluster1d(0.25, 4, max_rounds=200).fit(torch.relu(model.conv(data)).detach())
    assert torch.equal(model.drop.labels, alone.labels)
    volumes = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten())
    layer = attach(volumes, "1", DropCluster3d(0.25, 4, max_rounds=200))
    fit = fit_clusters(volumes, _smooth((6, 1, 3, 5, 5), seed=2), 6)
    assert fit.layers == ["1.attached_regularizer"] and layer.labels.shape == (2, 3, 5, 5)
    assert layer.fitted


# ---------------------------------------------------------------- torch.compile


@pytest.mark.parametrize(
    ("layer_class", "clusters", "shape"),
    [
        (DropCluster1d, _pairs_clusters, (16, 2, 6)),
        (DropCluster3d, _rows_clusters, (16, 2, 2, 2, 3)),
    ],
)
def test_a_compiled_layer_follows_set_p_and_new_clusters_without_recompiling(
    layer_class, clusters, shape
):
    from torch._dynamo.testing import CompileCounter

    # A frame compiled by an earlier test (same forward code) would be reused: start afresh.
    torch._dynamo.reset()
    width = clusters().n_clusters
    layer = layer_class(0.0, width, input_shape=shape[1:])
    counter = CompileCounter()
    compiled = torch.compile(layer, backend=counter)
    x = torch.ones(shape)
    sites = int(torch.tensor(shape[2:]).prod())
    assert torch.equal(compiled(x), x)  # not fitted: the identity, inside the graph
    layer.load_clusters(clusters())
    assert ((compiled(x)[:, 0] != 0).flatten(1).sum(dim=1) == sites).all()  # p = 0: all kept
    layer.set_p(0.5)
    out = compiled(x)
    drop = 1 if layer_class is DropCluster1d else 2  # floor(0.5 * 3), floor(0.5 * 4)
    kept = (out[:, 0] != 0).flatten(1).sum(dim=1)
    assert (kept == sites - drop * sites // width).all()
    assert (out[:, 1] == 0).all()
    layer.fit(_smooth(shape, seed=9))  # a refit writes the buffers the graph reads
    assert bool(layer.structured[1]) and layer.cluster_counts.tolist() == [width, width]
    assert (compiled(x)[:, 1] != 0).any()  # channel 1 is structured now: not zeroed
    assert counter.frame_count == 1
