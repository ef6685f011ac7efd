"""The Ray backend: each run is a Ray task that runs the worker command on its run folder.

Install the extra: ``pip install -e '.[ray]'`` in the dropcluster checkout. Without an address
Ray starts on this
machine; ``address="auto"`` (``--address auto``) joins the cluster this machine belongs to, and
any other address names a cluster's head node. Every node must have dropcluster installed and
see the sweep folder at the same path. A task asks for the run's CPUs and GPUs
(``num_cpus``, ``num_gpus``); Ray sets each task's ``CUDA_VISIBLE_DEVICES``. A runtime
environment (``runtime_env``: ``working_dir``, ``pip``, ``env_vars``, ...) goes to ``ray.init``,
or, on a Ray connection this process had already opened, to every task.

The task runs the worker as a subprocess (:func:`~dropcluster.experiments.backends.run_worker`)
rather than calling it in the Ray worker process: a Ray worker lives on from task to task, and
torch's thread count, the CUDA context and its cached memory are per process, so each run gets
a fresh process, as on this machine; the same command also runs a multi-GPU run under torchrun.
A task lost with its node is retried by Ray and resumes from the run's checkpoint.
"""

from __future__ import annotations

from typing import Any

from dropcluster.experiments.backends import (
    BackendSettings,
    Finished,
    RunTask,
    gpus_for_device,
    run_worker,
    task_environment,
)

try:
    import ray
except ImportError as error:  # the optional extra is missing
    raise ImportError(
        "--backend ray needs Ray: pip install -e '.[ray]' (in the dropcluster checkout)"
    ) from error

__all__ = [
    "RayBackend",
    "check_runtime_env",
]


#: Seconds ``stop`` waits for cancelled tasks to stop their workers.
_STOP_WAIT_SECONDS = 20.0


class RayBackend:
    """Runs as Ray tasks (see the module docstring).

    Args:
        settings: the backend settings (address, runtime environment, CPUs and GPUs per run).
        capacity: runs in flight at once (None: every pending run; Ray queues them).

    A Ray connection already open in this process is used as it is (and left open; the runtime
    environment then goes with each task); otherwise the backend connects (or starts Ray) and
    shuts Ray down in :meth:`close`.

    Raises:
        ValueError: Ray refuses the runtime environment (one line, before anything runs).
    """

    def __init__(self, settings: BackendSettings, capacity: int | None = None) -> None:
        self.capacity = capacity
        self._settings = settings
        check_runtime_env(settings.runtime_env)
        self._started = not ray.is_initialized()
        #: The runtime environment each task carries (None: the job's, from ray.init).
        self._task_runtime_env = None if self._started else settings.runtime_env
        if self._started:
            options: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "logging_level": "ERROR",
            }
            if settings.address is not None:
                options["address"] = settings.address
            if settings.runtime_env is not None:
                options["runtime_env"] = settings.runtime_env
            ray.init(**options)
        self._has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        self._remote = ray.remote(run_worker)
        self._running: dict[Any, RunTask] = {}

    def submit(self, task: RunTask) -> str:
        gpus = task.gpus
        if gpus is None:
            gpus = gpus_for_device(task.spec.config.device, self._has_gpus)
        options: dict[str, Any] = {
            "num_cpus": task.cpus or 1,
            "num_gpus": gpus,
            "name": f"dropcluster {task.run_id}",
        }
        if self._task_runtime_env is not None:
            options["runtime_env"] = self._task_runtime_env
        reference = self._remote.options(**options).remote(
            str(task.run_dir), task.procs, task_environment(task, gpus)
        )
        self._running[reference] = task
        return f"ray task {reference.task_id().hex()}"

    def poll(self) -> list[Finished]:
        if not self._running:
            return []
        references = list(self._running)
        ready, _ = ray.wait(references, num_returns=len(references), timeout=0)
        finished = []
        for reference in ready:
            task = self._running.pop(reference)
            try:
                finished.append(Finished(task, int(ray.get(reference))))
            except ray.exceptions.RayError as error:  # the task was lost or cancelled
                lines = str(error).strip().splitlines()
                finished.append(Finished(task, None, f"Ray: {lines[-1] if lines else error}"))
        return finished

    def stop(self) -> None:
        references = list(self._running)
        # A plain cancel raises KeyboardInterrupt in the task, which stops its worker first.
        for reference in references:
            ray.cancel(reference)
        if references:
            ray.wait(references, num_returns=len(references), timeout=_STOP_WAIT_SECONDS)
        self._running.clear()

    def close(self) -> None:
        if self._started and ray.is_initialized():
            ray.shutdown()
            self._started = False


def check_runtime_env(runtime_env: dict[str, Any] | None) -> None:
    """Raise ValueError (one line) when Ray refuses ``runtime_env``: a field of the wrong type
    (``env_vars`` must map names to strings), a ``working_dir`` that is no folder, ... Fields
    Ray does not know are left to its plugins, as Ray does."""
    if runtime_env is None:
        return
    try:
        ray.runtime_env.RuntimeEnv(**runtime_env)
    except (TypeError, ValueError) as error:
        reason = " ".join(str(error).split())
        raise ValueError(f"--runtime-env: Ray refuses it: {reason}") from None
