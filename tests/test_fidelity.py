"""Paper fidelity: the paper presets run the paper's layer, baselines and optimiser; variants are
named; the stem's dead channels are found unstructured; checkpoints of a chosen epoch are kept."""

from __future__ import annotations

import io
import json

import pytest
import torch
from conftest import require_fashion_mnist

from dropcluster.errors import CheckpointError
from dropcluster.experiments.presets import (
    Preset,
    arm_name,
    expand_grid,
    load_preset,
    preset_names,
    run_id,
)
from dropcluster.experiments.sweep import dry_run
from dropcluster.models import build_model, place_regularizer
from dropcluster.nn import DropBlock2d, DropCluster2d
from dropcluster.train import TrainConfig, train
from dropcluster.train.checkpoint import load_model_state
from dropcluster.train.restore import load_run
from dropcluster.train.setup import build_run

PAPER_LAYER = {"per_sample": False, "unstructured": "rena", "identical_neighbours": "split"}


# ---------------------------------------------------------------------------------------------
# Paper presets: the paper's layer, DropBlock and weight decay; ours as named variants


@pytest.mark.parametrize("name", ["paper-cifar100", "paper-tiny-imagenet"])
def test_paper_presets_run_the_papers_layer_dropblock_and_plain_weight_decay(name):
    preset = load_preset(name)
    specs = expand_grid(preset)
    for spec in specs:
        config = spec.config
        assert config.weight_decay_on == "all"
        assert config.cluster_images == config.batch_size == 128
        assert config.variant in (None, "groups34")
        if config.regularizer == "dropcluster":
            assert config.regularizer_options == PAPER_LAYER
        if config.regularizer == "dropblock":
            assert config.regularizer_options["mode"] == "reference"
    assert preset.assumptions, "every unstated setting is listed as an assumption"
    none_runs = [spec for spec in specs if spec.regularizer == "none"]
    assert none_runs and all(spec.config.keep_checkpoints == [50] for spec in none_runs)


@pytest.mark.parametrize("name", ["paper-cifar100", "paper-tiny-imagenet"])
def test_ours_presets_are_the_same_grids_with_our_settings_and_their_own_run_ids(name):
    paper = {spec.run_id: spec for spec in expand_grid(load_preset(name))}
    ours = expand_grid(load_preset(f"{name}-ours"))
    assert not {spec.run_id for spec in ours} & set(paper)  # mergeable into one database
    for spec in ours:
        config = spec.config
        if config.variant == "ramp":  # DropCluster with a ramp: an arm of its own, no twin
            assert config.regularizer == "dropcluster" and config.drop_schedule["kind"] == "linear"
            continue
        assert config.variant == "ours" and "-ours-" in spec.run_id
        assert config.weight_decay_on == "weights" and config.cluster_images == 512
        if config.regularizer == "dropcluster":
            assert config.regularizer_options == {
                "per_sample": True,
                "unstructured": "dead",
                "identical_neighbours": "merge",
            }
        twin = paper[spec.run_id.replace("-ours-", "-")]
        assert (config.epochs, config.lr, config.p) == (
            twin.config.epochs,
            twin.config.lr,
            twin.config.p,
        )


def test_the_dropblock_ablation_installs_dropblock_after_groups_3_and_4():
    spec = next(
        s for s in expand_grid(load_preset("paper-tiny-imagenet")) if s.config.variant == "groups34"
    )
    assert spec.run_id.startswith("dropblock-groups34-")
    model = build_model("resnet50", n_classes=200)
    options = dict(spec.config.regularizer_options)
    installed = place_regularizer(model, "dropblock", 0.1, "tiny-imagenet", **options)
    assert len(installed) == 2 and all(isinstance(m, DropBlock2d) for m in installed)
    assert [m.mode for m in installed] == ["reference", "reference"]
    assert model.slot("group3").regularizer is installed[0]
    assert model.slot("group4").regularizer is installed[1]
    assert model.slot("group1").is_empty and model.slot("group2").is_empty


def test_every_shipped_preset_expands():
    for name in preset_names():
        assert expand_grid(load_preset(name)), name


def test_the_evidence_preset_compares_ten_arms_over_five_seeds_and_two_fractions():
    specs = expand_grid(load_preset("evidence"))
    arms = {arm_name(s.regularizer, s.config.variant) for s in specs}
    assert arms == {
        "none",
        "dropout",
        "spatial_dropout",
        "dropblock",
        "stochastic_depth",
        "dropcluster",
        "dropcluster:ours",
        "dropcluster:per-sample",
        "dropcluster:dead",
        "dropcluster:dead-merge",
    }
    for arm in arms:
        runs = [s for s in specs if arm_name(s.regularizer, s.config.variant) == arm]
        assert sorted((s.train_fraction, s.seed) for s in runs) == sorted(
            (f, seed) for f in (0.1, 0.05) for seed in range(5)
        )
    by_variant = {s.config.variant: s.config for s in specs if s.regularizer == "dropcluster"}
    # Each variant changes one thing of the paper's layer (ours changes all of them).
    assert by_variant[None].regularizer_options == PAPER_LAYER
    assert by_variant["per-sample"].regularizer_options == {**PAPER_LAYER, "per_sample": True}
    assert by_variant["dead"].regularizer_options == {**PAPER_LAYER, "unstructured": "dead"}
    assert by_variant["dead-merge"].regularizer_options == {
        **PAPER_LAYER,
        "unstructured": "dead",
        "identical_neighbours": "merge",
    }
    assert by_variant["per-sample"].cluster_images == by_variant[None].cluster_images == 128


def test_grid_variants_options_and_their_errors():
    base = {
        "name": "v",
        "scale": "demo",
        "description": "d",
        "dataset": "synthetic",
        "base": {"dataset": "synthetic", "model": "lenet5", "epochs": 1},
    }
    grid = {"regularizer": ["dropcluster"], "p": [0.2], "train_fraction": [1.0], "seed": [3]}
    preset = Preset.from_dict(
        {
            **base,
            "options": {"dropcluster": {"n_clusters": 4, "per_sample": False}},
            "grids": [
                grid,
                {
                    **grid,
                    "variant": "x",
                    "options": {"cluster_images": 64, "regularizer_options": {"per_sample": True}},
                },
            ],
        }
    )
    plain, variant = expand_grid(preset)
    assert plain.run_id == run_id("dropcluster", 0.2, 1.0, 3) == "dropcluster-p0.2-f1-s3"
    assert variant.run_id == "dropcluster-x-p0.2-f1-s3"
    assert plain.config.regularizer_options == {"n_clusters": 4, "per_sample": False}
    assert variant.config.regularizer_options == {"n_clusters": 4, "per_sample": True}
    assert (plain.config.cluster_images, variant.config.cluster_images) == (512, 64)
    assert Preset.from_dict(preset.to_dict()) == preset
    with pytest.raises(ValueError, match="variant should be a non-empty name"):
        Preset.from_dict({**base, "grids": [{**grid, "variant": "Ours!"}]})
    with pytest.raises(ValueError, match="cannot set \\['seed'\\]"):
        Preset.from_dict({**base, "grids": [{**grid, "options": {"seed": 1}}]})
    with pytest.raises(ValueError, match="options of unknown regularizers \\['dropclutser'\\]"):
        Preset.from_dict({**base, "grids": [grid], "options": {"dropclutser": {}}})
    with pytest.raises(ValueError, match="run dropcluster-p0.2-f1-s3: regularizer_options"):
        Preset.from_dict({**base, "grids": [grid], "options": {"dropcluster": {"per_sampl": 1}}})


def test_analyze_settings_need_the_kept_checkpoint():
    preset = load_preset("paper-figures").to_dict()
    assert preset["analyze"] == {
        "runs": "all",
        "epoch": 50,
        "unstructured": "rena",
        "sample_images": 128,
    }
    preset["base"]["keep_checkpoints"] = []
    with pytest.raises(ValueError, match="does not keep that epoch's checkpoint"):
        Preset.from_dict(preset)


def test_dry_run_lists_every_setting_and_marks_the_assumptions(tmp_path):
    stream = io.StringIO()
    dry_run(load_preset("paper-tiny-imagenet"), tmp_path / "out", [], stream)
    text = stream.getvalue()
    for field in TrainConfig.__dataclass_fields__:
        if field not in (
            "regularizer",
            "p",
            "train_fraction",
            "seed",
            "regularizer_options",
            "variant",
        ):
            assert f" {field} = " in text, field
    assert "  * batch_size = 128" in text and "  * cluster_images = 128" in text
    assert "    lr = 0.1" in text  # stated by the paper: not marked
    assert 'dropcluster: {"identical_neighbours": "split", "per_sample": false' in text
    assert "assumptions (the paper does not state these" in text
    assert "variant=groups34" in text
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Configs: weight decay on every parameter, checked regularizer options, kept checkpoints


def _tiny_config(**values) -> TrainConfig:
    defaults = dict(
        dataset="synthetic",
        model="lenet5",
        epochs=2,
        batch_size=64,
        cluster_every=1,
        cluster_images=64,
        average_last=1,
        device="cpu",
        channels_last=False,
        regularizer="none",
        p=0.0,
        train_fraction=0.25,
    )
    return TrainConfig(**{**defaults, **values})


@pytest.mark.parametrize(("scope", "norm_decay"), [("weights", 0.0), ("all", 5e-4)])
def test_weight_decay_on_every_parameter_or_on_weights_only(scope, norm_decay):
    config = _tiny_config(model="resnet20", weight_decay=5e-4, weight_decay_on=scope)
    run = build_run(config, torch.device("cpu"))
    decayed, others = run.optimizer.param_groups
    assert decayed["weight_decay"] == 5e-4 and others["weight_decay"] == norm_decay
    stem_norm = run.model.stem_norm
    assert any(p is stem_norm.weight for p in others["params"])
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim <= 1 for p in others["params"])
    with pytest.raises(ValueError, match="weight_decay_on should be one of"):
        _tiny_config(weight_decay_on="bn")


def test_regularizer_options_are_checked_when_the_config_is_made():
    with pytest.raises(ValueError, match="regularizer_options \\{'per_sampl': True\\}"):
        _tiny_config(regularizer="dropcluster", p=0.1, regularizer_options={"per_sampl": True})
    with pytest.raises(ValueError, match="mode should be one of 'exact', 'reference'"):
        _tiny_config(regularizer="dropblock", p=0.1, regularizer_options={"mode": "ramos"})
    # Placement keys go to place_regularizer, not to the module.
    _tiny_config(regularizer="dropblock", p=0.1, regularizer_options={"slot": ["group1"]})
    with pytest.raises(ValueError, match="depth_rule should be one of 'constant', 'linear'"):
        _tiny_config(regularizer="dropout", p=0.1, regularizer_options={"depth_rule": "linar"})
    with pytest.raises(ValueError, match="slot should be a slot name or a non-empty list"):
        _tiny_config(regularizer="dropout", p=0.1, regularizer_options={"slot": []})


def test_a_kept_checkpoint_is_the_model_after_that_epoch(tmp_path):
    config = _tiny_config(epochs=3, keep_checkpoints=[1, 2])
    train(config, tmp_path, progress_stream=io.StringIO())
    assert sorted(p.name for p in tmp_path.glob("checkpoint*.pt")) == [
        "checkpoint-epoch1.pt",
        "checkpoint-epoch2.pt",
        "checkpoint.pt",
    ]
    first, last = load_run(tmp_path, epoch=1), load_run(tmp_path)
    assert (first.epochs_done, last.epochs_done) == (1, 3)
    assert not torch.equal(first.model.conv1.weight, last.model.conv1.weight)
    with pytest.raises(
        FileNotFoundError,
        match="no checkpoint kept after epoch 3 .*kept: checkpoint-epoch1.pt, checkpoint-epoch2.pt",
    ):
        load_run(tmp_path, epoch=3)
    # An epoch past the run's end keeps nothing (a preset's [50] under --set epochs=3).
    assert _tiny_config(epochs=3, keep_checkpoints=[50]).keep_checkpoints == [50]
    with pytest.raises(ValueError, match="keep_checkpoints entries should be an integer >= 1"):
        _tiny_config(epochs=3, keep_checkpoints=[0])


def test_a_lenet_checkpoint_of_0_1_is_refused_with_what_changed(tmp_path):
    train(_tiny_config(epochs=2), tmp_path, stop_after_epoch=1, progress_stream=io.StringIO())
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["model_revision"] == 2
    load_run(tmp_path)  # today's loads
    del state["model_revision"]  # as 0.1 wrote it
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="written by dropcluster 0.1: .*stem slot read the"):
        load_run(tmp_path)
    with pytest.raises(CheckpointError, match="written by dropcluster 0.1"):
        train(_tiny_config(epochs=2), tmp_path, resume=True, progress_stream=io.StringIO())


def test_a_checkpoint_of_the_old_bare_conv_stem_is_refused_with_what_changed(tmp_path):
    model = build_model("resnet20", n_classes=10, in_channels=1)
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("stem_norm.")}
    for name in ("weight", "bias", "running_mean", "running_var"):
        old[f"groups.0.0.norm1.{name}"] = torch.ones(16)
    with pytest.raises(
        CheckpointError, match="dropcluster 0.1: dropcluster 0.1.s ResNet stem was a bare conv"
    ):
        load_model_state(model, {"model": old}, tmp_path / "checkpoint.pt")
    load_model_state(model, {"model": model.state_dict(), "model_revision": 2}, "checkpoint.pt")
    with pytest.raises(CheckpointError, match="does not fit the run's model"):
        load_model_state(
            model,
            {"model": {"fc.weight": torch.zeros(1)}, "model_revision": 2},
            tmp_path / "checkpoint.pt",
        )


# ---------------------------------------------------------------------------------------------
# Dead stem channels on real data: found unstructured by both rules, shown by `analyze`


SILENCED = [3, 7, 11]


@pytest.fixture(scope="module")
def trained_fashion_mnist_run(tmp_path_factory):
    """A ResNet-20 (CIFAR stem: conv -> BN -> ReLU) trained one epoch on 2 % of Fashion-MNIST,
    then three stem channels silenced through their batch norm (scale 0, shift -0.5)."""
    require_fashion_mnist()
    folder = tmp_path_factory.mktemp("run")
    config = TrainConfig(
        dataset="fashion-mnist",
        model="resnet20",
        regularizer="none",
        p=0.0,
        epochs=1,
        train_fraction=0.02,
        eval_batch_size=1000,
        device="cpu",
        average_last=1,
    )
    train(config, folder, progress_stream=io.StringIO())
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    state["model"]["stem_norm.weight"][SILENCED] = 0.0
    state["model"]["stem_norm.bias"][SILENCED] = -0.5
    torch.save(state, folder / "checkpoint.pt")
    return folder


@pytest.mark.parametrize("rule", ["rena", "dead"])
def test_silenced_stem_channels_are_dead_unstructured_and_shown_by_analyze(
    trained_fashion_mnist_run, tmp_path, rule, capsys
):
    pytest.importorskip("matplotlib")
    from dropcluster.cli import main

    out = tmp_path / rule
    assert (
        main(
            [
                "analyze",
                "--checkpoint",
                str(trained_fashion_mnist_run),
                "--out",
                str(out),
                "--sample-images",
                "128",
                "--unstructured",
                rule,
            ]
        )
        == 0
    )
    report = json.loads((out / "analysis.json").read_text())
    clusters = report["clusters"]
    assert clusters["unstructured_rule"] == rule and clusters["channels"] == 16
    assert set(SILENCED) <= set(report["dead_channels"])
    unstructured = [c for c, ok in enumerate(clusters["structured"]) if not ok]
    assert set(SILENCED) <= set(unstructured)
    if rule == "dead":  # the dead rule flags exactly the constant channels
        assert set(unstructured) == set(report["dead_channels"])
    else:
        # The paper's rule also flags live channels whose background pixels are zero in every
        # image (Fashion-MNIST's black border): identical pixels never merge in ReNA.
        assert len(unstructured) > len(report["dead_channels"])
    markdown = (out / "analysis.md").read_text()
    assert "dead channel(s)** (constant over every pixel of the 128 images" in markdown
    for channel in SILENCED:
        assert f"| {channel} | **no** |" in markdown
    print(
        f"rule {rule}: dead {report['dead_channels']}, unstructured {unstructured}, "
        f"found {[clusters['n_found'][c] for c in SILENCED]} clusters in the silenced ones"
    )


def test_a_fitted_dropcluster_layer_masks_the_dead_stem_channels_in_evaluation():
    require_fashion_mnist()
    from dropcluster.data import fashion_mnist

    model = build_model("resnet20", n_classes=10, in_channels=1).eval()
    with torch.no_grad():
        model.stem_norm.weight[SILENCED] = 0.0
        model.stem_norm.bias[SILENCED] = -0.5
    (layer,) = place_regularizer(model, "dropcluster", 0.1, "fashion-mnist", **PAPER_LAYER)
    captured = []
    model.slot("stem").register_forward_pre_hook(lambda m, i: captured.append(i[0]))
    images, _ = fashion_mnist.load_fashion_mnist("test")
    batch = images[:128].float() / 255
    with torch.no_grad():
        model(batch)
    assert isinstance(layer, DropCluster2d)
    layer.fit(captured[0])
    assert set(SILENCED) <= set(torch.nonzero(~layer.structured).flatten().tolist())
    # Unstructured channels are masked in evaluation too.
    with torch.no_grad():
        out = layer.eval()(captured[0])
    assert out[:, SILENCED].abs().sum() == 0
    # ... and the others rescaled by count(M) / count_ones(M) = C / (structured channels).
    scale = 16 / int(layer.structured.sum())
    kept = layer.structured
    torch.testing.assert_close(out[:, kept], captured[0][:, kept] * scale)


def test_reproduce_analyses_every_run_on_its_kept_checkpoint_when_the_preset_says_so(tmp_path):
    pytest.importorskip("matplotlib")
    from dropcluster.cli import main

    preset = {
        "name": "figures-test",
        "scale": "demo",
        "description": "d",
        "dataset": "synthetic",
        "base": {**_tiny_config().to_dict(), "epochs": 2, "keep_checkpoints": [1]},
        "grids": [
            {
                "regularizer": ["none"],
                "p": [0.0],
                "train_fraction": [0.25],
                "seed": [0],
                "variant": "lenet",
            },
            {
                "regularizer": ["none"],
                "p": [0.0],
                "train_fraction": [0.25],
                "seed": [0],
                "variant": "resnet",
                "options": {"model": "resnet20"},
            },
        ],
        "average_last": 1,
        "analyze": {"runs": "all", "epoch": 1, "unstructured": "rena", "sample_images": 32},
    }
    path = tmp_path / "figures.json"
    path.write_text(json.dumps(preset))
    out = tmp_path / "out"
    assert main(["reproduce", "--preset", str(path), "--out", str(out)]) == 0
    for run in ("none-lenet-p0-f0.25-s0", "none-resnet-p0-f0.25-s0"):
        report = json.loads((out / "runs" / run / "analysis" / "analysis.json").read_text())
        assert report["run"]["epochs_done"] == 1  # the kept checkpoint, not the last one
        assert report["clusters"]["unstructured_rule"] == "rena"
        assert report["sample_images"] == 32
    text = (out / "report" / "report.md").read_text()
    assert "(../runs/none-resnet-p0-f0.25-s0/analysis/analysis.md)" in text


def _sweep_folder(folder, name, variant, top1_by_seed):
    """A sweep folder of preset ``name`` holding finished none and dropcluster runs."""
    from dropcluster.experiments.store import ResultsStore
    from dropcluster.experiments.sweep import PRESET_NAME

    grid = {
        "regularizer": ["none", "dropcluster"],
        "p": [0.1],
        "train_fraction": [1.0],
        "seed": [0, 1, 2],
    }
    preset = Preset.from_dict(
        {
            "name": name,
            "scale": "demo",
            "description": "d",
            "dataset": "synthetic",
            "base": {"dataset": "synthetic", "model": "lenet5", "epochs": 2},
            "grids": [grid],
            "variant": variant,
            "average_last": 1,
        }
    )
    folder.mkdir()
    (folder / PRESET_NAME).write_text(json.dumps(preset.to_dict()))
    with ResultsStore.in_folder(folder) as store:
        for spec in expand_grid(preset):
            store.add_run(
                spec.run_id,
                spec.config.to_dict(),
                preset=name,
                regularizer=spec.regularizer,
                p=spec.p,
                seed=spec.seed,
                train_fraction=spec.train_fraction,
            )
            store.mark_running(spec.run_id)
            top1 = top1_by_seed[spec.regularizer][spec.seed]
            history = [{"epoch": 0, "loss": 1.0, "top1": top1, "top5": 99.0}]
            store.record_finished(
                spec.run_id, history=history, top1=top1, top5=99.0, average_last=1, seconds=1.0
            )
    return folder


def test_report_with_another_sweep_shows_both_presets_side_by_side(tmp_path):
    from dropcluster.cli import main

    paper = _sweep_folder(
        tmp_path / "paper", "p", None, {"none": [70, 71, 72], "dropcluster": [71, 73, 75]}
    )
    ours = _sweep_folder(
        tmp_path / "ours", "p-ours", "ours", {"none": [70, 70, 70], "dropcluster": [70, 70, 71]}
    )
    out = tmp_path / "both"
    assert main(["report", "--out", str(paper), "--with", str(ours), "--to", str(out)]) == 0
    text = (out / "report.md").read_text()
    full = text[text.index("## Full training set") : text.index("### Every p")]
    assert "| DropCluster | 0.1 | 73.00 ± 2.00 |" in full
    assert "| DropCluster (ours) | 0.1 | 70.33 ± 0.58 |" in full
    paired = text[text.index("## Paired comparison") :]
    # DropCluster - none per seed: 1, 2, 3 (mean 2, sd 1); ours against none (ours): 0, 0, 1.
    assert "2.00 ± 1.00" in paired and "0.33 ± 0.58" in paired
    assert "## Other sweeps in this report" in text and "### Preset `p-ours`" in text
    with pytest.raises(ValueError, match="in the sweeps of both"):
        from dropcluster.experiments.store import ResultsStore
        from dropcluster.experiments.summary import CombinedResults

        with ResultsStore.in_folder(paper, readonly=True) as store:
            preset = load_preset(paper / "preset.json")
            CombinedResults([(store, preset), (store, preset)])
