"""One run of a sweep, in its own process: ``python -m dropcluster.experiments.worker RUN_DIR``.

The sweep writes ``RUN_DIR/job.json`` (the config, the device, the corruption settings) and
starts this process; it trains (resuming from the run's checkpoint when there is one), then
evaluates on corrupted test sets when asked, and exits 0. Its own files (``log.jsonl``,
``result.json``, ``corruptions.json``) are the source of truth the sweep copies into the results
database. A lock file keeps two processes (say, an orphan of a killed sweep and a new sweep)
from training the same run at once.

Under ``torchrun`` (a run on several GPUs) every rank runs this module; rank 0 holds the lock
and evaluates the corrupted test sets. Started by a Ray task or a Slurm job, the worker ends
when that task's process is gone (:data:`OWNER_PID_VARIABLE`), so an engine that lost a task
never has its run training on unseen.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dropcluster.files import FolderLock, atomic_write_json

__all__ = [
    "JOB_NAME",
    "OWNER_PID_VARIABLE",
    "main",
    "run_job",
    "watch_owner",
    "write_job",
]


JOB_NAME = "job.json"
#: The process that owns this worker (a Ray task, a Slurm job): the worker ends when it is gone.
OWNER_PID_VARIABLE = "DROPCLUSTER_OWNER_PID"


def write_job(run_dir: Path, config: dict[str, Any], evaluate: dict[str, Any] | None) -> Path:
    """Write the job description the worker reads (atomically)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(run_dir / JOB_NAME, {"config": config, "evaluate": evaluate})


def run_job(run_dir: Path) -> int:
    """Train and evaluate the run in ``run_dir``; returns the process exit status."""
    from dropcluster.errors import RunBusyError
    from dropcluster.train.config import TrainConfig, describe_device
    from dropcluster.train.loop import RUN_LOCK_NAME, train

    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        # Held until the process ends; train() and evaluate_run() take it again (re-entrant).
        # Under torchrun rank 0 holds it for the whole group.
        lock = FolderLock(run_dir, RUN_LOCK_NAME, "training run")
        try:
            lock.acquire()
        except RunBusyError:
            # Another process (an orphan of a killed sweep, a hand-started `train --resume`)
            # is writing this run: let it finish, then resume (a finished run returns at once).
            print(
                f"{run_dir} is being written by another process; waiting for it",
                file=sys.stderr,
                flush=True,
            )
            lock.acquire(wait=True)
    job = json.loads((run_dir / JOB_NAME).read_text())
    # The config imports the plugins it records (its "plugins") before it checks its names:
    # a plugin's regularizer trains here as in the process that started the sweep.
    config = TrainConfig.from_dict(job["config"])
    device = os.environ.get("DROPCLUSTER_DEVICE")
    if device:
        config = config.replace(device=device)
    threads = os.environ.get("DROPCLUSTER_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    if rank == 0:  # the worker's log says where the run computes
        print(describe_device(config.device, int(os.environ.get("WORLD_SIZE", "1"))), flush=True)
    train(config, run_dir, resume=True)
    if job.get("evaluate") and rank == 0:
        from dropcluster.experiments.corruption_eval import (
            CorruptionSettings,
            evaluate_run,
            evaluation_identity,
            stored_identity,
        )

        settings = CorruptionSettings(**job["evaluate"])
        device = config.resolved_device()
        wanted = evaluation_identity(settings, config.epochs, device)
        # Re-evaluate unless the stored results scored this finished model with these settings.
        if stored_identity(run_dir) != wanted or "corruptions" not in _result(run_dir):
            rows = evaluate_run(run_dir, settings, device=device)
            _track_corruptions(config, run_dir, rows)
    return 0


def _track_corruptions(config, run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """The corrupted-test results for the run's tracker, at step ``epochs`` (after the last
    epoch's); an evaluation that replaces an earlier one has TensorBoard drop the earlier's."""
    from dropcluster.train.tracking import corruption_scalars, make_tracker

    tracker = make_tracker(config.tracker, run_dir, purge_step=config.epochs)
    try:
        tracker.log_scalars(config.epochs, corruption_scalars(rows))
    finally:
        tracker.close()


def _result(run_dir: Path) -> dict[str, Any]:
    from dropcluster.train.loop import RESULT_NAME

    path = run_dir / RESULT_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def watch_owner(pid: int, interval: float = 1.0) -> None:
    """End this process as soon as process ``pid`` is gone.

    Every file a run writes is replaced atomically, so ending mid-epoch loses that epoch only.
    """

    def watch() -> None:
        while True:
            time.sleep(interval)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                print(
                    f"the task that started this worker (pid {pid}) is gone; stopping",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(3)
            except PermissionError:
                pass  # alive, another user's process

    threading.Thread(target=watch, name="owner-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m dropcluster.experiments.worker RUN_DIR", file=sys.stderr)
        return 2
    from dropcluster.errors import user_error_message
    from dropcluster.train.launch import rank_failure

    owner = os.environ.get(OWNER_PID_VARIABLE)
    if owner:
        watch_owner(int(owner))
    # The sweep's backends and the launcher stop a worker with SIGINT, to stop as on Ctrl-C
    # (its run resumes from its last checkpoint). A sweep started in the background (`nohup
    # ... &`, a batch script) hands its children SIGINT ignored: never inherit that.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    try:
        return run_job(Path(args[0]))
    except Exception as error:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:  # under the launcher: it prints the group's one line
            status = rank_failure(error, int(os.environ.get("RANK", "0")), world)
            if status is not None:
                return status
            raise
        message = user_error_message(error)
        if message is None:
            raise
        # The sweep keeps the last line of this log as the run's error: make it the message.
        print(message, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
