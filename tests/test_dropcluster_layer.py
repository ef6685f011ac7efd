"""DropCluster2d and drop_cluster2d: Algorithm 2 on hand-made clusters, statistics, state."""

import copy
import io
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from dropcluster.nn import Clusters, DropBlock2d, DropCluster2d, StochasticDepth, drop_cluster2d

# A 4x4 map split into its four 2x2 quadrants: cluster ids 0 1 / 2 3.
QUADRANTS = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _smooth(n_samples, n_channels, size, seed=0):
    noise = torch.randn(n_samples, n_channels, size + 4, size + 4, generator=_generator(seed))
    return F.avg_pool2d(noise, 5, 1)


def _fitted_layer(p=0.2, n_channels=6, size=12, **options):
    layer = DropCluster2d(p, 15, **options)
    layer.fit(_smooth(32, n_channels, size))
    return layer


# ---------------------------------------------------------------- cases worked by hand


def test_one_quadrant_dropped_and_unstructured_channel_zeroed():
    x = torch.arange(1.0, 2 * 16 + 1).view(1, 2, 4, 4)
    labels = torch.stack([QUADRANTS, QUADRANTS])
    structured = torch.tensor([True, False])
    clusters = Clusters.from_labels(labels, structured)
    out, mask = drop_cluster2d(x, 0.25, clusters, generator=_generator(), return_mask=True)
    # floor(0.25 * 4) = 1 cluster of 4 pixels dropped in channel 0; channel 1 masked.
    assert mask[0, 1].sum() == 0
    dropped = [q for q in range(4) if mask[0, 0][QUADRANTS == q].sum() == 0]
    assert len(dropped) == 1
    assert mask[0, 0].sum() == 12
    # count(M) / count_ones(M) = 32 / 12.
    assert torch.allclose(out, x * mask * (32 / 12))


def test_scale_uses_the_sizes_of_the_dropped_clusters():
    labels = torch.tensor([[[0, 1, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2], [2, 2, 2, 2]]])
    x = torch.ones(1, 1, 4, 4)
    seen = set()
    for seed in range(30):
        out, mask = drop_cluster2d(
            x, 0.5, Clusters.from_labels(labels), generator=_generator(seed), return_mask=True
        )
        kept = int(mask.sum())
        assert kept in (15, 13, 4)  # dropped cluster of size 1, 3 or 12: 1 cluster = floor(1.5)
        assert torch.allclose(out, mask * (16 / kept))
        seen.add(kept)
    assert seen == {15, 13, 4}


def test_evaluation_masks_only_unstructured_channels_and_rescales():
    x = torch.randn(3, 2, 4, 4, generator=_generator())
    labels = torch.stack([QUADRANTS, QUADRANTS])
    structured = torch.tensor([True, False])
    out = drop_cluster2d(x, 0.25, Clusters.from_labels(labels, structured), training=False)
    # Algorithm 2 rescales in inference too: count(M) / count_ones(M) = 32 / 16.
    assert torch.equal(out[:, 0], x[:, 0] * 2)
    assert torch.equal(out[:, 1], torch.zeros_like(x[:, 1]))


def test_shared_mask_is_the_same_for_every_image():
    x = torch.ones(8, 2, 4, 4)
    labels = torch.stack([QUADRANTS, QUADRANTS])
    clusters = Clusters.from_labels(labels)
    _, shared = drop_cluster2d(
        x, 0.5, clusters, per_sample=False, generator=_generator(), return_mask=True
    )
    assert shared.shape == (1, 2, 4, 4)
    _, own = drop_cluster2d(x, 0.5, clusters, generator=_generator(), return_mask=True)
    assert own.shape == (8, 2, 4, 4)
    assert not all(torch.equal(own[0], own[i]) for i in range(1, 8))


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("p", [0.1, 0.2, 0.3, 0.7])
def test_exactly_floor_p_n_clusters_dropped_in_each_structured_channel(p):
    layer = _fitted_layer(p)
    layer.record_mask = True
    x = torch.ones(64, 6, 12, 12)
    layer(x)
    mask = layer.last_mask
    labels = layer.labels
    expected = int(p * 15 + 1e-9)  # 1, 3, 4 and 10 (0.7 * 15 = 10.5)
    for channel in range(6):
        assert layer.structured[channel]
        for image in range(64):
            kept_labels = labels[channel][mask[image, channel] == 1].unique()
            assert 15 - kept_labels.numel() == expected, (channel, image)


def test_each_cluster_is_dropped_equally_often():
    layer = _fitted_layer(0.2, n_channels=4, generator=_generator(1))
    layer.record_mask = True
    layer(torch.ones(2000, 4, 12, 12))
    mask, labels = layer.last_mask, layer.labels
    # Per (image, channel): which clusters were dropped (their first pixel tells).
    first_pixel = torch.stack(
        [(labels[c].reshape(-1) == k).nonzero()[0, 0] for c in range(4) for k in range(15)]
    ).view(4, 15)
    dropped = torch.stack(
        [mask[:, c].reshape(2000, -1)[:, first_pixel[c]] == 0 for c in range(4)], dim=1
    )  # (2000, 4, 15)
    frequency = dropped.float().mean(dim=0)
    # Each cluster is dropped with probability 3/15 = 0.2; binomial sd over 2000 draws is
    # sqrt(0.2 * 0.8 / 2000) = 0.009, so 0.04 is more than 4 sd.
    assert (frequency - 0.2).abs().max() < 0.04
    # Channels draw independently: P(both drop cluster 0) = 0.04.
    both = (dropped[:, 0, 0] & dropped[:, 1, 0]).float().mean()
    assert abs(float(both) - 0.04) < 0.015


def test_channels_with_fewer_clusters_drop_floor_p_times_their_count():
    labels = torch.stack([QUADRANTS, (QUADRANTS >= 2).long()])  # 4 clusters, then 2 clusters
    clusters = Clusters.from_labels(labels)
    assert clusters.counts.tolist() == [4, 2]
    x = torch.ones(500, 2, 4, 4)
    _, mask = drop_cluster2d(x, 0.5, clusters, generator=_generator(), return_mask=True)
    assert (mask[:, 0].sum(dim=(1, 2)) == 8).all()  # floor(0.5 * 4) = 2 quadrants dropped
    assert (mask[:, 1].sum(dim=(1, 2)) == 8).all()  # floor(0.5 * 2) = 1 half dropped


# ---------------------------------------------------------------- module behaviour


def test_unfitted_layer_is_the_identity_and_says_so():
    layer = DropCluster2d(0.3)
    x = torch.randn(2, 3, 5, 5)
    assert layer(x) is x
    assert "not fitted" in repr(layer)


def test_evaluation_is_deterministic_and_sampling_in_eval_is_not():
    layer = _fitted_layer().eval()
    x = _smooth(4, 6, 12, seed=3)
    assert torch.equal(layer(x), layer(x))
    assert torch.equal(layer(x), x)  # every channel structured: scale 1, nothing masked
    layer.sample_in_eval = True
    assert not torch.equal(layer(x), layer(x))


def test_gradient_flows_only_through_kept_pixels():
    layer = _fitted_layer(0.3)
    layer.record_mask = True
    x = _smooth(4, 6, 12, seed=4).requires_grad_()
    weights = torch.randn(4, 6, 12, 12, generator=_generator(5))
    out = layer(x)
    (out * weights).sum().backward()
    mask = layer.last_mask
    scale = 6 * 144 / mask.sum(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(x.grad, weights * mask * scale, atol=1e-5)
    assert (x.grad[mask == 0] == 0).all()


def test_same_generator_seed_gives_the_same_mask():
    layer = _fitted_layer(0.2)
    x = torch.ones(4, 6, 12, 12)
    layer.generator = _generator(7)
    first = layer(x)
    layer.generator = _generator(7)
    assert torch.equal(first, layer(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_is_kept(dtype):
    layer = _fitted_layer(0.2)
    out = layer(torch.ones(2, 6, 12, 12, dtype=dtype))
    assert out.dtype == dtype
    assert float(out.float().mean()) == pytest.approx(1.0, abs=0.02)


def test_half_precision_model_keeps_p_exact():
    layer = _fitted_layer(0.2).half()
    assert layer.p.dtype == torch.float32
    layer.record_mask = True
    layer(torch.ones(2, 6, 12, 12, dtype=torch.float16))
    assert int((layer.last_mask[0, 0] == 0).any()) == 1
    dropped = 15 - layer.labels[0][layer.last_mask[0, 0] == 1].unique().numel()
    assert dropped == 3  # floor(0.2 * 15); a float16 p (0.19995) would give 2


def test_channels_last_input_gives_the_same_values_in_channels_last():
    layer = _fitted_layer(0.2)
    x = _smooth(4, 6, 12, seed=8)
    layer.generator = _generator(9)
    expected = layer(x)
    layer.generator = _generator(9)
    out = layer(x.to(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, expected)


def test_state_dict_round_trip_predicts_identically(tmp_path):
    layer = _fitted_layer(0.25, unstructured="rena")
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state) == {"labels", "structured", "cluster_counts", "cluster_sizes", "is_fitted"}
    restored = DropCluster2d(0.25, 15)  # p is a setting, not state
    restored.load_state_dict(state)
    assert restored.fitted
    x = _smooth(4, 6, 12, seed=10)
    layer.eval()
    restored.eval()
    assert torch.equal(layer(x), restored(x))
    layer.train()
    restored.train()
    layer.generator, restored.generator = _generator(11), _generator(11)
    assert torch.equal(layer(x), restored(x))


def test_loading_clusters_of_another_shape_into_a_fitted_layer_fails_clearly():
    small = _fitted_layer(size=8)
    large = _fitted_layer(size=12)
    with pytest.raises(ValueError, match=r"fitted on \(C, H, W\) = \(6, 8, 8\)"):
        large.load_state_dict(small.state_dict())
    large.reset()
    large.load_state_dict(small.state_dict())
    assert tuple(large.labels.shape) == (6, 8, 8)


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.1, float("inf"), 1.0])
def test_loading_an_invalid_p_is_refused_and_leaves_the_layer_unchanged(bad):
    source = _fitted_layer(0.25, size=8)
    state = source.state_dict()
    state["p"] = torch.tensor(bad)
    layer = _fitted_layer(0.1, size=12)
    before = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    with pytest.raises(ValueError, match=rf"cannot load 'p'.*\[0, 1\).*holds {bad}"):
        layer.load_state_dict(state)
    # Refused before the cluster buffers were resized for the (6, 8, 8) clusters.
    for name, tensor in layer.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    state["p"] = torch.tensor(0.3)
    layer.reset()
    layer.load_state_dict(state)
    assert float(layer.p) == pytest.approx(0.3)
    assert tuple(layer.labels.shape) == (6, 8, 8)


@pytest.mark.parametrize(
    "build",
    [lambda: DropCluster2d(0.1), lambda: DropBlock2d(0.1, 3), lambda: StochasticDepth(0.1)],
    ids=["DropCluster2d", "DropBlock2d", "StochasticDepth"],
)
def test_every_layer_with_a_drop_rate_refuses_a_nan_p_under_its_full_key(build):
    model = torch.nn.Sequential(torch.nn.Identity(), build())
    state = model.state_dict()
    state["1.p"] = torch.tensor(float("nan"))
    with pytest.raises(ValueError, match=r"cannot load '1\.p'.*holds nan"):
        model.load_state_dict(state)
    assert float(model[1].p) == pytest.approx(0.1)


def test_fit_with_nan_raises_and_keeps_the_previous_clusters():
    layer = _fitted_layer()
    before = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    bad = _smooth(8, 6, 12)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer.fit(bad)
    for name, tensor in layer.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_input_of_another_shape_than_fitted_fails_clearly():
    layer = _fitted_layer(size=12)
    with pytest.raises(ValueError, match=r"holds clusters for \(C, H, W\) = \(6, 12, 12\)"):
        layer(torch.ones(2, 6, 10, 10))


def test_paper_rule_masks_channels_with_a_constant_region():
    x = _smooth(32, 2, 16) + 5.0
    x[:, 1, 4:11, 4:11] = 0.0  # a 7x7 always-zero patch: 26 pieces > 15 under the paper's rule
    paper = DropCluster2d(0.1, 15, unstructured="rena", identical_neighbours="split").fit(x)
    assert paper.structured.tolist() == [True, False]
    assert torch.equal(paper.eval()(x)[:, 1], torch.zeros_like(x[:, 1]))
    default = DropCluster2d(0.1, 15).fit(x)
    assert default.structured.tolist() == [True, True]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: DropCluster2d(1.0), r"\[0, 1\)"),
        (lambda: DropCluster2d(-0.1), r"\[0, 1\)"),
        (lambda: DropCluster2d(0.1, 0), "n_clusters should be an integer >= 1, but got 0"),
        (lambda: DropCluster2d(0.1, unstructured="x"), "unstructured"),
        (lambda: DropCluster2d(0.1).set_p(1.5), r"\[0, 1\)"),
        (lambda: DropCluster2d(0.1).fit(torch.ones(4, 5, 5)), "4 dimensional"),
        (
            lambda: drop_cluster2d(
                torch.ones(2, 1, 5, 4), 0.1, Clusters.from_labels(QUADRANTS[None])
            ),
            r"the clusters fit \(C, H, W\) = \(1, 4, 4\), but the input has shape \(2, 1, 5, 4\)",
        ),
        (
            lambda: drop_cluster2d(torch.ones(1, 4, 4), 0.1, Clusters.from_labels(QUADRANTS[None])),
            "4 dimensional",
        ),
    ],
)
def test_bad_arguments_raise_clear_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        (
            lambda q: (q.masked_fill(q == 3, 4), [4]),
            r"channel 0 is structured with 4 clusters, "
            r"but its labels range from 0 to 4 \(expected 0 to 3\)",
        ),
        (lambda q: (q - 1, [4]), r"channel 0 .* labels range from -1 to 2"),
        (
            lambda q: (q, [5]),
            r"counts: channel 0 is structured with 5 clusters, but a structured "
            r"channel has 1 to 4",
        ),
        (lambda q: (q.float(), [4]), r"labels should be a 3-d integer tensor"),
    ],
    ids=["label_equal_to_its_count", "negative", "count_past_the_width", "float"],
)
def test_clusters_refuse_tables_a_fit_cannot_make(tables, message):
    labels, counts = tables(QUADRANTS[None])
    sizes = torch.full((1, 4), 4, dtype=torch.int64)
    with pytest.raises(ValueError, match=message):
        Clusters(labels, torch.tensor([True]), torch.tensor(counts), sizes)


def test_the_0_3_functional_form_fails_naming_the_new_one():
    x = torch.ones(2, 1, 4, 4)
    with pytest.raises(
        TypeError,
        match=r"new form since dropcluster 0.4: drop_cluster2d\(x, p, "
        r"clusters, training=True",
    ):
        drop_cluster2d(x, QUADRANTS[None], 4, 0.25, torch.tensor([True]))
    with pytest.raises(TypeError, match=r"keywords \['cluster_sizes'\]"):
        drop_cluster2d(x, 0.25, Clusters.from_labels(QUADRANTS[None]), cluster_sizes=None)
    with pytest.raises(TypeError, match="not loose tables"):
        drop_cluster2d(x, 0.25, QUADRANTS[None])


def test_unstructured_channels_of_hand_made_clusters_are_zeroed_whatever_their_labels():
    x = torch.ones(2, 2, 4, 4)
    labels = torch.stack([QUADRANTS, QUADRANTS + 4]).int()  # int32 is fine too
    clusters = Clusters.from_labels(labels, torch.tensor([True, False]))
    assert clusters.counts.tolist() == [4, 0] and int(clusters.labels[1].max()) == 0
    out = drop_cluster2d(x, 0.25, clusters, generator=_generator())
    assert torch.equal(out[:, 1], torch.zeros(2, 4, 4))
    assert int((out[:, 0] == 0).sum()) == 2 * 4  # one quadrant of 4 pixels per image


def test_a_layer_gives_its_clusters_and_loads_anothers():
    layer = _fitted_layer(0.3)
    clusters = layer.clusters
    assert clusters.shape == (6, 12, 12) and clusters.n_clusters == 15
    twin = DropCluster2d(0.3, 15).eval()
    twin.load_clusters(clusters)
    x = _smooth(4, 6, 12, seed=5)
    assert torch.equal(twin(x), layer.eval()(x))
    assert torch.equal(drop_cluster2d(x, 0.3, clusters, training=False), layer(x))
    assert DropCluster2d(0.1).clusters is None
    with pytest.raises(TypeError, match=r"layer.load_clusters\(Clusters\(labels, structured"):
        twin.load_clusters(clusters.labels, clusters.structured, clusters.counts, clusters.sizes)
    with pytest.raises(ValueError, match="are 15 wide, this layer has n_clusters=5"):
        DropCluster2d(0.1, 5).load_clusters(clusters)


# ---------------------------------------------------------------- torch.compile


def test_compiled_layer_keeps_masks_independent_and_does_not_recompile_on_new_p():
    layer = _fitted_layer(0.1, n_channels=8, size=8)
    layer.record_mask = False
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(graph_module, example_inputs)

    compiled = torch.compile(layer, backend=counting_backend)
    x = torch.ones(256, 8, 8, 8)
    out = compiled(x)
    n_graphs = len(graphs)
    assert n_graphs >= 1
    layer.set_p(0.3)
    out_high = compiled(x)
    assert len(graphs) == n_graphs  # the rate is a buffer: no recompilation
    # With p = 0.3, 4 of 15 clusters are dropped: zeros appear more often than with p = 0.1.
    assert (out_high == 0).float().mean() > (out == 0).float().mean()
    # pytorch issue 198333: groups of channels receiving identical masks. With 1 of 15
    # clusters dropped per channel, two channels share a zero pattern in 1/15 of images by
    # chance; identical masks would share it in all 256.
    zeros = (out == 0).reshape(256, 8, -1)
    dropped_label = torch.stack(
        [layer.labels[c].reshape(-1)[zeros[:, c].float().argmax(dim=1)] for c in range(8)], dim=1
    )  # (256, 8): the label of a dropped pixel in each image and channel
    for first in range(8):
        for second in range(first + 1, 8):
            same = (dropped_label[:, first] == dropped_label[:, second]).float().mean()
            assert same < 0.25, (first, second, float(same))
    same_image = (dropped_label[1:] == dropped_label[:-1]).float().mean()
    assert same_image < 0.2  # samples draw independently too
    # Backward rebuilds the multiplier from the saved table: with x = 1 it equals the output.
    x = torch.ones(16, 8, 8, 8, requires_grad=True)
    weights = torch.randn(16, 8, 8, 8, generator=_generator(2))
    out = compiled(x)
    out.backward(weights)
    assert torch.equal(x.grad, weights * out.detach())
    assert 0 < int((out == 0).sum()) < out.numel()


# ---------------------------------------------------------------- fixed-shape state, checkpoints


def _with_dead_channels(n_samples=32, n_channels=6, size=12, seed=0):
    """Smooth ReLU maps with channels 1 and 4 dead (all zero), as after a ReLU that died."""
    x = torch.relu(_smooth(n_samples, n_channels, size, seed=seed))
    x[:, [1, 4]] = 0
    return x


@pytest.mark.parametrize(
    ("unstructured", "identical"),
    [
        ("dead", "merge"),
        ("rena", "merge"),
        ("rena", "split"),
        ("hopkins", "merge"),
        ("none", "merge"),
    ],
)
def test_refits_write_the_same_buffers_in_place_under_every_rule(unstructured, identical):
    layer = DropCluster2d(
        0.2, 15, input_shape=(6, 12, 12), unstructured=unstructured, identical_neighbours=identical
    )
    buffers = {name: getattr(layer, name) for name in DropCluster2d.STATE}
    shapes = {name: tuple(t.shape) for name, t in buffers.items()}
    assert shapes == {
        "labels": (6, 12, 12),
        "structured": (6,),
        "cluster_counts": (6,),
        "cluster_sizes": (6, 15),
        "is_fitted": (),
    }
    pointers = {name: t.data_ptr() for name, t in buffers.items()}
    for seed in (0, 1):
        x = _with_dead_channels(seed=seed)
        layer.fit(x, generator=_generator(seed))
        for name, tensor in buffers.items():
            assert getattr(layer, name) is tensor and tensor.data_ptr() == pointers[name]
            assert tuple(tensor.shape) == shapes[name]
    # The tables agree with each other: counts are the sizes' non-zero columns, unstructured
    # channels have no clusters, and every pixel of a structured channel has a real cluster.
    sizes, counts = layer.cluster_sizes, layer.cluster_counts
    assert torch.equal((sizes > 0).sum(1), counts)
    assert torch.equal(counts > 0, layer.structured)
    assert torch.equal(sizes.sum(1), layer.structured.long() * 144)
    if unstructured in ("dead", "rena", "hopkins"):
        assert not layer.structured[[1, 4]].any()


def test_an_unfitted_layer_is_the_identity_and_takes_its_shapes_at_the_first_forward():
    layer = DropCluster2d(0.5, 15)
    assert layer.input_shape is None
    labels = layer.labels
    x = torch.randn(3, 6, 10, 10)
    assert torch.equal(layer(x), x)
    assert layer.input_shape == (6, 10, 10) and layer.labels is labels and not layer.fitted
    layer.fit(_smooth(16, 6, 10))
    assert layer.labels is labels
    with pytest.raises(ValueError, match=r"holds clusters for \(C, H, W\) = \(6, 10, 10\).*refit"):
        layer(torch.randn(3, 6, 12, 12))
    with pytest.raises(ValueError, match=r"call reset\(input_shape=\(6, 12, 12\)\)"):
        layer.fit(_smooth(16, 6, 12))
    layer.reset(input_shape=(6, 12, 12))
    layer.fit(_smooth(16, 6, 12))
    assert layer.input_shape == (6, 12, 12) and layer.labels is labels


def test_a_channel_rena_cannot_bring_to_k_clusters_is_unstructured():
    from dropcluster.nn.dropcluster import fixed_tables

    labels = torch.tensor([[[0, 1], [2, 3]], [[0, 0], [1, 1]]])
    structured = torch.tensor([True, True])
    n_found = torch.tensor([4, 2])
    sizes = torch.tensor([[1, 1, 1, 1], [2, 2, 0, 0]])
    out_labels, out_structured, counts, table = fixed_tables(labels, structured, n_found, sizes, 3)
    assert out_structured.tolist() == [False, True]
    assert counts.tolist() == [0, 2]
    assert table.tolist() == [[0, 0, 0], [2, 2, 0]]
    assert out_labels.tolist() == [[[0, 0], [0, 0]], [[0, 0], [1, 1]]]


class _Backbone(torch.nn.Module):
    """A stem whose optional regularizer sits beside the weights (as `attach` puts it)."""

    def __init__(self, regularizer=None):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(6)
        if regularizer is not None:
            self.regularizer = regularizer

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.regularizer(x) if hasattr(self, "regularizer") else x


@pytest.mark.parametrize(
    "build",
    [
        lambda: DropCluster2d(0.1),
        lambda: DropCluster2d(0.1, input_shape=(6, 8, 8)),
        lambda: DropBlock2d(0.1, 3),
        lambda: StochasticDepth(0.1),
    ],
    ids=["DropCluster2d", "DropCluster2d-materialized", "DropBlock2d", "StochasticDepth"],
)
def test_a_checkpoint_saved_without_regularizers_loads_strictly(build):
    torch.manual_seed(0)
    pretrained = _Backbone().state_dict()
    model = _Backbone(build())
    result = model.load_state_dict(pretrained, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(model.conv.weight, pretrained["conv.weight"])
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model(x), torch.relu(model.bn(model.conv(x))))  # still the identity
    extra = set(model.state_dict()) - set(pretrained)
    stateful = isinstance(model.regularizer, DropCluster2d)
    assert extra == ({f"regularizer.{n}" for n in DropCluster2d.STATE} if stateful else set())


def test_a_fitted_layer_keeps_its_clusters_when_the_checkpoint_has_none():
    model = _Backbone(DropCluster2d(0.1))
    model.regularizer.fit(torch.relu(_smooth(16, 6, 8)))
    labels = model.regularizer.labels.clone()
    model.load_state_dict(_Backbone().state_dict())
    assert model.regularizer.fitted and torch.equal(model.regularizer.labels, labels)


def test_an_ema_copy_made_before_the_first_fit_keeps_updating():
    from torch.optim.swa_utils import AveragedModel

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1),
        torch.nn.ReLU(),
        DropCluster2d(0.2, input_shape=(6, 8, 8)),
    )
    ema = AveragedModel(model, use_buffers=True)
    hand_made = copy.deepcopy(model)  # timm's ModelEma copies every state_dict entry in place
    with torch.no_grad():
        model[2].fit(model[:2](torch.rand(16, 3, 8, 8)))
    ema.update_parameters(model)
    with torch.no_grad():
        for mine, theirs in zip(
            hand_made.state_dict().values(), model.state_dict().values(), strict=True
        ):
            mine.copy_(theirs)
    assert torch.equal(ema.module[2].labels, model[2].labels)
    assert torch.equal(hand_made[2].labels, model[2].labels)


def test_checkpoints_of_dropcluster_0_1_still_load():
    """0.1 saved p, and tables as wide as the largest cluster count, without is_fitted."""
    from dropcluster.rena import rena

    x = _with_dead_channels()
    result = rena(x, 15, unstructured="rena", identical_neighbours="split")
    legacy = {
        "p": torch.tensor(0.25),
        "labels": result.labels,
        "structured": result.structured,
        "cluster_counts": result.n_found,
        "cluster_sizes": result.sizes,
    }
    assert result.sizes.shape[1] > 15  # the unstructured channels reached more than k
    layer = DropCluster2d(0.1, 15, unstructured="rena", identical_neighbours="split")
    layer.load_state_dict(legacy)
    fresh = DropCluster2d(0.25, 15, unstructured="rena", identical_neighbours="split").fit(x)
    assert float(layer.p) == 0.25 and layer.fitted
    for name in DropCluster2d.STATE:
        assert torch.equal(getattr(layer, name), getattr(fresh, name)), name
    unfitted = {name: torch.zeros(0) for name in ("labels", "structured", "cluster_counts")}
    empty = DropCluster2d(0.1)
    empty.load_state_dict({**unfitted, "cluster_sizes": torch.zeros(0, 0)})
    assert not empty.fitted


# ---------------------------------------------------------------- memory and per-fit tables


def _saved_tensors_of(function, x):
    """The tensors autograd keeps for backward while ``function(x)`` runs."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = function(x)
    return out, saved


@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_keeps_no_activation_sized_tensor(per_sample, dtype):
    # nn.Dropout2d keeps an (N, C, 1, 1) mask; the layer may keep its (B, C, K) table and refer
    # to its own fitted tables, but nothing of the input's size.
    layer = _fitted_layer(0.3, per_sample=per_sample).to(dtype)
    x = torch.ones(8, 6, 12, 12, dtype=dtype, requires_grad=True)  # the output is the multiplier
    out, saved = _saved_tensors_of(layer, x)
    own = {layer.labels.untyped_storage().data_ptr()}
    own |= {
        onehot.untyped_storage().data_ptr() for onehot in layer._tables[(12, 12)].onehots.values()
    }
    new = [t for t in saved if t.untyped_storage().data_ptr() not in own]
    assert sum(t.numel() for t in new) <= (8 if per_sample else 1) * 6 * 15
    weights = torch.randn(out.shape, generator=_generator(1), dtype=dtype)
    (out * weights).sum().backward()
    assert torch.equal(x.grad, weights * out.detach())
    assert 0 < int((out == 0).sum()) < out.numel()


def test_the_cpu_product_and_the_gather_give_identical_outputs_and_gradients():
    layer = _fitted_layer(0.3)
    x = _smooth(8, 6, 12, seed=3)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        layer.generator = _generator(4)
        xi = x.clone(memory_format=layout).requires_grad_()
        out = layer(xi)
        out.backward(torch.arange(out.numel(), dtype=torch.float32).view(out.shape) % 7)
        results.append((out, xi.grad))
    assert torch.float32 in layer._tables[(12, 12)].onehots  # the contiguous input took the product
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_tables_follow_a_refit_a_load_and_a_move():
    layer, other = _fitted_layer(0.2), DropCluster2d(0.2, 15).fit(_smooth(32, 6, 12, seed=9))
    x = _smooth(4, 6, 12, seed=8)

    def output(module):
        module.generator = _generator(3)
        return module(x)

    first = output(layer)
    assert not torch.equal(first, output(other))
    layer.load_state_dict(other.state_dict())
    assert torch.equal(output(layer), output(other))
    layer.fit(_smooth(32, 6, 12, seed=0))  # back to the first clusters, written in place
    assert torch.equal(output(layer), first)
    layer.double()
    assert torch.equal(output(layer), first.double())
    with torch.no_grad():
        layer.labels.copy_(other.labels)
        layer.cluster_sizes.copy_(other.cluster_sizes)
        layer.cluster_counts.copy_(other.cluster_counts)
        layer.structured.copy_(other.structured)
    assert torch.equal(output(layer), output(other).double())


@pytest.mark.parametrize("columns", [4, 64])  # packed draws (Floyd's sampler), sorted scores
def test_every_set_of_dropped_clusters_is_equally_likely(columns):
    # Four one-pixel clusters, p = 0.5: two dropped, each of the 6 pairs in 1/6 of the images.
    labels = torch.arange(4).view(1, 1, 4)
    sizes = torch.zeros(1, columns, dtype=torch.int64)
    sizes[0, :4] = 1
    clusters = Clusters(labels, torch.tensor([True]), torch.tensor([4]), sizes)
    out = drop_cluster2d(torch.ones(6000, 1, 1, 4), 0.5, clusters, generator=_generator(3))
    kept = (out[:, 0, 0] > 0).long()
    assert (kept.sum(dim=1) == 2).all()
    assert torch.equal(out[:, 0, 0][kept.bool()], torch.full((12000,), 2.0))  # 4 / 2 kept
    pairs = torch.unique(kept @ torch.tensor([1, 2, 4, 8]), return_counts=True)
    assert len(pairs[0]) == 6
    # 1000 expected per pair, standard deviation 29: five of them.
    assert (pairs[1] - 1000).abs().max() < 145, pairs


def test_a_compiled_layer_is_not_recompiled_by_its_first_fit():
    from torch._dynamo.testing import CompileCounter

    layer = DropCluster2d(0.2, 15, input_shape=(6, 12, 12))
    counter = CompileCounter()
    compiled = torch.compile(layer, backend=counter)
    x = _smooth(4, 6, 12, seed=8)
    assert torch.equal(compiled(x), x)  # not fitted: the identity, inside the graph
    layer.fit(_smooth(32, 6, 12))
    out = compiled(x)
    assert counter.frame_count == 1
    zeros = (out == 0).reshape(4, 6, -1).float().mean(dim=2)
    assert ((zeros > 0.02) & (zeros < 0.5)).all()  # 3 of 15 clusters dropped per channel
    layer.reset()
    assert torch.equal(compiled(x), x)
    assert counter.frame_count == 1


def test_float16_output_is_zero_not_nan_when_every_channel_is_masked():
    with pytest.warns(UserWarning, match="found no structured channel among the 64 channels"):
        layer = DropCluster2d(0.2, 15).fit(torch.zeros(8, 64, 32, 32))  # dead: all unstructured
    assert not layer.structured.any()
    layer.half()
    x = torch.ones(2, 64, 32, 32, dtype=torch.float16)
    for mode in (layer.train, layer.eval):
        mode()
        assert torch.equal(layer(x), torch.zeros_like(x))  # 64 * 32 * 32 overflows float16


def test_the_layer_runs_in_inference_mode():
    with torch.inference_mode():
        layer = DropCluster2d(0.2, 15).fit(_smooth(32, 6, 12))
        layer.train()
        out = layer(torch.ones(4, 6, 12, 12))
    assert int((out == 0).sum()) > 0


@pytest.mark.parametrize("compiled", [False, True])
def test_backward_survives_an_in_place_rewrite_of_the_buffers_between_forward_and_backward(
    compiled,
):
    # DDP rewrites buffers at every forward: two forwards, then one backward.
    layer = _fitted_layer(0.3)
    function = torch.compile(layer, backend="aot_eager") if compiled else layer
    x = torch.ones(4, 6, 12, 12, requires_grad=True)
    first, second = function(x), function(x)
    with torch.no_grad():
        layer.labels.add_(0)
    (first.sum() + second.sum()).backward()
    assert torch.equal(x.grad, (first + second).detach())


def test_per_fit_tables_are_reused_across_steps_and_dropped_by_every_write():
    layer = _fitted_layer(0.2)
    x = torch.ones(4, 6, 12, 12)
    layer(x)
    tables = layer._tables
    layer(x)
    assert layer._tables is tables  # computed once per fit, not per step
    copied = copy.deepcopy(layer)
    assert copied._tables is None
    layer.generator, copied.generator = _generator(5), _generator(5)
    assert torch.equal(layer(x), copied(x))
    writes = [
        lambda: layer.fit(_smooth(32, 6, 12, seed=2)),
        lambda: layer.load_state_dict(copied.state_dict()),
        layer.double,
        layer.reset,
    ]
    for write in writes:
        layer(x)
        assert layer._tables is not None
        write()
        assert layer._tables is None


@pytest.mark.parametrize("p", [0.5, 0.99])
def test_compiled_draws_drop_floor_p_n_clusters_with_mixed_counts(p):
    # Channel 0: 15 clusters; channel 1: 4; channel 2: unstructured.
    labels = torch.zeros(3, 8, 8, dtype=torch.int64)
    labels[0] = torch.arange(64).view(8, 8) % 15
    labels[1] = torch.arange(64).view(8, 8) % 4
    sizes = torch.zeros(3, 15, dtype=torch.int64)
    sizes[0] = torch.bincount(labels[0].flatten(), minlength=15)
    sizes[1, :4] = 16
    layer = DropCluster2d(p, 15, input_shape=(3, 8, 8))
    layer.load_clusters(
        Clusters(labels, torch.tensor([True, True, False]), torch.tensor([15, 4, 0]), sizes)
    )
    compiled = torch.compile(layer, backend="aot_eager")
    out = compiled(torch.ones(500, 3, 8, 8))
    for channel, count in ((0, 15), (1, 4)):
        kept = [labels[channel][out[n, channel] > 0].unique().numel() for n in range(500)]
        assert set(kept) == {count - int(p * count + 1e-9)}
    assert (out[:, 2] == 0).all()
    # Every cluster of channel 1 is dropped about equally often (p = 0.5: 2 of 4).
    dropped = torch.stack([(out[:, 1][:, labels[1] == k] == 0).all(dim=1) for k in range(4)])
    assert ((dropped.float().mean(dim=1) - (2 if p == 0.5 else 3) / 4).abs() < 0.08).all()


def test_compiled_layer_with_more_clusters_than_bits_uses_the_table_path():
    layer = DropCluster2d(0.2, 64).fit(_smooth(32, 4, 12))
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.ones(8, 4, 12, 12, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())


def test_bfloat16_product_and_gather_give_identical_outputs():
    layer = _fitted_layer(0.3)
    x = _smooth(8, 6, 12, seed=3).bfloat16()
    layer.generator = _generator(4)
    product = layer(x)
    assert torch.bfloat16 in layer._tables[(12, 12)].onehots
    layer.generator = _generator(4)
    gathered = layer(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(product, gathered)


# -- what a loaded or fitted layer checks --------------------------------------------------------


def _state_with(**changes) -> dict:
    """A fitted layer's state_dict with some entries changed."""
    state = _fitted_layer(0.3).state_dict()
    for key, change in changes.items():
        state[key] = change(state[key].clone())
    return state


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"labels": lambda t: t.masked_fill(t == 0, 15)},
            r"'labels': channel 0 is structured with \d+ clusters, but its labels range from 1 to "
            r"15 \(expected 0 to \d+\)",
        ),
        ({"labels": lambda t: t - 1}, r"'labels': channel 0 is structured .* range from -1"),
        (
            {"cluster_counts": lambda t: t + 20},
            r"'cluster_counts': channel 0 is structured with \d+ clusters, but a structured "
            r"channel has 1 to 15",
        ),
        (
            {"cluster_sizes": lambda t: t.roll(1, dims=1)},
            r"'cluster_sizes': channel 0 is structured .* but its sizes are \[",
        ),
        (
            {"structured": lambda t: t.logical_not()},
            r"'cluster_counts': channel 0 is unstructured with count \d+, but such a channel has 0",
        ),
        ({"labels": lambda t: t.float()}, r"'labels' should be a 3-d integer tensor"),
    ],
)
def test_loading_tables_a_fit_cannot_make_is_refused_naming_the_key(changes, message):
    layer = DropCluster2d(0.3, 15)
    state = _state_with(**changes)
    with pytest.raises(ValueError, match=f"cannot load DropCluster2d state: {message}"):
        layer.load_state_dict(state)
    assert not layer.fitted  # nothing of the state was taken


def test_a_fitted_layer_keeps_its_clusters_when_refusing_a_state():
    layer = _fitted_layer(0.3)
    before = {key: value.clone() for key, value in layer.state_dict().items()}
    bad = _state_with(labels=lambda t: t.masked_fill(t == 0, 15))
    with pytest.raises(ValueError, match="its labels range"):
        layer.load_state_dict(bad)
    assert all(torch.equal(before[key], value) for key, value in layer.state_dict().items())
    with pytest.raises(ValueError, match="counts: channel 0"):
        layer.load_clusters(
            Clusters(layer.labels, layer.structured, layer.cluster_counts + 20, layer.cluster_sizes)
        )
    assert all(torch.equal(before[key], value) for key, value in layer.state_dict().items())


def test_a_valid_state_still_loads_and_predicts_the_same():
    fitted = _fitted_layer(0.3).eval()
    layer = DropCluster2d(0.3, 15).eval()
    layer.load_state_dict(fitted.state_dict())
    x = _smooth(4, 6, 12, seed=9)
    assert torch.equal(layer(x), fitted(x))


@pytest.mark.parametrize("shape", [(8, 10), (8, 3, 10), (2, 3, 4, 4, 4)])
def test_input_that_is_not_a_feature_map_fails_at_the_first_forward(shape):
    layer = DropCluster2d(0.1)
    expected = f"takes (N, C, H, W) feature maps, but got input of shape {tuple(shape)}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        layer(torch.ones(shape))
    assert layer.input_shape is None


# ---------------------------------------------------------------- another input size

# Five clusters on a 4x4 map: the quadrants, with a one-pixel cluster 4 inside quadrant 0.
WITH_A_DOT = torch.tensor([[0, 0, 1, 1], [0, 4, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])


def _resampling_layer(p=0.2, **options):
    layer = DropCluster2d(p, 5, other_sizes="resample", **options)
    layer.load_clusters(Clusters.from_labels(WITH_A_DOT[None], n_clusters=5))
    return layer


def test_labels_resample_by_nearest_neighbour_as_interpolate_maps_positions():
    clusters = Clusters.from_labels(WITH_A_DOT[None], n_clusters=5)
    larger = clusters.resample(8, 8)  # every label twice in each direction
    assert torch.equal(larger.labels[0], WITH_A_DOT.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert larger.sizes.tolist() == [[12, 16, 16, 16, 4]] and larger.counts.tolist() == [5]
    smaller = clusters.resample(2, 2)  # the even rows and columns: the dot vanishes
    assert smaller.labels.tolist() == [[[0, 1], [2, 3]]]
    assert smaller.sizes.tolist() == [[1, 1, 1, 1, 0]] and smaller.counts.tolist() == [5]
    for height, width in ((3, 5), (7, 2), (10, 6)):
        expected = F.interpolate(WITH_A_DOT[None, None].float(), (height, width), mode="nearest")
        assert torch.equal(clusters.resample(height, width).labels, expected[0].long())
    assert clusters.resample(4, 4) is clusters


def _dropped_cluster(out, x, labels):
    """The one cluster of ``labels`` a (H, W) output dropped (None: nothing dropped), after
    checking that the kept pixels are x times count(M) / count_ones(M)."""
    zero = out == 0
    dropped = labels[zero].unique().tolist()
    assert len(dropped) <= 1 and torch.equal(zero, labels == dropped[0] if dropped else zero)
    kept = int((~zero).sum())
    assert torch.allclose(out[~zero], x[~zero] * labels.numel() / kept)
    return dropped[0] if dropped else None


def test_a_resampling_layer_drops_the_fitted_number_of_clusters_at_every_size():
    for size, sizes in ((8, [12, 16, 16, 16, 4]), (2, [1, 1, 1, 1, 0])):
        layer = _resampling_layer(generator=_generator(3))
        x = torch.rand(200, 1, size, size) + 1.0
        out = layer(x)
        labels = Clusters.from_labels(WITH_A_DOT[None], n_clusters=5).resample(size, size).labels
        # floor(0.2 * 5) = 1 of the fitted 5 clusters per image, each with its own pixels.
        dropped = [_dropped_cluster(out[n, 0], x[n, 0], labels[0]) for n in range(200)]
        seen = {None if d is None else sizes[d] for d in dropped}
        if size == 8:
            assert set(dropped) == {0, 1, 2, 3, 4}
        else:  # drawing the vanished cluster 4 drops nothing, and the scale is then 1
            assert set(dropped) == {0, 1, 2, 3, None} and seen == {1, None}
        # The functional form with the resampled clusters draws the same with the same seed.
        clusters = layer.clusters.resample(size, size)
        assert torch.equal(out, drop_cluster2d(x, 0.2, clusters, generator=_generator(3)))
    layer = _resampling_layer()
    layer.eval()
    assert torch.equal(layer(torch.ones(2, 1, 2, 2)), torch.ones(2, 1, 2, 2))


def test_a_fitted_layer_refuses_another_size_by_default_naming_both_and_the_option():
    layer = _fitted_layer(size=12)
    message = (
        r"DropCluster2d holds clusters for \(C, H, W\) = \(6, 12, 12\) maps, but got input of "
        r"shape \(2, 6, 10, 10\): refit it .* or make the layer with other_sizes='resample' to "
        r"resample its labels to each input's \(H, W\)$"
    )
    with pytest.raises(ValueError, match=message):
        layer(torch.ones(2, 6, 10, 10))
    layer.eval()
    with pytest.raises(ValueError, match=message):
        layer(torch.ones(2, 6, 10, 10))
    resampling = _fitted_layer(size=12, other_sizes="resample")
    with pytest.raises(ValueError, match=r"\(6, 12, 12\) maps, but got input of shape \(2, 5, 12"):
        resampling(torch.ones(2, 5, 12, 12))  # channels cannot be resampled
    with pytest.raises(ValueError, match="other_sizes should be one of"):
        DropCluster2d(0.1, other_sizes="nearest")
    with pytest.raises(ValueError, match=r"clusters.resample\(10, 10\) puts them on"):
        drop_cluster2d(torch.ones(2, 6, 10, 10), 0.1, layer.clusters)
    assert "other_sizes='resample'" in repr(resampling) and "other_sizes" not in repr(layer)


def test_multi_scale_training_and_evaluation_at_another_size_leave_the_state_unchanged():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        DropCluster2d(0.2, 15, other_sizes="resample"),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    )
    from dropcluster.nn import fit_clusters

    fit_clusters(model, _smooth(32, 1, 12), 32)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for size in (12, 16, 8, 12):  # one training step at each size
        x, target = _smooth(8, 1, size, seed=size), torch.randint(0, 3, (8,))
        loss = F.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        assert torch.isfinite(model[0].weight.grad).all() and model[0].weight.grad.abs().sum() > 0
        optimizer.step()
    model.eval()
    assert model(_smooth(2, 1, 20)).shape == (2, 3)
    assert model[2].input_shape == (4, 12, 12)
    assert set(model[2]._tables) == {(12, 12), (16, 16), (8, 8), (20, 20)}  # cached per size
    for name in DropCluster2d.STATE:  # the stored clusters stay at the fitted size
        key = f"2.{name}"
        assert torch.equal(model.state_dict()[key], state[key]), key
    # The gradient at another size passes exactly the kept pixels, scaled.
    layer = _resampling_layer(generator=_generator(4))
    layer.record_mask = True
    x = torch.rand(6, 1, 8, 8, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert torch.allclose(x.grad, out.detach() / x.detach())


def test_a_compiled_resampling_layer_drops_one_resampled_cluster_at_each_size():
    from tests.conftest import compile_counting_graphs

    torch.manual_seed(6)  # torch's generator: an explicit one breaks the graph
    layer = _resampling_layer()
    compiled, graphs = compile_counting_graphs(layer)
    for size in (8, 2):
        x = torch.rand(20, 1, size, size) + 1.0
        out = compiled(x)
        labels = layer.clusters.resample(size, size).labels[0]
        dropped = {_dropped_cluster(out[n, 0], x[n, 0], labels) for n in range(20)}
        assert dropped <= ({0, 1, 2, 3, 4} if size == 8 else {0, 1, 2, 3, None})
        assert len(dropped) >= 3
    # No graph break: one graph per size, or one with dynamic shapes when an earlier test
    # compiled this forward already (dynamo then marks the sizes dynamic).
    assert 1 <= len(graphs) <= 2


def test_a_fit_where_p_drops_no_cluster_says_so():
    activations = torch.rand(32, 2, 8, 8)
    activations[:, :, :4] += 1  # two halves: structure ReNA finds
    with pytest.warns(UserWarning, match=r"p=0.1 drops floor\(p \* n\) = 0 clusters .*n = 5"):
        DropCluster2d(0.1, n_clusters=5).fit(activations)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DropCluster2d(0.2, n_clusters=5).fit(activations)  # floor(0.2 * 5) = 1: no warning
        DropCluster2d(0.0, n_clusters=5).fit(activations)  # p = 0 (a ramp's start): silent
