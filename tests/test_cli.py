"""The `dropcluster` command and the package's public names."""

import json
import subprocess
import sys

import pytest

import dropcluster
from dropcluster.cli import main


def test_public_names_are_the_functions_not_their_modules():
    import dropcluster.hopkins  # noqa: F401
    import dropcluster.rena  # noqa: F401

    assert callable(dropcluster.rena)
    assert callable(dropcluster.spatial_hopkins)
    assert dropcluster.rena.__name__ == "rena"


def test_version_and_help_from_the_console_script():
    version = subprocess.run(
        [sys.executable, "-m", "dropcluster.cli", "--version"], capture_output=True, text=True
    )
    assert version.returncode == 0
    assert version.stdout.strip() == f"dropcluster {dropcluster.__version__}"
    help_text = subprocess.run(
        [sys.executable, "-m", "dropcluster.cli", "--help"], capture_output=True, text=True
    ).stdout
    assert "probe" in help_text and "cluster-analysis" in help_text


def test_cluster_analysis_on_real_images_prints_a_summary_and_writes_json(tmp_path, capsys):
    from conftest import require_fashion_mnist

    require_fashion_mnist()
    path = tmp_path / "analysis.json"
    code = main(
        ["probe", "--n-images", "32", "--channels", "6", "--train-steps", "3", "--json", str(path)]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "structured channels under each rule" in out
    assert "cluster map of channel" in out
    document = json.loads(path.read_text())
    assert len(document["channels"]) == 6
    assert {"spatial_hopkins", "n_found[rena]", "structured[dead]"} <= set(document["channels"][0])


def test_bad_option_gives_a_clear_error_and_exit_code_2(capsys):
    assert main(["cluster-analysis", "--n-clusters", "0"]) == 2
    assert "--n-clusters should be at least 1, but got 0" in capsys.readouterr().err


def test_train_command_runs_and_refuses_to_overwrite(tmp_path, capsys):
    args = [
        "train",
        "--dataset",
        "synthetic",
        "--model",
        "resnet20",
        "--regularizer",
        "dropblock",
        "--p",
        "0.1",
        "--option",
        "block_size=3",
        "--epochs",
        "1",
        "--train-fraction",
        "0.1",
        "--batch-size",
        "50",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "final (mean of the last 1 epochs): top-1" in out
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["regularizer_options"] == {"block_size": 3}
    assert json.loads((tmp_path / "result.json").read_text())["epochs"] == 1
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # a finished run just reports its result


def test_train_command_rejects_a_bad_option(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--option", "block_size"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_train_flags_are_derived_from_the_config_fields():
    import dataclasses

    from dropcluster.cli import add_config_flags, build_parser
    from dropcluster.train.config import TrainConfig

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    flags = {option for action in train._actions for option in action.option_strings}
    for spec in dataclasses.fields(TrainConfig):
        if spec.name == "plugins":  # --plugin MODULE, repeatable
            assert "--plugin" in flags and "--plugins" not in flags
        elif spec.name not in ("regularizer_options", "drop_schedule"):  # dicts: --set
            assert "--" + spec.name.replace("_", "-") in flags, spec.name
    assert {"--no-amp", "--no-channels-last", "--compile"} <= flags  # booleans both ways

    @dataclasses.dataclass
    class Extra:
        """A config.

        Attributes:
            warmup_epochs: epochs of linear warm-up
                (a second line).
            label_smoothing: smoothing of the targets.
        """

        warmup_epochs: int = 0
        label_smoothing: float | None = None
        tags: list[str] = dataclasses.field(default_factory=list)

    import argparse

    extra = argparse.ArgumentParser()
    add_config_flags(extra, Extra)
    args = extra.parse_args(["--warmup-epochs", "3", "--label-smoothing", "0.1", "--tags", "a"])
    assert (args.warmup_epochs, args.label_smoothing, args.tags) == (3, 0.1, ["a"])
    assert "epochs of linear warm-up (a second line)." in extra.format_help().replace("\n", " ")


def test_train_settings_come_from_config_then_set_then_flags(tmp_path):
    from dropcluster.cli import _train_config, build_parser

    path = tmp_path / "run.json"
    path.write_text(json.dumps({"epochs": 3, "lr": 0.2, "seed": 4}))
    args = build_parser().parse_args(
        [
            "train",
            "--out",
            str(tmp_path),
            "--config",
            str(path),
            "--set",
            "lr=0.3",
            "--set",
            "lr_milestones=[1,2]",
            "--seed",
            "5",
            "--no-amp",
            "--regularizer",
            "dropblock",
            "--option",
            "block_size=3",
        ]
    )
    config = _train_config(args)
    assert (config.epochs, config.lr, config.seed, config.lr_milestones) == (3, 0.3, 5, [1, 2])
    assert config.amp is False and config.regularizer_options == {"block_size": 3}
    args = build_parser().parse_args(["train", "--out", str(tmp_path), "--set", "epoch=3"])
    with pytest.raises(ValueError, match="unknown config keys \\['epoch'\\]"):
        _train_config(args)
