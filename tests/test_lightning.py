"""The Lightning callback refits on schedule in a real Trainer; checkpoints carry the fit."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from dropcluster.integrations.lightning import DropClusterRefit, DropRateScheduler
from dropcluster.nn import DropCluster2d, DropRateSchedule, fit_clusters

pytestmark = pytest.mark.filterwarnings(
    "ignore:Found 1 module\\(s\\) in eval mode",  # the frozen normaliser, on purpose
    "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated",  # Lightning on newer torch
)


class _TinyModule(LightningModule):
    """Frozen input normaliser, conv + ReLU, DropCluster2d, pooling, linear."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.normalise = nn.BatchNorm2d(1)
        self.normalise.eval()  # frozen: a refit must leave it in evaluation mode
        self.normalise.requires_grad_(False)
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.drop = DropCluster2d(0.3, 4, max_rounds=200)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10))

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.stem(self.normalise(x)))))

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return nn.functional.cross_entropy(self(images), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class _Recorder(Callback):
    """Per epoch, at its first batch: is the layer fitted, is the normaliser still frozen."""

    def __init__(self) -> None:
        self.fitted: dict[int, bool] = {}
        self.frozen: dict[int, bool] = {}
        self.at_train_start: dict[str, torch.Tensor] | None = None
        self.start_epoch: int | None = None

    def on_train_start(self, trainer, pl_module):
        self.start_epoch = trainer.current_epoch
        self.at_train_start = _state(pl_module.drop)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.fitted[trainer.current_epoch] = pl_module.drop.fitted
            self.frozen[trainer.current_epoch] = not pl_module.normalise.training


def _loader(n: int = 256) -> torch.utils.data.DataLoader:
    """n smooth 1x12x12 images: one of 10 class prototypes plus noise (deterministic)."""
    generator = torch.Generator().manual_seed(0)
    prototypes = nn.functional.avg_pool2d(torch.randn(10, 1, 12, 12, generator=generator), 3, 1, 1)
    labels = torch.arange(n) % 10
    images = prototypes[labels] + 0.3 * torch.randn(n, 1, 12, 12, generator=generator)
    dataset = torch.utils.data.TensorDataset(images, labels)
    return torch.utils.data.DataLoader(
        dataset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(1)
    )


def _trainer(root, max_epochs: int, callbacks, **options) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **options,
    )


def _state(layer: DropCluster2d) -> dict[str, torch.Tensor]:
    return {name: getattr(layer, name).clone() for name in DropCluster2d.STATE}


def _assert_same_state(layer: DropCluster2d, expected: dict[str, torch.Tensor]) -> None:
    assert layer.fitted
    for name in DropCluster2d.STATE:
        assert torch.equal(getattr(layer, name), expected[name]), name


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Four epochs with DropClusterRefit(every=2), then a checkpoint."""
    root = tmp_path_factory.mktemp("lightning")
    torch.manual_seed(0)
    module, refit, recorder = _TinyModule(), DropClusterRefit(every=2, n_images=128), _Recorder()
    trainer = _trainer(root, 4, [refit, recorder])
    trainer.fit(module, _loader())
    checkpoint = root / "fitted.ckpt"
    trainer.save_checkpoint(checkpoint)
    return module, refit, recorder, trainer, checkpoint


def test_refit_callback_fits_the_layers_at_the_start_of_due_epochs_only(trained):
    module, refit, recorder, trainer, _ = trained
    assert recorder.fitted == {0: False, 1: False, 2: True, 3: True}
    assert refit.last_fit.layers == ["drop"] and refit.last_fit.images == 128
    structured = refit.last_fit.structured[0]
    assert structured == int(module.drop.structured.sum()) > 0
    assert trainer.callback_metrics["dropcluster/structured/drop"] == structured
    assert all(recorder.frozen.values())  # the refit kept the frozen submodule in eval mode


def test_a_lightning_checkpoint_restores_the_fitted_clusters_exactly(trained):
    module, _, _, _, checkpoint = trained
    saved = _state(module.drop)
    restored = _TinyModule.load_from_checkpoint(checkpoint)
    _assert_same_state(restored.drop, saved)
    module.eval(), restored.eval()
    images = next(iter(_loader()))[0]
    with torch.no_grad():
        assert torch.equal(restored(images), module(images))


def test_the_checkpoint_state_dict_loads_into_a_plain_module(trained):
    module, _, _, _, checkpoint = trained
    state_dict = torch.load(checkpoint, weights_only=True)["state_dict"]
    for name in DropCluster2d.STATE:
        assert torch.equal(state_dict[f"drop.{name}"], getattr(module.drop, name)), name
    fresh = _TinyModule()
    fresh.load_state_dict(state_dict)
    _assert_same_state(fresh.drop, _state(module.drop))


def test_a_run_resumed_from_the_checkpoint_starts_with_the_fitted_clusters(trained, tmp_path):
    module, _, _, _, checkpoint = trained
    recorder = _Recorder()
    trainer = _trainer(tmp_path, 5, [DropClusterRefit(every=3, n_images=128), recorder])
    trainer.fit(_TinyModule(), _loader(), ckpt_path=checkpoint)
    assert recorder.start_epoch == 4 and recorder.fitted == {4: True}  # 4 is not due: no refit
    for name in DropCluster2d.STATE:
        assert torch.equal(recorder.at_train_start[name], getattr(module.drop, name)), name


def test_given_data_and_prepare_are_used_instead_of_the_train_loader(tmp_path):
    raw = (next(iter(_loader()))[0] * 40 + 128).clamp(0, 255).to(torch.uint8)
    seen = []

    def prepare(batch):
        seen.append(batch.dtype)
        return (batch.float() - 128) / 40

    refit = DropClusterRefit(every=5, first=0, n_images=32, data=raw, prepare=prepare)
    torch.manual_seed(0)
    module = _TinyModule()
    trainer = _trainer(tmp_path, 1, [refit])
    trainer.fit(module, _loader())
    assert module.drop.fitted and refit.last_fit.images == 32 and seen == [torch.uint8]
    assert repr(refit) == "DropClusterRefit(RefitSchedule(every=5, first=0, n_images=32))"


def test_missing_lightning_is_an_import_error_naming_the_extra(monkeypatch):
    monkeypatch.delitem(sys.modules, "dropcluster.integrations.lightning")
    for name in ("lightning", "lightning.pytorch"):
        monkeypatch.setitem(sys.modules, name, None)  # what an absent package looks like
    with pytest.raises(ImportError, match=r"pip install -e '\.\[lightning\]'"):
        importlib.import_module("dropcluster.integrations.lightning")


def test_the_package_never_imports_lightning():
    code = (
        "import sys, dropcluster, dropcluster.nn, dropcluster.integrations, dropcluster.train\n"
        "assert 'lightning' not in sys.modules, 'lightning imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- no silent no-ops, drop-rate schedules ---------------------------------------------------


def _short_trainer(root, max_epochs: int, callbacks, **options) -> Trainer:
    """One batch per epoch: the warnings and the schedule depend on epochs, not on data."""
    return _trainer(root, max_epochs, callbacks, **{"limit_train_batches": 1, **options})


def _ours(record) -> list[str]:
    return [str(w.message) for w in record if "DropCluster" in str(w.message)]


def test_refit_warns_at_fit_start_when_max_epochs_ends_before_the_first_refit(tmp_path):
    expected = (
        "DropClusterRefit(every=50) with max_epochs=10 refits first at the start of epoch 50, "
        "but the run has 10 epochs (0 to 9): DropCluster2d stays the identity for the whole "
        "run; set every below 10, e.g. every=2"
    )
    module = _TinyModule()
    with pytest.warns(UserWarning) as record:
        _short_trainer(tmp_path, 10, [DropClusterRefit()]).fit(module, _loader())
    assert _ours(record) == [expected]  # once: the end of the fit says nothing more
    assert not module.drop.fitted


def test_a_module_fitted_before_the_fit_is_no_silent_no_op(tmp_path, recwarn):
    module = _TinyModule()
    fit_clusters(module, next(iter(_loader()))[0], 64)
    _short_trainer(tmp_path, 2, [DropClusterRefit()]).fit(module, _loader())
    assert _ours(recwarn) == [] and module.drop.fitted


def test_refit_warns_at_fit_end_when_the_fit_stopped_before_the_first_refit(tmp_path):
    module = _TinyModule()
    trainer = _short_trainer(tmp_path, 5, [DropClusterRefit(every=2)], max_steps=2)
    with pytest.warns(UserWarning) as record:
        trainer.fit(module, _loader())  # max_steps ends it after epoch 1
    assert _ours(record) == [
        "the fit ended with DropCluster2d layer(s) ['drop'] never fitted: they were the "
        "identity for the whole run; DropClusterRefit fits first at the start of epoch 2: give "
        "it first= (or every=) below the epochs the fit runs"
    ]


def test_refit_on_a_module_without_dropcluster_warns(tmp_path):
    module = _TinyModule()
    module.drop = nn.Identity()
    with pytest.warns(UserWarning, match="holds no DropCluster2d: it has nothing to fit"):
        _short_trainer(tmp_path, 1, [DropClusterRefit(every=1)]).fit(module, _loader())


class _RateRecorder(Callback):
    def __init__(self) -> None:
        self.rates: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rates[trainer.current_epoch] = float(pl_module.drop.p)


def test_drop_rate_scheduler_sets_the_rate_of_each_epoch(tmp_path):
    recorder = _RateRecorder()
    scheduler = DropRateScheduler({"p": 0.3, "kind": "linear", "start_epoch": 0, "end_epoch": 2})
    trainer = _short_trainer(tmp_path, 3, [scheduler, recorder])
    trainer.fit(_TinyModule(), _loader())
    assert recorder.rates == pytest.approx({0: 0.0, 1: 0.15, 2: 0.3})
    assert float(trainer.callback_metrics["dropcluster/p"]) == pytest.approx(0.3)
    assert repr(scheduler).startswith("DropRateScheduler(DropRateSchedule(p=0.3, kind='linear'")


def test_a_resumed_fit_sets_the_rate_of_the_epoch_it_resumes_at(trained, tmp_path):
    *_, checkpoint = trained  # saved after 4 epochs
    recorder = _RateRecorder()
    schedule = DropRateSchedule(0.25, "late", start_epoch=4)
    trainer = _short_trainer(tmp_path, 6, [DropRateScheduler(schedule), recorder])
    trainer.fit(_TinyModule(), _loader(), ckpt_path=checkpoint)
    # The module is built with p = 0.3; epoch 4 is the schedule's, as in an unbroken fit.
    assert recorder.rates == {4: 0.25, 5: 0.25}
    with pytest.raises(ValueError, match=r"has to be in \[0, 1\]"):
        DropRateScheduler({"p": 1.5})
