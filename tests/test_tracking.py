"""TensorBoard tracking: the event files a run writes, read back, across a crash and a resume."""

from __future__ import annotations

import io
import json
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_runs import tiny_config

from dropcluster.cli import main
from dropcluster.train.config import TrainConfig
from dropcluster.train.loop import read_log, train
from dropcluster.train.tracking import corruption_scalars, epoch_scalars, make_tracker


def _config(**changes) -> TrainConfig:
    """LeNet-5 with DropCluster on 10 % of the synthetic set: 3 steps an epoch."""
    values = dict(model="lenet5", batch_size=64, train_fraction=0.1, eval_batch_size=250)
    values["tracker"] = "tensorboard"
    return tiny_config(**{**values, **changes})


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


EPOCH_TAGS = {
    "train/loss": "loss",
    "train/top1": "train_top1",
    "train/lr": "lr",
    "test/top1": "top1",
    "test/top5": "top5",
    "speed/epoch_seconds": "seconds",
    "speed/images_per_s": "images_per_s",
    "speed/eval_seconds": "eval_seconds",
}


def test_a_crashed_and_resumed_run_has_each_epoch_once_with_the_logs_values(tmp_path, monkeypatch):
    import dropcluster.train.loop as loop

    out = tmp_path / "run"
    config = _config()
    real_save = loop.save_checkpoint
    saved = []

    def full_disk_at_the_second(path, state):
        saved.append(state["epoch"])
        if len(saved) == 2:
            raise OSError(28, "No space left on device")
        real_save(path, state)

    # Epoch index 1 is logged, then its checkpoint cannot be written: the run resumes after
    # epoch index 0 and trains epoch index 1 again.
    monkeypatch.setattr(loop, "save_checkpoint", full_disk_at_the_second)
    with pytest.raises(OSError, match="No space left"):
        train(config, out, progress_stream=io.StringIO())
    assert [record["epoch"] for record in read_log(out / "log.jsonl")] == [0, 1]
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    result = train(config, out, resume=True, progress_stream=io.StringIO())

    log = read_log(out / "log.jsonl")
    scalars = _scalars(out)
    assert len(list(out.glob("events.out.tfevents.*"))) == 2
    assert sorted(scalars) == sorted(
        [
            *EPOCH_TAGS,
            "train/p",
            "refit/seconds",
            "refit/structured",
            "refit/structured_fraction",
            "final/top1",
            "final/top5",
        ]
    )
    for tag, key in EPOCH_TAGS.items():
        assert [step for step, _ in scalars[tag]] == [0, 1, 2], tag
        assert [value for _, value in scalars[tag]] == pytest.approx(
            [record[key] for record in log], rel=1e-6
        ), tag
    assert scalars["train/p"] == [(epoch, pytest.approx(0.2)) for epoch in range(3)]
    # Refits at the start of epochs 1 and 2 (cluster_every=1): LeNet-5's 6 channels.
    assert scalars["refit/structured"] == [(1, 6.0), (2, 6.0)]
    assert scalars["refit/structured_fraction"] == [(1, 1.0), (2, 1.0)]
    assert scalars["final/top1"] == [(2, pytest.approx(result.top1, rel=1e-6))]
    assert scalars["final/top5"] == [(2, pytest.approx(result.top5, rel=1e-6))]
    # A finished run resumed again trains nothing and writes no event file.
    train(config, out, resume=True, progress_stream=io.StringIO())
    assert len(list(out.glob("events.out.tfevents.*"))) == 2


def test_the_command_says_where_it_computes_and_how_to_view_the_curves(tmp_path, capsys):
    out = tmp_path / "run"
    arguments = ["--dataset", "synthetic", "--model", "lenet5", "--train-fraction", "0.1"]
    arguments += ["--batch-size", "64", "--no-channels-last", "--regularizer", "none"]
    assert (
        main(["train", *arguments, "--epochs", "1", "--tracker", "tensorboard", "--out", str(out)])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "device: cpu (auto: no CUDA device is visible)"
    assert lines[2] == f"tracker: tensorboard (view with: tensorboard --logdir {out})"
    scalars = _scalars(out)
    # No regularizer: no drop rate to plot; no refits.
    assert sorted(scalars) == sorted([*EPOCH_TAGS, "final/top1", "final/top5"])
    assert json.loads((out / "config.json").read_text())["tracker"] == "tensorboard"


def test_a_missing_tensorboard_is_one_line_before_anything_is_written(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    out = tmp_path / "run"
    assert (
        main(["train", "--dataset", "synthetic", "--tracker", "tensorboard", "--out", str(out)])
        == 2
    )
    error = capsys.readouterr().err.strip()
    assert error == (
        "dropcluster: error: tracker 'tensorboard' needs the tensorboard package, which is not "
        "installed: pip install 'dropcluster[tensorboard]' (or pip install tensorboard)"
    )
    assert not out.exists()
    with pytest.raises(ImportError, match="dropcluster\\[tensorboard\\]"):
        make_tracker("tensorboard", out)


def test_the_tracker_is_checked_and_is_not_part_of_a_runs_identity():
    with pytest.raises(
        ValueError, match="tracker should be one of 'none', 'tensorboard', but got 'wandb'"
    ):
        TrainConfig(tracker="wandb")
    tracked = TrainConfig(tracker="tensorboard")
    assert tracked.same_run_as(TrainConfig())
    # A config that keeps the default writes no tracker key: older runs' configs are the same.
    assert (
        "tracker" not in TrainConfig().to_dict() and tracked.to_dict()["tracker"] == "tensorboard"
    )


def test_scalars_of_a_log_record_and_of_corruption_rows():
    record = {
        "epoch": 4,
        "loss": 1.5,
        "train_top1": 40.0,
        "lr": 0.1,
        "p": 0.05,
        "structured": [6, 10],
        "channels": [8, 16],
        "layers": ["stem.drop", "group1.drop"],
        "refit_seconds": 0.25,
        "clusters_agree": True,
        "seconds": 2.0,
        "images_per_s": 1000.0,
    }
    assert epoch_scalars(record, constant_p=0.3) == {
        "train/loss": 1.5,
        "train/top1": 40.0,
        "train/lr": 0.1,
        "train/p": 0.05,  # the schedule's rate, logged, wins over the constant one
        "speed/epoch_seconds": 2.0,
        "speed/images_per_s": 1000.0,
        "refit/seconds": 0.25,
        "refit/structured": 16.0,
        "refit/structured_fraction": 16 / 24,
        "refit/structured/stem.drop": 6.0,
        "refit/structured/group1.drop": 10.0,
        "refit/clusters_agree": 1.0,
    }
    rows = [
        {"corruption": "clean", "severity": 0, "top1": 90.0, "top5": 99.0},
        {"corruption": "fog", "severity": 1, "top1": 80.0, "top5": 98.0},
        {"corruption": "fog", "severity": 2, "top1": 60.0, "top5": 94.0},
        {"corruption": "snow", "severity": 1, "top1": 70.0, "top5": 96.0},
        {"corruption": "snow", "severity": 2, "top1": 50.0, "top5": 90.0},
    ]
    assert corruption_scalars(rows) == {
        "corruption/clean/top1": 90.0,
        "corruption/clean/top5": 99.0,
        "corruption/mean/top1": 65.0,
        "corruption/mean/top5": 94.5,
        "corruption/severity1/top1": 75.0,
        "corruption/severity1/top5": 97.0,
        "corruption/severity2/top1": 55.0,
        "corruption/severity2/top5": 92.0,
        "corruption/fog/top1": 70.0,
        "corruption/fog/top5": 96.0,
        "corruption/snow/top1": 60.0,
        "corruption/snow/top5": 93.0,
    }


def test_a_sweep_worker_adds_the_corrupted_test_results_and_replaces_them(tmp_path):
    from dropcluster.experiments.worker import run_job, write_job

    run_dir = tmp_path / "run"
    config = _config(epochs=1, regularizer="none", average_last=1).to_dict()
    evaluate = {"corruptions": ["gaussian_noise"], "severities": [1, 2], "limit": 50}
    write_job(run_dir, config, evaluate)
    assert run_job(run_dir) == 0
    rows = json.loads((run_dir / "corruptions.json").read_text())["rows"]
    first = _scalars(run_dir)
    assert first["corruption/severity2/top1"] == [(1, pytest.approx(rows[2]["top1"]))]
    # Other settings: evaluated again; TensorBoard keeps the new values only, at step 1.
    write_job(run_dir, config, {**evaluate, "severities": [1], "seed": 1})
    assert run_job(run_dir) == 0
    rows = json.loads((run_dir / "corruptions.json").read_text())["rows"]
    second = _scalars(run_dir)
    assert second["corruption/gaussian_noise/top1"] == [(1, pytest.approx(rows[1]["top1"]))]
    assert second["corruption/clean/top1"] == [(1, pytest.approx(rows[0]["top1"]))]
    assert second["corruption/severity2/top1"] == []
    # The training curves (step 0) are untouched.
    assert second["train/loss"] == first["train/loss"] and len(second["train/loss"]) == 1
