"""The Slurm backend: the runs are Slurm jobs, submitted through submitit.

Install the extra: ``pip install -e '.[slurm]'`` in the dropcluster checkout. The runs handed
over together (every pending run, or ``--jobs`` of them) go to Slurm as one job array, one
task per run (:attr:`BackendSettings.array`; ``--no-array``: one job per run), with the
account, QoS, constraint, extra ``#SBATCH`` options and setup lines of the settings. submitit
keeps each job's pickled call, its Slurm log and its result in ``OUT/slurm``; this backend
records which job (an array task: ``1234_0``) trains which run in ``OUT/slurm/jobs.json``, so a
sweep started again (after ``--no-wait``, or after the submitting process died) follows the
jobs still queued or running instead of submitting them twice. A job that reaches its time
limit, or is preempted, is requeued by submitit and the run resumes from its last checkpoint.
The compute nodes must have dropcluster installed and see the sweep folder at the same path.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dropcluster.experiments.backends import (
    BackendSettings,
    Finished,
    RunTask,
    gpus_for_device,
    run_worker,
    task_environment,
)
from dropcluster.files import atomic_write_json

try:
    import submitit
    from submitit.core.utils import FailedJobError
    from submitit.helpers import Checkpointable
except ImportError as error:  # the optional extra is missing
    raise ImportError(
        "--backend slurm needs submitit: pip install -e '.[slurm]' (in the dropcluster checkout)"
    ) from error

__all__ = [
    "JOBS_NAME",
    "SlurmBackend",
    "check_slurm_commands",
    "check_slurm_settings",
    "job_state_message",
    "slurm_parameters",
]


#: Which job trains which run: ``{run id: job id}``, in the backend's folder.
JOBS_NAME = "jobs.json"
#: Slurm states of a job that is queued or running: a restarted sweep follows it.
_ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "RUNNING",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "CONFIGURING",
        "COMPLETING",
        "SUSPENDED",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
    }
)
#: Times a job is requeued at its time limit before it counts as failed.
_MAX_REQUEUES = 100


class _Run(Checkpointable):
    """The job's callable: :func:`run_worker`, resubmitted with the same arguments when the job
    is requeued (the run resumes from its checkpoint)."""

    def __call__(self, run_dir: str, procs: int, env: dict[str, str]) -> int:
        return run_worker(run_dir, procs, env)


class SlurmBackend:
    """Runs as Slurm jobs (see the module docstring).

    Args:
        settings: the backend settings (partition, time limit, memory, CPUs and GPUs per run,
            account, QoS, constraint, extra sbatch options, setup lines, arrays;
            ``cluster="local"`` runs the jobs on this machine with submitit's local executor).
        folder: submitit's folder for the job files (``OUT/slurm``).
        capacity: runs in flight at once (None: every pending run; Slurm queues them).

    With arrays, :meth:`submit` only takes a run in; the runs taken in since the last call go to
    Slurm as one array at the next :meth:`poll` or at :meth:`close` (the sweep hands over every
    run it has room for, then polls, or closes with ``--no-wait``).

    Raises:
        ValueError: Slurm's commands are missing, or submitit refuses an option (one line,
            before anything is submitted).
    """

    def __init__(self, settings: BackendSettings, folder: Path, capacity: int | None = None):
        check_slurm_settings(settings, folder)
        self.capacity = capacity
        self.folder = folder
        self._settings = settings
        folder.mkdir(parents=True, exist_ok=True)
        self._executor = submitit.AutoExecutor(
            folder=folder, cluster=settings.cluster, slurm_max_num_timeout=_MAX_REQUEUES
        )
        self._job_ids: dict[str, str] = _read_job_ids(folder / JOBS_NAME)
        self._running: dict[str, tuple[RunTask, Any]] = {}
        #: Runs taken in and not submitted yet (arrays), with the GPUs each asks for.
        self._waiting: list[tuple[RunTask, int]] = []

    def submit(self, task: RunTask) -> str:
        job = self._recorded_active_job(task.run_id)
        if job is not None:
            self._running[task.run_id] = (task, job)
            return f"slurm job {job.job_id} (submitted before)"
        gpus = task.gpus if task.gpus is not None else _gpus_for(task.spec.config.device)
        self._waiting.append((task, gpus))
        if not self._settings.array:
            self._submit_waiting()
            return f"slurm job {self._running[task.run_id][1].job_id}"
        return "slurm array task (submitted with the next poll)"

    def _submit_waiting(self) -> None:
        """Submit the runs taken in: one array per kind of job (the GPUs and cores a run asks
        for are the array's), or one job per run without arrays."""
        waiting, self._waiting = self._waiting, []
        groups: dict[tuple[int, int], list[RunTask]] = {}
        for task, gpus in waiting:
            groups.setdefault((gpus, task.cpus or 1), []).append(task)
        for (gpus, cpus), tasks in groups.items():
            if self._settings.array:
                self._submit(tasks, gpus, cpus, f"dropcluster-{self.folder.parent.name}")
            else:
                for task in tasks:
                    self._submit([task], gpus, cpus, f"dropcluster-{task.run_id}")

    def _submit(self, tasks: list[RunTask], gpus: int, cpus: int, name: str) -> None:
        """Submit ``tasks`` (several: as one array) and record their job ids."""
        self._executor.update_parameters(
            **slurm_parameters(self._settings, gpus=gpus, cpus=cpus, name=name)
        )
        try:
            with self._executor.batch():
                jobs = [
                    self._executor.submit(
                        _Run(), str(task.run_dir), task.procs, task_environment(task, gpus)
                    )
                    for task in tasks
                ]
        except FailedJobError as error:  # sbatch refused: its message, without the traceback
            lines = [line for line in str(error).splitlines() if line.strip()]
            raise OSError(
                f"sbatch refused the job of {len(tasks)} run(s): "
                f"{lines[-1].strip() if lines else error}"
            ) from None
        for task, job in zip(tasks, jobs, strict=True):
            self._job_ids[task.run_id] = str(job.job_id)
            self._running[task.run_id] = (task, job)
        atomic_write_json(self.folder / JOBS_NAME, self._job_ids)

    def _recorded_active_job(self, run_id: str) -> Any | None:
        """The job an earlier invocation submitted for ``run_id``, if it is still queued or
        running (None: none, or it ended)."""
        job_id = self._job_ids.get(run_id)
        if job_id is None or self._settings.cluster != "slurm":
            # submitit's local jobs cannot be followed from another process.
            return None
        job = submitit.SlurmJob(folder=self.folder, job_id=job_id)
        if job.paths.result_pickle.exists() or job.state.upper() not in _ACTIVE_STATES:
            return None
        return job

    def poll(self) -> list[Finished]:
        if self._waiting:
            self._submit_waiting()
        finished = []
        for run_id, (task, job) in list(self._running.items()):
            if not job.done():
                continue
            del self._running[run_id]
            state = job.state
            if _base_state(state) in _KILLED_STATES and not job.paths.result_pickle.exists():
                # Killed from outside: no result will come (job.result() would wait for one,
                # in case the filesystem lags).
                finished.append(Finished(task, None, job_state_message(job.job_id, state)))
                continue
            try:
                finished.append(Finished(task, int(job.result())))
            except Exception as error:  # noqa: BLE001 - submitit raises the job's own errors
                # Its message quotes the job's log, whose last line is no reason: the job's
                # state (Slurm's sacct, or submitit's own for local jobs) is, with the
                # exception the job's body raised when it raised one.
                raised = _raised_line(str(error)) if isinstance(error, FailedJobError) else None
                message = job_state_message(job.job_id, state, raised)
                finished.append(Finished(task, None, message))
        return finished

    def stop(self) -> None:
        self._waiting.clear()  # never submitted
        for _, job in self._running.values():
            job.cancel(check=False)
        self._running.clear()

    def close(self) -> None:
        # --no-wait: the sweep hands the runs over and closes without polling.
        if self._waiting:
            self._submit_waiting()


#: The flag that sets each of submitit's parameters, for its refusals.
_PARAMETER_FLAGS = {
    "slurm_partition": "--partition",
    "slurm_account": "--account",
    "slurm_qos": "--qos",
    "slurm_constraint": "--constraint",
    "slurm_additional_parameters": "--sbatch",
    "slurm_setup": "--job-setup",
    "slurm_array_parallelism": "--array-parallelism",
    "timeout_min": "--time",
    "mem_gb": "--mem",
    "cpus_per_task": "--cpus-per-run",
    "gpus_per_node": "--gpus-per-run",
}


def slurm_parameters(
    settings: BackendSettings, gpus: int = 0, cpus: int = 1, name: str = "dropcluster"
) -> dict[str, Any]:
    """submitit's ``update_parameters`` keywords for the jobs of ``settings`` (options left
    unset are None, which submitit leaves out).

    Args:
        settings: see :class:`BackendSettings`.
        gpus: GPUs of each job (one node, one task).
        cpus: CPU cores of each job.
        name: the job's (or the array's) name in the queue.
    """
    return {
        "name": name,
        "timeout_min": settings.time_minutes,
        "nodes": 1,
        "tasks_per_node": 1,
        "cpus_per_task": cpus,
        "gpus_per_node": gpus,
        "mem_gb": settings.mem_gb,
        "slurm_partition": settings.partition,
        "slurm_account": settings.account,
        "slurm_qos": settings.qos,
        "slurm_constraint": settings.constraint,
        "slurm_additional_parameters": dict(settings.sbatch) or None,
        "slurm_setup": list(settings.setup) or None,
        # submitit caps every array at 256 tasks at once by default: a limit only when asked.
        "slurm_array_parallelism": settings.array_parallelism or _NO_ARRAY_LIMIT,
    }


#: Tasks of an array running at once when no limit is asked for (submitit writes
#: ``%min(tasks, this)``: more than a sweep has runs).
_NO_ARRAY_LIMIT = 1_000_000


def check_slurm_settings(settings: BackendSettings, folder: Path | None = None) -> None:
    """Raise ValueError (one line, naming the flag) unless Slurm's commands are here and the
    installed submitit takes every option of ``settings``: the check before anything is
    submitted (or, called before a sweep starts, written).

    Args:
        settings: see :class:`BackendSettings`.
        folder: submitit's folder (nothing is written in it; None: a temporary one).
    """
    check_slurm_commands(settings.cluster)
    with tempfile.TemporaryDirectory() as scratch:
        executor = submitit.AutoExecutor(folder=folder or Path(scratch), cluster=settings.cluster)
        try:
            executor.update_parameters(**slurm_parameters(settings))
        except (ValueError, NameError, AssertionError, TypeError) as error:
            # Its first sentence names the parameter; the rest lists every valid one.
            text = str(error).strip()
            first = text.splitlines()[0].split(". ")[0] if text else type(error).__name__
            named = [flag for key, flag in _PARAMETER_FLAGS.items() if f"'{key}'" in first]
            raise ValueError(
                f"submitit {submitit.__version__} refuses "
                f"{' and '.join(named) if named else 'a Slurm option'}: {first}"
            ) from None


#: What the final Slurm states of a job that produced no result mean.
_STATE_MEANINGS = {
    "CANCELLED": "cancelled (scancel, or an administrator)",
    "TIMEOUT": "it reached its time limit too often (--time)",
    "OUT_OF_MEMORY": "it ran out of memory (--mem)",
    "NODE_FAIL": "its node failed",
    "PREEMPTED": "it was preempted",
    "FAILED": "the job failed",
    "INTERRUPTED": "its process was killed",
    "BOOT_FAIL": "its node failed to boot",
    "DEADLINE": "it passed its deadline",
}


#: Final states of a job stopped from outside (it wrote no result).
_KILLED_STATES = frozenset(
    {
        "CANCELLED",
        "TIMEOUT",
        "OUT_OF_MEMORY",
        "NODE_FAIL",
        "PREEMPTED",
        "INTERRUPTED",
        "BOOT_FAIL",
        "DEADLINE",
    }
)


def _base_state(state: str) -> str:
    """``"CANCELLED"`` of ``"CANCELLED by 1234"``."""
    return state.split()[0].upper() if state.split() else "UNKNOWN"


def job_state_message(job_id: str, state: str, raised: str | None = None) -> str:
    """One line for a job that ended without a result: its id, its final state and what that
    means, or the exception its body raised (``raised``, a line such as ``OSError: ...``)."""
    if raised:
        return f"Slurm job {job_id} raised {raised} (state {state})"
    meaning = _STATE_MEANINGS.get(_base_state(state))
    return f"Slurm job {job_id} ended in state {state}" + (f": {meaning}" if meaning else "")


def _raised_line(text: str) -> str | None:
    """The last line of a traceback in ``text`` that names an exception (None: none)."""
    for line in reversed(text.splitlines()):
        if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", line.strip()):
            return line.strip()
    return None


def _gpus_for(device: str) -> int:
    """GPUs a job asks for when ``--gpus-per-run`` is not given (see :func:`gpus_for_device`).

    Raises:
        ValueError: the device is "auto": a job gets a GPU only when it asks for one, so
            "auto" would quietly train on CPUs where the preset meant GPUs.
    """
    if device == "auto":
        raise ValueError(
            "the preset's device is 'auto', but a Slurm job has GPUs only when it asks for "
            "them: pass --gpus-per-run 1 (or 0 to train on CPUs), or --device cuda"
        )
    return gpus_for_device(device, engine_has_gpus=False)


def _read_job_ids(path: Path) -> dict[str, str]:
    """The ``{run id: job id}`` record of earlier submissions ({} when there is none).

    Raises:
        ValueError: the file is not a JSON object of names (it is written atomically, so only
            a hand edit or a damaged disk makes it so): following its jobs is then impossible,
            and guessing would submit runs that are still queued a second time.
    """
    advice = (
        "it records which Slurm job trains which run; restore it, or delete it when no job of "
        "this sweep is queued or running (such a job would be submitted again)"
    )
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): {advice}") from None
    if not isinstance(document, dict) or not all(
        isinstance(job, (str, int)) and not isinstance(job, bool) for job in document.values()
    ):
        raise ValueError(
            f"{path} should hold an object {{run id: job id}}, but holds "
            f"{type(document).__name__ if not isinstance(document, dict) else 'other values'}: "
            f"{advice}"
        )
    return {str(run_id): str(job_id) for run_id, job_id in document.items()}


def check_slurm_commands(cluster: str) -> None:
    """Raise ValueError unless Slurm's commands are here (``cluster="local"`` needs none).

    submitit submits with ``sbatch`` and starts the job's process with ``srun``; without them
    it fails deep in the first submission."""
    if cluster != "slurm":
        return
    missing = [command for command in ("sbatch", "srun") if shutil.which(command) is None]
    if missing:
        raise ValueError(
            f"--backend slurm submits jobs with Slurm's sbatch and srun, but this machine lacks "
            f"{' and '.join(missing)} (not on PATH): run the sweep on a login node of the "
            f"cluster, or use --backend local or ray"
        )
