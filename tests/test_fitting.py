"""fit_clusters and RefitSchedule: fitting the DropCluster layers of any model from its data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dropcluster.nn import DropCluster2d, RefitSchedule, fit_clusters


class _Counter(nn.Module):
    """The identity, counting its calls (to see where the capture forward stops)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        DropCluster2d(0.2, 15),
        nn.Conv2d(6, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        DropCluster2d(0.1, 15),
        _Counter(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def _images(n: int = 100, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 1, 20, 20, generator=generator)
    return nn.functional.avg_pool2d(noise, 5, 1, padding=2)


def test_fit_clusters_fits_every_layer_on_its_own_input_from_a_random_draw_of_images():
    model = _model()
    images = _images()
    model.train()
    generator = torch.Generator().manual_seed(3)
    fit = fit_clusters(model, images, 64, batch_size=16, generator=generator)
    assert model.training  # restored
    assert fit.layers == ["3", "6"] and fit.channels == [6, 8] and fit.images == 64
    assert fit.structured == [int(model[3].structured.sum()), int(model[6].structured.sum())]
    # By hand: the layers' inputs for the 64 images the generator draws (without replacement,
    # in increasing index order), in evaluation mode (running stats).
    drawn = torch.randperm(100, generator=torch.Generator().manual_seed(3))[:64].sort().values
    reference = _model()
    reference.eval()
    with torch.no_grad():
        first = reference[:3](images[drawn])
        reference[3].fit(first)
        reference[6].fit(reference[4:6](reference[3](first)))
    for layer, expected in ((model[3], reference[3]), (model[6], reference[6])):
        for name in DropCluster2d.STATE:
            assert torch.equal(getattr(layer, name), getattr(expected, name)), name
    record = fit.record()
    assert set(record) == {"structured", "channels", "layers", "refit_seconds"}


def test_the_capture_forward_stops_once_every_layer_has_its_input():
    model = _model()
    fit_clusters(model, _images(), 64, batch_size=16)
    assert model[7].calls == 0  # the layers after the last DropCluster2d never ran


def test_a_data_loader_of_pairs_gives_the_same_clusters_as_the_tensor():
    images = _images()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, torch.zeros(100, dtype=torch.int64)), batch_size=24
    )
    from_loader, from_tensor = _model(), _model()
    fit_clusters(from_loader, loader, 50)  # an iterable: its first 50 images, in its order
    fit_clusters(from_tensor, images[:50], 50, batch_size=7)  # all of them: in order
    for name in DropCluster2d.STATE:
        assert torch.equal(getattr(from_loader[3], name), getattr(from_tensor[3], name))


def test_prepare_turns_raw_batches_into_model_input():
    raw = (_images() * 40 + 128).clamp(0, 255).to(torch.uint8)
    model = _model()
    fit = fit_clusters(model, raw, 32, prepare=lambda batch: (batch.float() - 128) / 40)
    assert fit.images == 32 and model[3].fitted


def test_compiled_and_wrapped_models_are_fitted_through_their_wrappers():
    model = _model()
    compiled = torch.compile(model, backend="eager")
    fit = fit_clusters(compiled, _images(), 32)
    assert model[3].fitted and model[6].fitted and fit.layers == ["3", "6"]
    wrapped = nn.DataParallel(_model())
    fit_clusters(wrapped, _images(), 32)
    assert wrapped.module[3].fitted


def test_a_model_without_dropcluster_gives_an_empty_fit():
    fit = fit_clusters(nn.Sequential(nn.Conv2d(1, 2, 3)), _images(), 8)
    assert fit.layers == [] and fit.record() == {}


def test_bad_data_and_layers_never_called_are_clear_errors():
    with pytest.raises(ValueError, match="at least 2 images, but the data gave 1"):
        fit_clusters(_model(), _images(1), 8)
    with pytest.raises(ValueError, match="n_images should be an integer >= 2"):
        fit_clusters(_model(), _images(), 1)

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.spare = nn.Conv2d(1, 2, 3), DropCluster2d()

        def forward(self, x):
            return self.conv(x)

    unused = Unused()
    with pytest.raises(ValueError, match="input of 1 DropCluster2d layer"):
        fit_clusters(unused, _images(), 8)
    with pytest.raises(ValueError, match="pass prepare="):
        fit_clusters(_model(), [{"image": _images(4)}], 4)


def test_refit_schedule_follows_the_paper_first_at_s_then_every_s():
    schedule = RefitSchedule(every=50)
    assert [epoch for epoch in range(250) if schedule.due(epoch)] == [50, 100, 150, 200]
    early = RefitSchedule(every=3, first=0)
    assert [epoch for epoch in range(10) if early.due(epoch)] == [0, 3, 6, 9]
    model = _model()
    assert schedule.step(model, _images(), 49) is None and not model[3].fitted
    assert schedule.step(model, _images(), 50, batch_size=32).layers == ["3", "6"]
    with pytest.raises(ValueError, match="every should be an integer >= 1"):
        RefitSchedule(every=0)


def _fitted_state(model: nn.Sequential) -> list[torch.Tensor]:
    return [getattr(model[i], name).clone() for i in (3, 6) for name in DropCluster2d.STATE]


def _same_state(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def _drawn_images(data, n_images: int, generator: torch.Generator) -> list[int]:
    """The indices of the images fit_clusters runs, seen by a model that records its input."""
    seen: list[torch.Tensor] = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = DropCluster2d(0.1, 2)

        def forward(self, x):
            seen.append(x[:, 0, 0, 0].clone())  # each image's index, written in its pixels
            return self.drop(x)

    fit_clusters(Recorder(), data, n_images, batch_size=4, generator=generator)
    return torch.cat(seen).long().tolist()


def _indexed_images(n: int) -> torch.Tensor:
    """(n, 1, 4, 4) images whose pixels hold their index plus a little noise to cluster."""
    noise = torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.1
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1) + noise


def test_images_are_drawn_without_replacement_from_a_tensor_seeded_by_the_generator():
    images = _indexed_images(20)
    drawn = _drawn_images(images, 8, torch.Generator().manual_seed(5))
    expected = torch.randperm(20, generator=torch.Generator().manual_seed(5))[:8].sort().values
    assert drawn == expected.tolist() and len(set(drawn)) == 8
    assert drawn == _drawn_images(images, 8, torch.Generator().manual_seed(5))  # reproducible
    assert drawn != _drawn_images(images, 8, torch.Generator().manual_seed(6))
    # Asking for all of them (or more) takes every image in order and draws no random number.
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    with pytest.warns(UserWarning, match="got 20 images, fewer than the n_images=30 asked"):
        assert _drawn_images(images, 30, generator) == list(range(20))
    assert torch.equal(generator.get_state(), state)


def test_a_map_style_dataset_is_sampled_like_a_tensor_and_its_pairs_collated():
    images = _indexed_images(20)
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(20, dtype=torch.int64))
    from_dataset = _drawn_images(dataset, 8, torch.Generator().manual_seed(5))
    assert from_dataset == _drawn_images(images, 8, torch.Generator().manual_seed(5))

    class Items:  # no torch base class: __len__ and __getitem__ are enough
        def __len__(self):
            return 20

        def __getitem__(self, index):
            return images[index]

    assert _drawn_images(Items(), 8, torch.Generator().manual_seed(5)) == from_dataset


def test_an_iterable_gives_its_first_batches_in_its_own_order():
    images = _indexed_images(20)
    batches = [images[start : start + 5].flip(0) for start in range(0, 20, 5)]
    expected = [4, 3, 2, 1, 0, 9, 8, 7, 6, 5]
    assert _drawn_images(batches, 10, torch.Generator().manual_seed(5)) == expected
    assert _drawn_images(iter(batches), 10, torch.Generator().manual_seed(5)) == expected
    loader = torch.utils.data.DataLoader(images, batch_size=6)  # not shuffled: 0, 1, 2, ...
    assert _drawn_images(loader, 10, torch.Generator().manual_seed(5)) == list(range(12))


def test_successive_refits_of_a_schedule_fit_on_different_images_and_repeat_with_the_seed():
    images = _images(200)
    schedule = RefitSchedule(every=1, first=0, n_images=16, seed=7)
    model = _model()
    states = []
    for epoch in range(3):
        schedule.step(model, images, epoch, batch_size=16)
        states.append(_fitted_state(model))
    assert not _same_state(states[0], states[1]) and not _same_state(states[1], states[2])
    # The same seed draws the same images at the same epoch, in a new schedule (a resumed run).
    again = _model()
    RefitSchedule(every=1, first=0, n_images=16, seed=7).step(again, images, 1, batch_size=16)
    assert _same_state(_fitted_state(again), states[1])
    # What it draws: fit_clusters with the schedule's generator of that epoch.
    by_hand = _model()
    fit_clusters(by_hand, images, 16, batch_size=16, generator=schedule.generator(2))
    assert _same_state(_fitted_state(by_hand), states[2])
    other = _model()
    RefitSchedule(every=1, first=0, n_images=16, seed=8).step(other, images, 1, batch_size=16)
    assert not _same_state(_fitted_state(other), states[1])


def test_fewer_images_than_asked_warn_once_naming_both_counts():
    model = _model()
    with pytest.warns(UserWarning) as caught:
        fit = fit_clusters(model, _images(40), 64, batch_size=16)
    messages = [str(w.message) for w in caught]
    assert messages == [
        "fit_clusters got 40 images, fewer than the n_images=64 asked: the clusters are fitted "
        "on 40"
    ]
    assert fit.images == 40 and caught[0].filename == __file__


class _ChannelsFirst(nn.Module):
    def forward(self, x):
        return x.permute(0, 3, 1, 2)


def test_uint8_images_without_prepare_fail_with_one_line_naming_prepare():
    raw = (_images(8) * 40 + 128).clamp(0, 255).to(torch.uint8)
    with pytest.raises(ValueError) as caught:
        fit_clusters(_model(), raw, 8)
    message = str(caught.value)
    assert "\n" not in message and "torch.uint8 batch" in message
    assert "pass prepare= to turn a batch into the model's float input" in message
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(raw, raw[:, 0, 0, 0]), 4)
    with pytest.raises(ValueError, match="uint8 batch .* pass prepare="):
        fit_clusters(_model(), loader, 8)
    with pytest.raises(ValueError, match="make prepare= return the model's float input"):
        fit_clusters(_model(), raw, 8, prepare=lambda batch: batch)
    # A model that takes integer input (an embedding) is no mistake: it is fitted.
    embedded = nn.Sequential(nn.Embedding(256, 4), _ChannelsFirst(), DropCluster2d(0.1, 2))
    assert fit_clusters(embedded, raw[:, 0].long(), 8).images == 8
    assert embedded[2].fitted


# A refit under torch.compile


def _refit_compiled_lenet(device: str, backend: str) -> None:
    """The trainer's path on LeNet-5 with DropCluster in its paper slot, compiled with
    ``backend``: fit, train, refit, train. A refit writes the buffers in place, so the compiled
    graphs stay valid: nothing may recompile, and the graphs must use the new clusters."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from dropcluster.models import build_model, place_regularizer
    from dropcluster.nn import Clusters

    torch._dynamo.reset()  # no graphs or automatic dynamic shapes left by earlier tests
    torch.manual_seed(0)
    model = build_model("lenet5", n_classes=10, in_channels=1)
    (layer,) = place_regularizer(model, "dropcluster", 0.2, "fashion-mnist")
    model.to(device)
    data = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (96, 1, 28, 28), dtype=torch.uint8, generator=data).to(device)
    labels = torch.randint(0, 10, (96,), generator=data).to(device)

    def prepare(batch: torch.Tensor) -> torch.Tensor:
        return batch.float() / 255

    with torch.no_grad():  # as build_run does: the layer takes its shapes before compiling
        model.eval()(prepare(images[:2]))
    model.train()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def train_steps(count: int) -> None:
        for step in range(count):
            batch = slice(16 * step, 16 * (step + 1))
            loss = nn.functional.cross_entropy(compiled(prepare(images[batch])), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert torch.isfinite(loss)

    def copied_clusters() -> Clusters:
        held = layer.clusters
        return Clusters(
            held.labels.clone(), held.structured.clone(), held.counts.clone(), held.sizes.clone()
        )

    def seeded_output() -> torch.Tensor:
        torch.manual_seed(3)  # the same random numbers in each call
        return compiled(prepare(images[:16])).detach()  # autograd on, as in training (a guard)

    fit_clusters(compiled, images[:32], 32, prepare=prepare, batch_size=16)
    train_steps(2)
    graphs = counter.frame_count
    assert graphs >= 1
    first = copied_clusters()
    with torch.compiler.set_stance("fail_on_recompile"):
        fit_clusters(compiled, images[32:], 64, prepare=prepare, batch_size=32)
        assert not torch.equal(layer.labels, first.labels)
        refitted = seeded_output()
        # The graphs read the clusters from the buffers: the first fit's, written back in
        # place, give another output; the refit's again give the refitted one.
        second = copied_clusters()
        layer.load_clusters(first)
        assert not torch.allclose(seeded_output(), refitted, rtol=1e-2, atol=1e-2)
        layer.load_clusters(second)
        assert torch.equal(seeded_output(), refitted)
        train_steps(2)
    assert counter.frame_count == graphs


def test_a_refit_recompiles_nothing_in_a_compiled_training_model():
    _refit_compiled_lenet("cpu", "aot_eager")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_refit_recompiles_nothing_in_a_model_compiled_by_inductor_on_cuda():
    _refit_compiled_lenet("cuda", "inductor")
