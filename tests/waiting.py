"""Waiting in a test for what another process does: one helper and its limits.

A limit only bounds how long a failing test waits; a passing one goes on as soon as its
condition holds. The limits are sized for the slowest VM under a loaded test run, not for a
quiet machine: with four busy processes on two cores, a Ray sweep took over two minutes to
finish its first epoch.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

#: Seconds for a process, a Ray cluster or a Slurm job to start and finish a first epoch.
START_SECONDS = 300
#: Seconds for a stopped process to leave (and say so).
STOP_SECONDS = 120

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    failure: str,
    seconds: float = START_SECONDS,
    process: subprocess.Popen | None = None,
    interval: float = 0.05,
) -> T:
    """Poll ``condition`` until it returns a true value, and return that value.

    Fails with ``failure`` after ``seconds``, and at once when ``process`` (the one expected
    to make the condition true) has ended.
    """
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert process is None or process.poll() is None, f"{failure}: the process ended first"
        assert time.monotonic() < deadline, f"{failure} (waited {seconds:g} s)"
        time.sleep(interval)
    return value
