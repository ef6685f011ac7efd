"""What the reliability guide promises: nothing lost, no run stuck, every user error one line.

Each test reproduces a failure an adversarial probe found (the issue's reproduction commands)
and checks the guarantee that replaced it. The library-level parts live beside their code
(downloads in test_downloads.py, the results database in test_store.py, the layers in
test_dropcluster_layer.py / test_rena.py).
"""

from __future__ import annotations

import errno
import io
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch

from dropcluster.cli import main
from dropcluster.data.datasets import ImageDataset
from dropcluster.errors import DivergedError, RunBusyError
from dropcluster.experiments.corruption_eval import (
    CorruptionSettings,
    evaluate_corruptions,
    evaluate_run,
    parse_severities,
)
from dropcluster.experiments.presets import expand_grid
from dropcluster.experiments.store import ResultsStore
from dropcluster.experiments.sweep import RUNS_FOLDER, run_sweep
from dropcluster.train import loop
from dropcluster.train.config import TrainConfig
from dropcluster.train.loop import DIVERGED_NAME, read_log, train


def _config(**changes) -> TrainConfig:
    values = dict(
        dataset="synthetic",
        model="lenet5",
        regularizer="none",
        p=0.0,
        epochs=2,
        train_fraction=0.1,
        batch_size=64,
        lr=0.05,
        channels_last=False,
        average_last=1,
    )
    values.update(changes)
    return TrainConfig(**values)


def _quiet_train(config, out, **kwargs):
    return train(config, out, progress_stream=io.StringIO(), **kwargs)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reliability") / "run"
    _quiet_train(_config(epochs=1), run_dir)
    return run_dir


# -- 1. A bad evaluation batch size never overwrites good results ------------------------------


def _evaluate_args(run_dir, *extra):
    return [
        "evaluate",
        "--checkpoint",
        str(run_dir),
        "--corruptions",
        "gaussian_noise",
        "--severities",
        "1",
        "--limit",
        "100",
        *extra,
    ]


def test_bad_evaluation_batch_size_is_refused_before_anything_is_written(trained_run, capsys):
    assert main(_evaluate_args(trained_run)) == 0
    stored = (trained_run / "corruptions.json").read_text()
    result = (trained_run / "result.json").read_text()
    assert json.loads(stored)["rows"][0]["top1"] > 0
    for bad in ("-1", "0", "x"):
        with pytest.raises(SystemExit) as exit_info:
            main(_evaluate_args(trained_run, "--batch-size", bad))
        assert exit_info.value.code == 2
        assert "--batch-size: expected an integer >= 1" in capsys.readouterr().err
    settings = CorruptionSettings(corruptions=["gaussian_noise"], severities=[1], limit=100)
    with pytest.raises(ValueError, match="batch_size should be an integer >= 1, but got -1"):
        evaluate_run(trained_run, settings, batch_size=-1)
    assert (trained_run / "corruptions.json").read_text() == stored
    assert (trained_run / "result.json").read_text() == result


def test_an_evaluation_without_predictions_raises_instead_of_scoring_zero():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    settings = CorruptionSettings(corruptions=["gaussian_noise"], severities=[1])
    empty = torch.zeros(0, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="test set is empty"):
        evaluate_corruptions(
            model,
            empty,
            torch.zeros(0, dtype=torch.int64),
            torch.Tensor.float,
            settings,
            progress=io.StringIO(),
        )

    def no_release(corruption, severity):
        return empty, torch.zeros(0, dtype=torch.int64)

    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="produced no predictions"):
        evaluate_corruptions(
            model,
            images,
            torch.zeros(4, dtype=torch.int64),
            lambda x: x.float(),
            settings,
            released=no_release,
            progress=io.StringIO(),
        )


# -- 2. One writer per run; logs read robustly ----------------------------------------------


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from dropcluster.files import FolderLock; "
            "FolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)",
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_of_a_run_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = _config(epochs=2)
    _quiet_train(config, run_dir, stop_after_epoch=1)
    log_before = (run_dir / "log.jsonl").read_text()
    holder = _hold_lock(run_dir)
    try:
        with pytest.raises(RunBusyError, match="another process is writing the training run"):
            _quiet_train(config, run_dir, resume=True)
        args = [
            "train",
            "--config",
            str(run_dir / "config.json"),
            "--out",
            str(run_dir),
            "--resume",
        ]
        assert main(args) == 2
        assert "another process is writing the training run" in capsys.readouterr().err
        with pytest.raises(RunBusyError):
            evaluate_run(run_dir, CorruptionSettings(corruptions=["gaussian_noise"]))
    finally:
        holder.kill()
        holder.wait()
    assert (run_dir / "log.jsonl").read_text() == log_before
    # Once the other writer is gone, the run continues normally.
    assert len(_quiet_train(config, run_dir, resume=True).history) == 2


def test_read_log_skips_half_written_lines_and_keeps_the_last_record_of_an_epoch(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(
        '{"epoch": 0, "top1": 1.0}\n{"epoch": 1, "top1": 2.0}\n{"epoch": 0, "top1": 3.0}\n'
        '{"epoch": 1, "top1": 4.0}\n{"epoch": 2, "to'
    )
    assert read_log(path) == [{"epoch": 0, "top1": 3.0}, {"epoch": 1, "top1": 4.0}]


def test_sweep_repairs_a_run_whose_log_was_written_twice(tmp_path):
    from test_sweep import tiny_preset

    preset = tiny_preset()
    preset["grids"][0]["regularizer"] = ["none"]
    spec = expand_grid(preset)[0]
    out = tmp_path / "sweep"
    run_dir = out / RUNS_FOLDER / spec.run_id
    _quiet_train(spec.config, run_dir, stop_after_epoch=1)
    # What two writers left: every epoch twice, and a torn last line.
    log = (run_dir / "log.jsonl").read_text()
    (run_dir / "log.jsonl").write_text(log + log + '{"epoch": 1, "lo')
    summary = run_sweep(preset, out, stream=io.StringIO(), poll_seconds=0.05)
    assert summary.failed == [] and summary.finished == 1
    with ResultsStore.in_folder(out, readonly=True) as store:
        assert [row["epoch"] for row in store.epochs(spec.run_id)] == [0, 1]
        assert store.run(spec.run_id).status == "finished"
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]


# -- 4. A diverging or meaningless run is never recorded as finished -------------------------


def test_empty_training_set_is_refused(tmp_path, monkeypatch):
    from dropcluster.train import setup

    real = setup.load_dataset

    def empty_train(name, split, root=None):
        data = real(name, split, root)
        if split == "train":
            return ImageDataset(data.images[:0], data.labels[:0], data.classes, data.name)
        return data

    monkeypatch.setattr(setup, "load_dataset", empty_train)
    with pytest.raises(ValueError, match="synthetic training set .* holds no images"):
        _quiet_train(_config(), tmp_path / "run")
    assert not (tmp_path / "run" / "result.json").exists()


def test_nan_loss_stops_the_run_keeps_the_last_good_epoch_and_resumes_with_other_settings(
    tmp_path, monkeypatch
):
    run_dir = tmp_path / "run"
    config = _config(epochs=3)
    real = loop.F.cross_entropy
    calls = {"n": 0}

    def poisoned_in_epoch_2(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * float("nan") if calls["n"] > steps_per_epoch else loss

    steps_per_epoch = 200 // 64  # 10 % of the 2000 synthetic images, full batches only
    monkeypatch.setattr(loop.F, "cross_entropy", poisoned_in_epoch_2)
    with pytest.raises(DivergedError, match=r"training diverged in epoch 2 \(mean loss nan"):
        _quiet_train(config, run_dir)
    monkeypatch.setattr(loop.F, "cross_entropy", real)
    assert not (run_dir / "result.json").exists()
    assert json.loads((run_dir / DIVERGED_NAME).read_text())["epoch"] == 1
    assert [r["epoch"] for r in read_log(run_dir / "log.jsonl")] == [0]
    # Only optimisation settings may change after a divergence.
    with pytest.raises(ValueError, match="after a divergence only"):
        _quiet_train(config.replace(lr=0.01, p=0.1, regularizer="dropout"), run_dir, resume=True)
    result = _quiet_train(config.replace(lr=0.01, lr_milestones=[2]), run_dir, resume=True)
    # The learning rate each epoch ran with: the old one, the new one, then after its milestone.
    assert [r["epoch"] for r in result.history] == [0, 1, 2]
    assert [r["lr"] for r in result.history] == pytest.approx([0.05, 0.01, 0.001])
    assert not (run_dir / DIVERGED_NAME).exists()
    assert json.loads((run_dir / "result.json").read_text())["epochs"] == 3
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 0.01


def test_a_huge_but_finite_loss_counts_as_divergence(tmp_path, monkeypatch):
    real = loop.F.cross_entropy
    monkeypatch.setattr(loop.F, "cross_entropy", lambda *a: real(*a) * 0 + 2.7e31)
    with pytest.raises(DivergedError, match="mean loss 2.7e"):
        _quiet_train(_config(epochs=1), tmp_path / "run")


def test_sweep_records_a_diverging_run_as_failed_not_finished(tmp_path, capsys):
    from test_sweep import tiny_preset

    preset = tiny_preset(lr=1000.0)
    preset["grids"][0]["regularizer"] = ["none"]
    out = tmp_path / "sweep"
    summary = run_sweep(preset, out, stream=io.StringIO(), poll_seconds=0.05)
    assert summary.finished == 0 and len(summary.failed) == 1
    with ResultsStore.in_folder(out, readonly=True) as store:
        record = store.runs()[0]
    assert record.status == "failed" and record.top1 is None
    assert "training diverged in epoch 1" in record.error.splitlines()[-1]


# -- 6. Every user error is one line and exit status 2 ---------------------------------------


def _train_args(out, *extra):
    return [
        "train",
        "--dataset",
        "synthetic",
        "--model",
        "lenet5",
        "--regularizer",
        "none",
        "--epochs",
        "1",
        "--train-fraction",
        "0.1",
        "--out",
        str(out),
        *extra,
    ]


def _one_line_error(capsys) -> str:
    """The error line (progress lines may come before it); no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("dropcluster: error: ")]
    assert len(errors) == 1 and err.endswith(errors[0]), err
    return errors[0]


@pytest.mark.parametrize(
    ("text", "suffix", "message"),
    [
        ('{"p": "0.1"}', ".json", r"p should be a finite number, but got '0.1'"),
        ('{"momentum": null}', ".json", "momentum should be a finite number, but got None"),
        ('{"dataset": ["cifar100"]}', ".json", "dataset should be a string"),
        ('{"seed": 1.5}', ".json", "seed should be an integer, but got 1.5"),
        ('{"lr": NaN}', ".json", "lr should be a finite number, but got nan"),
        ('{"p": 0.1', ".json", "is not valid JSON"),
        ("p: [0.1\nlr: 1", ".yaml", "is not valid YAML"),
        ("- 1\n- 2\n", ".yaml", "should hold a mapping of config keys"),
    ],
)
def test_bad_config_files_give_one_line_naming_the_file(tmp_path, capsys, text, suffix, message):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = _one_line_error(capsys)
    assert message in err and str(path) in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "bit-flipped"])
def test_damaged_checkpoint_gives_one_line_naming_the_file(trained_run, tmp_path, capsys, damage):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    path = run_dir / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    if damage == "empty":
        data = bytearray()
    elif damage == "truncated":
        data = data[: len(data) // 3]
    else:
        for offset in range(len(data) - 60, len(data) - 20):
            data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    assert main(_evaluate_args(run_dir)) == 2
    err = _one_line_error(capsys)
    assert f"checkpoint {path}" in err and "restore it from a copy" in err
    config = json.loads((run_dir / "config.json").read_text())
    assert main(_train_args(run_dir, "--resume", "--epochs", str(config["epochs"]))) == 2
    assert f"checkpoint {path}" in _one_line_error(capsys)


def test_cuda_on_a_cpu_only_torch_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(_train_args(tmp_path / "run", "--device", "cuda")) == 2
    assert "device 'cuda' was asked for, but this torch" in _one_line_error(capsys)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--device", "cuda"]) == 2
    _one_line_error(capsys)


def test_full_disk_while_training_loses_nothing_and_leaves_no_partial_file(
    tmp_path, capsys, monkeypatch
):
    run_dir = tmp_path / "run"
    _quiet_train(_config(epochs=3), run_dir, stop_after_epoch=1)
    saved = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    real_save = torch.save

    def disk_full(obj, stream, *args, **kwargs):
        real_save(obj, stream)
        raise OSError(errno.ENOSPC, "No space left on device", str(stream.name))

    monkeypatch.setattr(torch, "save", disk_full)
    args = ["train", "--config", str(run_dir / "config.json"), "--out", str(run_dir), "--resume"]
    assert main(args) == 2
    err = _one_line_error(capsys)
    assert "the disk is full: free some space and rerun" in err
    # The checkpoint of epoch 1 is intact, no temporary file is left.
    names = sorted(p.name for p in run_dir.iterdir())
    assert not [name for name in names if name.endswith(".tmp")], names
    assert (run_dir / "checkpoint.pt").read_bytes() == saved["checkpoint.pt"]


@pytest.fixture
def sigint_as_python_sets_it():
    """SIGINT handled by Python's own handler (a test runner's worker may have another)."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_while_a_checkpoint_is_written_keeps_the_new_one_whole(
    tmp_path, capsys, monkeypatch, sigint_as_python_sets_it
):
    import os
    import signal

    from dropcluster.train.checkpoint import load_checkpoint

    run_dir = tmp_path / "run"
    _quiet_train(_config(epochs=3), run_dir, stop_after_epoch=1)
    saved_epoch = load_checkpoint(run_dir / "checkpoint.pt")["epoch"]
    real_save = torch.save

    def interrupted_save(obj, stream, *args, **kwargs):
        # Ctrl-C in the middle of torch.save (it once surfaced as torch's zip writer error
        # "unexpected pos", an internal error, instead of an interrupt).
        os.kill(os.getpid(), signal.SIGINT)
        real_save(obj, stream, *args, **kwargs)

    monkeypatch.setattr(torch, "save", interrupted_save)
    args = ["train", "--config", str(run_dir / "config.json"), "--out", str(run_dir), "--resume"]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    assert err.strip().endswith(
        "dropcluster: interrupted; a training run continues from its "
        "last finished epoch with --resume"
    )
    # The write went through first: the next epoch's checkpoint is whole, nothing is left over.
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == saved_epoch + 1
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.setattr(torch, "save", real_save)
    history = _quiet_train(_config(epochs=3), run_dir, resume=True).history
    assert [record["epoch"] for record in history] == [0, 1, 2]


def test_an_interrupt_hidden_behind_a_writers_cleanup_error_is_an_interrupt(
    tmp_path, capsys, monkeypatch
):
    from dropcluster.files import atomic_write

    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def write(stream):
        stream.write(b"half")
        try:
            raise KeyboardInterrupt  # where no handler held it (another thread)
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]
    # Any other error stays what it was.
    with pytest.raises(RuntimeError, match="unexpected pos"):
        atomic_write(target, lambda stream: (_ for _ in ()).throw(RuntimeError("unexpected pos")))


def test_any_command_whose_cleanup_fails_on_the_way_out_of_ctrl_c_says_interrupted(
    tmp_path, capsys, monkeypatch
):
    import sqlite3

    import dropcluster.cli as cli

    def handler(args):
        try:
            raise KeyboardInterrupt
        finally:
            raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(cli, "_run_train", handler)
    assert main(_train_args(tmp_path / "run")) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "dropcluster: interrupted; a training run continues from its last finished epoch with "
        "--resume"
    ]


def test_json_output_that_is_a_folder_is_refused_before_any_work(tmp_path, capsys):
    assert main(["cluster-analysis", "--json", str(tmp_path)]) == 2
    assert "is a folder: give the path of a file" in _one_line_error(capsys)


def test_read_only_folder_is_one_line(tmp_path, capsys, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "run"))

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert main(_train_args(tmp_path / "run")) == 2
    assert "the file system is read-only: choose a writable folder" in _one_line_error(capsys)


def test_internal_errors_print_a_traceback_and_exit_1(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(loop, "train", broken)
    assert main(_train_args(tmp_path / "run")) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "internal error: KeyError: 'a bug'" in err


# -- 7. Results of a finished sweep read from a read-only copy --------------------------------


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory) -> Path:
    from test_sweep import tiny_preset

    preset = tiny_preset()
    preset["grids"][0]["regularizer"] = ["none"]
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    assert run_sweep(preset, out, stream=io.StringIO(), poll_seconds=0.05).finished == 1
    return out


def test_results_and_report_work_on_a_read_only_copy(finished_sweep, tmp_path, capsys, monkeypatch):
    import os
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished_sweep, copy)
    real_access = os.access
    # Tests run as root, which writes anywhere: the store asks os.access, as on a real
    # read-only mount (test_store.py also checks a truly read-only folder as another user).

    def access(path, mode, **kwargs):
        if mode & os.W_OK and str(path).startswith(str(copy)):
            return False
        return real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    before = sorted(p.name for p in copy.iterdir())
    assert main(["results", "--out", str(copy)]) == 0
    assert "1 finished" in capsys.readouterr().out
    assert main(["report", "--out", str(copy), "--to", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    with ResultsStore.in_folder(finished_sweep, readonly=True) as store:
        top1 = store.runs()[0].top1
    assert report.startswith("# DropCluster sweep report: preset `tiny`")
    assert f"{top1:.2f}" in report
    assert sorted(p.name for p in copy.iterdir()) == before  # no -shm, -wal or report written


def test_damaged_database_or_a_folder_in_its_place_is_one_line(finished_sweep, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished_sweep, copy)
    database = copy / "results.sqlite"
    data = bytearray(database.read_bytes())
    data[4096:] = b"\xa5" * (len(data) - 4096)
    database.write_bytes(bytes(data))
    assert main(["results", "--out", str(copy)]) == 2
    assert "is corrupted" in _one_line_error(capsys)
    database.unlink()
    database.mkdir()
    assert main(["results", "--out", str(copy)]) == 2
    assert f"{database} is a folder" in _one_line_error(capsys)


# -- 8. Large ranges are refused before they are built --------------------------------------


def test_huge_severity_range_is_refused_without_building_it():
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="severities should be ints in 1..5"):
            parse_severities("1-10000000")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100_000


# -- 0.4: every failure the probe of 0.2-0.3 met is one line --------------------------------


@pytest.mark.parametrize("device", ["mps", "xla", "meta"])
def test_an_unsupported_device_is_named_before_any_checkpoint_is_read(
    trained_run, tmp_path, capsys, device
):
    assert main(_train_args(tmp_path / "run", "--device", device)) == 2
    assert f"device '{device}' is not supported: dropcluster runs on 'cpu' and 'cuda'" in (
        _one_line_error(capsys)
    )
    assert not (tmp_path / "run").exists()
    # A good checkpoint is never called damaged, nor is deleting it advised.
    assert main(_evaluate_args(trained_run, "--device", device)) == 2
    err = _one_line_error(capsys)
    assert "is not supported" in err and "damaged" not in err and "delete" not in err


def test_an_intact_checkpoint_that_cannot_go_to_a_device_is_not_called_damaged(
    trained_run, monkeypatch
):
    from dropcluster.errors import CheckpointError
    from dropcluster.train.checkpoint import load_checkpoint

    real_load = torch.load

    def no_such_device(path, map_location=None, **kwargs):
        if str(map_location) != "cpu":
            raise RuntimeError("Attempting to deserialize object on CUDA device 3")
        return real_load(path, map_location=map_location, **kwargs)

    monkeypatch.setattr(torch, "load", no_such_device)
    with pytest.raises(CheckpointError, match="is intact but cannot be loaded onto cuda:3") as got:
        load_checkpoint(trained_run / "checkpoint.pt", map_location="cuda:3")
    assert "delete" not in str(got.value)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--set", "regularizer_options=null"], "should be a mapping, but got None"),
        (["--set", "regularizer_options=[1]"], "should be a mapping, but got [1]"),
        (["--set", "regularizer_options=abc"], "should be a mapping, but got 'abc'"),
        (["--seed", "99999999999999999999"], "seed should be an integer >= 0 and <= 4294967295"),
    ],
)
def test_bad_train_values_are_one_line(tmp_path, capsys, flags, message):
    assert main(_train_args(tmp_path / "run", *flags)) == 2
    assert message in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["null", "[1]", "abc"])
def test_bad_regularizer_options_of_a_sweep_are_one_line(tmp_path, capsys, value):
    from test_sweep import tiny_preset

    preset = tmp_path / "p.json"
    preset.write_text(json.dumps(tiny_preset()))
    args = ["sweep", "--preset", str(preset), "--out", str(tmp_path / "out")]
    assert main([*args, "--set", f"regularizer_options={value}"]) == 2
    assert "base.regularizer_options should be a mapping" in _one_line_error(capsys)
    bad_grid = tiny_preset()
    bad_grid["grids"][0]["options"] = {"regularizer_options": 5}
    preset.write_text(json.dumps(bad_grid))
    assert main(args) == 2
    assert "options.regularizer_options should be a mapping, but got 5" in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "command", [["probe"], ["analyze", "--checkpoint", "x"], ["evaluate", "--checkpoint", "x"]]
)
def test_a_seed_past_the_largest_is_a_usage_error(command, capsys):
    with pytest.raises(SystemExit) as stopped:
        main([*command, "--seed", "99999999999999999999"])
    assert stopped.value.code == 2
    assert "expected an integer >= 0 and <= 4294967295" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--out", ""],
        ["sweep", "--out", " "],
        ["evaluate", "--checkpoint", ""],
        ["collect", ""],
    ],
)
def test_an_empty_path_is_refused(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(command)
    assert stopped.value.code == 2
    assert "expected a path, but got an empty string" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written in the current folder


@pytest.mark.parametrize("name", ["../../escape", "/abs/path", "..", ".hidden", "a/b", ""])
def test_names_that_become_paths_are_checked(name, tmp_path, capsys, monkeypatch):
    from test_sweep import tiny_preset

    monkeypatch.chdir(tmp_path)
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({**tiny_preset(), "name": name}))
    assert main(["sweep", "--preset", str(preset)]) == 2
    assert "name should be a" in _one_line_error(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]
