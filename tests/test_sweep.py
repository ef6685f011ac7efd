"""Presets, grid expansion and the resumable sweep runner (kill and restart, failures, dry run)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_data_datasets import write_cifar100
from waiting import wait_until

from dropcluster.cli import main
from dropcluster.experiments.presets import (
    Preset,
    apply_overrides,
    expand_grid,
    filter_runs,
    load_preset,
    parse_overrides,
    preset_names,
    run_id,
)
from dropcluster.experiments.store import ResultsStore
from dropcluster.experiments.sweep import dry_run, run_sweep

ROOT = Path(__file__).resolve().parents[1]


def tiny_preset(**base) -> dict:
    """A preset that trains LeNet-5 on 25 % of the synthetic set: a few seconds per run."""
    preset = {
        "name": "tiny",
        "scale": "demo",
        "description": "test preset",
        "dataset": "synthetic",
        "paper": None,
        "paper_command": "dropcluster reproduce --preset paper-cifar100",
        "base": {
            "dataset": "synthetic",
            "model": "lenet5",
            "epochs": 2,
            "batch_size": 64,
            "cluster_every": 1,
            "cluster_images": 64,
            "average_last": 1,
            "device": "cpu",
            "channels_last": False,
            **base,
        },
        "grids": [
            {"regularizer": ["none", "dropout"], "p": [0.1], "train_fraction": [0.25], "seed": [0]}
        ],
        "evaluate": None,
        "average_last": 1,
    }
    return preset


def test_shipped_presets_load_and_expand_to_the_papers_grids():
    assert {"demo", "paper-cifar100", "paper-tiny-imagenet"} <= set(preset_names())
    cifar = expand_grid(load_preset("paper-cifar100"))
    # none x 4 seeds + 5 regularizers x 5 rates x 4 seeds on the full set + 3 x 4 fractions x 4.
    assert len(cifar) == 4 + 5 * 5 * 4 + 3 * 4 * 4
    assert {s.train_fraction for s in cifar} == {1.0, 0.9, 0.8, 0.5, 0.2}
    assert {s.p for s in cifar if s.regularizer == "dropblock"} == {0.1, 0.15, 0.2, 0.25, 0.3}
    first = cifar[0].config
    assert (first.model, first.stem, first.epochs, first.lr_milestones) == (
        "resnet50",
        "imagenet",
        250,
        [150, 200],
    )
    assert (first.cluster_every, first.average_last, first.resolved_weight_decay()) == (
        50,
        50,
        5e-4,
    )
    tiny = expand_grid(load_preset("paper-tiny-imagenet"))
    assert {s.train_fraction for s in tiny} == {1.0, 0.9, 0.7, 0.5, 0.3, 0.1}
    assert all(s.evaluate_corruptions == (s.train_fraction == 1.0) for s in tiny)
    assert tiny[0].config.resolved_weight_decay() == 1e-4
    demo = expand_grid(load_preset("demo"))
    assert {s.regularizer for s in demo} == {
        "none",
        "dropout",
        "spatial_dropout",
        "dropblock",
        "stochastic_depth",
        "dropcluster",
    }
    assert demo[0].config.epochs // demo[0].config.cluster_every >= 2  # at least two refits


def test_grid_expansion_is_the_union_of_products_without_duplicates():
    preset = tiny_preset()
    preset["grids"] = [
        {
            "regularizer": ["none", "dropcluster"],
            "p": [0.1, 0.2],
            "train_fraction": [1.0, 0.5],
            "seed": [0, 1],
        },
        {"regularizer": ["dropcluster"], "p": [0.1], "train_fraction": [1.0], "seed": [0, 3]},
    ]
    ids = [s.run_id for s in expand_grid(preset)]
    # none: 1 rate x 2 fractions x 2 seeds; dropcluster: 2 x 2 x 2; second grid adds seed 3 only.
    assert len(ids) == 4 + 8 + 1 == len(set(ids))
    assert ids[0] == "none-p0-f1-s0" and "dropcluster-p0.1-f1-s3" in ids
    assert run_id("dropblock", 0.15, 0.9, 2) == "dropblock-p0.15-f0.9-s2"


def test_only_filters_by_field_and_by_run_id_pattern():
    preset = tiny_preset()
    preset["grids"][0].update(
        regularizer=["none", "dropout", "dropcluster"], p=[0.1, 0.2], seed=[0, 1]
    )
    specs = expand_grid(preset)
    assert {s.regularizer for s in filter_runs(specs, ["regularizer=dropout,none"])} == {
        "dropout",
        "none",
    }
    picked = filter_runs(specs, ["regularizer=dropcluster", "p=0.2", "seed=1"])
    assert [s.run_id for s in picked] == ["dropcluster-p0.2-f0.25-s1"]
    assert len(filter_runs(specs, ["dropout-*"])) == 4
    with pytest.raises(ValueError, match="key should be one of"):
        filter_runs(specs, ["epochs=3"])


def test_overrides_and_bad_presets_give_clear_errors(tmp_path):
    assert parse_overrides(["stem=cifar", "epochs=3", "lr_milestones=[1,2]"]) == {
        "stem": "cifar",
        "epochs": 3,
        "lr_milestones": [1, 2],
    }
    overridden = apply_overrides(load_preset("paper-cifar100"), {"stem": "cifar"})
    assert expand_grid(overridden)[0].config.stem == "cifar"
    with pytest.raises(ValueError, match="unknown preset 'nope'; valid presets are demo"):
        load_preset("nope")
    with pytest.raises(ValueError, match="epochs should be an integer >= 1, but got 0"):
        apply_overrides(load_preset("demo"), {"epochs": 0})
    bad = tiny_preset()
    bad["grids"][0]["regularizer"] = ["dropclustr"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="unknown regularizers \\['dropclustr'\\]"):
        load_preset(path)
    with pytest.raises(ValueError, match="--set should look like KEY=VALUE"):
        parse_overrides(["stem"])


def test_dry_run_lists_every_run_with_an_estimate_and_writes_nothing(tmp_path):
    stream = io.StringIO()
    specs = dry_run(load_preset("demo"), tmp_path / "out", [], stream)
    text = stream.getvalue()
    assert len(specs) == 12
    assert all(spec.run_id in text for spec in specs)
    assert "still to run" in text and "unknown" not in text
    assert not (tmp_path / "out").exists()


def _sweep_process(preset_path: Path, out: Path) -> subprocess.Popen:
    code = (
        "import sys; from dropcluster.cli import main; "
        f"sys.exit(main(['sweep', '--preset', {str(preset_path)!r}, '--out', {str(out)!r}]))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_killed_sweep_resumes_without_repeating_or_duplicating(tmp_path):
    preset = tiny_preset(epochs=4)
    preset["grids"][0]["seed"] = [0, 1]
    preset_path = tmp_path / "tiny.json"
    preset_path.write_text(json.dumps(preset))
    out = tmp_path / "out"
    first, second = "none-p0-f0.25-s0", "none-p0-f0.25-s1"
    process = _sweep_process(preset_path, out)
    # Kill the whole sweep (parent and worker, as a crash would) while the second run is mid-way.
    # The checkpoint is renamed into place after the epoch's log line: both are on disk.
    wait_until(
        (out / "runs" / second / "checkpoint.pt").is_file,
        "the second run did not finish an epoch",
        process=process,
        interval=0.02,
    )
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    first_log = (out / "runs" / first / "log.jsonl").read_text()
    second_epochs = (out / "runs" / second / "log.jsonl").read_text().splitlines()
    assert 1 <= len(second_epochs) < 4
    with ResultsStore.in_folder(out, readonly=True) as store:
        assert store.run(first).status == "finished"
        assert store.run(second).status == "running"  # what a crash leaves behind

    summary = run_sweep(json.loads(preset_path.read_text()), out, stream=io.StringIO())
    assert first not in summary.ran and second in summary.ran
    assert summary.finished == summary.total == 4 and not summary.failed
    # The finished run was not touched; the interrupted one continued from its checkpoint.
    assert (out / "runs" / first / "log.jsonl").read_text() == first_log
    resumed = (out / "runs" / second / "log.jsonl").read_text().splitlines()
    assert len(resumed) == 4
    assert resumed[0] == second_epochs[0]
    with ResultsStore.in_folder(out, readonly=True) as store:
        runs = {r.run_id: r for r in store.runs()}
        assert len(runs) == 4 and all(r.status == "finished" for r in runs.values())
        assert runs[first].attempts == 1 and runs[second].attempts == 2
        epochs = store.epochs()
        assert len(epochs) == 4 * 4
        assert len({(row["run_id"], row["epoch"]) for row in epochs}) == len(epochs)
        result = json.loads((out / "runs" / second / "result.json").read_text())
        assert runs[second].top1 == pytest.approx(result["top1"])

    # A third invocation has nothing to do.
    again = run_sweep(json.loads(preset_path.read_text()), out, stream=io.StringIO())
    assert again.ran == [] and again.finished == 4


def test_failed_run_is_recorded_and_retried_not_counted(tmp_path, capsys):
    data = tmp_path / "cifar"
    preset = tiny_preset(dataset="cifar100", data_dir=str(data), epochs=1, train_fraction=1.0)
    preset["dataset"] = "cifar100"
    preset["grids"][0].update(regularizer=["none"], train_fraction=[1.0])
    out = tmp_path / "out"
    summary = run_sweep(preset, out, stream=io.StringIO())
    assert summary.failed == ["none-p0-f1-s0"] and summary.finished == 0
    with ResultsStore.in_folder(out, readonly=True) as store:
        record = store.run("none-p0-f1-s0")
        assert record.status == "failed" and record.top1 is None
        # The worker's last line is the one-line message of the missing data set.
        assert record.error.splitlines()[-1].startswith("CIFAR-100: expected")
    assert main(["results", "--out", str(out), "--status", "failed"]) == 0
    assert "error: CIFAR-100: expected" in capsys.readouterr().out

    write_cifar100(data, n_train=12, n_test=5)
    retry = run_sweep(preset, out, stream=io.StringIO())
    assert retry.ran == ["none-p0-f1-s0"] and not retry.failed
    with ResultsStore.in_folder(out, readonly=True) as store:
        record = store.run("none-p0-f1-s0")
        assert (record.status, record.attempts, record.error) == ("finished", 2, None)


def test_a_folder_of_another_preset_or_other_settings_is_refused(tmp_path):
    preset = tiny_preset(epochs=1)
    preset["grids"][0]["regularizer"] = ["none"]
    out = tmp_path / "out"
    run_sweep(preset, out, stream=io.StringIO())
    with pytest.raises(ValueError, match="other settings \\(\\['epochs'\\] differ\\)"):
        run_sweep(apply_overrides(preset, {"epochs": 2}), out, stream=io.StringIO())
    other = {**preset, "name": "other"}
    with pytest.raises(ValueError, match="holds a sweep of preset 'tiny'"):
        run_sweep(other, out, stream=io.StringIO())


def test_jobs_run_side_by_side_and_share_the_cores(tmp_path, monkeypatch):
    from dropcluster.experiments import sweep

    launches = []
    real_launch = sweep._launch

    def spy(spec, out, evaluate, slot, devices, threads):
        launches.append((spec.run_id, slot, threads))
        return real_launch(spec, out, evaluate, slot, devices, threads)

    monkeypatch.setattr(sweep, "_launch", spy)
    monkeypatch.setattr(sweep.os, "cpu_count", lambda: 4)
    preset = tiny_preset(epochs=1)
    summary = run_sweep(preset, tmp_path / "out", jobs=2, stream=io.StringIO())
    assert summary.finished == 2 and not summary.failed
    # Both runs were started at once, in different slots, with half the cores each.
    assert sorted(slot for _, slot, _ in launches) == [0, 1]
    assert {threads for _, _, threads in launches} == {2}
    with pytest.raises(ValueError, match="jobs should be an integer >= 1, but got 0"):
        run_sweep(preset, tmp_path / "out", jobs=0)


def _fake_gpus(monkeypatch, count: int) -> None:
    """This machine as one with ``count`` CUDA devices (for the decisions; nothing runs there)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: f"Fake GPU {index}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def _recorded_workers(monkeypatch) -> list[dict]:
    """Record each worker's command and environment instead of starting it (its stand-in exits
    at once, so the run fails: only the assignment is looked at)."""
    from dropcluster.experiments import sweep

    started = []

    def record(command, run_dir, env=None):
        started.append({"run": run_dir.name, "command": command, **(env or {})})
        return subprocess.Popen(["true"])

    monkeypatch.setattr(sweep, "start_worker", record)
    return started


def test_local_jobs_default_to_one_per_visible_gpu_each_on_its_own(tmp_path, monkeypatch):
    from dropcluster.experiments.backends import BackendSettings
    from dropcluster.experiments.sweep import default_jobs

    preset = tiny_preset(device="auto", epochs=1)
    preset["grids"][0]["seed"] = [0, 1]  # 4 runs
    _fake_gpus(monkeypatch, 3)
    started = _recorded_workers(monkeypatch)
    stream = io.StringIO()
    summary = run_sweep(preset, tmp_path / "out", stream=stream, poll_seconds=0.01)
    assert "4 to run, 3 at a time" in stream.getvalue() and len(summary.failed) == 4
    # The first three start at once, one per GPU; the fourth takes the slot freed first.
    assert [worker["DROPCLUSTER_DEVICE"] for worker in started[:3]] == [
        "cuda:0",
        "cuda:1",
        "cuda:2",
    ]
    assert started[3]["DROPCLUSTER_DEVICE"] in {"cuda:0", "cuda:1", "cuda:2"}
    # Two GPUs per run on 4: two runs at once, each under the launcher on its own pair.
    started.clear()
    _fake_gpus(monkeypatch, 4)
    run_sweep(
        preset,
        tmp_path / "pairs",
        stream=io.StringIO(),
        poll_seconds=0.01,
        backend=BackendSettings(gpus_per_run=2),
    )
    assert [worker["CUDA_VISIBLE_DEVICES"] for worker in started[:2]] == ["0,1", "2,3"]
    assert all("dropcluster.train.launch" in worker["command"] for worker in started)
    # One GPU named, or none visible: one run at a time.
    assert (default_jobs("auto"), default_jobs("cuda"), default_jobs("cuda:1")) == (4, 4, 1)
    assert default_jobs("cpu") == 1
    _fake_gpus(monkeypatch, 0)
    assert default_jobs("auto") == 1


def test_the_dry_run_says_what_this_machine_gets(tmp_path, monkeypatch):
    from dropcluster.experiments.backends import BackendSettings

    stream = io.StringIO()
    dry_run(tiny_preset(device="auto"), tmp_path / "out", [], stream)
    lines = stream.getvalue().splitlines()
    at = lines.index("on this machine:")
    assert lines[at + 1 : at + 3] == [
        "    device: cpu (auto: no CUDA device is visible)",
        "    runs at a time: 1 (one per visible GPU, 1 without one; --jobs sets it)",
    ]
    _fake_gpus(monkeypatch, 4)
    stream = io.StringIO()
    pairs = BackendSettings(gpus_per_run=2)
    dry_run(tiny_preset(device="auto", batch_size=32), tmp_path / "out", [], stream, backend=pairs)
    lines = stream.getvalue().splitlines()
    at = lines.index("on this machine:")
    assert lines[at + 1 : at + 5] == [
        "    device: cuda, one GPU per process (2 processes, by local rank) (auto: 4 CUDA "
        "device(s) visible)",
        "    runs at a time: 2 (one per visible GPU, 1 without one; --jobs sets it)",
        "    processes per run: 2 (DistributedDataParallel), 16 images each per step; "
        "sync-batchnorm off",
        "warning: models with batch norm: each of the 2 processes computes batch norm "
        "statistics over its own 16 images (batch_size 32 / 2), fewer than 32: noisy statistics "
        "can cost accuracy; --sync-batchnorm (CUDA) computes them over the whole batch, or "
        "raise --batch-size",
    ]
    stream = io.StringIO()
    dry_run(tiny_preset(device="cuda:1"), tmp_path / "out", [], stream, jobs=3)
    lines = stream.getvalue().splitlines()
    at = lines.index("on this machine:")
    assert lines[at + 1 : at + 3] == [
        "    device: cuda:1, Fake GPU 1",
        "    runs at a time: 3 (--jobs)",
    ]


def test_command_line_dry_run_overrides_and_errors(tmp_path, capsys):
    assert (
        main(
            [
                "sweep",
                "--preset",
                "paper-cifar100",
                "--stem",
                "cifar",
                "--out",
                str(tmp_path / "c100"),
                "--only",
                "regularizer=dropcluster",
                "--only",
                "fraction=1",
                "--dry-run",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "preset paper-cifar100 (paper scale): 20 runs" in out and "dropcluster-p0.3-f1-s3" in out
    assert not (tmp_path / "c100").exists()
    assert main(["reproduce", "--preset", "nope", "--dry-run"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["results", "--out", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["report", "--out", str(tmp_path)]) == 2
    assert "has no preset.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--preset", "demo", "--jobs", "0", "--out", str(tmp_path / "d")])
    assert exit_info.value.code == 2
    assert "--jobs: expected an integer >= 1, but got 0" in capsys.readouterr().err


def test_a_database_from_a_newer_version_is_refused_by_the_commands(tmp_path, capsys):
    import sqlite3

    out = tmp_path / "out"
    with ResultsStore.in_folder(out):
        pass
    with sqlite3.connect(out / "results.sqlite") as connection:
        connection.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    assert main(["results", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "schema version 99" in error and "upgrade dropcluster" in error


def _evaluating_preset(**evaluate) -> dict:
    preset = tiny_preset(epochs=2)
    preset["grids"][0]["regularizer"] = ["none"]
    preset["evaluate"] = {
        "train_fraction": [0.25],
        "corruptions": "gaussian_noise",
        "severities": [1],
        "limit": 50,
        **evaluate,
    }
    return preset


def test_results_of_an_unfinished_checkpoint_are_replaced_once_the_run_finishes(tmp_path):
    from dropcluster.experiments.corruption_eval import CorruptionSettings, evaluate_run
    from dropcluster.train.loop import train

    preset = _evaluating_preset()
    out = tmp_path / "out"
    spec = expand_grid(preset)[0]
    run_dir = out / "runs" / spec.run_id
    train(spec.config, run_dir, stop_after_epoch=1, progress_stream=io.StringIO())
    settings = CorruptionSettings(corruptions="gaussian_noise", severities=[1], limit=50)
    with pytest.warns(UserWarning, match="not finished \\(1 of 2 epochs\\)"):
        evaluate_run(run_dir, settings, progress=io.StringIO())
    assert json.loads((run_dir / "corruptions.json").read_text())["checkpoint_epochs"] == 1

    summary = run_sweep(preset, out, stream=io.StringIO())
    assert summary.finished == 1 and not summary.failed
    document = json.loads((run_dir / "corruptions.json").read_text())
    assert document["checkpoint_epochs"] == 2 and document["device_type"] == "cpu"
    # Resuming the finished run (as after a crash before it was recorded) keeps the summary.
    train(spec.config, run_dir, resume=True, progress_stream=io.StringIO())
    result = json.loads((run_dir / "result.json").read_text())
    assert result["corruptions"]["clean"] == document["rows"][0]
    with ResultsStore.in_folder(out, readonly=True) as store:
        rows = store.corruption_results(spec.run_id)
    assert [(r["corruption"], r["severity"], r["source"]) for r in rows] == [
        ("clean", 0, "generated"),
        ("gaussian_noise", 1, "generated"),
    ]
    assert rows[1]["top1"] == document["rows"][1]["top1"]


def test_sweep_settings_are_checked_but_the_device_may_change(tmp_path):
    preset = _evaluating_preset()
    out = tmp_path / "out"
    run_sweep(preset, out, stream=io.StringIO())
    # Another device, eval batch size or tracker does not change results: the sweep continues.
    again = run_sweep(
        apply_overrides(
            preset, {"device": "auto", "eval_batch_size": 250, "tracker": "tensorboard"}
        ),
        out,
        stream=io.StringIO(),
    )
    assert again.finished == 1 and again.ran == []
    changed = _evaluating_preset(severities=[1, 2])
    with pytest.raises(ValueError, match="\\['evaluate'\\] differ"):
        run_sweep(changed, out, stream=io.StringIO())
    # A second sweep in the same folder at the same time is refused.
    import fcntl

    with open(out / ".sweep.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another sweep is running"):
            run_sweep(preset, out, stream=io.StringIO())


def test_bad_evaluate_blocks_are_refused_when_the_preset_loads(tmp_path):
    with pytest.raises(ValueError, match="unknown \\['severity'\\]"):
        Preset.from_dict(_evaluating_preset(severity=[1]))
    with pytest.raises(ValueError, match="evaluate.train_fraction \\[1.0\\] is in no grid"):
        Preset.from_dict(_evaluating_preset(train_fraction=[1.0]))
    with pytest.raises(ValueError, match="unknown corruption"):
        Preset.from_dict(_evaluating_preset(corruptions="fogg"))
    with pytest.raises(ValueError, match="but the data set is 'synthetic'"):
        Preset.from_dict(_evaluating_preset(corrupted_from=str(tmp_path)))


def test_preset_is_typed_and_round_trips_through_its_json_form():
    preset = Preset.from_dict(_evaluating_preset())
    assert preset.grids[0].regularizer == ["none"] and preset.average_last == 1
    assert preset.evaluate.train_fraction == [0.25]
    assert preset.evaluate.corruption.corruptions == ["gaussian_noise"]
    assert Preset.from_dict(preset.to_dict()) == preset
    assert Preset.from_dict(json.loads(json.dumps(preset.to_dict()))) == preset
    for name in preset_names():
        shipped = load_preset(name)
        assert Preset.from_dict(shipped.to_dict()) == shipped
    with pytest.raises(ValueError, match="tiny-test: unknown keys \\['evalute'\\]"):
        Preset.from_dict({**tiny_preset(), "evalute": None}, "tiny-test")
    with pytest.raises(ValueError, match="lacks the keys \\['grids'\\]"):
        Preset.from_dict({k: v for k, v in tiny_preset().items() if k != "grids"})
    with pytest.raises(ValueError, match="grid 0: a grid should have the keys"):
        Preset.from_dict({**tiny_preset(), "grids": [{"regularizer": ["none"]}]})
    with pytest.raises(ValueError, match="scale should be one of 'demo', 'paper'"):
        Preset.from_dict({**tiny_preset(), "scale": "huge"})
    # Every run's config is checked, not only the first of each grid.
    bad_seed = tiny_preset()
    bad_seed["grids"][0]["seed"] = [0, -1]
    with pytest.raises(
        ValueError, match="seed should be an integer >= 0 and <= 4294967295, but got -1"
    ):
        Preset.from_dict(bad_seed)


def test_a_sweep_folder_written_before_the_typed_presets_continues(tmp_path):
    out = tmp_path / "out"
    run_sweep(_evaluating_preset(), out, stream=io.StringIO())
    # The preset.json of an older sweep: corruptions as text, a key left out.
    old = _evaluating_preset(corruptions="gaussian_noise")
    del old["paper"]
    (out / "preset.json").write_text(json.dumps(old))
    again = run_sweep(_evaluating_preset(), out, stream=io.StringIO())
    assert again.finished == 1 and again.ran == []
    assert load_preset(out / "preset.json") == Preset.from_dict(_evaluating_preset())


def test_a_missing_corrupted_from_folder_is_refused_before_any_run(tmp_path):
    preset = _evaluating_preset()
    preset["base"]["dataset"] = preset["dataset"] = "cifar100"
    preset["evaluate"]["corrupted_from"] = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="corrupted_from .*missing is no folder"):
        run_sweep(preset, tmp_path / "out", stream=io.StringIO())
    assert not (tmp_path / "out").exists()


def test_released_results_keep_their_source(tmp_path):
    from dropcluster.experiments.run_folder import read_results

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "log.jsonl").write_text(json.dumps({"epoch": 0, "top1": 50.0, "top5": 90.0}) + "\n")
    (run_dir / "result.json").write_text(
        json.dumps({"top1": 50.0, "top5": 90.0, "average_last": 1})
    )
    (run_dir / "corruptions.json").write_text(
        json.dumps(
            {
                "source": "released",
                "rows": [
                    {"corruption": "clean", "severity": 0, "top1": 50.0, "top5": 90.0, "images": 10}
                ],
            }
        )
    )
    results = read_results(run_dir)
    assert results["corruptions"] == [
        {"corruption": "clean", "severity": 0, "top1": 50.0, "top5": 90.0, "source": "released"}
    ]


def test_reproduce_reports_and_analyses_the_dropcluster_run(tmp_path, capsys):
    preset = tiny_preset(epochs=2)
    preset["grids"][0]["regularizer"] = ["none", "dropcluster"]
    preset_path = tmp_path / "tiny.json"
    preset_path.write_text(json.dumps(preset))
    out = tmp_path / "out"
    assert main(["reproduce", "--preset", str(preset_path), "--out", str(out)]) == 0
    report = out / "report" / "report.md"
    assert f"report: {report}" in capsys.readouterr().out
    analysis = out / "runs" / "dropcluster-p0.1-f0.25-s0" / "analysis" / "analysis.md"
    assert analysis.is_file()
    text = report.read_text()
    assert "## Cluster analysis" in text
    assert "(../runs/dropcluster-p0.1-f0.25-s0/analysis/analysis.md)" in text
    assert "demo scale" in text and preset["paper_command"] in text
    # A second invocation has nothing to train and leaves the analysis as it was.
    stamp = analysis.stat().st_mtime_ns
    assert main(["reproduce", "--preset", str(preset_path), "--out", str(out)]) == 0
    assert analysis.stat().st_mtime_ns == stamp
    # A report written elsewhere stands alone: it carries a copy of the analysis it links.
    elsewhere = tmp_path / "docs"
    assert main(["report", "--out", str(out), "--to", str(elsewhere)]) == 0
    text = (elsewhere / "report.md").read_text()
    assert "(analyses/dropcluster-p0.1-f0.25-s0/analysis.md)" in text
    assert (elsewhere / "analyses" / "dropcluster-p0.1-f0.25-s0" / "cluster_maps.png").is_file()
