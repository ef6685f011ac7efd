"""Models: shapes, the paper's stem, parameter counts, slots and the placement table."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dropcluster.models import (
    MODELS,
    PAPER_PLACEMENTS,
    PreActResNet,
    build_model,
    place_regularizer,
)
from dropcluster.nn import DropBlock2d, DropCluster2d, StochasticDepth

# Pre-activation bottleneck ResNet-50, 100 classes, ImageNet stem: torchvision's ResNet-50
# without its 1000-class classifier has 23,508,032 parameters, + 2048 * 100 + 100 for this
# classifier = 23,712,932; pre-activation moves each block's last BN to the next block's input
# and adds a final BN over 2048 channels, which nets -7,680. The stem keeps its BN (+128) and the
# first block, whose input it activates, has no BN of its own (-128): the reference's layout.
RESNET50_CIFAR100_PARAMETERS = 23_705_252


@pytest.fixture(scope="module")
def resnet50_cifar100() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet50", n_classes=100).eval()


def tiny_resnet(**kwargs) -> PreActResNet:
    """A 4-group pre-activation ResNet small enough to build and run in milliseconds."""
    torch.manual_seed(0)
    options = {"block": "basic", "depths": (1, 2, 1, 1), "widths": (4, 8, 8, 8), "n_classes": 5}
    return PreActResNet(**{**options, **kwargs})


def stem_input_shape(model: nn.Module, images: torch.Tensor) -> tuple[int, ...]:
    """Shape of what the "stem" slot receives in a forward pass of ``images``."""
    shapes = []
    hook = model.slot("stem").register_forward_pre_hook(
        lambda module, inputs: shapes.append(tuple(inputs[0].shape))
    )
    try:
        with torch.no_grad():
            model(images)
    finally:
        hook.remove()
    return shapes[0]


@pytest.mark.parametrize(
    ("name", "stem", "shape"),
    [
        ("resnet18", "imagenet", (2, 3, 64, 64)),
        ("resnet18", "cifar", (2, 1, 28, 28)),
        ("resnet20", None, (2, 1, 28, 28)),
        ("resnet20", None, (2, 3, 32, 32)),
        ("resnet20", "imagenet", (2, 3, 64, 64)),
        ("lenet5", None, (2, 1, 28, 28)),
        ("lenet5", None, (2, 3, 32, 32)),
    ],
)
def test_output_shape_is_batch_by_classes(name, stem, shape):
    torch.manual_seed(0)
    model = build_model(name, n_classes=7, in_channels=shape[1], stem=stem)
    out = model(torch.randn(shape))
    assert out.shape == (shape[0], 7)
    out.sum().backward()  # trains: every parameter gets a gradient
    assert all(p.grad is not None for p in model.parameters())


def test_resnet50_on_one_cifar_image(resnet50_cifar100):
    with torch.no_grad():
        out = resnet50_cifar100(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 100)
    assert torch.isfinite(out).all()


def test_imagenet_stem_gives_the_papers_16x16_maps_on_32x32(resnet50_cifar100):
    # Paper: the first conv output on CIFAR-100 is 64 channels of 16x16.
    assert stem_input_shape(resnet50_cifar100, torch.randn(1, 3, 32, 32)) == (1, 64, 16, 16)


def test_imagenet_stem_gives_32x32_maps_on_64x64():
    model = build_model("resnet18", n_classes=200).eval()
    assert stem_input_shape(model, torch.randn(1, 3, 64, 64)) == (1, 64, 32, 32)


def test_cifar_stem_keeps_32x32_maps():
    model = build_model("resnet18", n_classes=100, stem="cifar").eval()
    assert stem_input_shape(model, torch.randn(1, 3, 32, 32)) == (1, 64, 32, 32)


@pytest.mark.parametrize("name", ["resnet20", "lenet5"])
def test_stem_slot_input_is_exactly_the_first_conv_layers_activations(name):
    model = build_model(name, n_classes=10, in_channels=1).eval()
    if name == "resnet20":  # BN with non-trivial statistics, so that the BN is really applied
        with torch.no_grad():
            model.stem_norm.running_mean.uniform_(-0.5, 0.5)
            model.stem_norm.running_var.uniform_(0.5, 2.0)
            model.stem_norm.weight.uniform_(0.5, 1.5)
            model.stem_norm.bias.uniform_(-0.5, 0.5)
    conv_out, slot_in = [], []
    model.conv1.register_forward_hook(lambda m, i, o: conv_out.append(o.clone()))
    model.slot("stem").register_forward_pre_hook(lambda m, i: slot_in.append(i[0].detach()))
    with torch.no_grad():
        model(torch.randn(2, 1, 28, 28))
        expected = conv_out[0]
        if name == "resnet20":
            norm = model.stem_norm
            expected = (expected - norm.running_mean[:, None, None]) / torch.sqrt(
                norm.running_var[:, None, None] + norm.eps
            ) * norm.weight[:, None, None] + norm.bias[:, None, None]
        expected = expected.clamp_min(0)
    # Compared after the whole forward: a later in-place op would have changed the kept tensor.
    torch.testing.assert_close(slot_in[0], expected, rtol=1e-5, atol=1e-6)
    assert (slot_in[0] == 0).any() and (slot_in[0] > 0).any()  # really after a ReLU


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_stem_is_conv_bn_relu_and_the_first_block_does_not_preactivate_again(stem):
    model = build_model("resnet50", n_classes=100, stem=stem)
    first, second = model.groups[0][0], model.groups[0][1]
    assert isinstance(first.norm1, torch.nn.Identity)  # the reference's "no_preact" block
    assert isinstance(second.norm1, torch.nn.BatchNorm2d)
    assert all(isinstance(g[0].norm1, torch.nn.BatchNorm2d) for g in model.groups[1:])
    assert model.stem_norm.num_features == 64


def test_a_channel_silenced_through_its_batch_norm_is_exactly_zero_at_the_stem_slot():
    # A dead ReLU channel: scale 0 and a negative shift make the BN output negative everywhere.
    model = build_model("resnet20", n_classes=10, in_channels=1).eval()
    with torch.no_grad():
        model.stem_norm.weight[[2, 5]] = 0.0
        model.stem_norm.bias[[2, 5]] = -0.1
    kept = []
    model.slot("stem").register_forward_pre_hook(lambda m, i: kept.append(i[0].detach().clone()))
    with torch.no_grad():
        model(torch.randn(4, 1, 28, 28))
    per_channel_max = kept[0].amax(dim=(0, 2, 3))
    assert per_channel_max[[2, 5]].tolist() == [0.0, 0.0]
    assert (per_channel_max[[0, 1, 3, 4]] > 0).all()


def test_resnet50_parameter_count(resnet50_cifar100):
    count = sum(p.numel() for p in resnet50_cifar100.parameters())
    assert count == RESNET50_CIFAR100_PARAMETERS
    assert 23.6e6 < count < 23.8e6


def test_resnet18_and_resnet20_parameter_counts():
    assert sum(p.numel() for p in build_model("resnet18", 100).parameters()) == 11_226_020
    # He et al. 2016 report 0.27M for ResNet-20 on CIFAR-10.
    assert sum(p.numel() for p in build_model("resnet20", 10).parameters()) == 272_282


def test_slots_of_a_four_group_resnet_in_forward_order():
    model = tiny_resnet()
    assert list(model.slots) == [
        "stem",
        "group1_inner",
        "residual",
        "group1",
        "group2_inner",
        "group2",
        "group3_inner",
        "group3",
        "group4_inner",
        "group4",
    ]
    assert len(model.slots["residual"]) == 5  # one per block
    assert len(model.slots["group2_inner"]) == 2
    assert model.slot_modules() == []


def test_slots_are_identity_by_default():
    model = tiny_resnet().eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(images)
        for name in model.slots:
            model.set_regularizer(name, nn.Identity())
        after = model(images)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert all(slot.is_empty for slots in model.slots.values() for slot in slots)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("dropout", {}),
        ("spatial_dropout", {}),
        ("dropblock", {"block_size": 3}),
        ("stochastic_depth", {}),
    ],
)
def test_regularizer_changes_training_output_but_not_eval_output(name, options):
    plain = tiny_resnet()
    regularized = copy.deepcopy(plain)
    place_regularizer(regularized, name, 0.5, "cifar100", **options)
    images = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        # Evaluation first: a training forward updates the batch-norm running averages.
        torch.testing.assert_close(regularized.eval()(images), plain.eval()(images), rtol=0, atol=0)
        torch.manual_seed(1)
        trained = regularized.train()(images)
        assert not torch.allclose(trained, plain.train()(images))


def test_eval_mode_is_deterministic():
    model = tiny_resnet()
    place_regularizer(model, "dropblock", 0.3, "tiny-imagenet", block_size=2)
    place_regularizer(model, "dropout", 0.3)
    place_regularizer(model, "stochastic_depth", 0.3)
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), model(images), rtol=0, atol=0)


def test_residual_factory_builds_one_module_per_block():
    model = build_model("resnet20", n_classes=10)
    installed = model.set_regularizer("residual", lambda: StochasticDepth(0.1))
    assert len(installed) == 9
    assert len({id(module) for module in installed}) == 9
    assert [slot.regularizer for slot in model.slots["residual"]] == installed
    blocks = [block for group in model.groups for block in group if hasattr(block, "residual")]
    assert [block.residual.regularizer for block in blocks] == installed


def test_a_module_for_a_per_block_slot_is_copied_into_each_block():
    model = tiny_resnet()
    layer = StochasticDepth(0.2)
    installed = model.set_regularizer("residual", layer)
    assert installed[0] is layer
    assert len({id(module) for module in installed}) == len(installed) == 5
    assert all(float(module.p) == pytest.approx(0.2) for module in installed)


def test_copies_for_a_per_block_slot_share_the_generator():
    # A copied generator would draw the same masks in every block.
    model = tiny_resnet()
    generator = torch.Generator().manual_seed(0)
    installed = model.set_regularizer("residual", StochasticDepth(0.2, generator=generator))
    assert all(module.generator is generator for module in installed)


def test_factory_returning_one_shared_module_raises():
    model = tiny_resnet()
    shared = StochasticDepth(0.1)
    with pytest.raises(ValueError, match="same module"):
        model.set_regularizer("residual", lambda: shared)
    with pytest.raises(TypeError, match="nn.Module"):
        model.set_regularizer("residual", lambda: 0.1)


def test_none_empties_a_slot():
    model = tiny_resnet()
    model.set_regularizer("group2", nn.Dropout(0.1))
    model.set_regularizer("group2", None)
    assert model.slot_modules() == []


def test_linear_depth_rule_grows_the_rate_with_depth():
    model = tiny_resnet()
    installed = place_regularizer(model, "stochastic_depth", 0.5, depth_rule="linear")
    rates = [float(module.p) for module in installed]
    assert rates == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


@pytest.mark.parametrize(
    ("dataset", "name", "slot", "module_type", "options"),
    [
        ("cifar100", "dropcluster", "stem", DropCluster2d, {"n_clusters": 15}),
        ("cifar100", "dropblock", "group1", DropBlock2d, {"block_size": 5}),
        ("tiny-imagenet", "dropblock", "group4", DropBlock2d, {"block_size": 7}),
        ("cifar100", "dropout", "group4_inner", nn.Dropout, {}),
        ("tiny-imagenet", "spatial_dropout", "group4_inner", nn.Dropout2d, {}),
        ("tiny-imagenet", "stochastic_depth", "residual", StochasticDepth, {}),
        ("fashion-mnist", "dropblock", "group1", DropBlock2d, {"block_size": 5}),
        ("synthetic", "dropcluster", "stem", DropCluster2d, {"n_clusters": 15}),
    ],
)
def test_placement_puts_the_papers_module_in_the_papers_slot(
    dataset, name, slot, module_type, options
):
    model = tiny_resnet()
    installed = place_regularizer(model, name, 0.2, dataset)
    assert len(installed) == len(model.slots[slot])
    assert model.slot_modules(slot) == installed
    assert model.slot_modules() == installed  # every other slot stays empty
    for module in installed:
        assert type(module) is module_type
        assert float(module.p) == pytest.approx(0.2)
        for option, value in options.items():
            assert getattr(module, option) == value


def test_placement_none_installs_nothing():
    model = tiny_resnet()
    for dataset in PAPER_PLACEMENTS:
        assert place_regularizer(model, "none", 0.0, dataset) == []
    assert model.slot_modules() == []


def test_placement_overrides_slot_and_options():
    model = tiny_resnet()
    installed = place_regularizer(model, "dropblock", 0.1, "cifar100", slot="group3", block_size=2)
    assert model.slot_modules("group3") == installed
    assert installed[0].block_size == 2


def test_three_group_resnet_places_group4_in_its_last_group():
    model = build_model("resnet20", n_classes=10)
    assert "group4" not in model.slots
    installed = place_regularizer(model, "dropout", 0.1, "tiny-imagenet")
    assert model.slot_modules("group3_inner") == installed and len(installed) == 3
    installed = place_regularizer(model, "dropblock", 0.1, "tiny-imagenet")
    assert model.slot_modules("group3") == installed
    with pytest.raises(ValueError, match="valid slots are stem, group1_inner"):
        model.set_regularizer("group4", nn.Dropout(0.1))


def test_lenet_places_dropcluster_on_its_first_conv_and_has_no_residual_slot():
    model = build_model("lenet5", n_classes=10, in_channels=1)
    installed = place_regularizer(model, "dropcluster", 0.1, "fashion-mnist")
    assert model.slot("stem").regularizer is installed[0]
    assert place_regularizer(model, "dropout", 0.1) == model.slot_modules("group1")
    with pytest.raises(ValueError, match="valid slots are stem, group1"):
        place_regularizer(model, "stochastic_depth", 0.1)


def test_unknown_slot_raises_with_the_valid_names():
    model = tiny_resnet()
    valid = "stem, group1_inner, residual, group1, group2_inner, .*, group4_inner, group4$"
    with pytest.raises(ValueError, match=f"unknown slot 'group5' .*; valid slots are {valid}"):
        model.set_regularizer("group5", nn.Dropout(0.1))
    with pytest.raises(ValueError, match="unknown slot 'conv'"):
        place_regularizer(model, "dropout", 0.1, slot="conv")
    with pytest.raises(ValueError, match="one per block"):
        model.slot("residual")


def test_unknown_model_and_regularizer_raise_with_the_valid_names():
    with pytest.raises(ValueError, match="model should be one of " + ", ".join(map(repr, MODELS))):
        build_model("resnet34", n_classes=10)
    with pytest.raises(ValueError, match="regularizer should be one of 'none', 'dropout'"):
        place_regularizer(tiny_resnet(), "cutout", 0.1)
    with pytest.raises(ValueError, match="stem should be one of"):
        build_model("resnet20", n_classes=10, stem="tiny")
    with pytest.raises(ValueError, match="no stem choice"):
        build_model("lenet5", n_classes=10, stem="cifar")


def test_bad_rate_or_option_leaves_the_model_unchanged():
    model = tiny_resnet()
    with pytest.raises(ValueError):
        place_regularizer(model, "stochastic_depth", 1.5)
    with pytest.raises(ValueError, match="bad options"):
        place_regularizer(model, "dropblock", 0.1, block_sizes=3)
    assert model.slot_modules() == []


@pytest.mark.parametrize("name", ["resnet20", "lenet5"])
def test_channels_last_input_gives_the_same_output(name):
    torch.manual_seed(0)
    model = build_model(name, n_classes=10).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        model = model.to(memory_format=torch.channels_last)
        out = model(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_dropcluster_in_the_stem_fits_on_the_stem_input():
    torch.manual_seed(0)
    model = build_model("resnet20", n_classes=10, in_channels=1)
    (layer,) = place_regularizer(model, "dropcluster", 0.2, "fashion-mnist", n_clusters=4)
    images = torch.rand(8, 1, 12, 12)
    captured = []
    hook = layer.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0]))
    with torch.no_grad():
        model.eval()(images)
    hook.remove()
    layer.fit(captured[0])
    assert tuple(layer.labels.shape) == (16, 12, 12)
    model.train()
    layer.record_mask = True
    assert model(images).shape == (8, 10)
    assert layer.last_mask is not None
