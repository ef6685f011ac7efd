"""Where a sweep's runs train: worker processes on this machine, Ray tasks or Slurm jobs.

Every backend runs the same command on a run folder whose ``job.json`` the sweep has written:
``python -m dropcluster.experiments.worker RUN_DIR``, under ``torchrun`` when a run has several
processes (:func:`worker_command`), with the worker's output appended to ``RUN_DIR/worker.log``.
A run's files are its only output: the submitting process reads them and writes the results
database, which nothing else writes. So the sweep folder has to be on a filesystem that every
machine running a task sees, at the same path.

A backend takes :class:`RunTask` objects (:meth:`Backend.submit`), says which have ended and
with what exit status (:meth:`Backend.poll`), stops those in flight (:meth:`Backend.stop`; each
keeps its last checkpoint) and lets its engine go (:meth:`Backend.close`). :class:`LocalBackend`
(the default, ``--jobs``) lives here; :mod:`.ray` and :mod:`.slurm` import their engine, so
nothing else needs Ray or submitit installed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dropcluster.experiments.presets import RunSpec
from dropcluster.experiments.worker import OWNER_PID_VARIABLE
from dropcluster.validation import check_choice, check_fields, check_int

__all__ = [
    "BACKENDS",
    "DEFAULT_SLURM_MINUTES",
    "STOP_GRACE_SECONDS",
    "WORKER_LOG_NAME",
    "Backend",
    "BackendSettings",
    "Finished",
    "LocalBackend",
    "RunTask",
    "check_sbatch_option",
    "cluster_backend",
    "gpus_for_device",
    "run_worker",
    "start_worker",
    "stop_process",
    "task_environment",
    "worker_command",
]


#: The engines a sweep can run on.
BACKENDS = ("local", "ray", "slurm")
#: A worker's output (its last line is the run's error when it fails), in the run folder.
WORKER_LOG_NAME = "worker.log"
#: Seconds a stopped worker has to leave after SIGINT before it is killed.
STOP_GRACE_SECONDS = 10.0
#: Slurm time limit of a job when none is given: a run that reaches it is requeued and resumes.
DEFAULT_SLURM_MINUTES = 240


@dataclass(frozen=True)
class BackendSettings:
    """Where a sweep's runs train and what each one asks for.

    Attributes:
        name: "local" (worker processes on this machine, ``--jobs`` at a time), "ray" (one Ray
            task per run) or "slurm" (a Slurm job array, one task per run, through submitit).
        gpus_per_run: GPUs each run gets. Above 1 the run trains under ``torchrun``, one
            process per GPU. None: one when the config's device is CUDA ("cuda", "cuda:N";
            "auto" too on a Ray cluster that has GPUs; Slurm refuses "auto" without it), else
            none. The local backend uses it only above 1 (its job slots own the GPUs).
        cpus_per_run: CPU cores each Ray task or Slurm job asks for (None: one); also its
            torch threads (shared among a run's processes). The local backend shares this
            machine's cores out instead.
        address: Ray: the cluster to join ("auto": the cluster this machine belongs to; None:
            start Ray on this machine).
        partition: Slurm partition (None: the cluster's default).
        time_minutes: Slurm time limit of each job; a run that reaches it is requeued and
            resumes from its last checkpoint.
        mem_gb: Slurm memory of each job, in GB (None: the partition's default).
        wait: wait for the runs and record them. False (Slurm only): submit and return; the
            same sweep command, or ``dropcluster collect``, records the results later.
        cluster: submitit's executor: "slurm", or "local" to run the jobs on this machine
            through submitit (tests, trying the Slurm path without Slurm).
        account: Slurm account the jobs are charged to (``sbatch --account``; None: yours).
        qos: Slurm quality of service (``sbatch --qos``; None: the default).
        constraint: Slurm node features the jobs need (``sbatch --constraint``, e.g. "a100").
        sbatch: other sbatch options, ``{name: value}`` without the leading dashes (e.g.
            ``{"gres": "gpu:a100:1"}``): one ``#SBATCH --name=value`` line each.
        setup: shell lines each Slurm job runs before the run (``module load ...``,
            ``source venv/bin/activate``), in order.
        array: submit the runs handed over together as one Slurm job array (True) instead of
            one job per run.
        array_parallelism: Slurm: at most this many tasks of an array run at once
            (``--array=0-N%K``; None: no limit).
        runtime_env: Ray's runtime environment of the tasks (``working_dir``, ``pip``,
            ``env_vars``, ...; see Ray's documentation), a JSON-like mapping.
    """

    name: str = "local"
    gpus_per_run: int | None = None
    cpus_per_run: int | None = None
    address: str | None = None
    partition: str | None = None
    time_minutes: int = DEFAULT_SLURM_MINUTES
    mem_gb: int | None = None
    wait: bool = True
    cluster: str = "slurm"
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    sbatch: dict[str, str] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    array: bool = True
    array_parallelism: int | None = None
    runtime_env: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        check_choice("backend", self.name, BACKENDS)
        check_choice("cluster", self.cluster, ("slurm", "local"))
        if self.gpus_per_run is not None:
            check_int("gpus_per_run", self.gpus_per_run, minimum=0)
        if self.cpus_per_run is not None:
            check_int("cpus_per_run", self.cpus_per_run, minimum=1)
        check_int("time_minutes", self.time_minutes, minimum=1)
        if self.mem_gb is not None:
            check_int("mem_gb", self.mem_gb, minimum=1)
        if not self.wait and self.name != "slurm":
            raise ValueError(
                f"--no-wait needs --backend slurm: a {self.name} run ends with the process "
                f"that started it"
            )
        if self.address is not None and self.name != "ray":
            raise ValueError(f"--address is for --backend ray, not {self.name}")
        if self.runtime_env is not None and self.name != "ray":
            raise ValueError(f"--runtime-env is for --backend ray, not {self.name}")
        self._check_slurm_options()

    def _check_slurm_options(self) -> None:
        """The Slurm-only options: given only for Slurm, and each a value sbatch can take."""
        given = {
            "--account": self.account is not None,
            "--qos": self.qos is not None,
            "--constraint": self.constraint is not None,
            "--sbatch": bool(self.sbatch),
            "--job-setup": bool(self.setup),
            "--no-array": not self.array,
            "--array-parallelism": self.array_parallelism is not None,
        }
        for flag, is_given in given.items():
            if is_given and self.name != "slurm":
                raise ValueError(f"{flag} is for --backend slurm, not {self.name}")
        for flag, value in (
            ("--account", self.account),
            ("--qos", self.qos),
            ("--constraint", self.constraint),
        ):
            if value is not None:
                _check_sbatch_value(flag, value)
        for name, value in self.sbatch.items():
            check_sbatch_option(name, value)
        for line in self.setup:
            if not line.strip() or "\n" in line or "\r" in line:
                raise ValueError(
                    f"--job-setup takes one shell line (a module load, a source ...), but got "
                    f"{line!r}"
                )
        if self.array_parallelism is not None:
            check_int("array_parallelism", self.array_parallelism, minimum=1)
            if not self.array:
                raise ValueError(
                    "--array-parallelism limits the tasks of a job array: leave out --no-array"
                )
        if self.runtime_env is not None and not all(isinstance(k, str) for k in self.runtime_env):
            raise ValueError("--runtime-env should be a JSON object with names as keys")

    @property
    def procs_per_run(self) -> int:
        """Processes per run: one per GPU under torchrun when a run has several GPUs."""
        return self.gpus_per_run if self.gpus_per_run and self.gpus_per_run > 1 else 1


#: sbatch options a flag of their own sets (or dropcluster sets itself): not for ``--sbatch``.
_SBATCH_FLAGS = {
    "partition": "--partition",
    "time": "--time",
    "mem": "--mem",
    "account": "--account",
    "qos": "--qos",
    "constraint": "--constraint",
    "cpus-per-task": "--cpus-per-run",
    "gpus-per-node": "--gpus-per-run",
    "array": "--array-parallelism",
}
_SBATCH_SET_BY_SUBMITIT = frozenset(
    {"job-name", "output", "error", "open-mode", "signal", "nodes", "ntasks-per-node", "wckey"}
)


def _check_sbatch_value(flag: str, value: str) -> None:
    if not value.strip() or value != value.strip() or "\n" in value or "\r" in value:
        raise ValueError(
            f"{flag} should be a value on one line, without spaces around, but got {value!r}"
        )


def check_sbatch_option(name: str, value: str) -> None:
    """Raise ValueError unless ``--sbatch name=value`` can be an ``#SBATCH --name=value`` line:
    an option name (letters, digits, ``-``, ``_``; no leading dashes), a value on one line, and
    not an option that a flag of its own sets (the message names the flag)."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name):
        raise ValueError(
            f"--sbatch takes NAME=VALUE with an sbatch option name such as gres or mail-type "
            f"(no leading dashes), but got the name {name!r}"
        )
    key = name.replace("_", "-").lower()
    if key in _SBATCH_FLAGS:
        raise ValueError(f"--sbatch {name}=...: use {_SBATCH_FLAGS[key]} instead")
    if key in _SBATCH_SET_BY_SUBMITIT:
        raise ValueError(f"--sbatch {name}=...: dropcluster (through submitit) sets --{key} itself")
    _check_sbatch_value(f"--sbatch {name}", value)


@dataclass(frozen=True)
class RunTask:
    """One run for a backend: its folder (``job.json`` written) and what it asks for.

    Attributes:
        spec: the run (its id and config).
        run_dir: the run folder, an absolute path every machine sees.
        procs: processes of the run (above 1: under torchrun).
        gpus: GPUs to ask the engine for (None: from the config's device, see
            :func:`gpus_for_device`).
        cpus: CPU cores to ask the engine for (None: one).
    """

    spec: RunSpec
    run_dir: Path
    procs: int = 1
    gpus: int | None = None
    cpus: int | None = None

    @property
    def run_id(self) -> str:
        return self.spec.run_id


@dataclass(frozen=True)
class Finished:
    """A task that ended.

    Attributes:
        task: the task.
        status: the worker's exit status (0: the run's results are in its folder; negative:
            killed by that signal); None when the engine lost the task (a node died, a job
            was cancelled) and has no status.
        message: the engine's account of a lost task, e.g. a Slurm job's final state.
    """

    task: RunTask
    status: int | None
    message: str = ""


class Backend(Protocol):
    """What the sweep needs from an engine (see the module docstring)."""

    #: Runs in flight at once (None: every pending run is submitted at once; the engine queues).
    capacity: int | None

    def submit(self, task: RunTask) -> str:
        """Start (or queue) ``task``; returns the engine's id of it (a pid, a Slurm job id)."""
        ...

    def poll(self) -> list[Finished]:
        """The tasks that ended since the last call; never blocks."""
        ...

    def stop(self) -> None:
        """Stop every task in flight (each run keeps its last checkpoint)."""
        ...

    def close(self) -> None:
        """Let the engine go; tasks still in flight are left to run (Slurm ``--no-wait``)."""
        ...


def worker_command(run_dir: str | Path, procs: int = 1, python: str | None = None) -> list[str]:
    """The command that trains the run in ``run_dir``: the worker module, under torch's elastic
    launcher (:mod:`dropcluster.train.launch`: torchrun's, ending in one line on a failure)
    with ``procs`` processes on this node when ``procs`` > 1 (one per GPU)."""
    python = python or sys.executable
    if procs == 1:
        return [python, "-m", "dropcluster.experiments.worker", str(run_dir)]
    return [
        python,
        "-m",
        "dropcluster.train.launch",
        str(procs),
        "dropcluster.experiments.worker",
        str(run_dir),
    ]


def gpus_for_device(device: str, engine_has_gpus: bool) -> int:
    """GPUs a run asks for when ``--gpus-per-run`` is not given: one for a CUDA device, one for
    "auto" when the engine has GPUs, else none."""
    if device.startswith("cuda"):
        return 1
    return 1 if device == "auto" and engine_has_gpus else 0


def task_environment(task: RunTask, gpus: int) -> dict[str, str]:
    """The variables a remote task gives its worker: the device the engine gave it (a task sees
    only its own GPUs, numbered from 0) and torch threads for the cores it asked for."""
    env = {}
    if task.procs == 1:
        # Under torchrun each rank picks the GPU of its local rank; one process takes GPU 0.
        env["DROPCLUSTER_DEVICE"] = "cuda" if gpus else "cpu"
    # The cores asked for, not the node's: torch would otherwise take every core it sees.
    env["DROPCLUSTER_THREADS"] = str(max(1, (task.cpus or 1) // task.procs))
    return env


def start_worker(
    command: list[str], run_dir: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start ``command`` with its output appended to ``run_dir/worker.log`` (not waiting).

    Args:
        command: see :func:`worker_command`.
        run_dir: the run folder.
        env: variables added to this process's environment.
    """
    with open(run_dir / WORKER_LOG_NAME, "a") as log:
        log.write(f"--- attempt started {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n")
        log.flush()
        # The child has its own copy of the file descriptor; ours closes with the block.
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )


def stop_process(process: subprocess.Popen) -> None:
    """Interrupt a worker (SIGINT: it stops as on Ctrl-C), then kill it if it lingers."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_worker(run_dir: str, procs: int = 1, env: dict[str, str] | None = None) -> int:
    """Train one run where this function runs and return the worker's exit status.

    The body of a Ray task and of a Slurm job: the command is built here, with this machine's
    Python. The worker runs as a subprocess, so torch threads, CUDA memory and a crash belong
    to the run, not to the engine's long-lived process. An interruption of this function (Ray's
    cancel, Slurm's requeue at the time limit) stops the worker first.
    """
    path = Path(run_dir)
    owner = {OWNER_PID_VARIABLE: str(os.getpid())}
    # A child inherits the signal mask of the thread that starts it, and Ray's workers block
    # SIGINT: unblock it for the child, or stopping the worker (SIGINT) would wait in vain.
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        process = start_worker(worker_command(path, procs), path, {**(env or {}), **owner})
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    # An engine started in the background (`nohup ... &`, a batch script) runs with SIGINT
    # ignored, and then neither a cancel (Ray's raises KeyboardInterrupt through SIGINT's
    # handler) nor an interruption would reach this function: handle it for the run's length.
    ignored = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    )
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:
            try:
                # Short waits: Ray's cancel raises KeyboardInterrupt between bytecodes only.
                return process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                continue
    except BaseException:
        stop_process(process)
        raise
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


class LocalBackend:
    """Worker processes on this machine, ``jobs`` at a time, each in a job slot.

    Args:
        jobs: runs trained at once.
        launch: ``launch(task, slot)`` starts the worker of ``task`` in job slot ``slot`` (its
            GPU or GPUs, its share of the cores) and returns the process.
    """

    def __init__(self, jobs: int, launch: Callable[[RunTask, int], subprocess.Popen]) -> None:
        self.capacity: int | None = jobs
        self._launch = launch
        self._running: dict[int, tuple[RunTask, subprocess.Popen]] = {}

    def submit(self, task: RunTask) -> str:
        slot = min(set(range(self.capacity or 1)) - set(self._running))
        process = self._launch(task, slot)
        self._running[slot] = (task, process)
        return f"pid {process.pid}"

    def poll(self) -> list[Finished]:
        finished = []
        for slot, (task, process) in list(self._running.items()):
            status = process.poll()
            if status is not None:
                del self._running[slot]
                finished.append(Finished(task, status))
        return finished

    def stop(self) -> None:
        for _, process in self._running.values():
            stop_process(process)
        self._running.clear()

    def close(self) -> None:
        pass


def cluster_backend(settings: BackendSettings, folder: Path, capacity: int | None) -> Backend:
    """The Ray or Slurm backend ``settings`` names (the local one needs a launcher: see
    :class:`LocalBackend`).

    Args:
        settings: see :class:`BackendSettings`.
        folder: the sweep folder (Slurm keeps its job files in ``folder/slurm``).
        capacity: runs in flight at once (None: every pending run; the cluster queues them).

    Raises:
        ImportError: Ray or submitit is not installed (the message says which extra to install).
    """
    if settings.name == "ray":
        from dropcluster.experiments.backends.ray import RayBackend

        return RayBackend(settings, capacity)
    check_choice("a cluster backend", settings.name, ("ray", "slurm"))
    from dropcluster.experiments.backends.slurm import SlurmBackend

    return SlurmBackend(settings, folder / "slurm", capacity)
