"""Crash-safe file writes and per-folder locks, shared by everything that writes results.

A file is replaced atomically: written to a temporary file in the same folder, flushed to disk,
then renamed over the target. A crash, a full disk or a read-only folder at any moment leaves
either the old file or the new one, never a partial one, and no temporary file behind. A Ctrl-C
(SIGINT) that arrives while a file is written waits until the write is done: the interrupt then
stops the program as usual, with the new file complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from dropcluster.errors import RunBusyError, raised_while_interrupted

__all__ = [
    "FolderLock",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
]


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Replace ``path`` with what ``write(handle)`` writes to a binary handle, atomically.

    The temporary file has a unique name (two writers never share one) and is removed when
    anything fails, the rename included. A SIGINT during the write is held until the file is
    in place, then raised as :class:`KeyboardInterrupt`.
    """
    path = Path(path)
    with _sigint_held():
        handle, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
        try:
            with os.fdopen(handle, "wb") as stream:
                write(stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, path)
        except BaseException as error:
            try:
                os.unlink(temporary)
            except FileNotFoundError:
                pass
            if raised_while_interrupted(error):
                raise KeyboardInterrupt from error
            raise
    return path


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold SIGINT for the block's length, then raise KeyboardInterrupt if one came.

    Only where Python's own handler is installed and in the main thread (signal handlers can be
    set there only); elsewhere the block runs as it is, and an interrupt that a writer's cleanup
    turned into another error is told apart afterwards.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8), atomically."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda stream: stream.write(data))


def atomic_write_json(path: str | Path, document: Any) -> Path:
    """Replace ``path`` with ``document`` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(document, indent=2) + "\n")


class FolderLock:
    """An exclusive, advisory lock on a folder, held through a lock file inside it.

    The operating system releases it when the process ends, however it ends (kill -9 too), so
    a lock is never left stale. Within one process the lock is re-entrant: code that holds a
    run's lock (a sweep's worker) may call code that takes it again (``train``). Use as a
    context manager, or :meth:`acquire` / :meth:`release`.

    Args:
        folder: the folder to lock (created when missing).
        name: the lock file's name in it.
        what: how error messages name the folder's content ("training run", "sweep").
    """

    # Open lock files of this process and how many holders each has, by resolved path:
    # flock() treats a second open() of the same file as another owner, even in one process.
    _held: dict[str, list] = {}

    def __init__(self, folder: str | Path, name: str = ".lock", what: str = "run") -> None:
        self.path = Path(folder) / name
        self.what = what
        self._key: str | None = None

    def acquire(self, wait: bool = False) -> FolderLock:
        """Take the lock; without ``wait``, raise :class:`RunBusyError` when another process
        holds it, else block until it is free."""
        if self._key is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        entry = FolderLock._held.get(key)
        if entry is not None:
            entry[1] += 1
            self._key = key
            return self
        handle = open(self.path, "a")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.close()
            raise RunBusyError(
                f"another process is writing the {self.what} in {self.path.parent} (it holds "
                f"{self.path.name}): wait for it to finish, or stop it first"
            ) from None
        except BaseException:
            handle.close()
            raise
        FolderLock._held[key] = [handle, 1]
        self._key = key
        return self

    def release(self) -> None:
        if self._key is None:
            return
        entry = FolderLock._held[self._key]
        entry[1] -= 1
        if entry[1] == 0:
            del FolderLock._held[self._key]
            entry[0].close()  # closing the file drops the lock
        self._key = None

    @property
    def held(self) -> bool:
        return self._key is not None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()
