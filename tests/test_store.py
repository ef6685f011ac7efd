"""Tests of the sweep's results database (``dropcluster.experiments.store``)."""

from __future__ import annotations

import csv
import json
import math
import sqlite3

import pytest

from dropcluster.experiments import store as store_module
from dropcluster.experiments.store import (
    DATABASE_NAME,
    RUN_STATUSES,
    SCHEMA_VERSION,
    ResultsStore,
    RunRecord,
    SchemaVersionError,
)

CONFIG = {
    "dataset": "fashion-mnist", "model": "resnet20", "regularizer": "dropcluster", "p": 0.1,
    "regularizer_options": {"block_size": 5}, "epochs": 3, "lr": 0.1, "lr_milestones": [1, 2],
    "seed": 0, "train_fraction": 1.0, "data_dir": None, "amp": False,
}  # fmt: skip

HISTORY = [
    {"epoch": 0, "loss": 2.1, "train_top1": 20.0, "top1": 30.5, "top5": 70.25, "lr": 0.1,
     "seconds": 1.5, "images_per_s": 1000.0},
    {"epoch": 1, "loss": 1.5, "train_top1": 40.0, "top1": 45.0, "top5": 80.0, "lr": 0.1,
     "seconds": 1.25, "images_per_s": 1200.0, "structured": [3, 5], "channels": [16, 32],
     "refit_seconds": 0.5},
    {"epoch": 2, "loss": float("nan"), "train_top1": 50.0, "top1": 50.0, "top5": 85.0,
     "lr": 0.01, "seconds": 1.0, "images_per_s": 1300.0},
]  # fmt: skip

CORRUPTIONS = [
    {"corruption": "clean", "severity": 0, "top1": 50.0, "top5": 85.0},
    {"corruption": "gaussian_noise", "severity": 1, "top1": 40.0, "top5": 75.0},
    {"corruption": "gaussian_noise", "severity": 5, "top1": 10.0, "top5": 30.0},
]

CLUSTERS = [
    {"epoch": 1, "layer": "layer2.0", "channels": 16, "structured": 3, "refit_seconds": 0.5},
    {"epoch": 1, "layer": "layer10.0", "channels": 32, "structured": 5, "refit_seconds": None},
]


def add(store: ResultsStore, run_id: str = "dc-p0.1-s0", config: dict | None = None, **kw):
    """Add a run with the grid coordinates of ``CONFIG`` (overridable)."""
    setup = {"preset": "fmnist", "regularizer": "dropcluster", "p": 0.1, "seed": 0,
             "train_fraction": 1.0, **kw}  # fmt: skip
    return store.add_run(run_id, CONFIG if config is None else config, **setup)


def finish(store: ResultsStore, run_id: str = "dc-p0.1-s0") -> None:
    store.record_finished(
        run_id, history=HISTORY, top1=47.5, top5=82.5, average_last=2, seconds=12.0,
        corruptions=CORRUPTIONS, clusters=CLUSTERS,
    )  # fmt: skip


def snapshot(store: ResultsStore) -> tuple:
    """Everything the store holds, for before/after comparisons."""
    return (store.runs(), store.epochs(), store.corruption_results(), store.cluster_stats())


@pytest.fixture
def store(tmp_path):
    with ResultsStore.in_folder(tmp_path / "sweep") as results:
        yield results


def test_new_store_creates_folder_schema_and_version(tmp_path):
    with ResultsStore.in_folder(tmp_path / "a" / "b") as results:
        assert results.path == tmp_path / "a" / "b" / DATABASE_NAME
        assert results.path.is_file()
        assert results.counts() == dict.fromkeys(RUN_STATUSES, 0)
    connection = sqlite3.connect(tmp_path / "a" / "b" / DATABASE_NAME)
    version = connection.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    journal_mode = connection.execute("PRAGMA journal_mode").fetchone()
    connection.close()
    assert int(version[0]) == SCHEMA_VERSION
    assert journal_mode[0] == "wal"


def test_round_trip_of_a_finished_run(store):
    assert add(store) is True
    store.mark_running("dc-p0.1-s0")
    finish(store)

    record = store.run("dc-p0.1-s0")
    assert isinstance(record, RunRecord)
    assert record.config == CONFIG
    assert (record.preset, record.regularizer, record.p, record.seed, record.train_fraction) == (
        "fmnist", "dropcluster", 0.1, 0, 1.0,
    )  # fmt: skip
    assert (record.status, record.attempts, record.error) == ("finished", 1, None)
    assert (record.top1, record.top5, record.average_last) == (47.5, 82.5, 2)
    assert (record.epochs_done, record.seconds) == (3, 12.0)
    assert record.updated_at > 0

    epochs = store.epochs("dc-p0.1-s0")
    assert [row["epoch"] for row in epochs] == [0, 1, 2]
    assert epochs[0] == {"run_id": "dc-p0.1-s0", **HISTORY[0]}
    # Extra keys of a history record come back as they went in.
    assert epochs[1] == {"run_id": "dc-p0.1-s0", **HISTORY[1]}
    # SQLite has no NaN: a NaN loss is stored as NULL.
    assert epochs[2]["loss"] is None and epochs[2]["top1"] == 50.0

    corruptions = store.corruption_results("dc-p0.1-s0")
    assert corruptions == [
        {"run_id": "dc-p0.1-s0", **row, "source": "generated"} for row in CORRUPTIONS
    ]
    # Layers come back in the order recorded, not sorted by name.
    assert store.cluster_stats("dc-p0.1-s0") == [
        {"run_id": "dc-p0.1-s0", **row} for row in CLUSTERS
    ]
    assert store.counts() == {"pending": 0, "running": 0, "finished": 1, "failed": 0}


def test_readers_filter_by_run(store):
    add(store, "a")
    add(store, "b", seed=1)
    store.record_epochs("a", HISTORY[:2])
    store.record_epochs("b", HISTORY[:1])
    store.record_clusters("a", CLUSTERS)
    assert [row["run_id"] for row in store.epochs()] == ["a", "a", "b"]
    assert [row["epoch"] for row in store.epochs("b")] == [0]
    assert store.cluster_stats("b") == []
    assert store.epochs("unknown") == []
    assert store.run("a").epochs_done == 2 and store.run("b").epochs_done == 1


def test_record_epochs_replaces_the_history(store):
    add(store)
    store.record_epochs("dc-p0.1-s0", HISTORY)
    store.record_epochs("dc-p0.1-s0", HISTORY[:1])
    assert [row["epoch"] for row in store.epochs()] == [0]
    assert store.run("dc-p0.1-s0").epochs_done == 1
    with pytest.raises(ValueError, match="epoch 0 more than once"):
        store.record_epochs("dc-p0.1-s0", [HISTORY[0], HISTORY[0]])
    with pytest.raises(ValueError, match="no 'epoch' key"):
        store.record_epochs("dc-p0.1-s0", [{"loss": 1.0}])
    with pytest.raises(KeyError, match="no run 'missing'"):
        store.record_epochs("missing", HISTORY)


def test_corruptions_replace_same_corruption_and_severity(store):
    add(store)
    store.record_corruptions("dc-p0.1-s0", CORRUPTIONS)
    store.record_corruptions(
        "dc-p0.1-s0",
        [{"corruption": "gaussian_noise", "severity": 5, "top1": 12.0, "top5": float("nan")}],
        source="released",
    )
    rows = {(r["corruption"], r["severity"]): r for r in store.corruption_results()}
    assert len(rows) == 3
    assert rows["gaussian_noise", 5]["top1"] == 12.0
    assert rows["gaussian_noise", 5]["top5"] is None
    assert rows["gaussian_noise", 5]["source"] == "released"
    assert rows["clean", 0]["source"] == "generated"
    with pytest.raises(ValueError, match="clean baseline has severity 0"):
        store.record_corruptions(
            "dc-p0.1-s0", [{"corruption": "clean", "severity": 1, "top1": 1.0, "top5": 1.0}]
        )
    with pytest.raises(ValueError, match="source has to be one of"):
        store.record_corruptions("dc-p0.1-s0", CORRUPTIONS, source="downloaded")


def test_clusters_replace_same_epoch_and_layer(store):
    add(store)
    store.record_clusters("dc-p0.1-s0", CLUSTERS)
    store.record_clusters(
        "dc-p0.1-s0", [{"epoch": 1, "layer": "layer2.0", "channels": 16, "structured": 7}]
    )
    stats = store.cluster_stats()
    assert [row["layer"] for row in stats] == ["layer2.0", "layer10.0"]
    assert stats[0]["structured"] == 7 and stats[0]["refit_seconds"] is None
    with pytest.raises(ValueError, match="0 <= structured <= channels"):
        store.record_clusters(
            "dc-p0.1-s0", [{"epoch": 2, "layer": "x", "channels": 4, "structured": 5}]
        )


def test_add_run_is_idempotent_and_keeps_status_and_results(store):
    assert add(store) is True
    store.mark_running("dc-p0.1-s0")
    finish(store)
    # Tuples and lists are the same config once stored as JSON.
    assert add(store, config={**CONFIG, "lr_milestones": (1, 2)}) is False
    assert len(store.runs()) == 1
    record = store.run("dc-p0.1-s0")
    assert record.status == "finished" and record.top1 == 47.5 and record.attempts == 1
    assert len(store.epochs()) == 3


def test_add_run_with_changed_config_names_the_keys(store):
    add(store)
    with pytest.raises(ValueError, match="grid changed") as raised:
        add(store, config={**CONFIG, "epochs": 30, "lr": 0.05})
    message = str(raised.value)
    assert "config.epochs: 3 -> 30" in message and "config.lr: 0.1 -> 0.05" in message
    assert "config.model" not in message
    with pytest.raises(ValueError, match="seed: 0 -> 1"):
        add(store, seed=1)
    assert store.run("dc-p0.1-s0").config == CONFIG


def test_add_run_validates_its_arguments(store):
    with pytest.raises(ValueError, match="p has to be between 0 and 1, but got 1.5"):
        add(store, p=1.5)
    with pytest.raises(ValueError, match=r"train_fraction has to be in \(0, 1\], but got 0.0"):
        add(store, train_fraction=0.0)
    with pytest.raises(TypeError, match="seed has to be an int"):
        add(store, seed=1.0)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        add(store, config={"data_dir": object()})
    assert store.runs() == []


def test_record_finished_is_atomic(store, monkeypatch):
    add(store)
    store.mark_running("dc-p0.1-s0")
    store.record_epochs("dc-p0.1-s0", HISTORY[:1])
    store.record_corruptions("dc-p0.1-s0", CORRUPTIONS[:1])
    before = snapshot(store)

    # Fail after the epochs and corruptions were written, before the clusters and the status.
    def fail_mid_transaction(connection, rows):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(store_module, "_upsert_clusters", fail_mid_transaction)
    with pytest.raises(RuntimeError, match="disk on fire"):
        finish(store)
    assert snapshot(store) == before
    assert store.run("dc-p0.1-s0").status == "running"


def test_record_finished_rolls_back_on_a_database_error(store, tmp_path):
    add(store)
    store.record_epochs("dc-p0.1-s0", HISTORY[:2])
    before = snapshot(store)
    # A trigger makes the last insert of the transaction fail inside SQLite itself.
    other = sqlite3.connect(store.path)
    with other:
        other.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON clusters BEGIN SELECT RAISE(ABORT, 'no'); END"
        )
    other.close()
    with pytest.raises(sqlite3.DatabaseError):
        finish(store)
    assert snapshot(store) == before
    assert [row["epoch"] for row in store.epochs()] == [0, 1]


def test_reset_interrupted_sets_running_runs_back_to_pending(store):
    for run_id in ("a", "b", "c"):
        add(store, run_id)
    store.mark_running("a")
    store.mark_running("b")
    finish(store, "b")
    store.mark_running("c")
    assert store.reset_interrupted() == ["a", "c"]
    assert [store.run(run_id).status for run_id in ("a", "b", "c")] == [
        "pending", "finished", "pending",
    ]  # fmt: skip
    assert store.run("a").attempts == 1
    assert store.reset_interrupted() == []


def test_failed_run_keeps_its_error_and_is_not_finished(store):
    add(store, "a")
    add(store, "b", seed=1)
    store.mark_running("a")
    store.mark_failed("a", "RuntimeError: CUDA out of memory")
    record = store.run("a")
    assert (record.status, record.error, record.attempts) == (
        "failed", "RuntimeError: CUDA out of memory", 1,
    )  # fmt: skip
    assert record.top1 is None
    assert store.counts() == {"pending": 1, "running": 0, "finished": 0, "failed": 1}
    assert store.runs(status="finished") == []
    assert [r.run_id for r in store.runs(status="failed")] == ["a"]
    # A retry clears the error and counts one more attempt.
    store.mark_running("a")
    assert (store.run("a").error, store.run("a").attempts) == (None, 2)


def test_runs_are_ordered_and_filtered(store):
    add(store, "z", regularizer="dropblock", p=0.1, seed=0)
    add(store, "small", p=0.1, seed=0, train_fraction=0.1)
    add(store, "s1", p=0.1, seed=1)
    add(store, "s0", p=0.1, seed=0)
    add(store, "high-p", p=0.2, seed=0)
    add(store, "other-preset", preset="other", p=0.3, seed=0)
    assert [r.run_id for r in store.runs()] == [
        "z", "s0", "s1", "small", "high-p", "other-preset",
    ]  # fmt: skip
    assert [r.run_id for r in store.runs(preset="other")] == ["other-preset"]
    assert len(store.runs(status="pending", preset="fmnist")) == 5
    with pytest.raises(ValueError, match="status has to be one of"):
        store.runs(status="done")


def test_unknown_run_raises_key_error(store):
    with pytest.raises(KeyError, match="no run 'ghost'"):
        store.run("ghost")
    with pytest.raises(KeyError, match="no run 'ghost'"):
        store.mark_running("ghost")
    with pytest.raises(KeyError, match="no run 'ghost'"):
        store.record_clusters("ghost", CLUSTERS)


def test_newer_schema_version_is_refused(tmp_path):
    path = tmp_path / DATABASE_NAME
    ResultsStore(path).close()
    connection = sqlite3.connect(path)
    with connection:
        connection.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    connection.close()
    for readonly in (False, True):
        with pytest.raises(SchemaVersionError) as raised:
            ResultsStore(path, readonly=readonly)
        message = str(raised.value)
        assert "schema version 2" in message and f"up to {SCHEMA_VERSION}" in message
        assert str(path) in message and "pip install -U dropcluster" in message


def test_non_sqlite_file_is_refused_and_left_alone(tmp_path):
    path = tmp_path / DATABASE_NAME
    content = b"run_id,top1\n" + b"x" * 200
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is not an SQLite database") as raised:
        ResultsStore(path)
    assert str(path) in str(raised.value)
    assert path.read_bytes() == content


def test_foreign_sqlite_database_is_refused(tmp_path):
    path = tmp_path / "other.sqlite"
    connection = sqlite3.connect(path)
    with connection:
        connection.execute("CREATE TABLE people (name TEXT)")
    connection.close()
    with pytest.raises(ValueError, match="not a dropcluster results database"):
        ResultsStore(path)


def test_readonly_on_a_missing_file_raises_and_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results database at"):
        ResultsStore.in_folder(tmp_path / "nowhere", readonly=True)
    assert not (tmp_path / "nowhere").exists()


def test_readonly_store_reads_but_refuses_writes(store):
    add(store)
    finish(store)
    store.close()
    with ResultsStore(store.path, readonly=True) as reader:
        assert reader.run("dc-p0.1-s0").top1 == 47.5
        with pytest.raises(PermissionError, match="opened readonly"):
            reader.mark_running("dc-p0.1-s0")


def test_reader_sees_committed_data_while_the_writer_is_open(store):
    add(store, "a")
    with ResultsStore(store.path, readonly=True) as reader:
        assert [r.run_id for r in reader.runs()] == ["a"]
        store.mark_running("a")
        finish(store, "a")
        add(store, "b", seed=1)
        # The reader sees each commit of the writer as soon as it is made.
        assert reader.run("a").status == "finished"
        assert reader.counts()["pending"] == 1
        assert len(reader.epochs("a")) == 3
        # And a plain sqlite3 reader does too, while the writer holds its connection.
        plain = sqlite3.connect(store.path, timeout=1.0)
        assert plain.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 2
        plain.close()


def test_export_csv_round_trips_through_the_csv_module(store, tmp_path):
    add(store, "a")
    add(store, "b", config={**CONFIG, "extra_key": "x"}, seed=1)
    store.mark_running("a")
    finish(store, "a")
    store.mark_failed("b", "boom, with a comma\nand a newline")

    paths = store.export_csv(tmp_path / "csv")
    assert [path.name for path in paths] == [
        "runs.csv", "epochs.csv", "corruptions.csv", "clusters.csv",
    ]  # fmt: skip
    assert not list((tmp_path / "csv").glob("*.tmp"))

    def read(name):
        with open(tmp_path / "csv" / name, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))

    runs = read("runs.csv")
    assert [row["run_id"] for row in runs] == ["a", "b"]
    assert "config" not in runs[0]
    assert runs[0]["status"] == "finished" and float(runs[0]["top1"]) == 47.5
    assert runs[0]["config.model"] == "resnet20" and float(runs[0]["config.lr"]) == 0.1
    assert json.loads(runs[0]["config.regularizer_options"]) == {"block_size": 5}
    assert json.loads(runs[0]["config.lr_milestones"]) == [1, 2]
    assert runs[0]["config.data_dir"] == "" and runs[0]["config.amp"] == "false"
    # A key only one run's config has is an empty field for the others.
    assert runs[0]["config.extra_key"] == "" and runs[1]["config.extra_key"] == "x"
    assert runs[1]["error"] == "boom, with a comma\nand a newline" and runs[1]["top1"] == ""

    epochs = read("epochs.csv")
    assert [(row["run_id"], int(row["epoch"])) for row in epochs] == [("a", 0), ("a", 1), ("a", 2)]
    assert float(epochs[0]["top5"]) == 70.25 and epochs[2]["loss"] == ""
    assert json.loads(epochs[1]["structured"]) == [3, 5] and epochs[0]["structured"] == ""
    assert float(epochs[1]["refit_seconds"]) == 0.5

    corruptions = read("corruptions.csv")
    assert [
        (row["corruption"], int(row["severity"]), float(row["top1"]), row["source"])
        for row in corruptions
    ] == [(r["corruption"], r["severity"], r["top1"], "generated") for r in CORRUPTIONS]

    clusters = read("clusters.csv")
    assert [(row["layer"], int(row["structured"]), row["refit_seconds"]) for row in clusters] == [
        ("layer2.0", 3, "0.5"), ("layer10.0", 5, ""),
    ]  # fmt: skip

    # A second export replaces the files.
    store.mark_running("b")
    store.export_csv(tmp_path / "csv")
    assert read("runs.csv")[1]["status"] == "running"


def test_nan_final_metrics_are_stored_as_null(store):
    add(store)
    store.record_finished(
        "dc-p0.1-s0", history=[], top1=float("nan"), top5=math.nan, average_last=0, seconds=0.0
    )
    record = store.run("dc-p0.1-s0")
    assert record.status == "finished" and record.top1 is None and record.top5 is None


def test_record_corruptions_with_replace_keeps_only_the_new_rows(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite") as store:
        store.add_run("a", {"x": 1}, preset=None, regularizer="none", p=0.0, seed=0,
                      train_fraction=1.0)  # fmt: skip
        old = [{"corruption": "clean", "severity": 0, "top1": 1.0, "top5": 2.0},
               {"corruption": "zoom_blur", "severity": 1, "top1": 3.0, "top5": 4.0}]  # fmt: skip
        store.record_corruptions("a", old)
        new = [{"corruption": "clean", "severity": 0, "top1": 5.0, "top5": 6.0},
               {"corruption": "shot_noise", "severity": 2, "top1": 7.0, "top5": 8.0}]  # fmt: skip
        store.record_corruptions("a", new, source="released", replace=True)
        rows = store.corruption_results("a")
    assert [(r["corruption"], r["severity"], r["top1"], r["source"]) for r in rows] == [
        ("clean", 0, 5.0, "released"), ("shot_noise", 2, 7.0, "released")]  # fmt: skip
