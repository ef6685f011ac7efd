"""`dropcluster collect`: a sweep's database rebuilt from its run folders, and sweeps of one
preset merged, without training and without duplicate rows."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from test_sweep import tiny_preset

from dropcluster.cli import main
from dropcluster.experiments.collect import collect
from dropcluster.experiments.presets import Preset, apply_overrides, expand_grid
from dropcluster.experiments.store import ResultsStore
from dropcluster.experiments.sweep import run_sweep
from dropcluster.experiments.worker import write_job
from dropcluster.train.loop import train

#: Run columns an invocation sets (how often and how long it ran), not the run's results.
BOOKKEEPING = ("attempts", "seconds", "updated_at")
NONE, DROPCLUSTER = "none-p0-f0.25-s0", "dropcluster-p0.1-f0.25-s0"


def _preset() -> dict:
    """Two runs, one with cluster statistics, both evaluated on one corruption."""
    preset = tiny_preset(epochs=2)
    preset["grids"][0]["regularizer"] = ["none", "dropcluster"]
    preset["evaluate"] = {
        "train_fraction": [0.25],
        "corruptions": "gaussian_noise",
        "severities": [1],
        "limit": 50,
    }
    return preset


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("collect") / "sweep"
    assert run_sweep(_preset(), out, jobs=2, stream=io.StringIO(), poll_seconds=0.1).finished == 2
    return out


def _tables(out: Path) -> dict[str, list]:
    """The database's rows, without the bookkeeping columns."""
    with ResultsStore.in_folder(out, readonly=True) as store:
        runs = [{k: v for k, v in vars(r).items() if k not in BOOKKEEPING} for r in store.runs()]
        return {
            "runs": runs,
            "epochs": store.epochs(),
            "corruptions": store.corruption_results(),
            "clusters": store.cluster_stats(),
        }


def _copy(sweep: Path, to: Path, *, drop_runs: tuple[str, ...] = ()) -> Path:
    """A copy of a sweep folder without its database (and without some runs)."""
    shutil.copytree(sweep, to, ignore=shutil.ignore_patterns("results.sqlite*"))
    for run_id in drop_runs:
        shutil.rmtree(to / "runs" / run_id)
    return to


def _train_one_epoch_of(run_id: str, run_dir: Path) -> None:
    """An unfinished run folder, as a sweep would leave it (job.json, one epoch of two)."""
    preset = Preset.from_dict(_preset())
    spec = {s.run_id: s for s in expand_grid(preset)}[run_id]
    write_job(run_dir, spec.config.to_dict(), preset.evaluate.corruption.to_dict())
    train(spec.config, run_dir, stop_after_epoch=1, progress_stream=io.StringIO())


def test_collect_rebuilds_a_deleted_database_exactly_and_is_idempotent(
    finished_sweep, tmp_path, capsys
):
    copy = _copy(finished_sweep, tmp_path / "copy")
    assert main(["collect", str(copy)]) == 0
    err = capsys.readouterr().err
    assert "2 run(s) recorded; 2 of them new to the database; 0 finished before" in err
    original = _tables(finished_sweep)
    assert _tables(copy) == original
    assert len(original["corruptions"]) == 4 and original["clusters"]  # every table compared
    assert main(["collect", str(copy)]) == 0
    assert "0 run(s) recorded; 2 finished before" in capsys.readouterr().err
    assert _tables(copy) == original


def test_an_unfinished_run_folder_is_reported_and_left_alone(finished_sweep, tmp_path):
    copy = _copy(finished_sweep, tmp_path / "copy", drop_runs=(NONE,))
    _train_one_epoch_of(NONE, copy / "runs" / NONE)
    summary = collect(copy, stream=io.StringIO())
    assert summary.recorded == [DROPCLUSTER] and summary.unfinished == [NONE]
    with ResultsStore.in_folder(copy, readonly=True) as store:
        assert [r.run_id for r in store.runs()] == [DROPCLUSTER]


def test_a_restarted_sweep_records_runs_finished_in_their_folders_without_training(
    finished_sweep, tmp_path
):
    copy = _copy(finished_sweep, tmp_path / "copy")
    summary = run_sweep(_preset(), copy, stream=io.StringIO())
    assert sorted(summary.collected) == sorted([NONE, DROPCLUSTER]) and summary.ran == []
    assert _tables(copy) == _tables(finished_sweep)


def test_merging_sweeps_of_disjoint_runs_gives_their_union(finished_sweep, tmp_path, capsys):
    first = _copy(finished_sweep, tmp_path / "first", drop_runs=(DROPCLUSTER,))
    second = _copy(finished_sweep, tmp_path / "second", drop_runs=(NONE,))
    # The merged folder has the run unfinished, and the first source has it unfinished too.
    merged = tmp_path / "merged"
    _train_one_epoch_of(DROPCLUSTER, merged / "runs" / DROPCLUSTER)
    _train_one_epoch_of(DROPCLUSTER, first / "runs" / DROPCLUSTER)
    assert main(["collect", str(merged), "--from", str(first), "--from", str(second)]) == 0
    err = capsys.readouterr().err
    assert f"copied {NONE} from {first}" in err and f"copied {DROPCLUSTER} from {second}" in err
    assert _tables(merged) == _tables(finished_sweep)
    assert json.loads((merged / "preset.json").read_text())["name"] == "tiny"
    assert not list((merged / "runs").glob(".*"))  # no leftovers of the copies
    # Merging again changes nothing: a finished run is never replaced.
    summary = collect(merged, [first, second], stream=io.StringIO())
    assert summary.copied == {} and summary.recorded == []
    assert set(summary.not_copied.values()) == {"finished here already"}
    assert _tables(merged) == _tables(finished_sweep)


def test_merge_refuses_another_preset_or_other_settings(finished_sweep, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "preset.json").write_text(json.dumps({**_preset(), "name": "other"}))
    assert main(["collect", str(finished_sweep), "--from", str(other)]) == 2
    assert "holds a sweep of preset 'other'" in capsys.readouterr().err
    changed = apply_overrides(_preset(), {"epochs": 3})
    (other / "preset.json").write_text(json.dumps(changed.to_dict()))
    assert main(["collect", str(finished_sweep), "--from", str(other)]) == 2
    assert "other settings than" in capsys.readouterr().err
    assert main(["collect", str(tmp_path / "nothing")]) == 2
    assert "has no preset.json" in capsys.readouterr().err


# -- what collect refuses to record (the probe's reproductions) -------------------------------


def _foreign_train_run(finished_sweep: Path, to: Path, **changes) -> Path:
    """A folder as `dropcluster train` leaves it (config.json, no job.json), holding the
    finished run NONE with its config changed: another run's folder copied into a sweep."""
    shutil.copytree(finished_sweep / "runs" / NONE, to)
    (to / "job.json").unlink()
    spec = {s.run_id: s for s in expand_grid(Preset.from_dict(_preset()))}[NONE]
    (to / "config.json").write_text(json.dumps({**spec.config.to_dict(), **changes}))
    return to


def test_collect_records_no_foreign_run_and_no_copy(finished_sweep, tmp_path):
    copy = _copy(finished_sweep, tmp_path / "copy")
    runs = copy / "runs"
    _foreign_train_run(finished_sweep, runs / "mine", regularizer="dropblock", p=0.1, lr=0.5)
    # The same foreign run under a grid run's name, in place of that run.
    shutil.rmtree(runs / DROPCLUSTER)
    _foreign_train_run(finished_sweep, runs / DROPCLUSTER, regularizer="dropblock", p=0.1, lr=0.5)
    for index in range(4):  # four copies of one run under other names
        shutil.copytree(runs / NONE, runs / f"copy-{index}")
    stream = io.StringIO()
    summary = collect(copy, stream=stream)
    assert summary.recorded == [NONE]
    assert set(summary.skipped) == {"mine", DROPCLUSTER, *(f"copy-{i}" for i in range(4))}
    assert "its name is no run id of the preset" in summary.skipped["mine"]
    assert f"its config is that of run {NONE}: a copy of it?" in summary.skipped["copy-2"]
    reason = summary.skipped[DROPCLUSTER]
    assert f"another run than the preset's {DROPCLUSTER}" in reason
    assert "lr 0.5 here, 0.1 in the preset" in reason and "regularizer 'dropblock' here" in reason
    assert f"skipped: {runs / 'copy-0'} (" in stream.getvalue()
    with ResultsStore.in_folder(copy, readonly=True) as store:
        assert [(r.run_id, r.status) for r in store.runs()] == [(NONE, "finished")]


@pytest.mark.parametrize(
    ("file", "text", "reason"),
    [
        ("config.json", '{"p": "abc"}', "p should be a finite number, but got 'abc'"),
        ("config.json", None, "its config lacks ['regularizer']"),
        ("config.json", '{"seed": [0]}', "seed should be an integer, but got [0]"),
        ("config.json", '{"weight_decay_on": null}', "it was trained by dropcluster 0.1"),
        ("result.json", "[1, 2]", "result.json should hold an object, but holds a list"),
        ("result.json", '{"top1": "high"}', "result.json: top1 should be a number, but got 'high'"),
        ("log.jsonl", '{"epoch": 0, "loss": "x"}', "log.jsonl: epoch 0: loss should be a number"),
        ("corruptions.json", "{", "corruptions.json is not valid JSON"),
        ("corruptions.json", "[1, 2]", "corruptions.json should hold an object, but holds a list"),
        (
            "result.json",
            '{"average_last": 100000000000000000000}',
            "result.json: average_last should be an integer from 1 to 2147483647",
        ),
        ("result.json", '{"top5": 1' + "0" * 400 + "}", "result.json: top5 should be a number"),
    ],
)
def test_a_folder_with_a_wrongly_typed_file_is_skipped_with_its_reason(
    finished_sweep, tmp_path, file, text, reason
):
    copy = _copy(finished_sweep, tmp_path / "copy")
    run_dir = copy / "runs" / NONE
    if file == "config.json":  # as `dropcluster train` writes it: no job.json
        config = json.loads((run_dir / "job.json").read_text())["config"]
        (run_dir / "job.json").unlink()
        config.update(json.loads(text) if text else {})
        if text is None:
            del config["regularizer"]
        if config.get("weight_decay_on", "") is None:  # 0.1's configs lack the key
            del config["weight_decay_on"]
        (run_dir / file).write_text(json.dumps(config))
    elif file == "result.json" and text.startswith("{"):
        document = json.loads((run_dir / file).read_text())
        (run_dir / file).write_text(json.dumps({**document, **json.loads(text)}))
    elif file == "log.jsonl":
        lines = (run_dir / file).read_text().splitlines()
        lines[0] = json.dumps({**json.loads(lines[0]), **json.loads(text)})
        (run_dir / file).write_text("\n".join(lines) + "\n")
    else:
        (run_dir / file).write_text(text)
    summary = collect(copy, stream=io.StringIO())
    assert summary.recorded == [DROPCLUSTER]  # the other folder is recorded all the same
    assert list(summary.skipped) == [NONE] and reason in summary.skipped[NONE]


def test_collect_repairs_rows_recorded_unchecked_and_the_report_names_unreadable_ones(
    finished_sweep, tmp_path, capsys
):
    import sqlite3

    copy = _copy(finished_sweep, tmp_path / "copy")
    assert sorted(collect(copy, stream=io.StringIO()).recorded) == sorted([NONE, DROPCLUSTER])
    # What an unchecked collect (0.3) could record: a renamed copy of a run, a text where p
    # belongs, and a grid run stored with another config.
    shutil.copytree(copy / "runs" / NONE, copy / "runs" / "copy-1")
    with ResultsStore.in_folder(copy) as store:
        store.add_run(
            "copy-1",
            {"lr": 0.1},
            preset="tiny",
            regularizer="none",
            p=0.0,
            seed=0,
            train_fraction=0.25,
        )
    connection = sqlite3.connect(copy / "results.sqlite")
    with connection:
        connection.execute("UPDATE runs SET p = 'abc' WHERE run_id = ?", (NONE,))
        config = json.loads(
            connection.execute(
                "SELECT config FROM runs WHERE run_id = ?", (DROPCLUSTER,)
            ).fetchone()[0]
        )
        connection.execute(
            "UPDATE runs SET config = ? WHERE run_id = ?",
            (json.dumps({**config, "lr": 0.5}), DROPCLUSTER),
        )
    connection.close()
    # The report reads what it can and names the row it cannot.
    assert main(["report", "--out", str(copy)]) == 0
    report = (copy / "report" / "report.md").read_text()
    assert f"`{NONE}`: run '{NONE}': p should be a finite number, but got 'abc'" in report
    capsys.readouterr()
    assert main(["results", "--out", str(copy)]) == 0
    assert f"not read: {NONE} (run '{NONE}': p should be" in capsys.readouterr().out

    # A row that disagrees with preset.json may mean preset.json was edited: nothing changes
    # without --drop-mismatched.
    before = _tables(copy)
    assert main(["collect", str(copy)]) == 2
    err = capsys.readouterr().err
    assert (
        f"1 run(s) of {copy / 'results.sqlite'} disagree with {copy / 'preset.json'} "
        f"({DROPCLUSTER}: recorded with another config than the preset's (lr 0.5 stored, "
        f"0.1 in the preset)); nothing was changed"
    ) in err
    assert _tables(copy) == before

    assert main(["collect", str(copy), "--drop-mismatched"]) == 0
    err = capsys.readouterr().err
    assert f"removed from the database: {NONE} (run '{NONE}': p should be a finite number" in err
    assert (
        f"removed from the database: copy-1 (its folder is not run copy-1: it holds run "
        f"{NONE}, not copy-1)"
    ) in err
    assert f"removed from the database: {DROPCLUSTER} (recorded with another config" in err
    assert "2 run(s) recorded; 2 of them new to the database" in err
    assert _tables(copy) == _tables(finished_sweep)


def test_collect_removes_a_finished_row_whose_folder_holds_another_run(
    finished_sweep, tmp_path, capsys
):
    """0.3's path to a wrong row: a run registered by the sweep (pending, the preset's config),
    its folder replaced by a foreign run, then recorded by an unchecked collect."""
    copy = _copy(finished_sweep, tmp_path / "copy")
    assert sorted(collect(copy, stream=io.StringIO()).recorded) == sorted([NONE, DROPCLUSTER])
    shutil.rmtree(copy / "runs" / NONE)
    _foreign_train_run(finished_sweep, copy / "runs" / NONE, seed=7, lr=0.05)
    assert main(["collect", str(copy)]) == 0
    err = capsys.readouterr().err
    assert (
        f"removed from the database: {NONE} (its folder is not run {NONE}: it holds run "
        f"none-p0-f0.25-s7, not {NONE})"
    ) in err
    assert f"skipped: {copy / 'runs' / NONE} (it holds another run than the preset's" in err
    with ResultsStore.in_folder(copy, readonly=True) as store:
        assert [r.run_id for r in store.runs()] == [DROPCLUSTER]


def test_a_copy_that_fails_half_way_leaves_no_temporary_folder(finished_sweep, tmp_path):
    source = _copy(finished_sweep, tmp_path / "source")
    out = _copy(finished_sweep, tmp_path / "out", drop_runs=(NONE, DROPCLUSTER))
    os.mkfifo(source / "runs" / NONE / "pipe")  # copytree fails on it, after the other files
    summary = collect(out, [source], stream=io.StringIO())
    assert "pipe" in summary.not_copied[f"{source}:{NONE}"]
    assert list(summary.copied) == [DROPCLUSTER]
    assert not list((out / "runs").glob(".*")) and not (out / "runs" / NONE).exists()


def test_merge_copies_no_foreign_run_and_leaves_no_temporary_folder(finished_sweep, tmp_path):
    source = _copy(finished_sweep, tmp_path / "source")
    out = _copy(finished_sweep, tmp_path / "out", drop_runs=(NONE, DROPCLUSTER))
    # A run whose job.json says another data set, model and learning rate.
    job = json.loads((source / "runs" / NONE / "job.json").read_text())
    job["config"].update(dataset="fashion-mnist", model="resnet20", lr=0.5)
    (source / "runs" / NONE / "job.json").write_text(json.dumps(job))
    # A run folder that is a link to the real one (copied as its content), and a dangling link.
    real = tmp_path / "elsewhere" / DROPCLUSTER
    shutil.move(source / "runs" / DROPCLUSTER, real)
    (source / "runs" / DROPCLUSTER).symlink_to(real)
    (source / "runs" / "none-p0-f0.25-s1").symlink_to(tmp_path / "nowhere")
    summary = collect(out, [source], stream=io.StringIO())
    assert list(summary.copied) == [DROPCLUSTER] and not (out / "runs" / DROPCLUSTER).is_symlink()
    assert (
        "dataset 'fashion-mnist' here, 'synthetic' in the preset"
        in summary.not_copied[f"{source}:{NONE}"]
    )
    assert summary.not_copied[f"{source}:none-p0-f0.25-s1"] == "it is a link to nothing"
    assert summary.recorded == [DROPCLUSTER]
    assert not list((out / "runs").glob(".*"))
    # The folder stays usable: a sweep trains the run that was not copied.
    assert run_sweep(_preset(), out, stream=io.StringIO()).ran == [NONE]


def test_a_link_to_nothing_inside_a_run_is_refused_before_anything_is_copied(
    finished_sweep, tmp_path
):
    source = _copy(finished_sweep, tmp_path / "source")
    out = _copy(finished_sweep, tmp_path / "out", drop_runs=(NONE, DROPCLUSTER))
    (source / "runs" / NONE / "notes.txt").symlink_to(tmp_path / "missing.txt")
    # The target of the other run is an unfinished link: replaced folders only.
    (out / "runs").mkdir(exist_ok=True)
    (out / "runs" / DROPCLUSTER).symlink_to(tmp_path / "nowhere")
    summary = collect(out, [source], stream=io.StringIO())
    assert summary.copied == {}
    assert "notes.txt is a symbolic link to" in summary.not_copied[f"{source}:{NONE}"]
    assert "which does not exist" in summary.not_copied[f"{source}:{NONE}"]
    assert (
        "is a symbolic link: collect replaces folders only"
        in summary.not_copied[f"{source}:{DROPCLUSTER}"]
    )
    assert not list((out / "runs").glob(".*"))
    assert summary.skipped == {DROPCLUSTER: "it is a link to nothing"}


def test_a_sweep_never_records_or_trains_over_a_foreign_run_in_a_run_folder(
    finished_sweep, tmp_path
):
    copy = _copy(finished_sweep, tmp_path / "copy", drop_runs=(NONE,))
    _foreign_train_run(finished_sweep, copy / "runs" / NONE, lr=0.5)
    before = (copy / "runs" / NONE / "config.json").read_text()
    stream = io.StringIO()
    summary = run_sweep(_preset(), copy, stream=stream)
    assert summary.failed == [NONE] and summary.ran == [] and summary.finished == 1
    assert "lr 0.5 here, 0.1 in the preset" in stream.getvalue()
    assert (copy / "runs" / NONE / "config.json").read_text() == before  # left alone
    assert not (copy / "runs" / NONE / "job.json").exists()
    with ResultsStore.in_folder(copy, readonly=True) as store:
        assert "its folder cannot be recorded" in store.run(NONE).error
