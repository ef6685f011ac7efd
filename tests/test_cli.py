"""The `dropcluster` command and the package's public names."""

import json
import subprocess
import sys

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
        ["probe", "--n-images", "32", "--channels", "6", "--train-steps", "3",
         "--json", str(path)]
    )  # fmt: skip
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
    args = ["train", "--dataset", "synthetic", "--model", "resnet20", "--regularizer",
            "dropblock", "--p", "0.1", "--option", "block_size=3", "--epochs", "1",
            "--train-fraction", "0.1", "--batch-size", "50", "--out", str(tmp_path)]  # fmt: skip
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
