"""One run of a sweep, in its own process: ``python -m dropcluster.experiments.worker RUN_DIR``.

The sweep writes ``RUN_DIR/job.json`` (the config, the device, the corruption settings) and
starts this process; it trains (resuming from the run's checkpoint when there is one), then
evaluates on corrupted test sets when asked, and exits 0. Its own files (``log.jsonl``,
``result.json``, ``corruptions.json``) are the source of truth the sweep copies into the results
database. A lock file keeps two processes (say, an orphan of a killed sweep and a new sweep)
from training the same run at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Any

JOB_NAME = "job.json"
LOCK_NAME = ".lock"


def write_job(run_dir: Path, config: dict[str, Any], evaluate: dict[str, Any] | None) -> Path:
    """Write the job description the worker reads (atomically)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / JOB_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"config": config, "evaluate": evaluate}, indent=2) + "\n")
    tmp.replace(path)
    return path


def run_job(run_dir: Path) -> int:
    """Train and evaluate the run in ``run_dir``; returns the process exit status."""
    from dropcluster.train.config import TrainConfig
    from dropcluster.train.loop import train

    lock = open(run_dir / LOCK_NAME, "w")  # noqa: SIM115 - held for the process's lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # An orphan of a killed sweep is still training this run: let it finish, then resume
        # (a finished run returns at once).
        print(f"{run_dir} is being run by another process; waiting for it", file=sys.stderr,
              flush=True)  # fmt: skip
        fcntl.flock(lock, fcntl.LOCK_EX)
    job = json.loads((run_dir / JOB_NAME).read_text())
    config = TrainConfig.from_dict(job["config"])
    device = os.environ.get("DROPCLUSTER_DEVICE")
    if device:
        config = config.replace(device=device)
    threads = os.environ.get("DROPCLUSTER_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    train(config, run_dir, resume=True)
    if job.get("evaluate"):
        from dropcluster.train.robustness import (
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
            evaluate_run(run_dir, settings, device=device)
    return 0


def _result(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "result.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m dropcluster.experiments.worker RUN_DIR", file=sys.stderr)
        return 2
    return run_job(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
