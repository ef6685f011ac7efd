"""Tests of the sweep's results database (``dropcluster.experiments.store``)."""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import shutil
import sqlite3
import stat
import tempfile
from pathlib import Path

import pytest

from dropcluster import errors
from dropcluster.experiments import store as store_module
from dropcluster.experiments.store import (
    DATABASE_NAME,
    RUN_STATUSES,
    SCHEMA_VERSION,
    ResultsDatabaseError,
    ResultsStorageError,
    ResultsStore,
    RunRecord,
    SchemaVersionError,
)

CONFIG = {
    "dataset": "fashion-mnist",
    "model": "resnet20",
    "regularizer": "dropcluster",
    "p": 0.1,
    "regularizer_options": {"block_size": 5},
    "epochs": 3,
    "lr": 0.1,
    "lr_milestones": [1, 2],
    "seed": 0,
    "train_fraction": 1.0,
    "data_dir": None,
    "amp": False,
}

HISTORY = [
    {
        "epoch": 0,
        "loss": 2.1,
        "train_top1": 20.0,
        "top1": 30.5,
        "top5": 70.25,
        "lr": 0.1,
        "seconds": 1.5,
        "images_per_s": 1000.0,
    },
    {
        "epoch": 1,
        "loss": 1.5,
        "train_top1": 40.0,
        "top1": 45.0,
        "top5": 80.0,
        "lr": 0.1,
        "seconds": 1.25,
        "images_per_s": 1200.0,
        "structured": [3, 5],
        "channels": [16, 32],
        "refit_seconds": 0.5,
    },
    {
        "epoch": 2,
        "loss": float("nan"),
        "train_top1": 50.0,
        "top1": 50.0,
        "top5": 85.0,
        "lr": 0.01,
        "seconds": 1.0,
        "images_per_s": 1300.0,
    },
]

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
    setup = {
        "preset": "fmnist",
        "regularizer": "dropcluster",
        "p": 0.1,
        "seed": 0,
        "train_fraction": 1.0,
        **kw,
    }
    return store.add_run(run_id, CONFIG if config is None else config, **setup)


def finish(store: ResultsStore, run_id: str = "dc-p0.1-s0") -> None:
    store.record_finished(
        run_id,
        history=HISTORY,
        top1=47.5,
        top5=82.5,
        average_last=2,
        seconds=12.0,
        corruptions=CORRUPTIONS,
        clusters=CLUSTERS,
    )


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
        "fmnist",
        "dropcluster",
        0.1,
        0,
        1.0,
    )
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
    # The table's keys refuse what no history can hold, and the failed write changes nothing.
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE constraint failed"):
        store.record_epochs("dc-p0.1-s0", [HISTORY[0], HISTORY[0]])
    with pytest.raises(sqlite3.IntegrityError, match="NOT NULL constraint failed: epochs.epoch"):
        store.record_epochs("dc-p0.1-s0", [{"loss": 1.0}])
    assert [row["epoch"] for row in store.epochs()] == [0]
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
    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
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


def test_a_run_of_a_0_1_sweep_is_refused_with_why(store):
    add(store)  # a 0.1 config: no weight_decay_on
    with pytest.raises(
        ValueError, match="made by dropcluster 0.1: dropcluster 0.1's ResNet stem was a bare conv"
    ):
        add(store, config={**CONFIG, "weight_decay_on": "weights"})


def test_a_config_stored_without_its_variant_takes_the_one_in_its_run_id(store):
    # Runs recorded before configs kept their variant: adding them again must not fail.
    config = {**CONFIG, "weight_decay_on": "all"}
    run_id = "dropcluster-ours-p0.1-f1-s0"
    assert add(store, run_id, config) is True
    assert add(store, run_id, {**config, "variant": "ours"}) is False
    assert store.run(run_id).arm == "dropcluster:ours"
    with pytest.raises(ValueError, match="config.variant: 'ours' -> 'theirs'"):
        add(store, run_id, {**config, "variant": "theirs"})


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
        "pending",
        "finished",
        "pending",
    ]
    assert store.run("a").attempts == 1
    assert store.reset_interrupted() == []


def test_failed_run_keeps_its_error_and_is_not_finished(store):
    add(store, "a")
    add(store, "b", seed=1)
    store.mark_running("a")
    store.mark_failed("a", "RuntimeError: CUDA out of memory")
    record = store.run("a")
    assert (record.status, record.error, record.attempts) == (
        "failed",
        "RuntimeError: CUDA out of memory",
        1,
    )
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
        "z",
        "s0",
        "s1",
        "small",
        "high-p",
        "other-preset",
    ]
    assert [r.run_id for r in store.runs(preset="other")] == ["other-preset"]
    assert len(store.runs(status="pending", preset="fmnist")) == 5
    with pytest.raises(ValueError, match="status should be one of 'pending'"):
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
        assert str(path) in message and "git pull, then make venv" in message


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
        "runs.csv",
        "epochs.csv",
        "corruptions.csv",
        "clusters.csv",
    ]
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
        ("layer2.0", 3, "0.5"),
        ("layer10.0", 5, ""),
    ]

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
        store.add_run(
            "a", {"x": 1}, preset=None, regularizer="none", p=0.0, seed=0, train_fraction=1.0
        )
        old = [
            {"corruption": "clean", "severity": 0, "top1": 1.0, "top5": 2.0},
            {"corruption": "zoom_blur", "severity": 1, "top1": 3.0, "top5": 4.0},
        ]
        store.record_corruptions("a", old)
        new = [
            {"corruption": "clean", "severity": 0, "top1": 5.0, "top5": 6.0},
            {"corruption": "shot_noise", "severity": 2, "top1": 7.0, "top5": 8.0},
        ]
        store.record_corruptions("a", new, source="released", replace=True)
        rows = store.corruption_results("a")
    assert [(r["corruption"], r["severity"], r["top1"], r["source"]) for r in rows] == [
        ("clean", 0, 5.0, "released"),
        ("shot_noise", 2, 7.0, "released"),
    ]


# -- errors, read-only folders and damaged files ------------------------------------------------

WAL, SHM = f"{DATABASE_NAME}-wal", f"{DATABASE_NAME}-shm"


def _finished_sweep(folder: Path, runs: int = 3) -> tuple:
    """A closed database in ``folder`` with ``runs`` finished runs; returns its snapshot."""
    with ResultsStore.in_folder(folder) as writer:
        for seed in range(runs):
            add(writer, f"run-{seed}", seed=seed)
            writer.mark_running(f"run-{seed}")
            finish(writer, f"run-{seed}")
        return snapshot(writer)


def _outcome(function) -> tuple:
    try:
        return ("ok", function())
    except Exception as error:
        return ("error", type(error).__name__, str(error))


def _as_nobody(function) -> tuple:
    """``_outcome(function)`` in a forked child process that runs as the user nobody."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: leaves through os._exit only, never back into pytest
        try:
            os.close(read_end)
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            except OSError as error:
                data = pickle.dumps(("setup", type(error).__name__, str(error)))
            else:
                data = pickle.dumps(_outcome(function))
            with os.fdopen(write_end, "wb") as stream:
                stream.write(data)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as stream:
        data = stream.read()
    os.waitpid(pid, 0)
    outcome = pickle.loads(data)
    if outcome[0] == "setup":
        pytest.skip(f"cannot drop root privileges to test a read-only folder: {outcome[2]}")
    return outcome


def _in_read_only_folder(folder: Path, function) -> tuple:
    """``function()`` where ``folder`` and its files are really read-only: ``("ok", result)``
    or ``("error", exception type name, message)``.

    The folder is made 0o555 and its files 0o444 (restored after); as root, which ignores
    permission bits, ``function`` runs in a child process that drops to the user nobody.
    """
    entries = [folder, *folder.iterdir()]
    modes = {entry: stat.S_IMODE(entry.stat().st_mode) for entry in entries}
    for entry in entries:
        entry.chmod(0o555 if entry.is_dir() else 0o444)
    try:
        return _as_nobody(function) if os.geteuid() == 0 else _outcome(function)
    finally:
        for entry, mode in modes.items():
            entry.chmod(mode)


@pytest.fixture
def shared_tmp():
    """A temporary folder the user nobody can reach (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="dropcluster-store-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def _reader_view(folder: Path):
    """A function that reads the sweep in ``folder`` read-only: (immutable, snapshot, files)."""

    def read() -> tuple:
        with ResultsStore.in_folder(folder, readonly=True) as reader:
            files_while_open = sorted(os.listdir(folder))
            return reader.immutable, snapshot(reader), files_while_open

    return read


def _check_one_line_error(error: BaseException, path: Path, *phrases: str) -> None:
    message = str(error)
    assert isinstance(error, errors.DropClusterError)
    assert str(path) in message and "\n" not in message
    for phrase in phrases:
        assert phrase in message


def test_schema_version_error_is_the_one_of_dropcluster_errors(tmp_path):
    assert SchemaVersionError is errors.SchemaVersionError
    assert store_module.SchemaVersionError is errors.SchemaVersionError
    assert issubclass(SchemaVersionError, errors.DropClusterError)
    assert issubclass(SchemaVersionError, RuntimeError)
    assert issubclass(ResultsDatabaseError, errors.DropClusterError)
    assert issubclass(ResultsDatabaseError, ValueError)
    assert issubclass(ResultsStorageError, errors.DropClusterError)
    assert issubclass(ResultsStorageError, OSError)


def test_writer_close_checkpoints_the_wal_into_the_file(tmp_path):
    folder = tmp_path / "sweep"
    writer = ResultsStore.in_folder(folder)
    add(writer)
    finish(writer)
    expected = snapshot(writer)
    # A reader still has the database open, so SQLite's own last-close checkpoint does not
    # run: the writer's close has to merge the WAL itself.
    other = sqlite3.connect(writer.path)
    assert other.execute("SELECT COUNT(*) FROM runs").fetchone() == (1,)
    assert (folder / WAL).stat().st_size > 0
    writer.close()
    writer.close()  # a second close does nothing
    assert (folder / WAL).stat().st_size == 0
    # The database file alone holds every commit.
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(folder / DATABASE_NAME, alone / DATABASE_NAME)
    other.close()
    with ResultsStore.in_folder(alone, readonly=True) as reader:
        assert snapshot(reader) == expected
    # Once the last connection is closed, no -wal or -shm file is left next to the file.
    assert sorted(os.listdir(folder)) == [DATABASE_NAME]


@pytest.mark.parametrize("not_writable", ["folder", "file"])
def test_readonly_store_opens_immutable_where_it_cannot_write(tmp_path, monkeypatch, not_writable):
    expected = _finished_sweep(tmp_path / "sweep")
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "sweep", copy)
    assert sorted(os.listdir(copy)) == [DATABASE_NAME]
    with ResultsStore.in_folder(tmp_path / "sweep", readonly=True) as reader:
        assert reader.immutable is False  # a writable folder: read the normal way

    # Tests run as root, which can write anywhere: let os.access say what a read-only mount
    # would (access(2) reports EROFS there, even to root).
    denied = copy if not_writable == "folder" else copy / DATABASE_NAME
    access = os.access

    def fake_access(path, mode, **kwargs):
        if mode & os.W_OK and Path(path).resolve() == denied.resolve():
            return False
        return access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", fake_access)
    immutable, content, files_while_open = _reader_view(copy)()
    assert immutable is True
    assert content == expected
    assert files_while_open == [DATABASE_NAME]  # no -shm or -wal file was made
    assert sorted(os.listdir(copy)) == [DATABASE_NAME]
    with ResultsStore.in_folder(copy, readonly=True) as reader:
        assert len(reader.epochs()) == 3 * len(HISTORY)
        assert reader.counts()["finished"] == 3
        with pytest.raises(PermissionError, match="opened readonly"):
            reader.mark_running("run-0")


def test_readonly_store_reads_a_really_read_only_folder(shared_tmp):
    folder = shared_tmp / "sweep"
    expected = _finished_sweep(folder)
    assert _in_read_only_folder(folder, _reader_view(folder)) == (
        "ok",
        (True, expected, [DATABASE_NAME]),
    )

    # A writer cannot open it, and says why in one line.
    def write() -> None:
        with ResultsStore.in_folder(folder) as writer:
            writer.mark_running("run-0")

    kind, name, message = _in_read_only_folder(folder, write)
    assert (kind, name) == ("error", "ResultsStorageError")
    assert str(folder / DATABASE_NAME) in message and "\n" not in message
    assert "read-only" in message or "readable and writable" in message
    assert sorted(os.listdir(folder)) == [DATABASE_NAME]
    with ResultsStore.in_folder(folder, readonly=True) as reader:
        assert snapshot(reader) == expected
    # A reader in a writable folder leaves an empty -wal and a -shm file behind (a read-only
    # connection cannot remove them): the folder, made read-only after, still reads.
    assert sorted(os.listdir(folder)) == sorted([DATABASE_NAME, WAL, SHM])
    assert (folder / WAL).stat().st_size == 0
    outcome = _in_read_only_folder(folder, _reader_view(folder))
    assert outcome[0] == "ok" and outcome[1][1] == expected
    (folder / SHM).unlink()
    assert _in_read_only_folder(folder, _reader_view(folder)) == (
        "ok",
        (True, expected, sorted([DATABASE_NAME, WAL])),
    )


def test_read_only_folder_with_an_unmerged_wal(shared_tmp):
    # A writer that never closed (killed, or still running elsewhere): its last commits are in
    # the -wal file only, which immutable reading would miss.
    source = shared_tmp / "live"
    writer = ResultsStore.in_folder(source)
    add(writer, "a")
    finish(writer, "a")
    add(writer, "b", seed=1)
    expected = snapshot(writer)
    folder = shared_tmp / "copy"
    folder.mkdir()
    folder.chmod(0o755)
    for name in (DATABASE_NAME, WAL, SHM):
        shutil.copy(source / name, folder / name)
    writer.close()
    assert (folder / WAL).stat().st_size > 0

    # With the -shm file, the reader reads the WAL through it, writing nothing.
    outcome = _in_read_only_folder(folder, _reader_view(folder))
    assert outcome[0] == "ok", outcome
    immutable, content, files = outcome[1]
    assert immutable is False and content == expected
    assert [record.run_id for record in content[0]] == ["a", "b"]
    assert files == sorted([DATABASE_NAME, WAL, SHM])

    # Without it, reading needs a file SQLite cannot create: a clear error, not stale data.
    (folder / SHM).unlink()
    kind, name, message = _in_read_only_folder(folder, _reader_view(folder))
    assert (kind, name) == ("error", "ResultsStorageError")
    assert str(folder / DATABASE_NAME) in message and WAL in message and "\n" not in message
    assert "copy the sweep folder to a writable place" in message
    assert sorted(os.listdir(folder)) == [DATABASE_NAME, WAL]

    # An empty -wal file (a writer killed after its checkpoint) holds nothing: read immutably.
    (folder / WAL).unlink()
    _finished_sweep(shared_tmp / "done", runs=1)
    shutil.copy(shared_tmp / "done" / DATABASE_NAME, folder / DATABASE_NAME)
    (folder / WAL).touch()
    outcome = _in_read_only_folder(folder, _reader_view(folder))
    assert outcome[0] == "ok", outcome
    immutable, content, files = outcome[1]
    assert immutable is True and [record.run_id for record in content[0]] == ["run-0"]
    assert files == [DATABASE_NAME, WAL]


def _damaged_database(tmp_path: Path, where: str) -> Path:
    """A results database of many pages with garbage over some of them (never page 1)."""
    path = tmp_path / "sweep" / DATABASE_NAME
    history = [{**HISTORY[1], "epoch": epoch, "note": "x" * 60} for epoch in range(150)]
    with ResultsStore(path) as writer:
        for seed in range(4):
            add(writer, f"run-{seed}", seed=seed)
            writer.record_finished(
                f"run-{seed}", history=history, top1=1.0, top5=2.0, average_last=1, seconds=1.0
            )
    size = path.stat().st_size
    page_size = 4096
    assert size >= 20 * page_size
    start = page_size if where == "all pages but the first" else size - 3 * page_size
    with open(path, "r+b") as handle:
        handle.seek(start)
        handle.write(bytes(range(7, 256, 31)) * ((size - start) // 8 + 1))
    assert path.stat().st_size >= size
    return path


@pytest.mark.parametrize("readonly", [False, True])
@pytest.mark.parametrize("where", ["all pages but the first", "the last pages"])
def test_corrupted_pages_raise_a_clear_error(tmp_path, where, readonly):
    path = _damaged_database(tmp_path, where)
    # The damage shows when the file is opened, or at the first query that reads a bad page.
    with pytest.raises(ResultsDatabaseError) as raised:
        with ResultsStore(path, readonly=readonly) as store:
            snapshot(store)
            store.export_csv(tmp_path / "csv")
    assert isinstance(raised.value, ValueError)
    assert isinstance(raised.value.__cause__, sqlite3.DatabaseError)
    _check_one_line_error(raised.value, path, "is corrupted", "restore it from a copy")


def test_damaged_header_is_not_an_sqlite_database(tmp_path):
    path = tmp_path / DATABASE_NAME
    _finished_sweep(tmp_path, runs=1)
    with open(path, "r+b") as handle:
        handle.write(b"\0" * 100)
    for readonly in (False, True):
        with pytest.raises(ResultsDatabaseError, match="is not an SQLite database") as raised:
            ResultsStore(path, readonly=readonly)
        _check_one_line_error(raised.value, path)


def test_database_path_that_is_a_folder_is_refused(tmp_path):
    folder = tmp_path / "sweep"
    _finished_sweep(folder, runs=1)
    for readonly in (False, True):
        with pytest.raises(IsADirectoryError) as raised:
            ResultsStore(folder, readonly=readonly)
        message = str(raised.value)
        assert f"{folder} is a folder" in message and "ResultsStore.in_folder" in message
        assert "\n" not in message
    (tmp_path / "nested" / DATABASE_NAME).mkdir(parents=True)
    with pytest.raises(OSError, match="is a folder"):
        ResultsStore.in_folder(tmp_path / "nested")
    assert sorted(os.listdir(folder)) == [DATABASE_NAME]


def test_write_to_a_read_only_database_raises_a_clear_error(store):
    add(store)
    store.record_epochs("dc-p0.1-s0", HISTORY[:1])
    before = snapshot(store)
    # What a read-only file or folder does to a write, without needing one (tests run as root).
    store._connection.execute("PRAGMA query_only = 1")
    for write in (
        lambda: store.mark_running("dc-p0.1-s0"),
        lambda: store.record_epochs("dc-p0.1-s0", HISTORY),
        lambda: add(store, "other", seed=1),
    ):
        with pytest.raises(ResultsStorageError) as raised:
            write()
        assert isinstance(raised.value, OSError)
        assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
        _check_one_line_error(raised.value, store.path, "read-only", "writable output folder")
    assert snapshot(store) == before
    store._connection.execute("PRAGMA query_only = 0")
    store.mark_running("dc-p0.1-s0")
    assert store.run("dc-p0.1-s0").status == "running"


def test_full_disk_raises_a_clear_error_and_keeps_what_was_committed(store):
    add(store)
    store.record_epochs("dc-p0.1-s0", HISTORY)
    before = snapshot(store)
    # The database may not grow: what a full disk does to a write.
    pages = store._connection.execute("PRAGMA page_count").fetchone()[0]
    store._connection.execute(f"PRAGMA max_page_count = {pages}")
    big = [{**HISTORY[1], "epoch": epoch, "note": "y" * 500} for epoch in range(200)]
    with pytest.raises(ResultsStorageError) as raised:
        store.record_epochs("dc-p0.1-s0", big)
    _check_one_line_error(raised.value, store.path, "disk is full", "free some space")
    assert snapshot(store) == before  # the failed transaction was rolled back
    store._connection.execute("PRAGMA max_page_count = 1073741823")
    store.record_epochs("dc-p0.1-s0", big)
    assert len(store.epochs()) == len(big)


def test_sqlite_errors_that_are_not_about_the_file_pass_unchanged(store):
    add(store)
    other = sqlite3.connect(store.path)
    with other:
        other.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE ON runs BEGIN SELECT RAISE(ABORT, 'no'); END"
        )
    other.close()
    with pytest.raises(sqlite3.IntegrityError, match="no"):
        store.mark_running("dc-p0.1-s0")
    # The wrapper keeps the methods' names and documentation.
    assert ResultsStore.record_epochs.__name__ == "record_epochs"
    assert "epochs_done" in ResultsStore.record_epochs.__doc__
