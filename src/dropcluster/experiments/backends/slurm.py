"""The Slurm backend: each run is a Slurm job, submitted through submitit.

Install the extra: ``pip install -e '.[slurm]'`` in the dropcluster checkout. submitit keeps each
job's pickled
call, its Slurm log and its result in ``OUT/slurm``; this backend records which job trains
which run in ``OUT/slurm/jobs.json``, so a sweep started again (after ``--no-wait``, or after
the submitting process died) follows the jobs still queued or running instead of submitting
them twice. A job that reaches its time limit, or is preempted, is requeued by submitit and the
run resumes from its last checkpoint. The compute nodes must have dropcluster installed and see
the sweep folder at the same path.
"""

from __future__ import annotations

import json
import re
import shutil
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
    "job_state_message",
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
        settings: the backend settings (partition, time limit, memory, CPUs and GPUs per run;
            ``cluster="local"`` runs the jobs on this machine with submitit's local executor).
        folder: submitit's folder for the job files (``OUT/slurm``).
        capacity: runs in flight at once (None: every pending run; Slurm queues them).
    """

    def __init__(self, settings: BackendSettings, folder: Path, capacity: int | None = None):
        check_slurm_commands(settings.cluster)
        self.capacity = capacity
        self.folder = folder
        self._settings = settings
        folder.mkdir(parents=True, exist_ok=True)
        self._executor = submitit.AutoExecutor(
            folder=folder, cluster=settings.cluster, slurm_max_num_timeout=_MAX_REQUEUES
        )
        self._job_ids: dict[str, str] = _read_job_ids(folder / JOBS_NAME)
        self._running: dict[str, tuple[RunTask, Any]] = {}

    def submit(self, task: RunTask) -> str:
        job = self._recorded_active_job(task.run_id)
        if job is None:
            gpus = task.gpus if task.gpus is not None else _gpus_for(task.spec.config.device)
            self._executor.update_parameters(
                name=f"dropcluster-{task.run_id}",
                timeout_min=self._settings.time_minutes,
                nodes=1,
                tasks_per_node=1,
                cpus_per_task=task.cpus or 1,
                gpus_per_node=gpus,
                mem_gb=self._settings.mem_gb,
                slurm_partition=self._settings.partition,
            )
            job = self._executor.submit(
                _Run(), str(task.run_dir), task.procs, task_environment(task, gpus)
            )
            self._job_ids[task.run_id] = str(job.job_id)
            atomic_write_json(self.folder / JOBS_NAME, self._job_ids)
        self._running[task.run_id] = (task, job)
        return f"slurm job {job.job_id}"

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
        for _, job in self._running.values():
            job.cancel(check=False)
        self._running.clear()

    def close(self) -> None:
        pass


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
