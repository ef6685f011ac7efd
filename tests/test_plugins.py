"""Plugins: registering regularizers, models and data sets, loading them (--plugin, a preset's
"plugins", entry points), and running them in train, sweeps (worker processes) and reports."""

from __future__ import annotations

import json
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch
from torch import nn

import dropcluster.plugins as plugins
from dropcluster.cli import main
from dropcluster.data import AugmentConfig, ImageDataset, load_dataset
from dropcluster.data.datasets import augment_preset, dataset_names
from dropcluster.experiments import report_figures
from dropcluster.experiments.presets import Preset, expand_grid
from dropcluster.models import (
    Placement,
    build_model,
    dataset_family,
    lenet5,
    model_names,
    place_regularizer,
    placement_for,
)
from dropcluster.nn import REGULARIZERS, build_regularizer
from dropcluster.nn.registry import regularizer_names
from dropcluster.plugins import (
    PLUGIN_GROUP,
    Registry,
    load_plugins,
    register_dataset,
    register_model,
    register_regularizer,
)
from dropcluster.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "examples" / "plugin_package"


class Scale(nn.Module):
    """Multiplies by 1 - p: a deterministic stand-in whose effect a test can compute."""

    def __init__(self, p: float, factor: float = 1.0) -> None:
        super().__init__()
        self.p, self.factor = p, factor

    def forward(self, x):
        return x * (1 - self.p) * self.factor


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch, tmp_path):
    """Every test starts with no plugin registered and no entry point installed; the modules it
    writes are importable from ``tmp_path/plugins`` and forgotten afterwards."""
    monkeypatch.setattr(plugins, "REGISTRY", Registry())
    monkeypatch.setattr(plugins, "entry_points", lambda group: [])
    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    before = set(sys.modules)
    yield folder
    for name in set(sys.modules) - before:
        if name.startswith(("plug_", "mydrop")):
            del sys.modules[name]


def write_module(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


SCALE_PLUGIN = """
    from torch import nn
    from dropcluster.plugins import register_regularizer

    class Scale(nn.Module):
        def __init__(self, p, factor=1.0):
            super().__init__()
            self.p, self.factor = p, factor

        def forward(self, x):
            return x * (1 - self.p) * self.factor

    register_regularizer("scale", Scale, placement="stem", display_name="Scale (ours)")
"""


# ---------------------------------------------------------------------------------------------
# Registering


def test_a_registered_regularizer_is_built_placed_and_named_like_a_built_in_one():
    register_regularizer("scale", Scale, placement="stem", display_name="Scale (ours)")
    assert regularizer_names() == (*REGULARIZERS, "scale")
    module = build_regularizer("scale", 0.25, factor=2.0)
    assert isinstance(module, Scale) and (module.p, module.factor) == (0.25, 2.0)
    assert build_regularizer("scale", 0.5)(torch.ones(2)).tolist() == [0.5, 0.5]
    model = lenet5(1, 10)
    (installed,) = place_regularizer(model, "scale", 0.25, "synthetic")
    assert model.slots["stem"][0].regularizer is installed and installed.p == 0.25
    # A config names it; bad options fail when the config is made, naming the option.
    assert TrainConfig(regularizer="scale", regularizer_options={"factor": 3.0}).p == 0.1
    with pytest.raises(ValueError, match="bad options for 'scale'.*'width'"):
        TrainConfig(regularizer="scale", regularizer_options={"width": 3})
    # Reports: its display name, after the built-in arms, in a colour no built-in arm has.
    assert report_figures.display_name("scale") == "Scale (ours)"
    assert report_figures.display_name("scale:big") == "Scale (ours) (big)"
    styles = report_figures.arm_styles(["dropcluster", "scale", "other"])
    assert report_figures.ordered_regularizers(["scale", "dropcluster", "none"])[-1] == "scale"
    assert styles["scale"]["color"] == report_figures.PLUGIN_COLOURS[1]  # "other" sorts first
    assert styles["other"]["color"] == report_figures.PLUGIN_COLOURS[0]
    assert styles["scale"]["color"] not in report_figures.REGULARIZER_COLOURS.values()


def test_placement_per_family_and_registered_without_one():
    register_regularizer(
        "scale",
        Scale,
        placement={
            "cifar100": Placement("stem"),
            "tiny-imagenet": Placement("group4", {"factor": 2.0}),
        },
    )
    assert placement_for("scale", "synthetic") == Placement("stem")
    assert placement_for("scale", "tiny-imagenet").options == {"factor": 2.0}
    register_regularizer("bare", Scale)
    assert placement_for("bare", "cifar100") == Placement(None)
    with pytest.raises(ValueError, match="regularizer 'bare' has no slot: register it with"):
        place_regularizer(lenet5(1, 10), "bare", 0.1)
    (installed,) = place_regularizer(lenet5(1, 10), "bare", 0.1, slot="stem")
    assert isinstance(installed, Scale)
    with pytest.raises(ValueError, match="with a 'cifar100' row"):
        register_regularizer("partial", Scale, placement={"tiny-imagenet": Placement("stem")})


def test_built_in_names_cannot_be_shadowed_and_a_name_is_registered_once():
    with pytest.raises(ValueError, match="regularizer 'dropout' is built in and cannot be"):
        register_regularizer("dropout", Scale, replace=True)
    with pytest.raises(ValueError, match="model 'lenet5' is built in"):
        register_model("lenet5", lambda n_classes, in_channels, stem=None: None)
    with pytest.raises(ValueError, match="dataset 'synthetic' is built in"):
        register_dataset("synthetic", lambda split, root: None, augment=AugmentConfig())
    register_regularizer("scale", Scale, display_name="First")
    message = (
        f"plugin '{__name__}': regularizer 'scale' is already registered \\(by plugin "
        f"'{__name__}'\\); pass replace=True to replace it"
    )
    with pytest.raises(ValueError, match=message):
        register_regularizer("scale", Scale)
    register_regularizer("scale", Scale, display_name="Second", replace=True)
    assert report_figures.display_name("scale") == "Second"
    with pytest.raises(ValueError, match="lower-case letters"):
        register_regularizer("My:Drop", Scale)


def test_factories_are_checked_for_the_call_the_project_makes():
    with pytest.raises(
        ValueError,
        match=r"plugin '.*test_plugins': regularizer 'x': .*cannot be called as "
        r"factory\(p, \*\*options\)",
    ):
        register_regularizer("x", lambda: nn.Identity())
    with pytest.raises(ValueError, match=r"cannot be called as factory\(n_classes, in_channels"):
        register_model("x", lambda n_classes: None)
    with pytest.raises(ValueError, match=r"cannot be called as loader\(split, root\)"):
        register_dataset("x", lambda split: None, augment=AugmentConfig())
    with pytest.raises(ValueError, match="should be registered with a callable"):
        register_regularizer("x", "not callable")
    with pytest.raises(ValueError, match="augment of data set 'x' should be an AugmentConfig"):
        register_dataset("x", lambda split, root: None, augment={"flip": True})
    # A factory that returns something else is caught at its first call.
    register_regularizer("bad", lambda p: "not a module")
    with pytest.raises(ValueError, match="should return an nn.Module, but returned str"):
        build_regularizer("bad", 0.1)


def _tiny_split(split, root):
    images = torch.arange(2 * 16 * 16 * 3, dtype=torch.int64).remainder(256).to(torch.uint8)
    images = images.reshape(2, 3, 16, 16).repeat(16 if split == "train" else 4, 1, 1, 1)
    labels = torch.arange(images.shape[0]) % 2
    return ImageDataset(images, labels, ["a", "b"], "tiny")


def test_a_registered_model_and_data_set_train(tmp_path):
    from dropcluster.train.loop import train

    register_model(
        "tiny-lenet", lambda n_classes, in_channels, stem=None: lenet5(in_channels, n_classes)
    )
    augment = AugmentConfig(crop_padding=0, flip=False, mean=(0.5,), std=(0.25,))
    register_dataset("tiny", _tiny_split, augment=augment, family="tiny-imagenet")
    assert model_names()[-1] == "tiny-lenet" and dataset_names()[-1] == "tiny"
    assert dataset_family("tiny") == "tiny-imagenet" and augment_preset("tiny") is augment
    assert len(load_dataset("tiny", "test")) == 8
    assert isinstance(build_model("tiny-lenet", n_classes=2, in_channels=3), type(lenet5(3, 2)))
    config = TrainConfig(
        dataset="tiny",
        model="tiny-lenet",
        regularizer="dropout",
        epochs=1,
        batch_size=8,
        average_last=1,
        channels_last=False,
    )
    result = train(config, tmp_path / "run")
    assert len(result.history) == 1 and 0.0 <= result.top1 <= 100.0
    register_model("not-slotted", lambda n_classes, in_channels, stem=None: nn.Linear(2, 2))
    with pytest.raises(ValueError, match="should return a SlottedModel"):
        build_model("not-slotted", n_classes=2)
    register_dataset("not-a-set", lambda split, root: [], augment=augment)
    with pytest.raises(ValueError, match="should return an ImageDataset, but returned list"):
        load_dataset("not-a-set")


# ---------------------------------------------------------------------------------------------
# Loading


def test_load_plugins_imports_once_and_names_the_module_in_every_error(fresh_registry):
    write_module(fresh_registry, "plug_scale", SCALE_PLUGIN)
    assert load_plugins(["plug_scale"]) == ["plug_scale"]
    assert load_plugins(["plug_scale"]) == []
    assert "scale" in regularizer_names()
    write_module(fresh_registry, "plug_twice", SCALE_PLUGIN + SCALE_PLUGIN.replace("scale", "s2"))
    write_module(fresh_registry, "plug_again", SCALE_PLUGIN)
    with pytest.raises(
        ValueError,
        match="^plugin 'plug_again': regularizer 'scale' is already registered \\(by plugin "
        "'plug_scale'\\); pass replace=True to replace it$",
    ):
        load_plugins(["plug_again"])
    write_module(fresh_registry, "plug_broken", "import math\nraise RuntimeError('no\\nGPU')\n")
    with pytest.raises(
        ValueError, match="^plugin 'plug_broken' failed to import: RuntimeError: no GPU$"
    ):
        load_plugins(["plug_broken"])
    with pytest.raises(ValueError, match="^plugin 'plug_missing' is not importable here"):
        load_plugins(["plug_missing"])
    write_module(
        fresh_registry,
        "plug_sig",
        "from dropcluster.plugins import register_model\nregister_model('m', lambda: None)\n",
    )
    with pytest.raises(ValueError, match=r"^plugin 'plug_sig': model 'm': .* cannot be called"):
        load_plugins(["plug_sig"])
    write_module(
        fresh_registry,
        "plug_function",
        "from dropcluster.plugins import register_model\n"
        "def register():\n"
        "    register_model('fm', lambda n_classes, in_channels, stem=None: None)\n",
    )
    assert load_plugins(["plug_function:register"]) == ["plug_function:register"]
    assert "fm" in model_names()
    with pytest.raises(ValueError, match="should be a module name"):
        load_plugins(["not a module"])


def test_entry_points_are_loaded_once_lazily_when_a_name_is_unknown(fresh_registry, monkeypatch):
    write_module(fresh_registry, "plug_ep", SCALE_PLUGIN)
    calls = []

    def fake_entry_points(group):
        calls.append(group)
        return [EntryPoint(name="scale", value="plug_ep", group=PLUGIN_GROUP)]

    monkeypatch.setattr(plugins, "entry_points", fake_entry_points)
    TrainConfig(regularizer="dropout")  # built-in names never load them
    assert calls == []
    assert TrainConfig(regularizer="scale").regularizer == "scale"
    assert calls == [PLUGIN_GROUP]
    with pytest.raises(ValueError, match="regularizer should be one of .*'scale'.* but got 'nope'"):
        TrainConfig(regularizer="nope")
    assert calls == [PLUGIN_GROUP]  # once per process


def test_a_broken_entry_point_is_one_line_naming_it(fresh_registry, monkeypatch):
    write_module(fresh_registry, "plug_ep_broken", "raise ImportError('needs foo')\n")
    monkeypatch.setattr(
        plugins,
        "entry_points",
        lambda group: [EntryPoint(name="broken", value="plug_ep_broken", group=group)],
    )
    with pytest.raises(
        ValueError,
        match="^plugin \"plug_ep_broken \\(entry point 'broken'\\)\" failed to import: "
        "ImportError: needs foo$",
    ):
        build_regularizer("unknown", 0.1)


def _config_args(out: Path) -> list[str]:
    return [
        "train",
        "--out",
        str(out),
        "--dataset",
        "synthetic",
        "--model",
        "lenet5",
        "--regularizer",
        "scale",
        "--epochs",
        "1",
        "--train-fraction",
        "0.05",
        "--average-last",
        "1",
        "--no-channels-last",
        "--batch-size",
        "50",
    ]


def test_train_plugin_flag_records_the_plugin_for_resume_and_evaluate(
    fresh_registry, monkeypatch, tmp_path, capsys
):
    write_module(fresh_registry, "plug_scale", SCALE_PLUGIN)
    out = tmp_path / "run"
    assert main([*_config_args(out), "--plugin", "plug_scale"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["plugins"] == ["plug_scale"] and saved["regularizer"] == "scale"
    # A new process knows no plugin: the run's own config brings it back.
    monkeypatch.setattr(plugins, "REGISTRY", Registry())
    del sys.modules["plug_scale"]
    assert main(["train", "--config", str(out / "config.json"), "--out", str(out), "--resume"]) == 0
    assert "scale" in regularizer_names()
    monkeypatch.setattr(plugins, "REGISTRY", Registry())
    del sys.modules["plug_scale"]
    command = [
        "evaluate",
        "--checkpoint",
        str(out),
        "--corruptions",
        "gaussian_noise",
        "--severities",
        "1",
        "--limit",
        "20",
        "--device",
        "cpu",
    ]
    assert main(command) == 0
    assert "gaussian_noise" in (out / "corruptions.json").read_text()


def test_a_bad_plugin_stops_the_command_before_any_run(fresh_registry, tmp_path, capsys):
    write_module(fresh_registry, "plug_broken", "raise KeyError('x')\n")
    out = tmp_path / "run"
    assert main([*_config_args(out), "--plugin", "plug_broken"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["dropcluster: error: plugin 'plug_broken' failed to import: KeyError: 'x'"]
    assert not out.exists()
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps(_preset(["plug_missing"])))
    assert main(["sweep", "--preset", str(preset), "--out", str(tmp_path / "s")]) == 2
    assert "plugin 'plug_missing' is not importable here" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def _preset(plugin_list: list[str] | None = None, regularizers=("none", "scale")) -> dict:
    preset = {
        "name": "tiny-plugin",
        "scale": "demo",
        "description": "a plugin arm",
        "dataset": "synthetic",
        "base": {
            "dataset": "synthetic",
            "model": "lenet5",
            "epochs": 1,
            "batch_size": 50,
            "average_last": 1,
            "device": "cpu",
            "channels_last": False,
        },
        "grids": [
            {"regularizer": list(regularizers), "p": [0.2], "train_fraction": [0.05], "seed": [0]}
        ],
        "average_last": 1,
    }
    if plugin_list is not None:
        preset["plugins"] = plugin_list
    return preset


def test_the_preset_field_and_the_flag_record_plugins_in_every_run(
    fresh_registry, tmp_path, capsys
):
    write_module(fresh_registry, "plug_scale", SCALE_PLUGIN)
    preset = Preset.from_dict(_preset(["plug_scale"]))
    assert [spec.config.plugins for spec in expand_grid(preset)] == [["plug_scale"]] * 2
    assert preset.to_dict()["plugins"] == ["plug_scale"]
    # The same grid without the field, with --plugin on the dry run.
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_preset()))
    assert main(["sweep", "--preset", str(path), "--dry-run", "--plugin", "plug_scale"]) == 0
    assert "scale-p0.2-f0.05-s0" in capsys.readouterr().out


def test_a_local_sweep_worker_imports_the_plugin(fresh_registry, tmp_path, monkeypatch, capsys):
    write_module(fresh_registry, "plug_scale", SCALE_PLUGIN)
    monkeypatch.setenv("PYTHONPATH", str(fresh_registry))  # the worker processes' import path
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_preset(["plug_scale"])))
    out = tmp_path / "out"
    assert main(["reproduce", "--preset", str(path), "--out", str(out)]) == 0
    job = json.loads((out / "runs" / "scale-p0.2-f0.05-s0" / "job.json").read_text())
    assert job["config"]["plugins"] == ["plug_scale"]
    result = json.loads((out / "runs" / "scale-p0.2-f0.05-s0" / "result.json").read_text())
    assert 0.0 <= result["top1"] <= 100.0
    assert "| Scale (ours) | 0.2 |" in (out / "report" / "report.md").read_text()


def test_the_guides_package_runs_as_one_more_arm_of_its_preset(tmp_path, monkeypatch, capsys):
    # docs/plugins.md: the example package, on the import path as `pip install -e` would put it.
    monkeypatch.syspath_prepend(str(PACKAGE))
    monkeypatch.setenv("PYTHONPATH", str(PACKAGE))
    out = tmp_path / "out"
    preset = str(PACKAGE / "compare.json")
    only = ["--only", "regularizer=dropout,gaussian_dropout", "--set", "epochs=1"]
    command = ["reproduce", "--preset", preset, "--out", str(out), *only]
    assert main(command) == 0
    report = (out / "report" / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| Gaussian dropout | 0.1 |")]
    assert len(rows) == 1 and "| Dropout | 0.1 |" in report
    from mydrop import GaussianDropout

    layer = GaussianDropout(0.2).train()
    torch.manual_seed(0)
    x = torch.ones(20000)
    noisy = layer(x)
    assert abs(noisy.mean().item() - 1.0) < 0.02 and abs(noisy.var().item() - 0.25) < 0.02
    assert torch.equal(layer.eval()(x), x)


def test_a_schedule_is_refused_for_a_plugin_layer_it_cannot_set():
    register_regularizer("scale", Scale, placement="stem")
    config = dict(dataset="synthetic", model="lenet5", regularizer="scale", p=0.2, epochs=3)
    with pytest.raises(ValueError, match="builds Scale, whose rate it cannot set"):
        TrainConfig(**config, drop_schedule={"kind": "early", "end_epoch": 2})
    TrainConfig(**config)  # without a schedule the plugin's layer runs as built
