"""The Lightning callback refits on schedule in a real Trainer; checkpoints carry the fit."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from dropcluster.integrations.lightning import DropClusterRefit
from dropcluster.nn import DropCluster2d

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


def _trainer(root, max_epochs: int, callbacks) -> Trainer:
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
