"""The exceptions dropcluster raises for problems a user can fix.

Every class here derives from :class:`DropClusterError`; the ``dropcluster`` command prints
them as one line and exits with status 2. Where a built-in type also fits (a bad value is a
``ValueError``), the class derives from it too, so ``except ValueError`` keeps working.
"""

from __future__ import annotations


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
