"""The results database of an experiment sweep: one SQLite file in the sweep's output folder.

It holds the runs of the grid (their configs, status and final metrics), the per-epoch history,
the corruption results and the cluster statistics of every run. One process writes (the sweep's
parent); any number of readers (the report, the ``results`` command) may open the file at the
same time: the database is in WAL mode, so readers see the last committed state and never block
the writer. Every write is one transaction, so a crash never leaves a half-written run.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

# SchemaVersionError lives in dropcluster.errors; importing it from here keeps working.
from dropcluster.compat import refuse_0_1_run, variant_from_run_id
from dropcluster.errors import DropClusterError, SchemaVersionError
from dropcluster.experiments.presets import arm_name
from dropcluster.files import atomic_write_text
from dropcluster.validation import check_choice, check_float, check_int, check_type

__all__ = [
    "CLEAN",
    "CORRUPTION_SOURCES",
    "DATABASE_NAME",
    "EPOCH_METRICS",
    "FAILED",
    "FINISHED",
    "PENDING",
    "RUNNING",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "ResultsDatabaseError",
    "ResultsStorageError",
    "ResultsStore",
    "RunRecord",
    "UnreadableRunError",
]


#: Version of the tables below; a database from a newer version is refused.
SCHEMA_VERSION = 1
#: File name of the database in a sweep's output folder.
DATABASE_NAME = "results.sqlite"
PENDING = "pending"
RUNNING = "running"
FINISHED = "finished"
FAILED = "failed"
#: Life cycle of a run: pending -> running -> finished or failed (a failed run is retried).
RUN_STATUSES = (PENDING, RUNNING, FINISHED, FAILED)
#: Where corruption results come from: corruptions applied here, or the released files
#: (CIFAR-100-C, Tiny-ImageNet-C).
CORRUPTION_SOURCES = ("generated", "released")
#: The clean baseline's row in the corruption results.
CLEAN = "clean"

#: Per-epoch metrics with a column of their own; other keys of a history record go to ``extra``.
EPOCH_METRICS = ("loss", "train_top1", "top1", "top5", "lr", "seconds", "images_per_s")

_EPOCH_KEYS = frozenset(("epoch", *EPOCH_METRICS))

#: Seconds a connection waits for another one's lock before giving up.
_BUSY_TIMEOUT_S = 30.0
#: Milliseconds the writer's closing checkpoint waits for readers to leave the WAL; past that it
#: copies what it can without waiting (the WAL then stays until the last connection closes).
_CLOSE_CHECKPOINT_TIMEOUT_MS = 1000

# Primary SQLite result codes (an exception's ``sqlite_errorcode`` may be an extended code, whose
# low byte is the primary one).
_SQLITE_PERM = 3
_SQLITE_READONLY = 8
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_NOTADB = 26
#: SQLite's messages for these codes (Python < 3.11 gives no code with its exceptions).
_MESSAGE_CODES = (
    ("access permission denied", _SQLITE_PERM),
    ("readonly database", _SQLITE_READONLY),
    ("disk I/O error", _SQLITE_IOERR),
    ("malformed", _SQLITE_CORRUPT),
    ("database or disk is full", _SQLITE_FULL),
    ("unable to open database file", _SQLITE_CANTOPEN),
    ("file is not a database", _SQLITE_NOTADB),
)

_RUN_COLUMNS = (
    "run_id",
    "preset",
    "regularizer",
    "p",
    "seed",
    "train_fraction",
    "config",
    "status",
    "attempts",
    "error",
    "top1",
    "top5",
    "average_last",
    "epochs_done",
    "seconds",
    "updated_at",
)

_SCHEMA = f"""
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY,
    preset TEXT,
    regularizer TEXT NOT NULL,
    p REAL NOT NULL,
    seed INTEGER NOT NULL,
    train_fraction REAL NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN {RUN_STATUSES}),
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    top1 REAL,
    top5 REAL,
    average_last INTEGER,
    epochs_done INTEGER NOT NULL DEFAULT 0,
    seconds REAL,
    updated_at REAL NOT NULL
);
CREATE TABLE epochs (
    run_id TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,
    {", ".join(f"{name} REAL" for name in EPOCH_METRICS)},
    extra TEXT,
    PRIMARY KEY (run_id, epoch)
);
CREATE TABLE corruptions (
    run_id TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    corruption TEXT NOT NULL,
    severity INTEGER NOT NULL,
    top1 REAL,
    top5 REAL,
    source TEXT NOT NULL CHECK (source IN {CORRUPTION_SOURCES}),
    PRIMARY KEY (run_id, corruption, severity)
);
CREATE TABLE clusters (
    run_id TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,
    layer TEXT NOT NULL,
    channels INTEGER NOT NULL,
    structured INTEGER NOT NULL,
    refit_seconds REAL,
    PRIMARY KEY (run_id, epoch, layer)
);
"""


class ResultsDatabaseError(DropClusterError, ValueError):
    """The file is not a results database, or it is corrupted (restore it, or re-collect)."""


class UnreadableRunError(ResultsDatabaseError):
    """A row of the runs table holds a value of the wrong type (a hand-edited database, or one
    written by a version that did not check what it stored): ``dropcluster collect`` repairs
    the database from the run folders."""


class ResultsStorageError(DropClusterError, OSError):
    """The results database cannot be read or written where it lies: a read-only folder or
    file, a full disk, an I/O error."""


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _database_errors(*, writing: bool) -> Callable[[_Method], _Method]:
    """Decorate a store method: SQLite errors caused by the file or the disk (corrupted pages,
    a read-only folder, a full disk, ...) become one-line :class:`ResultsDatabaseError` and
    :class:`ResultsStorageError`; any other exception passes unchanged. Costs one function call
    when nothing fails (the sweep writes epochs often).
    """

    def decorate(method: _Method) -> _Method:
        @functools.wraps(method)
        def converting(self: ResultsStore, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except sqlite3.DatabaseError as error:
                converted = _converted_error(self.path, error, writing=writing)
                if converted is None:
                    raise
                raise converted from error

        return converting  # type: ignore[return-value]

    return decorate


def _primary_code(error: sqlite3.Error) -> int | None:
    """The primary SQLite result code of ``error`` (None when it has none).

    Python 3.11+ gives the code; before, it is read from SQLite's message.
    """
    code = getattr(error, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF
    message = str(error)
    for text, primary in _MESSAGE_CODES:
        if text in message:
            return primary
    return None


def _converted_error(
    path: Path, error: sqlite3.DatabaseError, *, writing: bool, opening: bool = False
) -> DropClusterError | None:
    """The one-line error for ``error`` met on the database ``path``; None for an error that is
    not about the file or the disk (a constraint, a lock, ...), unless ``opening``: then every
    error is the file's."""
    code = _primary_code(error)
    if code == _SQLITE_NOTADB and opening:
        return ResultsDatabaseError(
            f"{path} is not an SQLite database ({error}); results databases are the "
            f"{DATABASE_NAME} files a sweep writes"
        )
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return ResultsDatabaseError(
            f"results database {path} is corrupted ({error}): restore it from a copy, or move "
            f"it aside and run the sweep again, which rebuilds it from the run folders without "
            f"training finished runs again"
        )
    if code == _SQLITE_READONLY:
        if writing:
            return ResultsStorageError(
                f"cannot write results database {path} ({error}): the file or its folder is "
                f"read-only; make both writable, or sweep into a writable output folder"
            )
        return ResultsStorageError(
            f"cannot read results database {path} ({error}): SQLite has to write a -shm file "
            f"next to it and its folder is read-only; copy the sweep folder to a writable place "
            f"and read the copy"
        )
    if code == _SQLITE_FULL:
        return ResultsStorageError(
            f"cannot write results database {path}: the disk is full ({error}); free some "
            f"space and run again (what was committed before is kept)"
        )
    if code == _SQLITE_IOERR:
        return ResultsStorageError(
            f"disk I/O error on results database {path} ({error}): check the disk and its free "
            f"space, then run again"
        )
    if code in (_SQLITE_CANTOPEN, _SQLITE_PERM):
        need = "readable and writable" if writing else "readable"
        return ResultsStorageError(
            f"cannot open results database {path} ({error}): the file and its folder have to "
            f"be {need}"
        )
    if opening:
        return ResultsDatabaseError(f"cannot read {path} as a results database ({error})")
    return None


@dataclass(frozen=True)
class RunRecord:
    """One run of the sweep as stored: its identity, config, status and final metrics.

    Attributes:
        run_id: unique name of the run in the sweep.
        preset: the preset the run belongs to (None: a run not made from a preset).
        regularizer, p, seed, train_fraction: the grid coordinates of the run.
        config: the run's ``TrainConfig`` as a dict.
        status: one of :data:`RUN_STATUSES`.
        attempts: how many times the run was started.
        error: the error text of the last failed attempt (None unless failed).
        top1, top5: final metrics in percent (mean over the last ``average_last`` epochs).
        average_last: number of epochs the final metrics average over.
        epochs_done: number of epochs recorded.
        seconds: wall time of the finished attempt, from its start (or its submission to a
            cluster) to its end; None when the run was recorded from its folder.
        updated_at: ``time.time()`` of the last change.
    """

    run_id: str
    preset: str | None
    regularizer: str
    p: float
    seed: int
    train_fraction: float
    config: dict
    status: str
    attempts: int
    error: str | None
    top1: float | None
    top5: float | None
    average_last: int | None
    epochs_done: int
    seconds: float | None
    updated_at: float

    @property
    def arm(self) -> str:
        """What a report compares this run under: ``"dropcluster"``, or ``"dropcluster:ours"``
        for a run of variant "ours" (see :func:`dropcluster.experiments.presets.arm_name`).

        The variant is the config's ``variant``; a config without that key (a run stored by a
        version without variants, or a hand-made record) takes it from a run id of the form
        :func:`dropcluster.experiments.presets.run_id` makes, ``dropcluster-ours-p0.1-f1-s0``;
        any other id means no variant.
        """
        if "variant" in self.config:
            return arm_name(self.regularizer, self.config["variant"])
        variant = variant_from_run_id(
            self.run_id, self.regularizer, self.p, self.train_fraction, self.seed
        )
        return arm_name(self.regularizer, variant)


class ResultsStore:
    """The results database of one sweep (see the module docstring).

    A read-only store (``readonly=True``) of a file whose folder, or the file itself, it cannot
    write (a read-only mount, an archived copy) opens the file as *immutable*: SQLite reads it
    as it is, without the ``-shm`` file WAL mode otherwise needs, and creates nothing next to
    it. Immutable reading would ignore a ``-wal`` file, so when there is one (a writer has the
    database open, or was killed before closing it) the store reads through the ``-shm`` file
    instead, and says what to do when that is not possible either (copy the folder). A store
    that can write next to the file opens it read-only the normal way and sees every commit of
    a writer as it is made.

    Args:
        path: the SQLite file; created, with its parent folder and the tables, when missing.
        readonly: open for reading only (the report and the ``results`` command); the file has
            to exist.

    Attributes:
        immutable: the file was opened as immutable (see above).

    Raises:
        FileNotFoundError: ``readonly`` and there is no file at ``path``.
        IsADirectoryError: ``path`` is a folder.
        ResultsDatabaseError: ``path`` is not an SQLite database, not a results database, or is
            corrupted (also from any method that meets corrupted pages later); a ``ValueError``.
        ResultsStorageError: the file cannot be opened, read or written where it lies: a
            read-only folder or file, a full disk, an I/O error (also from any method that
            meets one later); an ``OSError``.
        SchemaVersionError: the database comes from a newer dropcluster.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = bool(readonly)
        self.immutable = False
        self._closed = False
        if self.path.is_dir():
            raise IsADirectoryError(
                f"results database path {self.path} is a folder; pass the file, or use "
                f"ResultsStore.in_folder({str(self.path)!r})"
            )
        if self.readonly:
            if not self.path.is_file():
                raise FileNotFoundError(
                    f"no results database at {self.path} (a sweep creates {DATABASE_NAME} in "
                    f"its output folder)"
                )
            connect = self._connect_readonly
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connect = self._connect_writer
        try:
            connection = connect()
        except sqlite3.DatabaseError as error:
            raise self._opening_error(error) from error
        # Transactions are opened explicitly (BEGIN IMMEDIATE for writes), never implicitly.
        connection.isolation_level = None
        connection.row_factory = sqlite3.Row
        self._connection = connection
        try:
            self._open()
        except sqlite3.DatabaseError as error:
            connection.close()
            raise self._opening_error(error) from error
        except BaseException:
            connection.close()
            raise

    @classmethod
    def in_folder(cls, out_dir: str | Path, *, readonly: bool = False) -> ResultsStore:
        """The store of the sweep whose output folder is ``out_dir``: ``out_dir/results.sqlite``."""
        return cls(Path(out_dir) / DATABASE_NAME, readonly=readonly)

    def _connect_writer(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S)

    def _connect_readonly(self) -> sqlite3.Connection:
        """A read-only connection: immutable where nothing can be written next to the file."""
        uri = self.path.resolve().as_uri()
        if os.access(self.path.parent, os.W_OK) and os.access(self.path, os.W_OK):
            return sqlite3.connect(uri + "?mode=ro", uri=True, timeout=_BUSY_TIMEOUT_S)
        wal = self.path.with_name(self.path.name + "-wal")
        try:
            wal_size: int | None = wal.stat().st_size
        except FileNotFoundError:
            wal_size = None
        if wal_size is None:
            # No -wal file: no connection has the database open, and all of it is in the file.
            self.immutable = True
            return sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True)
        # A -wal file: a writer has the database open, or was killed before closing it, and
        # the WAL may hold commits the file lacks, which immutable reading would ignore. SQLite
        # reads them through an existing -shm file, even a read-only one.
        connection = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=_BUSY_TIMEOUT_S)
        try:
            connection.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as error:
            connection.close()
            if _primary_code(error) not in (_SQLITE_CANTOPEN, _SQLITE_READONLY, _SQLITE_PERM):
                raise
            if wal_size == 0:  # an empty WAL: the file holds everything
                self.immutable = True
                return sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True)
            raise ResultsStorageError(
                f"cannot read results database {self.path}: its folder is read-only and "
                f"{wal.name} holds commits not yet merged into it (its writer did not close "
                f"it), which SQLite can read only with a {self.path.name}-shm file next to it; "
                f"copy the sweep folder to a writable place and read the copy"
            ) from error
        return connection

    def _opening_error(self, error: sqlite3.DatabaseError) -> DropClusterError:
        converted = _converted_error(self.path, error, writing=not self.readonly, opening=True)
        assert converted is not None  # opening=True converts every error
        return converted

    def _open(self) -> None:
        """Check the file is a results database of a version we read; create the tables if new.

        SQLite errors (not a database, corrupted, unreadable) propagate; ``__init__`` converts
        them."""
        connection = self._connection
        tables = {
            row["name"]
            for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        if not tables and not self.readonly:
            self._create_schema()
            return
        if "meta" not in tables:
            raise ResultsDatabaseError(
                f"{self.path} is an SQLite database but not a dropcluster results database "
                f"(it has no meta table; tables found: {sorted(tables)})"
            )
        row = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        try:
            version = int(row["value"]) if row is not None else None
        except ValueError:
            version = None
        if version is None or version < 1:
            raise ResultsDatabaseError(
                f"{self.path} has no valid schema version in its meta table (expected an "
                f"integer >= 1, got {None if row is None else row['value']!r})"
            )
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"database {self.path} has schema version {version}, this dropcluster reads up "
                f"to {SCHEMA_VERSION}: upgrade dropcluster (git pull, then make venv)"
            )
        connection.execute("PRAGMA foreign_keys = ON")
        if not self.readonly:
            # WAL lets readers open the file while the sweep writes; it is stored in the file,
            # so only the writer needs to set it.
            connection.execute("PRAGMA journal_mode = WAL")

    def _create_schema(self) -> None:
        connection = self._connection
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA foreign_keys = ON")
        with self._write() as cursor:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    cursor.execute(statement)
            cursor.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )

    # -- connection ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (a second call does nothing).

        The writer first checkpoints the WAL into the database file and empties the ``-wal``
        file (``PRAGMA wal_checkpoint(TRUNCATE)``), so the file holds every commit on its own
        even while a reader still has the database open (when the last connection closes,
        SQLite also removes the ``-wal`` and ``-shm`` files). The checkpoint waits at most
        about a second for readers; what it cannot copy stays, committed, in the WAL.
        """
        if self._closed:
            return
        self._closed = True
        connection = self._connection
        try:
            if not self.readonly:
                connection.execute(f"PRAGMA busy_timeout = {_CLOSE_CHECKPOINT_TIMEOUT_MS}")
                connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error:
            pass  # e.g. a full disk: every commit is still in the WAL, merged by a later close
        finally:
            connection.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={str(self.path)!r}, readonly={self.readonly})"

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed when the block ends, rolled back on any error."""
        if self.readonly:
            raise PermissionError(f"results database {self.path} was opened readonly")
        connection = self._connection
        # `with connection` commits on success and rolls back on an exception; IMMEDIATE takes
        # the write lock at once, so the transaction cannot fail half-way on a busy database.
        with connection:
            connection.execute("BEGIN IMMEDIATE")
            yield connection

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every query in the block sees the same committed state."""
        connection = self._connection
        with connection:
            connection.execute("BEGIN")
            yield connection

    # -- runs ---------------------------------------------------------------------------------

    @_database_errors(writing=True)
    def add_run(
        self,
        run_id: str,
        config: dict,
        *,
        preset: str | None,
        regularizer: str,
        p: float,
        seed: int,
        train_fraction: float,
    ) -> bool:
        """Add a run of the grid as pending, unless it is there already.

        Args:
            run_id: unique name of the run.
            config: the run's ``TrainConfig`` as a dict (JSON-serialisable).
            preset, regularizer, p, seed, train_fraction: see :class:`RunRecord`.

        Returns:
            True if the run was added; False if it existed (its status and results are kept).

        Raises:
            ValueError: a value of the wrong type, or the run exists with a different config or
                grid coordinates (the grid changed under an existing run id); the message lists
                what differs.
        """
        check_type("run_id", run_id, str)
        check_type("preset", preset, str | None)
        check_type("regularizer", regularizer, str)
        check_float("p", p)
        check_int("seed", seed)
        check_float("train_fraction", train_fraction)
        check_type("config", config, dict)
        config_text = _json_text(config)
        new = {
            "preset": preset,
            "regularizer": regularizer,
            "p": p,
            "seed": seed,
            "train_fraction": train_fraction,
        }
        with self._write() as connection:
            row = connection.execute(
                "SELECT preset, regularizer, p, seed, train_fraction, config FROM runs "
                "WHERE run_id = ?",
                (run_id,),
            ).fetchone()
            if row is None:
                connection.execute(
                    "INSERT INTO runs (run_id, preset, regularizer, p, seed, train_fraction, "
                    "config, status, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        run_id,
                        preset,
                        regularizer,
                        p,
                        seed,
                        train_fraction,
                        config_text,
                        PENDING,
                        time.time(),
                    ),
                )
                return True
            try:
                _run_record(
                    connection.execute(
                        f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs WHERE run_id = ?", (run_id,)
                    ).fetchone()
                )
            except UnreadableRunError as error:
                raise ValueError(
                    f"{self.path}: {error}: `dropcluster collect {self.path.parent}` repairs "
                    f"the database from the run folders"
                ) from None
            stored, given = json.loads(row["config"]), json.loads(config_text)
            if "variant" not in stored and "variant" in given:
                # Recorded before configs kept their variant: it is the one in the run id.
                stored["variant"] = variant_from_run_id(
                    run_id, regularizer, p, train_fraction, seed
                )
            if "weight_decay_on" in given:
                refuse_0_1_run(self.path, run_id, stored)
            differences = _differences(
                {**{key: row[key] for key in new}, **_prefixed(stored)},
                {**new, **_prefixed(json.loads(config_text))},
            )
            if differences:
                raise ValueError(
                    f"run {run_id!r} is already in {self.path} with a different setup "
                    f"({'; '.join(differences)}): the grid changed under an existing run id; "
                    f"give the changed runs new ids or sweep into a new output folder"
                )
            return False

    @_database_errors(writing=True)
    def delete_run(self, run_id: str) -> bool:
        """Remove a run and all its rows (epochs, corruptions, clusters) in one transaction.

        Returns:
            True if there was such a run.
        """
        with self._write() as connection:
            cursor = connection.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
            return cursor.rowcount > 0

    @_database_errors(writing=True)
    def mark_running(self, run_id: str) -> None:
        """Mark a run as started: status running, one more attempt, no error."""
        with self._write() as connection:
            self._update_run(
                connection, run_id, "status = ?, attempts = attempts + 1, error = NULL", (RUNNING,)
            )

    @_database_errors(writing=True)
    def mark_failed(self, run_id: str, error: str) -> None:
        """Mark a run as failed and keep the error text (e.g. the traceback's last lines)."""
        with self._write() as connection:
            self._update_run(connection, run_id, "status = ?, error = ?", (FAILED, error))

    @_database_errors(writing=True)
    def reset_interrupted(self) -> list[str]:
        """Set every running run back to pending (the sweep was killed mid-way).

        Returns:
            The ids of the runs that were reset, sorted.
        """
        with self._write() as connection:
            run_ids = [
                row["run_id"]
                for row in connection.execute(
                    "SELECT run_id FROM runs WHERE status = ? ORDER BY run_id", (RUNNING,)
                )
            ]
            connection.execute(
                "UPDATE runs SET status = ?, updated_at = ? WHERE status = ?",
                (PENDING, time.time(), RUNNING),
            )
        return run_ids

    @_database_errors(writing=True)
    def record_epochs(self, run_id: str, history: Sequence[dict]) -> None:
        """Replace a run's per-epoch rows with ``history`` and set its ``epochs_done``.

        Args:
            run_id: the run.
            history: one dict per epoch with an int ``epoch`` and any of :data:`EPOCH_METRICS`;
                other keys (``structured``, ``channels``, ``refit_seconds``, ...) are kept as
                JSON and come back from :meth:`epochs`.
        """
        epoch_rows = _epoch_rows(run_id, history)
        with self._write() as connection:
            self._require_run(connection, run_id)
            _replace_epochs(connection, run_id, epoch_rows)
            self._update_run(connection, run_id, "epochs_done = ?", (len(epoch_rows),))

    @_database_errors(writing=True)
    def record_finished(
        self,
        run_id: str,
        *,
        history: Sequence[dict],
        top1: float,
        top5: float,
        average_last: int,
        seconds: float | None,
        corruptions: Sequence[dict] | None = None,
        clusters: Sequence[dict] | None = None,
    ) -> None:
        """Store a finished run in one transaction: all of it lands, or none of it.

        The epoch rows are replaced by ``history``; the corruption and cluster rows by
        ``corruptions`` and ``clusters`` when given (None keeps the rows already there); the
        final metrics are set, the status becomes finished and the error is cleared.

        Args:
            run_id: the run.
            history: as in :meth:`record_epochs`.
            top1, top5: final metrics in percent.
            average_last: number of epochs the final metrics average over.
            seconds: wall time of the finished attempt (None: unknown, e.g. a run recorded
                from its folder by ``dropcluster collect``).
            corruptions: rows as in :meth:`record_corruptions`; a row's ``source`` key, if
                any, says where it comes from (default "generated").
            clusters: rows as in :meth:`record_clusters`.
        """
        epoch_rows = _epoch_rows(run_id, history)
        corruption_rows = None
        if corruptions is not None:
            corruption_rows = _corruption_rows(run_id, corruptions, "generated")
        cluster_rows = None if clusters is None else _cluster_rows(run_id, clusters)
        with self._write() as connection:
            self._require_run(connection, run_id)
            _replace_epochs(connection, run_id, epoch_rows)
            if corruption_rows is not None:
                connection.execute("DELETE FROM corruptions WHERE run_id = ?", (run_id,))
                _upsert_corruptions(connection, corruption_rows)
            if cluster_rows is not None:
                connection.execute("DELETE FROM clusters WHERE run_id = ?", (run_id,))
                _upsert_clusters(connection, cluster_rows)
            self._update_run(
                connection,
                run_id,
                "status = ?, error = NULL, top1 = ?, top5 = ?, average_last = ?, seconds = ?, "
                "epochs_done = ?",
                (FINISHED, _metric(top1), _metric(top5), average_last, seconds, len(epoch_rows)),
            )

    @_database_errors(writing=True)
    def record_corruptions(
        self, run_id: str, rows: Sequence[dict], *, source: str = "generated", replace: bool = False
    ) -> None:
        """Store a run's corruption results; rows replace those of the same corruption and severity.

        With ``replace=True`` the run's previous corruption rows are all deleted first (in the
        same transaction): the stored rows are then exactly ``rows``, one evaluation's settings.

        Args:
            run_id: the run.
            rows: dicts ``{"corruption": str, "severity": int, "top1": float, "top5": float}``;
                the clean baseline is corruption "clean" with severity 0, the corruptions have
                severities >= 1.
            source: "generated" (corruptions applied here) or "released" (the CIFAR-100-C /
                Tiny-ImageNet-C files); a row's own ``source`` key takes precedence.
        """
        corruption_rows = _corruption_rows(run_id, rows, source)
        with self._write() as connection:
            self._require_run(connection, run_id)
            if replace:
                connection.execute("DELETE FROM corruptions WHERE run_id = ?", (run_id,))
            _upsert_corruptions(connection, corruption_rows)

    @_database_errors(writing=True)
    def record_clusters(self, run_id: str, rows: Sequence[dict]) -> None:
        """Store a run's cluster statistics; rows replace those of the same epoch and layer.

        Args:
            run_id: the run.
            rows: dicts ``{"epoch": int, "layer": str, "channels": int, "structured": int,
                "refit_seconds": float | None}``: at the refit of ``epoch``, ``structured`` of
                the layer's ``channels`` channels were found structured.
        """
        cluster_rows = _cluster_rows(run_id, rows)
        with self._write() as connection:
            self._require_run(connection, run_id)
            _upsert_clusters(connection, cluster_rows)

    def _require_run(self, connection: sqlite3.Connection, run_id: str) -> None:
        if connection.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
            raise KeyError(f"no run {run_id!r} in {self.path} (add it with add_run first)")

    def _update_run(
        self,
        connection: sqlite3.Connection,
        run_id: str,
        assignments: str,
        parameters: tuple = (),
    ) -> None:
        cursor = connection.execute(
            f"UPDATE runs SET {assignments}, updated_at = ? WHERE run_id = ?",
            (*parameters, time.time(), run_id),
        )
        if cursor.rowcount == 0:
            raise KeyError(f"no run {run_id!r} in {self.path} (add it with add_run first)")

    # -- reading ------------------------------------------------------------------------------

    @_database_errors(writing=False)
    def run(self, run_id: str) -> RunRecord:
        """The stored state of one run.

        Raises:
            KeyError: there is no such run.
            UnreadableRunError: its row holds a value of the wrong type (see
                :meth:`unreadable_runs`).
        """
        row = self._connection.execute(
            f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        if row is None:
            raise KeyError(f"no run {run_id!r} in {self.path}")
        return _run_record(row)

    @_database_errors(writing=False)
    def runs(self, *, status: str | None = None, preset: str | None = None) -> list[RunRecord]:
        """The runs, optionally of one status and/or preset.

        Ordered by regularizer, p, train_fraction (largest first), seed.
        """
        if status is not None:
            check_choice("status", status, RUN_STATUSES)
        conditions, parameters = [], []
        if status is not None:
            conditions.append("status = ?")
            parameters.append(status)
        if preset is not None:
            conditions.append("preset = ?")
            parameters.append(preset)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = self._connection.execute(
            f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs {where} "
            "ORDER BY regularizer, p, train_fraction DESC, seed, run_id",
            parameters,
        )
        records = []
        for row in rows:
            try:
                records.append(_run_record(row))
            except UnreadableRunError:
                continue  # listed by unreadable_runs()
        return records

    @_database_errors(writing=False)
    def unreadable_runs(self, *, preset: str | None = None) -> dict[str, str]:
        """The rows of the runs table that :meth:`runs` leaves out because a value has the
        wrong type (a text where a number belongs, a config that is not a JSON object), by run
        id, with the reason. ``dropcluster collect`` repairs them; reports name them.

        Args:
            preset: only rows of this preset (rows whose preset cannot be read are always
                included).
        """
        unreadable = {}
        for row in self._connection.execute(f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs"):
            if (
                preset is not None
                and row["preset"] != preset
                and (row["preset"] is None or isinstance(row["preset"], str))
            ):
                continue  # another preset's row (one whose preset is unreadable is listed)
            try:
                _run_record(row)
            except UnreadableRunError as error:
                unreadable[str(row["run_id"])] = str(error)
        return unreadable

    @_database_errors(writing=False)
    def epochs(self, run_id: str | None = None) -> list[dict]:
        """Per-epoch rows, of one run or all, ordered by run id and epoch.

        Returns:
            Dicts ``{"run_id", "epoch", *EPOCH_METRICS, **extra}``; missing metrics are None.
        """
        return self._epochs(self._connection, run_id)

    @_database_errors(writing=False)
    def corruption_results(self, run_id: str | None = None) -> list[dict]:
        """Corruption results, of one run or all: the clean baseline first, then by name and
        severity.

        Returns:
            Dicts ``{"run_id", "corruption", "severity", "top1", "top5", "source"}``.
        """
        return self._corruption_results(self._connection, run_id)

    @_database_errors(writing=False)
    def cluster_stats(self, run_id: str | None = None) -> list[dict]:
        """Cluster statistics, of one run or all, by run id, epoch and the order recorded.

        Returns:
            Dicts ``{"run_id", "epoch", "layer", "channels", "structured", "refit_seconds"}``.
        """
        return self._cluster_stats(self._connection, run_id)

    @_database_errors(writing=False)
    def counts(self) -> dict[str, int]:
        """Number of runs per status (every status, zeros included)."""
        counts = dict.fromkeys(RUN_STATUSES, 0)
        for row in self._connection.execute(
            "SELECT status, COUNT(*) AS n FROM runs GROUP BY status"
        ):
            counts[row["status"]] = row["n"]
        return counts

    def _epochs(self, connection: sqlite3.Connection, run_id: str | None) -> list[dict]:
        where, parameters = _run_filter(run_id)
        rows = connection.execute(
            f"SELECT run_id, epoch, {', '.join(EPOCH_METRICS)}, extra FROM epochs {where} "
            "ORDER BY run_id, epoch",
            parameters,
        )
        records = []
        for row in rows:
            record = {key: row[key] for key in ("run_id", "epoch", *EPOCH_METRICS)}
            if row["extra"] is not None:
                record.update(json.loads(row["extra"]))
            records.append(record)
        return records

    def _corruption_results(self, connection: sqlite3.Connection, run_id: str | None) -> list[dict]:
        where, parameters = _run_filter(run_id)
        rows = connection.execute(
            "SELECT run_id, corruption, severity, top1, top5, source FROM corruptions "
            f"{where} ORDER BY run_id, corruption != '{CLEAN}', corruption, severity",
            parameters,
        )
        return [dict(row) for row in rows]

    def _cluster_stats(self, connection: sqlite3.Connection, run_id: str | None) -> list[dict]:
        where, parameters = _run_filter(run_id)
        # rowid keeps the layers in the order they were recorded (network depth), which sorting
        # by name would not ("layer10" < "layer2").
        rows = connection.execute(
            "SELECT run_id, epoch, layer, channels, structured, refit_seconds FROM clusters "
            f"{where} ORDER BY run_id, epoch, rowid",
            parameters,
        )
        return [dict(row) for row in rows]

    # -- export -------------------------------------------------------------------------------

    @_database_errors(writing=False)
    def export_csv(self, out_dir: str | Path) -> list[Path]:
        """Write the database as CSV files, each atomically (temporary file, then rename).

        Files: ``runs.csv`` (the run columns, then the config's keys as ``config.<key>``),
        ``epochs.csv`` (extra keys as columns), ``corruptions.csv`` and ``clusters.csv``. All
        four come from one consistent snapshot. Values that are not strings, numbers or None
        (lists, dicts, booleans) are written as JSON; None is an empty field.

        Returns:
            The paths written, in the order above.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with self._snapshot() as connection:
            run_rows = connection.execute(
                f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs "
                "ORDER BY regularizer, p, train_fraction DESC, seed, run_id"
            ).fetchall()
            epoch_rows = self._epochs(connection, None)
            corruption_rows = self._corruption_results(connection, None)
            cluster_rows = self._cluster_stats(connection, None)

        run_columns = [name for name in _RUN_COLUMNS if name != "config"]
        configs = [json.loads(row["config"]) for row in run_rows]
        config_keys = sorted({key for config in configs for key in config})
        runs_table = [
            {
                **{name: row[name] for name in run_columns},
                **{f"config.{key}": config.get(key) for key in config_keys},
            }
            for row, config in zip(run_rows, configs, strict=True)
        ]
        epoch_columns = ["run_id", "epoch", *EPOCH_METRICS]
        extra_keys = sorted({key for row in epoch_rows for key in row} - set(epoch_columns))
        tables = (
            ("runs.csv", run_columns + [f"config.{key}" for key in config_keys], runs_table),
            ("epochs.csv", epoch_columns + extra_keys, epoch_rows),
            (
                "corruptions.csv",
                ["run_id", "corruption", "severity", "top1", "top5", "source"],
                corruption_rows,
            ),
            (
                "clusters.csv",
                ["run_id", "epoch", "layer", "channels", "structured", "refit_seconds"],
                cluster_rows,
            ),
        )
        paths = []
        for name, columns, rows in tables:
            path = out_dir / name
            _write_csv_atomically(path, columns, rows)
            paths.append(path)
        return paths


# -- conversion ---------------------------------------------------------------------------------
# The rows come from this package's sweep (a run's log and result files): they are converted,
# not checked; the tables' constraints (keys, NOT NULL, CHECK) refuse what cannot be stored.


def _metric(value: Any) -> float | None:
    """A metric as stored: a float, or None for a missing value or NaN (SQLite has no NaN)."""
    if value is None:
        return None
    number = float(value)  # also takes numpy scalars and 0-d tensors
    return None if math.isnan(number) else number


def _plain(value: Any) -> Any:
    """``value`` as plain JSON data: tuples become lists, NaN becomes None, numpy and torch
    values become Python numbers and lists."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())
    return value


def _json_text(value: Any) -> str:
    return json.dumps(_plain(value), sort_keys=True)


def _prefixed(config: dict) -> dict:
    return {f"config.{key}": value for key, value in config.items()}


def _differences(stored: dict, given: dict) -> list[str]:
    """'key: stored -> given' for every key whose value differs (missing keys shown as such)."""
    missing = object()
    differences = []
    for key in sorted(stored.keys() | given.keys()):
        old, new = stored.get(key, missing), given.get(key, missing)
        if old != new:
            old_text = "(absent)" if old is missing else repr(old)
            new_text = "(absent)" if new is missing else repr(new)
            differences.append(f"{key}: {old_text} -> {new_text}")
    return differences


def _epoch_rows(run_id: str, history: Sequence[dict]) -> list[tuple]:
    rows = []
    for record in history:
        metrics = [_metric(record.get(name)) for name in EPOCH_METRICS]
        extra = {key: value for key, value in record.items() if key not in _EPOCH_KEYS}
        rows.append((run_id, record.get("epoch"), *metrics, _json_text(extra) if extra else None))
    return rows


def _corruption_rows(run_id: str, rows: Sequence[dict], source: str) -> list[tuple]:
    return [
        (
            run_id,
            row["corruption"],
            row["severity"],
            _metric(row["top1"]),
            _metric(row["top5"]),
            row.get("source", source),
        )
        for row in rows
    ]


def _cluster_rows(run_id: str, rows: Sequence[dict]) -> list[tuple]:
    return [
        (
            run_id,
            row["epoch"],
            row["layer"],
            row["channels"],
            row["structured"],
            _metric(row.get("refit_seconds")),
        )
        for row in rows
    ]


# -- writing rows (inside a transaction) -------------------------------------------------------


def _replace_epochs(connection: sqlite3.Connection, run_id: str, rows: list[tuple]) -> None:
    connection.execute("DELETE FROM epochs WHERE run_id = ?", (run_id,))
    placeholders = ", ".join("?" * (len(EPOCH_METRICS) + 3))
    connection.executemany(
        f"INSERT INTO epochs (run_id, epoch, {', '.join(EPOCH_METRICS)}, extra) "
        f"VALUES ({placeholders})",
        rows,
    )


def _upsert_corruptions(connection: sqlite3.Connection, rows: list[tuple]) -> None:
    connection.executemany(
        "INSERT INTO corruptions (run_id, corruption, severity, top1, top5, source) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, corruption, severity) DO UPDATE SET "
        "top1 = excluded.top1, top5 = excluded.top5, source = excluded.source",
        rows,
    )


def _upsert_clusters(connection: sqlite3.Connection, rows: list[tuple]) -> None:
    # An update in place (not INSERT OR REPLACE) keeps the row's rowid, hence its layer order.
    connection.executemany(
        "INSERT INTO clusters (run_id, epoch, layer, channels, structured, refit_seconds) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, epoch, layer) DO UPDATE SET "
        "channels = excluded.channels, structured = excluded.structured, "
        "refit_seconds = excluded.refit_seconds",
        rows,
    )


# -- reading rows ------------------------------------------------------------------------------


def _run_filter(run_id: str | None) -> tuple[str, tuple]:
    if run_id is None:
        return "", ()
    return "WHERE run_id = ?", (run_id,)


#: The Python type of each run column, as a row must hold it to become a RunRecord (SQLite
#: stores a value of another type where it was given one: a text in a REAL column stays text).
_RUN_COLUMN_TYPES: dict[str, Any] = {
    "run_id": str,
    "preset": str | None,
    "regularizer": str,
    "p": float,
    "seed": int,
    "train_fraction": float,
    "status": str,
    "attempts": int,
    "error": str | None,
    "top1": float | None,
    "top5": float | None,
    "average_last": int | None,
    "epochs_done": int,
    "seconds": float | None,
    "updated_at": float,
}


def _run_record(row: sqlite3.Row) -> RunRecord:
    """A row of the runs table as a RunRecord (UnreadableRunError: a value of the wrong type)."""
    values = {name: row[name] for name in _RUN_COLUMNS}
    for name, hint in _RUN_COLUMN_TYPES.items():
        value = values[name]
        if isinstance(value, float) and math.isnan(value) and hint is not float:
            continue  # a metric SQLite reads back as NaN is as good as None
        try:
            check_type(name, value, hint)
        except ValueError as error:
            raise UnreadableRunError(f"run {values['run_id']!r}: {error}") from None
    try:
        values["config"] = json.loads(values["config"])
    except (TypeError, ValueError):
        values["config"] = None
    if not isinstance(values["config"], dict):
        raise UnreadableRunError(f"run {values['run_id']!r}: its config is not a JSON object")
    return RunRecord(**values)


def _csv_field(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return json.dumps(value, sort_keys=True)


def _write_csv_atomically(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Write a CSV file next to ``path`` and rename it over ``path`` (readers never see half)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({column: _csv_field(row.get(column)) for column in columns})
    atomic_write_text(path, text.getvalue())
