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
    assert "cluster-analysis" in help_text


def test_cluster_analysis_on_real_images_prints_a_summary_and_writes_json(tmp_path, capsys):
    from conftest import require_fashion_mnist

    require_fashion_mnist()
    path = tmp_path / "analysis.json"
    code = main(
        ["cluster-analysis", "--n-images", "32", "--channels", "6", "--train-steps", "3",
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
