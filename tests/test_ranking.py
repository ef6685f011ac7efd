"""rank_layers: which place of a model has the most spatially structured activations."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dropcluster.cli import main
from dropcluster.experiments.layer_ranking import plot_ranking
from dropcluster.models import lenet5
from dropcluster.nn import attach
from dropcluster.nn.ranking import LayerRanking, LayerStructure, rank_layers
from dropcluster.train.config import TrainConfig
from dropcluster.train.loop import train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Shuffle(nn.Module):
    """Moves every site to a fixed random place: the values stay, the neighbourhoods go."""

    def __init__(self, sites: int) -> None:
        super().__init__()
        self.register_buffer(
            "order", torch.randperm(sites, generator=torch.Generator().manual_seed(1))
        )

    def forward(self, x):
        return x.flatten(2)[:, :, self.order].view_as(x)


class Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


class SmoothThenNoise(nn.Module):
    """``smooth``: a 5x5 averaging conv (channel 0) and a dead channel (zero weights, channel 1)
    on smooth images; ``shuffle`` scatters its sites; ``mix``: a 1x1 identity conv of that."""

    def __init__(self) -> None:
        super().__init__()
        self.smooth = nn.Conv2d(1, 2, 5, padding=2, bias=False)
        self.shuffle = Shuffle(16 * 16)
        self.mix = nn.Conv2d(2, 2, 1, bias=False)
        with torch.no_grad():
            self.smooth.weight.zero_()
            self.smooth.weight[0].fill_(1 / 25)
            self.mix.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        self.head = nn.Linear(2 * 16 * 16, 3)

    def forward(self, x):
        return self.head(self.mix(self.shuffle(self.smooth(x))).flatten(1))


def smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 1, 16, 16) float32: 4x4 noise upsampled bilinearly, smooth at every scale the 3x3
    neighbourhood of Spatial Hopkins sees."""
    coarse = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=True)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def ranked() -> LayerRanking:
    model = SmoothThenNoise()
    return rank_layers(
        model, smooth_images(32), modules=["mix", "smooth", "shuffle"], generator=_generator()
    )


def test_the_smooth_place_ranks_first_and_the_scattered_ones_near_one_half(ranked):
    assert ranked[0].name == ranked.best == "smooth"
    assert {layer.name for layer in ranked[1:]} == {"mix", "shuffle"}
    smooth = ranked[0]
    # The averaged channel is smooth; the dead channel is constant: exactly 0.5 (0/0 rule).
    assert smooth.hopkins[0] > 0.7
    assert smooth.hopkins[1] == 0.5
    assert smooth.hopkins_mean == pytest.approx((smooth.hopkins[0] + 0.5) / 2)
    for layer in ranked[1:]:
        assert abs(layer.hopkins[0] - 0.5) < 0.06  # scattered: no structure left
        assert layer.hopkins[1] == 0.5
    # The default "dead" rule: the zero-weight channel is unstructured everywhere.
    assert [layer.structured for layer in ranked] == [1, 1, 1]
    assert {layer.name: layer.order for layer in ranked} == {"smooth": 0, "shuffle": 1, "mix": 2}
    assert [layer.name for layer in ranked.by_depth()] == ["smooth", "shuffle", "mix"]
    assert all(layer.channels == 2 and layer.size == (16, 16) for layer in ranked)
    assert all(layer.slot is None for layer in ranked)
    assert ranked.n_images == 32 and ranked.n_clusters == 15 and ranked.unstructured == "dead"


def test_summaries_worked_by_hand():
    layer = LayerStructure("a", 0, None, 4, (8, 8), (0.5, 0.6, 0.7, 0.9), 3)
    assert layer.hopkins_mean == pytest.approx(0.675)
    # Linear interpolation at positions 0.75, 1.5 and 2.25 of the sorted values.
    assert layer.hopkins_quartiles == pytest.approx((0.575, 0.65, 0.75))
    assert layer.structured_fraction == 0.75


def test_rows_are_plain_json_in_rank_order_and_the_table_says_the_same(ranked):
    rows = json.loads(json.dumps(ranked.to_rows()))
    assert [row["rank"] for row in rows] == [1, 2, 3]
    assert [row["module"] for row in rows] == [layer.name for layer in ranked]
    first = rows[0]
    assert first["size"] == "16x16" and first["channels"] == 2 and first["slot"] is None
    assert first["structured"] == 1 and first["structured_fraction"] == 0.5
    assert first["hopkins_mean"] == pytest.approx(ranked[0].hopkins_mean)
    assert first["hopkins_median"] == pytest.approx(ranked[0].hopkins_mean)  # two channels
    lines = str(ranked).splitlines()
    assert lines[0].split()[:3] == ["rank", "module", "slot"]
    assert lines[1].split()[:2] == ["1", "smooth"] and lines[1].endswith("1/2 (50%)")
    assert f"{ranked[0].hopkins_mean:.3f}" in lines[1]
    assert "32 images" in lines[-1] and "'dead' rule" in lines[-1]


def test_the_default_places_are_the_convs_outputs():
    ranking = rank_layers(SmoothThenNoise(), smooth_images(8), generator=_generator())
    assert [layer.name for layer in ranking] == ["smooth", "mix"]
    assert ranking.skipped == ()


def test_the_paper_rule_is_passed_to_rena():
    model = SmoothThenNoise()
    ranking = rank_layers(
        model, smooth_images(32), modules=["smooth"], unstructured="none", generator=_generator()
    )
    assert ranking[0].structured == 2  # "none": no channel is unstructured, not even the dead


def test_a_model_with_slots_is_measured_at_its_slots_on_their_input():
    torch.manual_seed(0)
    model = lenet5(1, 10)
    # What the slot's regularizer outputs is not what it sees: a zeroing regularizer changes
    # nothing of the measure.
    model.set_regularizer("stem", Zero())
    images = smooth_images(16)
    ranking = rank_layers(model, images, generator=_generator())
    by_depth = ranking.by_depth()
    assert [(layer.name, layer.slot) for layer in by_depth] == [
        ("stem", "stem"),
        ("group1", "group1"),
    ]
    assert by_depth[0].channels == 6 and by_depth[0].size == (16, 16)
    assert by_depth[1].channels == 16 and by_depth[1].size == (4, 4)
    assert by_depth[0].structured > 0  # the input of the slot, not Zero's output
    convs = rank_layers(model, images, modules="convs", generator=_generator())
    assert sorted(layer.name for layer in convs) == ["conv1", "conv2"]


def test_a_named_module_is_measured_before_its_attached_regularizer():
    model = SmoothThenNoise()
    attach(model, "smooth", Zero())
    ranking = rank_layers(model, smooth_images(16), modules=["smooth"], generator=_generator())
    assert ranking[0].hopkins[0] > 0.7 and ranking[0].structured == 1


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.act = nn.ReLU()
        self.down = nn.Conv2d(3, 3, 3, stride=2, padding=1)
        self.tiny = nn.Conv2d(3, 3, 3, stride=4, padding=1)

    def forward(self, x):
        x = self.act(self.down(self.act(self.conv(x))))
        return self.tiny(x)


def test_a_module_called_twice_is_measured_at_its_first_call():
    ranking = rank_layers(CalledTwice(), smooth_images(8), modules=["act"], generator=_generator())
    assert ranking[0].size == (16, 16)  # not the 8x8 of its second call


def test_default_places_too_small_are_skipped_and_named_ones_raise():
    ranking = rank_layers(CalledTwice(), smooth_images(8), generator=_generator())
    assert [layer.name for layer in ranking.by_depth()] == ["conv", "down"]
    assert ranking.skipped == (
        "tiny (maps of 2x2, smaller than 3 along an axis (Spatial Hopkins needs 3))",
    )
    assert "skipped: tiny" in ranking.format()
    with pytest.raises(ValueError, match="cannot measure module 'tiny': maps of 2x2"):
        rank_layers(CalledTwice(), smooth_images(8), modules=["tiny"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"modules": ["nope"]}, "has no submodule 'nope'"),
        ({"modules": ["head"]}, r"cannot measure module 'head': expected an \(N, C, L\)"),
        ({"modules": "blocks"}, "modules should be None, 'convs' or 'slots'"),
        ({"modules": ["mix", "mix"]}, "each module once"),
        ({"modules": "slots"}, "has no slot to measure"),
        ({"n_batches": 0}, "n_batches"),
        ({"unstructured": "maybe"}, "unstructured"),
    ],
)
def test_bad_arguments_raise_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message):
        rank_layers(SmoothThenNoise(), smooth_images(4), **options)


def test_one_image_is_not_enough():
    with pytest.raises(ValueError, match="at least 2 images, but the data gave 1"):
        rank_layers(SmoothThenNoise(), smooth_images(1))


def test_data_forms_and_the_training_modes_restored():
    images = smooth_images(10)
    labels = torch.zeros(10, dtype=torch.long)
    model = SmoothThenNoise().train()
    model.mix.eval()  # a frozen part stays frozen
    cases = [
        (images, 8),  # 2 batches of 4
        (TensorDataset(images, labels), 8),  # (image, label) items collated
        (DataLoader(TensorDataset(images, labels), batch_size=3), 6),  # its first 2 batches
        ([images[:5], images[5:]], 10),  # a list of batches
    ]
    for data, expected in cases:
        ranking = rank_layers(model, data, modules=["smooth"], batch_size=4, generator=_generator())
        assert ranking.n_images == expected
    assert model.training and model.smooth.training and not model.mix.training


def test_attach_takes_the_rankings_best_place(ranked):
    model = SmoothThenNoise()  # another instance: the ranking names modules, not objects
    layer = attach(model, ranked, Zero())
    assert model.smooth.attached_regularizer is layer
    with torch.no_grad():
        assert torch.equal(model(smooth_images(2)), model.head.bias.expand(2, 3))


def test_the_plot_is_written(ranked, tmp_path):
    path = plot_ranking(ranked, tmp_path / "ranking.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A LeNet-5 run of one epoch on 2 % of the synthetic set."""
    run_dir = tmp_path_factory.mktemp("rank_run")
    config = TrainConfig(
        dataset="synthetic",
        model="lenet5",
        regularizer="none",
        epochs=1,
        batch_size=32,
        train_fraction=0.02,
        average_last=1,
        eval_batch_size=500,
        channels_last=False,
    )
    train(config, run_dir, progress_stream=io.StringIO())
    return run_dir


def test_the_cli_ranks_a_run_folder(tiny_run, tmp_path, capsys):
    json_path, plot_path = tmp_path / "ranking.json", tmp_path / "ranking.png"
    status = main(
        [
            "rank-layers",
            "--run",
            str(tiny_run),
            "--n-batches",
            "1",
            "--batch-size",
            "16",
            "--json",
            str(json_path),
            "--plot",
            str(plot_path),
        ]
    )
    assert status == 0
    out = capsys.readouterr().out
    written = json.loads(json_path.read_text())
    assert written["n_images"] == 16 and written["model"] == "lenet5"
    assert sorted(row["module"] for row in written["layers"]) == ["group1", "stem"]
    assert f"best: {written['best']}" in out
    assert written["best"] == written["layers"][0]["module"]
    assert "(1 epochs)" in written["source"]
    assert plot_path.read_bytes()[:8] == PNG_SIGNATURE


def test_the_cli_ranks_an_untrained_model_and_refuses_half_a_request(capsys):
    status = main(
        [
            "rank-layers",
            "--model",
            "lenet5",
            "--dataset",
            "synthetic",
            "--modules",
            "conv1,conv2",
            "--n-batches",
            "1",
            "--batch-size",
            "8",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0 and "untrained (seed 0)" in out and "conv2" in out
    assert main(["rank-layers", "--model", "lenet5"]) == 2
    assert "needs --dataset" in capsys.readouterr().err


@pytest.mark.parametrize("dims", [1, 3])
def test_1d_and_3d_conv_outputs_are_ranked(dims):
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
    side = {1: 32, 3: 8}[dims]
    model = nn.Sequential(conv(1, 2, 3, padding=1), Shuffle(side**dims), conv(2, 2, 1))
    with torch.no_grad():
        model[0].weight.fill_(1 / 3**dims)
        model[2].weight.copy_(torch.eye(2).view(2, 2, *[1] * dims))
    coarse = torch.randn(16, 1, *[4] * dims, generator=_generator())
    mode = {1: "linear", 3: "trilinear"}[dims]
    images = F.interpolate(coarse, size=(side,) * dims, mode=mode, align_corners=True)
    ranking = rank_layers(model, images, generator=_generator())
    assert [layer.name for layer in ranking] == ["0", "2"]
    assert ranking[0].size == (side,) * dims and ranking[0].channels == 2
    assert ranking[0].hopkins_mean > 0.6 and abs(ranking[1].hopkins_mean - 0.5) < 0.06


def test_the_placement_preset_pairs_three_slots_with_no_dropout():
    from dropcluster.experiments.presets import arm_name, expand_grid, load_preset
    from dropcluster.models.slots import SlottedModel
    from dropcluster.nn import DropCluster2d
    from dropcluster.train.setup import build_configured_model

    specs = expand_grid(load_preset("placement"))
    arms: dict[str, list] = {}
    for spec in specs:
        arms.setdefault(arm_name(spec.regularizer, spec.config.variant), []).append(spec)
    assert set(arms) == {"none", "dropcluster:stem", "dropcluster:group1", "dropcluster:group3"}
    for runs in arms.values():  # each arm pairs with the no-dropout run of every seed
        assert sorted((s.train_fraction, s.seed) for s in runs) == [(0.1, s) for s in range(5)]
    assert len({spec.run_id for spec in specs}) == len(specs) == 20
    paper_layer = {"per_sample": False, "unstructured": "rena", "identical_neighbours": "split"}
    for slot in ("stem", "group1", "group3"):
        config = arms[f"dropcluster:{slot}"][0].config
        assert config.regularizer_options == {**paper_layer, "slot": slot} and config.p == 0.1
        model = build_configured_model(config, 10, 1, torch.device("cpu"))
        assert isinstance(model, SlottedModel)
        installed = [m for m in model.modules() if isinstance(m, DropCluster2d)]
        assert installed == [model.slot(slot).regularizer]
