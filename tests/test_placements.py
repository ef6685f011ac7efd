"""The paper's placements on foreign models (torchvision and timm ResNet layouts) and on ours."""

from __future__ import annotations

import copy

import pytest
import torch
from reference_models import Bottleneck, ResNet18, TimmResNet18
from torch import nn

from dropcluster.models import place_regularizer, resnet20, resnet50
from dropcluster.nn import (
    DropBlock2d,
    DropCluster2d,
    StochasticDepth,
    attach,
    fit_clusters,
    place_dropblock,
    place_dropcluster,
    place_dropout,
    place_stochastic_depth,
)

BLOCKS = [f"layer{stage}.{index}" for stage in range(1, 5) for index in range(2)]


def _model(seed: int = 0, layout=ResNet18, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return layout(n_classes=10, width=8, **kwargs)


def _record(model: nn.Module, names: list[str], inputs: bool = False) -> dict[str, torch.Tensor]:
    """Copies of the inputs (or outputs) of the named modules at each forward, by name."""
    seen = {}
    for name in names:
        module = model.get_submodule(name)
        if inputs:
            module.register_forward_pre_hook(
                lambda _, args, name=name: seen.__setitem__(name, args[0].clone())
            )
        else:
            module.register_forward_hook(
                lambda _, __, out, name=name: seen.__setitem__(name, out.clone())
            )
    return seen


# --- StochasticDepth: the branch only, never the identity path ------------------------------


def test_stochastic_depth_with_p_1_leaves_every_torchvision_block_its_shortcut_through_relu():
    model = _model()
    placed = place_stochastic_depth(model, 1.0)
    assert list(placed) == [f"{block}.bn2.attached_regularizer" for block in BLOCKS]
    block_in = _record(model, BLOCKS, inputs=True)
    block_out = _record(model, BLOCKS)
    model.train()
    model(torch.randn(4, 3, 64, 64))
    for name in BLOCKS:
        block, x = model.get_submodule(name), block_in[name]
        shortcut = x if block.downsample is None else block.downsample(x)
        assert torch.equal(block_out[name], torch.relu(shortcut)), name


@pytest.mark.parametrize("block_name", ["layer1.0", "layer2.0"])  # identity, downsample
def test_a_dropped_branch_gives_relu_of_the_shortcut_on_any_input(block_name):
    model = _model()
    place_stochastic_depth(model, 1.0)
    block = model.get_submodule(block_name).train()
    x = torch.randn(3, block.conv1.in_channels, 8, 8)  # negative values: the ReLU matters
    shortcut = x if block.downsample is None else block.downsample(x)
    assert torch.equal(block(x.clone()), torch.relu(shortcut))
    assert (torch.relu(shortcut) != shortcut).any()


def test_a_bottleneck_block_drops_its_branch_after_bn3():
    torch.manual_seed(0)
    model = ResNet18(n_classes=10, width=4, block=Bottleneck, layers=(3, 4, 6, 3))
    placed = place_stochastic_depth(model, 1.0)
    assert len(placed) == 16 and all(name.endswith(".bn3.attached_regularizer") for name in placed)
    block = model.layer2[0].train()
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(block(x.clone()), torch.relu(block.downsample(x)))


def test_with_p_0_and_in_evaluation_the_model_is_unchanged():
    reference, model, other = _model(), _model(), _model()
    place_stochastic_depth(model, 0.0)
    place_stochastic_depth(other, 0.5)
    x = torch.randn(4, 3, 64, 64)
    assert torch.equal(other.eval()(x), reference.eval()(x))
    assert torch.equal(model.train()(x), reference.train()(x))
    other.load_state_dict(reference.state_dict())  # strict: no weight renamed, no key added


def test_each_sample_keeps_its_branch_scaled_or_drops_it():
    model = _model()
    branch_out = _record(model, ["layer2.0.bn2"])  # registered first: sees the branch itself
    place_stochastic_depth(model, 0.5)
    block_in, block_out = _record(model, ["layer2.0"], inputs=True), _record(model, ["layer2.0"])
    torch.manual_seed(3)
    model.train()(torch.randn(16, 3, 32, 32))
    block = model.layer2[0]
    shortcut = block.downsample(block_in["layer2.0"])
    dropped = torch.relu(shortcut)
    kept = torch.relu(shortcut + 2.0 * branch_out["layer2.0.bn2"])
    out = block_out["layer2.0"]
    was_dropped = [torch.equal(out[i], dropped[i]) for i in range(16)]
    was_kept = [torch.allclose(out[i], kept[i], atol=1e-6) for i in range(16)]
    assert all(d != k for d, k in zip(was_dropped, was_kept, strict=True))
    assert 0 < sum(was_dropped) < 16


def test_the_linear_rule_gives_block_l_of_l_the_rate_p_l_over_l():
    model = _model()
    placed = place_stochastic_depth(model, 0.8, rule="linear", mode="batch")
    rates = [float(layer.p) for layer in placed.values()]
    assert rates == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], abs=1e-7)
    assert {layer.mode for layer in placed.values()} == {"batch"}
    constant = place_stochastic_depth(_model(), 0.3)
    assert [float(layer.p) for layer in constant.values()] == pytest.approx([0.3] * 8)


def test_explicit_branches_on_a_model_without_known_blocks():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2))

        def forward(self, x):
            return x + self.body(x)

    model = nn.Sequential(Residual(), Residual())
    with pytest.raises(ValueError, match=r"looked for residual blocks .* top-level modules are"):
        place_stochastic_depth(model, 1.0)
    placed = place_stochastic_depth(model, 1.0, rule="linear", branches=["0.body", "1.body"])
    assert list(placed) == ["0.body.1.attached_regularizer", "1.body.1.attached_regularizer"]
    assert [float(layer.p) for layer in placed.values()] == [0.5, 1.0]
    x = torch.randn(2, 2, 4, 4)
    assert torch.equal(model.train()(x), x)


# --- timm's ResNet layout --------------------------------------------------------------------


def test_timm_blocks_get_stochastic_depth_as_their_drop_path():
    reference, model = _model(layout=TimmResNet18), _model(layout=TimmResNet18)
    placed = place_stochastic_depth(model, 1.0, rule="linear")
    assert list(placed) == [f"{block}.drop_path" for block in BLOCKS]
    assert all(model.get_submodule(name) is layer for name, layer in placed.items())
    assert float(model.layer4[1].drop_path.p) == 1.0 and float(model.layer1[0].drop_path.p) == 0.125
    block = model.layer3[0].train()
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(block(x.clone()), torch.relu(block.downsample(x)))
    model.load_state_dict(reference.state_dict())  # strict
    y = torch.randn(2, 3, 64, 64)
    assert torch.equal(model.eval()(y), reference.eval()(y))


def test_a_timm_model_with_a_drop_path_already_is_refused_and_left_as_it_was():
    model = _model(layout=TimmResNet18, drop_path_rate=0.1, drop_path=StochasticDepth)
    assert model.layer1[0].drop_path is None  # timm's rule: block 0 gets rate 0, no module
    with pytest.raises(ValueError, match=r"layer1\.1\.drop_path is StochasticDepth already"):
        place_stochastic_depth(model, 0.2)
    assert model.layer1[0].drop_path is None


def test_timm_stem_stages_and_pooled_features():
    model = _model(layout=TimmResNet18)
    assert list(place_dropcluster(model, 0.1)) == ["act1.attached_regularizer"]
    assert list(place_dropblock(model, 0.1)) == [
        "layer3.1.attached_regularizer",
        "layer4.1.attached_regularizer",
    ]
    # timm's drop_rate: dropout on the pooled features, before fc.
    assert list(place_dropout(model, 0.5, after="global_pool")) == [
        "global_pool.attached_regularizer"
    ]
    fc_in = _record(model, ["fc"], inputs=True)
    torch.manual_seed(0)
    model.train()(torch.randn(4, 3, 64, 64))
    assert (fc_in["fc"] == 0).float().mean() > 0.3  # half dropped (and ReLU zeros)


# --- DropBlock after stages 3-4, Dropout before the head, DropCluster after the stem ----------


def test_dropblock_after_stages_3_and_4_changes_only_those_stages():
    reference, model = _model(), _model()
    placed = place_dropblock(model, 0.3, block_size=3)
    assert list(placed) == ["layer3.1.attached_regularizer", "layer4.1.attached_regularizer"]
    stages = ["layer1", "layer2", "layer3", "layer4"]
    seen, expected = _record(model, stages), _record(reference, stages)
    x = torch.randn(8, 3, 64, 64)
    torch.manual_seed(0)
    model.train()(x)
    reference.train()(x)
    assert torch.equal(seen["layer1"], expected["layer1"])
    assert torch.equal(seen["layer2"], expected["layer2"])
    assert not torch.equal(seen["layer3"], expected["layer3"])
    placed["layer3.1.attached_regularizer"].set_p(0.0)  # stage 4's own layer still drops
    model(x)
    reference(x)
    assert torch.equal(seen["layer3"], expected["layer3"])
    assert not torch.equal(seen["layer4"], expected["layer4"])


def test_dropout_goes_before_the_head():
    reference, model = _model(), _model()
    block_out = _record(model, ["layer4.1"])  # registered first: the output before dropout
    placed = place_dropout(model, 0.5)
    assert list(placed) == ["layer4.1.attached_regularizer"]
    assert type(placed["layer4.1.attached_regularizer"]) is nn.Dropout
    pool_in = _record(model, ["avgpool"], inputs=True)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    assert torch.equal(model.eval()(x), reference.eval()(x))
    model.train()(x)
    before, after = block_out["layer4.1"], pool_in["avgpool"]
    zeroed = (after == 0) & (before > 0)
    assert zeroed.any()
    assert torch.equal(after[~zeroed], 2.0 * before[~zeroed])
    spatial = place_dropout(_model(), 0.5, spatial=True)
    assert type(next(iter(spatial.values()))) is nn.Dropout2d


def test_dropcluster_after_the_stem_fits_and_drops():
    torch.manual_seed(0)
    images = torch.rand(32, 3, 32, 32)
    reference, model = _model(), _model()
    stem_out = _record(model, ["relu"])  # registered first: the activations before the layer
    placed = place_dropcluster(model, 0.5, input_shape=(8, 16, 16))
    assert list(placed) == ["relu.attached_regularizer"]
    layer = placed["relu.attached_regularizer"]
    assert layer.n_clusters == 15
    fit = fit_clusters(model, images, 16)
    assert layer.fitted and fit.channels == [8]
    assert torch.equal(model.eval()(images[:4]), reference.eval()(images[:4]))
    pool_in = _record(model, ["maxpool"], inputs=True)
    model.train()(images[:4])
    before, after = stem_out["relu"], pool_in["maxpool"]
    zeroed = (after == 0) & (before > 0)
    assert zeroed.any()
    assert (after[~zeroed] >= before[~zeroed]).all()  # kept pixels rescaled by >= 1


# --- this project's models: their slots --------------------------------------------------------


def test_resnet20_slots_and_the_same_rates_as_place_regularizer():
    torch.manual_seed(0)
    model, other = resnet20(), resnet20()
    placed = place_stochastic_depth(model, 0.9, rule="linear")
    assert len(placed) == 9 and all(name.endswith("residual.regularizer") for name in placed)
    ours = [float(layer.p) for layer in placed.values()]
    theirs = place_regularizer(other, "stochastic_depth", 0.9, depth_rule="linear")
    assert ours == pytest.approx([0.1 * block for block in range(1, 10)])
    assert ours == [float(layer.p) for layer in theirs]
    # p = 1: a pre-activation block is its shortcut (no ReLU after the addition).
    for layer in placed.values():
        layer.set_p(1.0)
    block = model.groups[1][0].train()
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(block(x.clone()), block.shortcut(torch.relu(block.norm1(x))))
    # group4 is group3 here: (3, 4) is one place.
    assert list(place_dropblock(model, 0.1, block_size=5)) == ["groups.2.3.regularizer"]
    dropout = place_dropout(model, 0.1)
    assert list(dropout) == [f"groups.2.{i}.inner.regularizer" for i in range(3)]


def test_resnet50_slots():
    model = resnet50(n_classes=10)
    stem = place_dropcluster(model, 0.1)
    assert list(stem) == ["stem.regularizer"] and stem["stem.regularizer"].n_clusters == 15
    blocks = place_dropblock(model, 0.1, stages=1, block_size=5)  # the paper's CIFAR-100 place
    assert list(blocks) == ["groups.0.3.regularizer"]
    assert model.slot_modules("group1")[0] is blocks["groups.0.3.regularizer"]
    assert isinstance(blocks["groups.0.3.regularizer"], DropBlock2d)
    assert len(place_dropout(model, 0.1, spatial=True)) == 3  # group4_inner: 3 blocks
    assert len(place_stochastic_depth(model, 0.2)) == 16
    assert isinstance(model.slot_modules("stem")[0], DropCluster2d)


# --- errors and explicit names ---------------------------------------------------------------


def test_unknown_layouts_are_named_in_one_line():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError) as error:
        place_dropcluster(model, 0.1)
    message = str(error.value)
    assert "\n" not in message
    assert "'relu' (torchvision ResNet) or 'act1' (timm ResNet)" in message
    assert "top-level modules are 0, 1; name the place with after=" in message
    with pytest.raises(ValueError, match=r"looked for a top-level 'layer3'.* with stages="):
        place_dropblock(model, 0.1)
    with pytest.raises(ValueError, match=r"looked for a last stage.* with after="):
        place_dropout(model, 0.1)
    with pytest.raises(ValueError, match=r"has no stage 5 \('layer5'\); its stages are layer1"):
        place_dropblock(_model(), 0.1, stages=(4, 5))
    with pytest.raises(ValueError, match="stages should be"):
        place_dropblock(_model(), 0.1, stages=())
    with pytest.raises(ValueError, match="rule"):
        place_stochastic_depth(_model(), 0.1, rule="exponential")
    with pytest.raises(ValueError, match=r"has to be in \[0, 1\], but got 1.5"):
        place_stochastic_depth(_model(), 1.5)
    assert list(place_dropcluster(model, 0.1, after="1")) == ["1.attached_regularizer"]
    assert list(place_dropblock(_model(), 0.1, stages="layer2.0")) == [
        "layer2.0.attached_regularizer"
    ]


def test_a_failed_placement_leaves_the_model_as_it_was():
    model = _model()
    attach(model, "layer3.0.bn2", nn.Identity())
    with pytest.raises(ValueError, match="'layer3.0.bn2' has a regularizer attached already"):
        place_stochastic_depth(model, 0.1)
    assert not hasattr(model.layer1[0].bn2, "attached_regularizer")
    with pytest.raises(ValueError, match="bad|unexpected|block_size"):
        place_dropblock(model, 0.1, block_size=0)
    assert not hasattr(model.layer4[1], "attached_regularizer")
    slotted = resnet20()
    with pytest.raises(ValueError, match="n_clusters"):
        place_dropcluster(slotted, 0.1, n_clusters=0)
    assert slotted.slot("stem").is_empty


def test_a_wrapped_model_is_placed_inside():
    model = _model()
    wrapped = nn.DataParallel(copy.deepcopy(model))
    placed = place_stochastic_depth(wrapped, 0.1)
    assert next(iter(placed)) == "layer1.0.bn2.attached_regularizer"
    assert wrapped.module.layer1[0].bn2.attached_regularizer is next(iter(placed.values()))
