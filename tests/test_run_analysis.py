"""analyze_run: the cluster analysis of a trained run folder (figures, JSON, Markdown report)."""

import io
import json
import re

import numpy as np
import pytest
import torch
from tiny_runs import tiny_config

from dropcluster.experiments.run_analysis import FIGURE_NAMES, analyze_run
from dropcluster.experiments.run_analysis_figures import LayerHopkins, plot_cluster_maps
from dropcluster.nn import DropCluster2d
from dropcluster.train.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from dropcluster.train.loop import train
from dropcluster.train.restore import load_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TAB_RED = np.array([0xD6, 0x27, 0x28]) / 255


def _tiny_config(**changes):
    values = dict(epochs=2, train_fraction=0.1, average_last=1, eval_batch_size=500)
    return tiny_config(**{**values, **changes})


@pytest.fixture(scope="module")
def dropcluster_run(tmp_path_factory):
    """A ResNet-20 run whose DropCluster layer was fitted at the start of epoch 2."""
    run_dir = tmp_path_factory.mktemp("dropcluster_run")
    train(_tiny_config(train_fraction=0.05), run_dir, progress_stream=io.StringIO())
    return run_dir


@pytest.fixture(scope="module")
def fitted_analysis(dropcluster_run, tmp_path_factory):
    """(markdown path, analysis.json) of the DropCluster run."""
    return _analyze(dropcluster_run, tmp_path_factory.mktemp("fitted_analysis"))


@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory):
    """A LeNet-5 run without regularizer whose first conv channel 2 is dead (weights zeroed:
    its output is the constant bias)."""
    run_dir = tmp_path_factory.mktemp("lenet_run")
    config = _tiny_config(model="lenet5", regularizer="none", epochs=1)
    train(config, run_dir, progress_stream=io.StringIO())
    state = load_checkpoint(run_dir / CHECKPOINT_NAME)
    state["model"]["conv1.weight"][2] = 0.0
    save_checkpoint(run_dir / CHECKPOINT_NAME, state)
    return run_dir


@pytest.fixture(scope="module")
def lenet_analysis(lenet_run, tmp_path_factory):
    """(markdown path, analysis.json) of the LeNet run, seed 0."""
    return _analyze(lenet_run, tmp_path_factory.mktemp("lenet_analysis"))


def _analyze(run_dir, out_dir, **options):
    options = {"n_images": 2, "sample_images": 48, **options}
    markdown = analyze_run(run_dir, out_dir, **options)
    return markdown, json.loads((out_dir / "analysis.json").read_text())


def _assert_valid_pngs(out_dir):
    for name in FIGURE_NAMES.values():
        data = (out_dir / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > 5000, name


def test_fitted_run_reports_the_layers_own_clusters(dropcluster_run, fitted_analysis):
    markdown, report = fitted_analysis
    assert markdown.name == "analysis.md"
    _assert_valid_pngs(markdown.parent)
    layer = load_run(dropcluster_run).model.slot("stem").regularizer
    assert isinstance(layer, DropCluster2d) and layer.fitted
    clusters = report["clusters"]
    assert clusters["source"] == "model"
    assert (clusters["channels"], clusters["height"], clusters["width"]) == (16, 32, 32)
    assert clusters["structured"] == layer.structured.tolist()
    assert clusters["n_found"] == layer.cluster_counts.tolist()
    hopkins = report["channel_hopkins"]
    assert len(hopkins) == 16 and all(0.0 <= value <= 1.0 for value in hopkins)
    # Every structured channel of the fitted layer reaches its 15 clusters on these maps.
    pairs = zip(clusters["n_found"], clusters["structured"], strict=True)
    assert all(n == 15 for n, structured in pairs if structured)
    # The example channels are structured, and the mask drops about p of their pixels.
    assert all(clusters["structured"][c] for c in report["example_channels"])
    assert 0.05 < report["mask"]["dropped_fraction"] < 0.5


def test_one_histogram_entry_per_depth_slot(fitted_analysis):
    _, report = fitted_analysis
    layers = report["layers"]
    assert [layer["name"] for layer in layers] == ["stem", "group1", "group2", "group3"]
    assert [layer["channels"] for layer in layers] == [16, 16, 32, 64]
    assert [layer["height"] for layer in layers] == [32, 32, 16, 8]
    for layer in layers:
        assert len(layer["hopkins"]) == layer["channels"]
        assert all(0.0 <= value <= 1.0 for value in layer["hopkins"])
        assert layer["q1"] <= layer["median"] <= layer["q3"]
        assert 0.0 <= layer["fraction_below_0_55"] <= 1.0
    # The clustered slot's per-channel values are the stem row of the histogram figure.
    assert layers[0]["hopkins"] == report["channel_hopkins"]


def test_markdown_links_figures_and_counts_unstructured_channels(lenet_analysis):
    markdown, _ = lenet_analysis
    text = markdown.read_text()
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (markdown.parent / name).is_file()
    assert sorted(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)) == sorted(FIGURE_NAMES.values())
    assert "**1 of 6 channels are unstructured**" in text
    assert "| 2 | **no** |" in text
    assert "| layer | channels | map | median | IQR | fraction < 0.55 |" in text


def test_run_without_dropcluster_fits_rena_here(lenet_analysis):
    markdown, report = lenet_analysis
    _assert_valid_pngs(markdown.parent)
    clusters = report["clusters"]
    assert clusters["source"] == "fitted here"
    assert clusters["n_clusters"] == 15 and clusters["unstructured_rule"] == "dead"
    assert "no DropCluster layer" in markdown.read_text()
    # Only the zeroed channel is dead (a constant map): unstructured, and Spatial Hopkins is
    # exactly the no-structure value there.
    assert clusters["structured"] == [True, True, False, True, True, True]
    assert report["channel_hopkins"][2] == 0.5
    pairs = zip(clusters["n_found"], clusters["structured"], strict=True)
    assert all(n <= 15 for n, structured in pairs if structured)
    assert [layer["name"] for layer in report["layers"]] == ["stem", "group1"]
    assert report["mask"]["p"] == 0.2 and "illustrative" in report["mask"]["description"]


def test_unfitted_dropcluster_layer_is_fitted_here_with_its_settings(tmp_path):
    run_dir = tmp_path / "run"
    config = _tiny_config(model="lenet5", epochs=1, p=0.3, regularizer_options={"n_clusters": 6})
    train(config, run_dir, progress_stream=io.StringIO())
    markdown, report = _analyze(run_dir, tmp_path / "out", sample_images=32)
    assert report["clusters"]["source"] == "fitted here"
    assert report["clusters"]["n_clusters"] == 6
    assert "not fitted yet" in markdown.read_text()
    assert report["mask"]["p"] == pytest.approx(0.3)


def test_same_seed_gives_identical_json_and_another_seed_does_not(
    lenet_run, lenet_analysis, tmp_path
):
    # The run without DropCluster: ReNA, Spatial Hopkins and the mask all draw from the seed.
    first_markdown, first = lenet_analysis
    _, again = _analyze(lenet_run, tmp_path / "again", seed=0)
    _, other = _analyze(lenet_run, tmp_path / "other", seed=4)
    assert (first_markdown.parent / "analysis.json").read_text() == (
        tmp_path / "again" / "analysis.json"
    ).read_text()
    assert first == again
    assert other["example_images"] != first["example_images"]
    assert other["channel_hopkins"] != first["channel_hopkins"]


def test_default_output_folder_is_inside_the_run(lenet_run):
    markdown = analyze_run(lenet_run, n_images=1, sample_images=16)
    assert markdown == lenet_run / "analysis" / "analysis.md"
    assert json.loads((lenet_run / "analysis" / "analysis.json").read_text())["sample_images"] == 16


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_images": 0}, "n_images should be an integer >= 1"),
        ({"n_images": 17}, "n_images should be at most 16"),
        ({"sample_images": 1}, "sample_images should be an integer >= 2"),
        ({"n_images": 8, "sample_images": 4}, r"n_images \(8\) should be at most sample_images"),
        ({"seed": -1}, "seed should be an integer >= 0"),
        ({"n_images": 2.0}, "n_images should be an int"),
    ],
)
def test_bad_arguments_raise_clear_errors(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        analyze_run(tmp_path, **options)


def test_missing_or_non_run_folder_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run folder"):
        analyze_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        analyze_run(tmp_path)


def test_unstructured_channels_are_framed_in_red(tmp_path):
    labels = torch.arange(4 * 12 * 12).reshape(4, 12, 12) % 5
    structured = np.array([True, False, True, True])
    common = dict(n_found=np.full(4, 5), hopkins=None, title="t")
    plot_cluster_maps(labels.numpy(), structured, path=tmp_path / "one.png", **common)
    plot_cluster_maps(labels.numpy(), np.ones(4, bool), path=tmp_path / "none.png", **common)
    from matplotlib.image import imread

    def red_pixels(name):
        pixels = imread(tmp_path / name)[..., :3]
        return int((np.abs(pixels - TAB_RED).max(axis=-1) < 0.02).sum())

    # The cluster palette has no red: red pixels come only from the unstructured panel.
    assert red_pixels("none.png") == 0
    assert red_pixels("one.png") > 100


def test_layer_hopkins_keeps_a_panel_for_maps_too_small(tmp_path):
    from dropcluster.experiments.run_analysis_figures import plot_layer_hopkins

    layers = [
        LayerHopkins("stem", 4, 16, 16, np.array([0.6, 0.7, 0.8, 0.5])),
        LayerHopkins("group4", 8, 2, 2, None),
    ]
    path = plot_layer_hopkins(layers, tmp_path / "layers.png", title="t")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
