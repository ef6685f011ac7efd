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


def test_fit_clusters_fits_every_layer_on_its_own_input_from_the_first_images():
    model = _model()
    images = _images()
    model.train()
    fit = fit_clusters(model, images, 64, batch_size=16)
    assert model.training  # restored
    assert fit.layers == ["3", "6"] and fit.channels == [6, 8] and fit.images == 64
    assert fit.structured == [int(model[3].structured.sum()), int(model[6].structured.sum())]
    # By hand: the layers' inputs for the first 64 images, in evaluation mode (running stats).
    reference = _model()
    reference.eval()
    with torch.no_grad():
        first = reference[:3](images[:64])
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
    fit_clusters(from_loader, loader, 50)
    fit_clusters(from_tensor, images, 50, batch_size=7)
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
