"""Corrupted-test evaluation: settings, determinism, released sets, `dropcluster evaluate`."""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch import nn

from dropcluster.cli import main
from dropcluster.data.corrupted_sets import write_released_marker
from dropcluster.data.corruptions import CORRUPTIONS, PAPER, corrupt
from dropcluster.experiments import corruption_eval
from dropcluster.experiments.corruption_eval import (
    CorruptionSettings,
    evaluate_corruptions,
    format_table,
    mean_over_corruptions,
    parse_corruptions,
    parse_severities,
)
from dropcluster.train.config import TrainConfig
from dropcluster.train.loop import evaluate, train
from dropcluster.train.restore import load_run


def test_severities_and_corruptions_parse_ranges_lists_and_all():
    assert parse_severities("1-5") == [1, 2, 3, 4, 5]
    assert parse_severities("1,3-4") == [1, 3, 4]
    assert parse_severities("2") == [2]
    assert parse_severities([5, 1, 5]) == [1, 5]
    assert parse_corruptions("all") == list(CORRUPTIONS)
    assert parse_corruptions("paper") == list(PAPER) == CorruptionSettings().corruptions
    assert parse_corruptions("zoom_blur, gaussian_noise") == ["gaussian_noise", "zoom_blur"]
    for bad in ("0-2", "6", "a", "", "1-"):
        with pytest.raises(ValueError, match="severities should"):
            parse_severities(bad)
    with pytest.raises(ValueError, match="unknown corruption 'fogg': expected a set"):
        parse_corruptions("fogg,zoom_blur")
    with pytest.raises(ValueError, match="jpeg_quality"):
        CorruptionSettings(jpeg_quality=100)
    with pytest.raises(ValueError, match="limit"):
        CorruptionSettings(limit=0)


class MeanIntensityClassifier(nn.Module):
    """Two classes by mean brightness: a model whose accuracy corruptions visibly change."""

    def forward(self, x):
        mean = x.mean(dim=(1, 2, 3))
        return torch.stack([-mean, mean], dim=1) * 10


def _two_class_set(n=300, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=generator)
    # 1.5 grey levels either side of the threshold: strong noise flips some decisions.
    base = torch.where(labels == 1, 129, 126).to(torch.uint8)
    images = base.view(n, 1, 1, 1).expand(n, 1, 28, 28).clone()
    return images, labels


def _prepare(images):
    return images.float() / 255.0 - 0.5


def test_clean_row_equals_plain_evaluation_and_rows_are_deterministic(monkeypatch):
    images, labels = _two_class_set()
    model = MeanIntensityClassifier()
    settings = CorruptionSettings(corruptions="gaussian_noise,impulse_noise", severities="1,5")
    rows = evaluate_corruptions(
        model, images, labels, _prepare, settings, batch_size=64, progress=io.StringIO()
    )
    assert [(r["corruption"], r["severity"]) for r in rows] == [
        ("clean", 0),
        ("gaussian_noise", 1),
        ("gaussian_noise", 5),
        ("impulse_noise", 1),
        ("impulse_noise", 5),
    ]
    top1, top5 = evaluate(model, images, labels, _prepare, batch_size=64)
    assert (rows[0]["top1"], rows[0]["top5"]) == (top1, top5) == (100.0, 100.0)
    assert all(r["images"] == 300 for r in rows)
    # Same settings, other batch size: identical (the chunks, not the batches, are seeded).
    again = evaluate_corruptions(
        model, images, labels, _prepare, settings, batch_size=7, progress=io.StringIO()
    )
    assert again == rows
    # Another seed gives other noise, so (with this borderline model) other accuracies.
    other = evaluate_corruptions(
        model,
        images,
        labels,
        _prepare,
        CorruptionSettings(corruptions="impulse_noise", severities="5", seed=1),
        progress=io.StringIO(),
    )
    assert other[1]["top1"] != rows[4]["top1"]


def test_chunks_are_corrupted_with_generators_seeded_by_their_coordinates(monkeypatch):
    images, labels = _two_class_set(n=250)
    monkeypatch.setattr(corruption_eval, "CHUNK_IMAGES", 100)
    seen = []
    real_corrupt = corruption_eval.corrupt

    def spy(chunk, corruption, severity, *, family, generator):
        seen.append((chunk.shape[0], family, generator.initial_seed()))
        return real_corrupt(chunk, corruption, severity, family=family, generator=generator)

    monkeypatch.setattr(corruption_eval, "corrupt", spy)
    settings = CorruptionSettings(corruptions="shot_noise", severities="2")
    evaluate_corruptions(
        MeanIntensityClassifier(), images, labels, _prepare, settings, progress=io.StringIO()
    )
    assert [s[0] for s in seen] == [100, 100, 50]
    assert {s[1] for s in seen} == {"cifar"}  # 28x28 images use the CIFAR family
    assert len({s[2] for s in seen}) == 3
    # Chunk 1 is corrupted exactly as a direct call with its generator would do it.
    generator = corruption_eval.chunk_generator(0, "shot_noise", 2, 1, torch.device("cpu"))
    expected = corrupt(images[100:200], "shot_noise", 2, generator=generator)
    generator = corruption_eval.chunk_generator(0, "shot_noise", 2, 1, torch.device("cpu"))
    assert torch.equal(
        real_corrupt(images[100:200], "shot_noise", 2, generator=generator), expected
    )


def test_released_sets_replace_generated_ones():
    images, labels = _two_class_set(n=40)
    calls = []

    def released(corruption, severity):
        calls.append((corruption, severity))
        # A "released" set where every image is black: the mean classifier says class 0.
        return torch.zeros_like(images), labels

    settings = CorruptionSettings(corruptions="zoom_blur", severities="1-2")
    rows = evaluate_corruptions(
        MeanIntensityClassifier(),
        images,
        labels,
        _prepare,
        settings,
        released=released,
        progress=io.StringIO(),
    )
    assert calls == [("zoom_blur", 1), ("zoom_blur", 2)]
    expected = 100.0 * float((labels == 0).float().mean())
    assert rows[1]["top1"] == pytest.approx(expected) and rows[2]["top1"] == pytest.approx(expected)


def test_mean_and_table_summarise_every_severity():
    rows = [
        {"corruption": "clean", "severity": 0, "top1": 90.0, "top5": 99.0},
        {"corruption": "gaussian_noise", "severity": 1, "top1": 80.0, "top5": 95.0},
        {"corruption": "zoom_blur", "severity": 1, "top1": 70.0, "top5": 93.0},
        {"corruption": "gaussian_noise", "severity": 3, "top1": 50.0, "top5": 85.0},
        {"corruption": "zoom_blur", "severity": 3, "top1": 40.0, "top5": 80.0},
    ]
    assert mean_over_corruptions(rows) == [
        {"severity": 1, "top1": 75.0, "top5": 94.0, "corruptions": 2},
        {"severity": 3, "top1": 45.0, "top5": 82.5, "corruptions": 2},
    ]
    table = format_table(rows).splitlines()
    assert table[0].split() == ["top-1", "(%)", "sev", "1", "sev", "3"]
    assert table[1].split() == ["gaussian_noise", "80.00", "50.00"]
    assert table[3].split() == ["mean", "over", "corruptions", "75.00", "45.00"]
    assert table[4] == "clean: 90.00"


def test_evaluate_command_writes_the_runs_results(tmp_path, capsys):
    config = TrainConfig(
        dataset="synthetic",
        model="lenet5",
        regularizer="none",
        p=0.0,
        epochs=1,
        train_fraction=0.1,
        batch_size=64,
        channels_last=False,
    )
    run_dir = tmp_path / "run"
    train(config, run_dir, progress_stream=io.StringIO())
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(run_dir),
            "--corruptions",
            "gaussian_noise,defocus_blur",
            "--severities",
            "1,5",
            "--limit",
            "100",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "gaussian_noise" in out and "mean over corruptions" in out
    document = json.loads((run_dir / "corruptions.json").read_text())
    assert document["source"] == "generated"
    assert document["settings"]["limit"] == 100
    assert len(document["rows"]) == 1 + 2 * 2
    assert all(row["images"] == 100 for row in document["rows"])
    assert document["amp_dtype"] is None and document["seconds"] > 0  # full precision on the CPU
    result = json.loads((run_dir / "result.json").read_text())
    assert "top1" in result  # the training summary is kept
    assert result["corruptions"]["clean"] == document["rows"][0]
    assert [m["severity"] for m in result["corruptions"]["mean_over_corruptions"]] == [1, 5]
    # Evaluating again with the same settings reproduces the same numbers.
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(run_dir),
                "--corruptions",
                "gaussian_noise,defocus_blur",
                "--severities",
                "1,5",
                "--limit",
                "100",
            ]
        )
        == 0
    )
    assert json.loads((run_dir / "corruptions.json").read_text())["rows"] == document["rows"]


def test_evaluate_command_reports_bad_input(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "no run folder" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--severities", "7"]) == 2
    assert "severities should be ints in 1..5" in capsys.readouterr().err


def test_evaluate_reads_released_cifar100_c_files(tmp_path, capsys):
    import numpy as np
    from test_data_datasets import write_cifar100

    from dropcluster.data import load_dataset

    data = tmp_path / "data"
    write_cifar100(data, n_train=40, n_test=10)
    config = TrainConfig(
        dataset="cifar100",
        data_dir=str(data),
        model="lenet5",
        regularizer="none",
        p=0.0,
        epochs=1,
        batch_size=16,
        channels_last=False,
    )
    run_dir = tmp_path / "run"
    train(config, run_dir, progress_stream=io.StringIO())
    test_set = load_dataset("cifar100", "test", root=data)
    # A "released" CIFAR-100-C: severity 1 holds the clean test images, severity 2 black ones.
    clean = test_set.images.permute(0, 2, 3, 1).numpy()
    released = tmp_path / "CIFAR-100-C"
    released.mkdir()
    stacked = np.concatenate([clean, np.zeros_like(clean), clean, clean, clean])
    np.save(released / "zoom_blur.npy", stacked)
    np.save(released / "labels.npy", np.tile(test_set.labels.numpy(), 5))
    # Smaller than the release on purpose: the marker records what it holds.
    write_released_marker(released, "cifar100-c", {"corruptions": 1, "per_severity": len(clean)})
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(run_dir),
            "--corruptions",
            "zoom_blur",
            "--severities",
            "1-2",
            "--corrupted-from",
            str(released),
        ]
    )
    assert code == 0, capsys.readouterr().err
    document = json.loads((run_dir / "corruptions.json").read_text())
    assert document["source"] == "released"
    clean_row, severity1, severity2 = document["rows"]
    assert (severity1["top1"], severity1["top5"]) == (clean_row["top1"], clean_row["top5"])
    assert severity1["images"] == severity2["images"] == 10
    loaded_model = load_run(run_dir).model
    black = torch.zeros_like(test_set.images)
    expected = evaluate(loaded_model, black, test_set.labels, load_run(run_dir).prepare_eval, 10)
    assert (severity2["top1"], severity2["top5"]) == expected
