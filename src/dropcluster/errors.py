"""The exceptions dropcluster raises for problems a user can fix.

Every class here derives from :class:`DropClusterError`; the ``dropcluster`` command prints
them as one line and exits with status 2. Where a built-in type also fits (a bad value is a
``ValueError``), the class derives from it too, so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import errno

__all__ = [
    "CheckpointError",
    "DivergedError",
    "DropClusterError",
    "RunBusyError",
    "SchemaVersionError",
    "raised_while_interrupted",
    "user_error_message",
]


class DropClusterError(Exception):
    """Base class of the errors a user can act on (the message says how)."""


class SchemaVersionError(DropClusterError, RuntimeError):
    """A results database was written by a newer dropcluster than the one reading it."""


class CheckpointError(DropClusterError, ValueError):
    """A checkpoint file is truncated, corrupted or not a dropcluster checkpoint."""


class RunBusyError(DropClusterError, RuntimeError):
    """Another process is writing the same run folder (each run has one writer at a time)."""


class DivergedError(DropClusterError, RuntimeError):
    """Training stopped because the loss became NaN or infinite."""


#: Advice for operating-system errors a user can act on, by errno.
_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space and rerun (files already saved are intact)",
    errno.EDQUOT: "the disk quota is used up: free some space and rerun",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.EACCES: "permission denied: choose a folder you may write to",
    errno.EPERM: "operation not permitted: choose a folder you may write to",
    errno.EISDIR: "a folder is where a file was expected: give a file's path",
    errno.ENOTDIR: "a file is where a folder was expected",
    errno.ENOENT: "no such file or folder",
}


def raised_while_interrupted(error: BaseException) -> bool:
    """Whether ``error`` is not a KeyboardInterrupt itself but came while one was handled.

    Cleanup code that fails on the way out of a Ctrl-C (torch.save's zip writer checks its
    position when closed) replaces the interrupt with its own error: it was still a Ctrl-C.
    """
    if isinstance(error, KeyboardInterrupt):
        return False
    seen: set[int] = set()
    cause = error.__context__
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__context__
    return False


def user_error_message(error: BaseException) -> str | None:
    """The one-line message of an error the user can fix; None for an internal error."""
    import sqlite3

    if isinstance(error, OSError) and error.errno is not None and error.strerror:
        advice = _OS_ADVICE.get(error.errno, error.strerror)
        where = error.filename if error.filename is not None else ""
        return f"{advice}" + (f" ({where})" if where else "")
    if isinstance(error, (DropClusterError, ValueError, OSError)):
        return " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, ImportError) and "pip install" in str(error):
        # A missing optional extra says how to install it; any other ImportError is a bug.
        return str(error)
    if isinstance(error, sqlite3.DatabaseError):
        return f"results database error: {error}"
    return None
