"""`dropcluster collect`: a sweep's database rebuilt from its run folders, and sweeps of one
preset merged, without training and without duplicate rows."""

from __future__ import annotations

import io
import json
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
    preset["evaluate"] = {"train_fraction": [0.25], "corruptions": "gaussian_noise",
                          "severities": [1], "limit": 50}  # fmt: skip
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
        return {"runs": runs, "epochs": store.epochs(), "corruptions": store.corruption_results(),
                "clusters": store.cluster_stats()}  # fmt: skip


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


def test_collect_rebuilds_a_deleted_database_exactly_and_is_idempotent(finished_sweep, tmp_path,
                                                                       capsys):  # fmt: skip
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
