"""attach/detach: a regularizer after any named submodule, on torchvision- and timm-style layouts
and on this project's models, with pretrained checkpoints, copies, compile and DDP."""

from __future__ import annotations

import copy
import io
import re
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from reference_models import ResNet18, TimmStyleNet
from torch import nn

from dropcluster.models import build_model
from dropcluster.nn import (
    DropBlock2d,
    DropCluster2d,
    StochasticDepth,
    attach,
    detach,
    fit_clusters,
)
from dropcluster.nn.attach import ATTACHED_NAME


def _resnet18(seed: int = 0) -> ResNet18:
    torch.manual_seed(seed)
    return ResNet18(n_classes=10, width=8)


def _timm(seed: int = 0) -> TimmStyleNet:
    torch.manual_seed(seed)
    return TimmStyleNet(n_classes=10, width=8)


def _resnet20(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet20", n_classes=10)


def _images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _with_a_dead_stem_channel(model: ResNet18) -> ResNet18:
    """Channel 0 of the stem's ReLU output is 0 everywhere, so a fitted DropCluster2d there
    masks it in evaluation and rescales the other channels: the layer visibly acts."""
    with torch.no_grad():
        model.bn1.weight[0] = 0.0
        model.bn1.bias[0] = -1.0
    return model


def _resnet18_forward_with(model: ResNet18, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ResNet forward with ``layer`` applied by hand after the stem's ``relu``."""
    x = model.maxpool(layer(model.relu(model.bn1(model.conv1(x)))))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return model.fc(torch.flatten(model.avgpool(x), 1))


PLACES = [
    (_resnet18, "relu"),  # the stem of a torchvision ResNet
    (_resnet18, "layer2.1"),  # a Sequential index
    (_resnet18, "layer3.0.bn1"),
    (_timm, "act1"),  # the stem of a timm EfficientNet
    (_timm, "blocks.1.0"),
    (_resnet20, "conv1"),
    (_resnet20, "groups.0.1"),
]

REGULARIZERS = {
    "dropcluster": lambda: DropCluster2d(0.2),
    "dropblock": lambda: DropBlock2d(0.3, 3),
    "stochastic_depth": lambda: StochasticDepth(0.2),
}


# Names and checkpoints


@pytest.mark.parametrize("kind", sorted(REGULARIZERS))
@pytest.mark.parametrize(("build", "after"), PLACES)
def test_attach_renames_nothing_and_a_checkpoint_saved_before_loads_strictly(build, after, kind):
    pretrained_model = build(seed=0).eval()
    pretrained = copy.deepcopy(pretrained_model.state_dict())
    x = _images()
    with torch.no_grad():
        expected = pretrained_model(x)
    model = build(seed=1)  # other weights, replaced by the checkpoint's
    parameters = [name for name, _ in model.named_parameters()]
    keys = list(model.state_dict())
    regularizer = attach(model, after, REGULARIZERS[kind]())
    assert [name for name, _ in model.named_parameters()] == parameters
    prefix = f"{after}.{ATTACHED_NAME}."
    added = [key for key in model.state_dict() if key.startswith(prefix)]
    assert [key for key in model.state_dict() if not key.startswith(prefix)] == keys
    assert added == [prefix + key for key in regularizer.state_dict()]  # none but DropCluster's
    result = model.load_state_dict(pretrained, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), expected)  # unfitted DropCluster2d and eval: identity


def test_fitted_clusters_travel_in_the_state_dict_under_the_target_name():
    model = _resnet18()
    attach(model, "relu", DropCluster2d(0.2))
    fit_clusters(model, _images(32), 16)
    state = model.state_dict()
    fresh = _resnet18(seed=3)
    layer = attach(fresh, "relu", DropCluster2d(0.2))
    fresh.load_state_dict(state, strict=True)
    assert layer.fitted
    assert torch.equal(layer.labels, state[f"relu.{ATTACHED_NAME}.labels"])


# The regularizer acts where it is attached


@pytest.mark.parametrize(
    ("build", "after"), [(_resnet18, "relu"), (_timm, "act1"), (_resnet20, "conv1")]
)
def test_dropblock_attached_changes_the_training_output_and_rate_zero_does_not(build, after):
    model = build().train()
    original = copy.deepcopy(model)
    layer = attach(model, after, DropBlock2d(0.5, 3, generator=torch.Generator().manual_seed(0)))
    x = _images()
    assert not torch.equal(model(x), original(x))
    layer.set_p(0.0)
    assert torch.equal(model(x), original(x))


def test_fitted_dropcluster_in_eval_equals_the_layer_applied_by_hand_after_the_module():
    model = _with_a_dead_stem_channel(_resnet18())
    original = copy.deepcopy(model).eval()
    layer = attach(model, "relu", DropCluster2d(0.2))
    fit_clusters(model, _images(64, seed=2), 64)
    assert layer.fitted and not bool(layer.structured[0])
    model.eval()
    x = _images()
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out, _resnet18_forward_with(original, layer, x))
        assert not torch.allclose(out, original(x))  # channel 0 masked, the others rescaled


def test_a_module_called_twice_per_forward_is_regularized_at_each_call():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def forward(self, x):
            self.shapes.append(tuple(x.shape))
            return x

    model = _resnet18()
    in_block, in_stem = attach(model, "layer1.0.relu", Counter()), attach(model, "relu", Counter())
    model(_images(2))
    assert in_block.shapes == [(2, 8, 8, 8)] * 2  # BasicBlock's relu: after bn1 and after the sum
    assert in_stem.shapes == [(2, 8, 16, 16)]  # the stem's relu runs once


def test_dropcluster_after_a_twice_called_module_is_fitted_on_its_first_call_and_drops_both():
    """What attach's docstring says of a module called twice per forward: fit_clusters fits on
    the first call's output, and the same clusters are dropped at each call."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.act = nn.ReLU()

        def forward(self, x):
            first = self.act(self.conv(x))
            return self.act(first.flip(-1) - 0.1)  # the second call sees other maps

    torch.manual_seed(0)
    model = Twice()
    images = _images(32)
    layer = attach(model, "act", DropCluster2d(0.0, 5))
    fit_clusters(model, images, 32)
    with torch.no_grad():
        first_call = torch.relu(model.conv(images))
        second_call = torch.relu(first_call.flip(-1) - 0.1)
    on_first = DropCluster2d(0.0, 5).fit(first_call)
    on_second = DropCluster2d(0.0, 5).fit(second_call)
    assert torch.equal(layer.labels, on_first.labels)
    assert not torch.equal(layer.labels, on_second.labels)
    # Both calls go through the layer: with a dead channel in the fit, both outputs lose it.
    layer.structured[0] = False
    layer.cluster_counts[0] = 0
    layer.cluster_sizes[0] = 0
    layer.labels[0] = 0
    calls = []
    hook = layer.register_forward_hook(lambda module, inputs, output: calls.append(output))
    model.eval()(images[:2])
    hook.remove()
    assert len(calls) == 2 and all(bool((out[:, 0] == 0).all()) for out in calls)


def test_a_twice_called_module_of_two_shapes_fails_naming_the_target_after_the_fit():
    class TwoShapes(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.act(x)[:, :, ::2, ::2])

    model = TwoShapes()
    attach(model, "act", DropCluster2d(0.1, 5))
    fit_clusters(model, torch.rand(8, 3, 16, 16), 8)
    with pytest.raises(
        ValueError,
        match=r"attached after 'act' \(ReLU\): DropCluster2d holds "
        r"clusters for \(C, H, W\) = \(3, 16, 16\)",
    ):
        model(torch.rand(2, 3, 16, 16))


@pytest.mark.parametrize(
    ("after", "where"), [("fc", "after 'fc' (Linear)"), ("", "to the model's output (ResNet18)")]
)
def test_dropcluster_after_an_output_that_is_no_feature_map_fails_at_the_first_forward(
    after, where
):
    model = _resnet18()
    attach(model, after, DropCluster2d(0.1))  # "" is the model itself
    with pytest.raises(
        ValueError,
        match=rf"attached {re.escape(where)}: DropCluster2d takes "
        r"\(N, C, H, W\) feature maps, but got input of shape "
        r"\(2, 10\)",
    ):
        model(_images(2))


def test_a_sequential_target_is_regularized_once_through_its_last_layer():
    class Count(nn.Module):
        calls = 0

        def forward(self, x):
            Count.calls += 1
            return x

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()))
    counter = attach(model, "1", Count())
    model(_images(2))
    assert Count.calls == 1  # a child added to a Sequential would also run as a layer
    assert model[1][1]._modules[ATTACHED_NAME] is counter
    assert detach(model, "1") is counter and Count.calls == 1
    root = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    attach(root, "", DropCluster2d(0.1))
    with pytest.raises(ValueError, match=r"attached after '1' \(Flatten\): DropCluster2d takes"):
        root(_images(2))
    with pytest.raises(ValueError, match="'' is an empty nn.Sequential"):
        attach(nn.Sequential(), "", Count())


def test_fit_clusters_names_the_layer_whose_fit_fails():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    attach(model, "1", DropCluster2d(0.1, 5))
    with pytest.raises(
        ValueError, match=r"DropCluster2d '1.attached_regularizer': x should hold finite values"
    ):
        fit_clusters(model, torch.full((8, 3, 6, 6), float("nan")), 8)


# Fitting


@pytest.mark.parametrize(
    ("build", "after", "stem"),
    [
        (_timm, "act1", lambda m, x: m.act1(m.bn1(m.conv_stem(x)))),
        (_resnet20, "conv1", lambda m, x: m.conv1(x)),
    ],
)
def test_fit_clusters_fits_the_attached_layer_on_the_target_output(build, after, stem):
    model = build()
    reference = copy.deepcopy(model).eval()
    layer = attach(model, after, DropCluster2d(0.2))
    images = _images(40, seed=4)  # all of them: no random draw, the first 40 in order
    fit = fit_clusters(model, images, 40, batch_size=16)
    assert fit.layers == [f"{after}.{ATTACHED_NAME}"] and fit.images == 40
    with torch.no_grad():
        expected = DropCluster2d(0.2).fit(stem(reference, images[:40]))
    for name in DropCluster2d.STATE:
        assert torch.equal(getattr(layer, name), getattr(expected, name)), name


# Copies


def _deepcopy(model):
    return copy.deepcopy(model)


def _save_and_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("make_copy", [_deepcopy, _save_and_load])
def test_a_copied_model_applies_its_own_regularizer(make_copy):
    model = _resnet18().train()
    original = copy.deepcopy(model)
    layer = attach(model, "layer1.0.bn1", DropBlock2d(0.0, 3))
    twin = make_copy(model)
    twin_layer = twin.get_submodule(f"layer1.0.bn1.{ATTACHED_NAME}")
    assert twin_layer is not layer
    x = _images()
    twin_layer.set_p(0.5)
    assert not torch.equal(twin(x), original(x))
    assert torch.equal(model(x), original(x))  # the original's p is still 0
    layer.set_p(0.5)
    twin_layer.set_p(0.0)
    assert torch.equal(twin(x), original(x))
    assert not torch.equal(model(x), original(x))
    assert detach(twin, "layer1.0.bn1") is twin_layer  # the copy's hook is found and removed


# Detach


def test_detach_restores_the_original_forward_and_state_dict_keys():
    model = _with_a_dead_stem_channel(_resnet18()).eval()
    keys = list(model.state_dict())
    x = _images()
    with torch.no_grad():
        before = model(x)
    layer = attach(model, "relu", DropCluster2d(0.2))
    fit_clusters(model, _images(64, seed=2), 64)
    with torch.no_grad():
        assert not torch.allclose(model(x), before)
    assert detach(model, "relu") is layer
    assert list(model.state_dict()) == keys
    assert not model.relu._forward_hooks and not hasattr(model.relu, ATTACHED_NAME)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    attach(model, "relu", layer)  # nothing left behind: it attaches again
    with torch.no_grad():
        assert not torch.allclose(model(x), before)


# Errors


class _OwnAttribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.attached_regularizer = 1.0

    def forward(self, x):
        return x


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda m: attach(m, "layer1.0.rleu", DropBlock2d()),
            r"no submodule 'layer1.0.rleu'.*close names: layer1.0.relu",
        ),
        (lambda m: attach(m, "head", DropBlock2d()), r"ResNet18 has no submodule 'head'"),
        (lambda m: attach(m, 3, DropBlock2d()), "after should be a module name"),
        (lambda m: attach(m, "relu", torch.relu), "should be an nn.Module, but got"),
        (lambda m: detach(m, "relu"), "'relu' has no regularizer attached"),
        (lambda m: detach(m, "rel"), "no submodule 'rel'.*close names: relu"),
        (
            lambda m: attach(nn.Sequential(_OwnAttribute()), "0", DropBlock2d()),
            "has its own attribute 'attached_regularizer'",
        ),
    ],
)
def test_bad_names_and_arguments_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(_resnet18())


def test_a_second_attach_at_the_same_place_is_refused_and_keeps_the_first():
    model = _resnet18()
    first = attach(model, "layer1.0.bn1", DropBlock2d(0.1, 3))
    with pytest.raises(ValueError, match=r"attached already \(DropBlock2d.*detach\(model, "):
        attach(model, "layer1.0.bn1", StochasticDepth(0.1))
    assert model.layer1[0].bn1.attached_regularizer is first
    assert len(model.layer1[0].bn1._forward_hooks) == 1


# Wrappers


def test_compiled_model_gives_the_eager_output_in_evaluation():
    model = _with_a_dead_stem_channel(_resnet18())
    original = copy.deepcopy(model).eval()
    attach(model, "relu", DropCluster2d(0.2))
    attach(model, "layer2.0.bn1", DropBlock2d(0.2, 3))
    fit_clusters(model, _images(64, seed=2), 64)
    model.eval()
    compiled = torch.compile(model, backend="eager")
    x = _images()
    with torch.no_grad():
        out = compiled(x)
        assert torch.equal(out, model(x))
        assert not torch.allclose(out, original(x))
    assert fit_clusters(compiled, _images(64, seed=2), 64).layers == [f"relu.{ATTACHED_NAME}"]


def test_a_regularizer_attached_after_compiling_needs_a_reset_and_attach_warns():
    model = _resnet18().eval()
    compiled = torch.compile(model, backend="eager")
    x = _images()
    with torch.no_grad():
        before = compiled(x)
        with pytest.warns(UserWarning, match=r"call torch._dynamo.reset\(\) now"):
            attach(compiled, "layer4.1", StochasticDepth(1.0).train())  # zeros: visible
        assert torch.equal(compiled(x), before)  # what the warning is about: the hook is unseen
        torch._dynamo.reset()
        assert torch.equal(compiled(x), model(x)) and not torch.equal(compiled(x), before)
        detach(model, "layer4.1")  # a removed hook is noticed
        assert torch.equal(compiled(x), before)


def test_attach_reaches_the_module_inside_data_parallel_and_ddp_wrappers(tmp_path):
    model = _resnet18()
    parallel = nn.DataParallel(model)
    layer = attach(parallel, "relu", DropBlock2d(0.1, 3))
    assert model.relu.attached_regularizer is layer
    assert detach(parallel, "module.relu") is layer  # the wrapper's spelling works too
    # A bounded wait: a stuck rendezvous fails the test instead of holding the suite.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp_path / 'store'}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=120),
    )
    try:
        # Attached before wrapping: DDP sees the layer's buffers from the start.
        layer = attach(model, "relu", DropCluster2d(0.2))
        wrapped = nn.parallel.DistributedDataParallel(model)
        fit = fit_clusters(wrapped, _images(32), 32)
        assert fit.layers == [f"relu.{ATTACHED_NAME}"] and layer.fitted
        wrapped(_images()).sum().backward()
        assert detach(wrapped, "relu") is layer
    finally:
        dist.destroy_process_group()


# Package layout


def test_train_package_exports_its_entry_points_without_loading_the_loop_for_the_config():
    import dropcluster.train as train_package
    from dropcluster.train import RunResult, TrainConfig, train
    from dropcluster.train.config import TrainConfig as config_class
    from dropcluster.train.loop import RunResult as result_class
    from dropcluster.train.loop import train as train_function

    assert (TrainConfig, RunResult, train) == (config_class, result_class, train_function)
    assert set(train_package.__all__) <= set(dir(train_package))
    with pytest.raises(AttributeError, match="no attribute 'Trainer'"):
        train_package.Trainer  # noqa: B018
