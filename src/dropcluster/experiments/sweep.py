"""The resumable sweep: run every run of a preset's grid that is not finished yet.

Layout of the output folder ``OUT``::

    OUT/preset.json         the preset the sweep runs (with --set overrides applied)
    OUT/results.sqlite      the results database (runs, epochs, corruptions, clusters)
    OUT/runs/<run id>/      one folder per run: job.json, config.json, checkpoint.pt, log.jsonl,
                            result.json, corruptions.json, worker.log

Each run is trained by a worker process (:mod:`dropcluster.experiments.worker`) that resumes
from the run's own checkpoint, so the sweep can be killed at any moment and started again with
the same command: finished runs are never repeated, an interrupted run continues from its last
finished epoch, and a failed run (its error is kept in the database) is retried. Only this
process writes the database, each run's results in one transaction.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from dropcluster.experiments.corruption_eval import CORRUPTIONS_NAME, CorruptionSettings
from dropcluster.experiments.presets import (
    Preset,
    RunSpec,
    as_preset,
    expand_grid,
    filter_runs,
    load_preset,
)
from dropcluster.experiments.store import DATABASE_NAME, FAILED, FINISHED, ResultsStore
from dropcluster.experiments.worker import write_job
from dropcluster.files import atomic_write_json
from dropcluster.train.config import NOT_IDENTITY, resolve_device
from dropcluster.train.loop import LOG_NAME, RESULT_NAME, read_log
from dropcluster.validation import check_int

PRESET_NAME = "preset.json"
SWEEP_LOCK_NAME = ".sweep.lock"
#: A worker's output (its last line is the run's error when it fails), in the run folder.
WORKER_LOG_NAME = "worker.log"
#: The folder of a sweep's run folders: ``OUT/runs/<run id>/``.
RUNS_FOLDER = "runs"
#: Where sweeps go when no output folder is given: ``runs/<preset name>`` in the working folder.
DEFAULT_OUT_PARENT = Path("runs")

#: Training set and test set sizes, for cost estimates.
DATASET_SIZES = {
    "cifar100": (50_000, 10_000),
    "tiny-imagenet": (100_000, 10_000),
    "fashion-mnist": (60_000, 10_000),
    "synthetic": (2_000, 500),
}
#: Measured training throughput (images/s) on this project's 2-core reference CPU (torch 2.13,
#: allocator settings of the Makefile), per (model, data set); evaluation runs about 3x faster.
CPU_IMAGES_PER_SECOND = {
    ("resnet20", "fashion-mnist"): 1400.0,
    ("resnet20", "synthetic"): 1000.0,
    ("lenet5", "fashion-mnist"): 8000.0,
    ("resnet50", "cifar100"): 21.0,
    ("resnet50", "tiny-imagenet"): 6.0,
}


@dataclass
class SweepSummary:
    """What a sweep invocation did."""

    total: int = 0
    finished: int = 0
    failed: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    seconds: float = 0.0


def prepare_folder(preset: Preset, out: Path) -> None:
    """Create ``out`` and record the preset; refuse a folder that holds another preset's sweep,
    or this preset's with other settings (which would mix runs made differently)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / PRESET_NAME
    if path.is_file():
        existing = load_preset(path)
        if existing.name != preset.name:
            raise ValueError(
                f"{out} holds a sweep of preset {existing.name!r}, not {preset.name!r}: "
                f"choose another --out"
            )
        old_base, new_base = _identity_base(existing.base), _identity_base(preset.base)
        changed = sorted(k for k in set(old_base) | set(new_base)
                         if old_base.get(k) != new_base.get(k))  # fmt: skip
        if existing.evaluate != preset.evaluate:
            changed.append("evaluate")
        if changed:
            raise ValueError(
                f"{out} holds a sweep of {preset.name!r} with other settings ({changed} "
                f"differ): rerun with the same --set/--stem/--corrupted-from options, or choose "
                f"another --out"
            )
    atomic_write_json(path, preset.to_dict())


def _identity_base(base: dict[str, Any]) -> dict[str, Any]:
    """The base config without the keys that do not change results (device, eval batch size)."""
    return {key: value for key, value in base.items() if key not in NOT_IDENTITY}


def _corruption_settings(preset: Preset) -> CorruptionSettings | None:
    """The corrupted test sets of the preset's evaluated runs (None: no evaluation)."""
    return preset.evaluate.corruption if preset.evaluate else None


def estimate_seconds(
    spec: RunSpec,
    measured: dict[tuple[str, str], float] | None = None,
    evaluate: CorruptionSettings | None = None,
) -> float:
    """Rough CPU seconds for one run: images processed / a measured throughput.

    ``measured`` maps (model, data set) to images/s seen in this sweep's finished runs and takes
    precedence over the reference-CPU table; ``evaluate`` is the preset's corrupted test sets.
    NaN when neither knows the model.
    """
    config = spec.config
    n_train, n_test = DATASET_SIZES.get(config.dataset, (0, 0))
    key = (config.model, config.dataset)
    rate = (measured or {}).get(key) or CPU_IMAGES_PER_SECOND.get(key)
    if not rate:
        return float("nan")
    train_images = config.epochs * n_train * config.train_fraction
    eval_images = config.epochs * n_test
    seconds = train_images / rate + eval_images / (3 * rate)
    if spec.evaluate_corruptions and evaluate:
        images = min(n_test, evaluate.limit or n_test)
        tasks = 1 + len(evaluate.corruptions) * len(evaluate.severities)
        seconds += tasks * images / (3 * rate)
    return seconds


def measured_rates(store: ResultsStore) -> dict[tuple[str, str], float]:
    """Median training images/s per (model, data set) over this database's finished epochs."""
    rates: dict[tuple[str, str], list[float]] = {}
    configs = {r.run_id: r.config for r in store.runs()}
    for row in store.epochs():
        config = configs.get(row["run_id"])
        if config and row.get("images_per_s"):
            rates.setdefault((config["model"], config["dataset"]), []).append(row["images_per_s"])
    return {key: sorted(values)[len(values) // 2] for key, values in rates.items()}


def format_duration(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "unknown"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600}:{rest // 60 % 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


def _selected_runs(preset: Preset, only: list[str]) -> list[RunSpec]:
    """The runs of the preset that ``only`` selects; ValueError when it selects none."""
    every_run = expand_grid(preset)
    specs = filter_runs(every_run, only)
    if not specs:
        raise ValueError(f"--only {only} selects none of the {len(every_run)} runs")
    return specs


def plan(preset: Preset, out: Path, only: list[str]) -> tuple[list[RunSpec], ResultsStore]:
    """The runs selected by ``only``, registered in the database (as pending when new)."""
    specs = _selected_runs(preset, only)
    store = ResultsStore.in_folder(out)
    for spec in specs:
        store.add_run(
            spec.run_id,
            _identity_base(spec.config.to_dict()),
            preset=preset.name,
            regularizer=spec.regularizer,
            p=spec.p,
            seed=spec.seed,
            train_fraction=spec.train_fraction,
        )
    return specs, store


def dry_run(
    preset: Preset | dict[str, Any], out: Path, only: list[str], stream: TextIO
) -> list[RunSpec]:
    """Print the grid, each run's status and the estimated cost; write nothing.

    ``preset`` is a :class:`~dropcluster.experiments.presets.Preset` or its JSON form.
    """
    preset = as_preset(preset)
    specs = _selected_runs(preset, only)
    status: dict[str, str] = {}
    rates: dict[tuple[str, str], float] = {}
    database = out / DATABASE_NAME
    if database.is_file():
        with ResultsStore(database, readonly=True) as store:
            status = {r.run_id: r.status for r in store.runs()}
            rates = measured_rates(store)
    total = remaining = 0.0
    stream.write(f"preset {preset.name}: {len(specs)} runs\n")
    stream.write(f"{'run':<40} {'epochs':>6} {'corrupt':>7} {'status':>9} {'estimate':>12}\n")
    evaluate = _corruption_settings(preset)
    for spec in specs:
        seconds = estimate_seconds(spec, rates, evaluate)
        state = status.get(spec.run_id, "new")
        total += seconds
        if state != FINISHED:
            remaining += seconds
        stream.write(
            f"{spec.run_id:<40} {spec.config.epochs:>6} "
            f"{'yes' if spec.evaluate_corruptions else 'no':>7} {state:>9} "
            f"{format_duration(seconds):>12}\n"
        )
    source = "this sweep's finished runs" if rates else "the reference 2-core CPU"
    stream.write(
        f"estimated time, one job at a time, at the speed of {source}: total "
        f"{format_duration(total)}, still to run {format_duration(remaining)} (a GPU is "
        f"typically 20-100x faster for ResNet-50)\n"
    )
    return specs


def collect_results(run_dir: Path) -> dict[str, Any]:
    """Read a finished run's files into the arguments of ``ResultsStore.record_finished``."""
    history = read_log(run_dir / LOG_NAME)
    result = json.loads((run_dir / RESULT_NAME).read_text())
    corruptions = None
    corruption_file = run_dir / CORRUPTIONS_NAME
    if corruption_file.is_file():
        document = json.loads(corruption_file.read_text())
        source = document.get("source", "generated")
        corruptions = [
            {**{key: row[key] for key in ("corruption", "severity", "top1", "top5")},
             "source": source}
            for row in document["rows"]
        ]  # fmt: skip
    clusters = []
    for record in history:
        if "structured" in record:
            names = record.get("layers") or [f"layer{i}" for i in range(len(record["structured"]))]
            for name, structured, channels in zip(
                names, record["structured"], record["channels"], strict=True
            ):
                clusters.append(
                    {
                        "epoch": record["epoch"],
                        "layer": name,
                        "channels": channels,
                        "structured": structured,
                        "refit_seconds": record.get("refit_seconds"),
                    }
                )
    return {
        "history": history,
        "top1": result["top1"],
        "top5": result["top5"],
        "average_last": result["average_last"],
        "corruptions": corruptions,
        "clusters": clusters,
    }


def _logged_history(run_dir: Path) -> list[dict[str, Any]] | None:
    """The epochs a running worker has logged (a half-written line is read at the next poll);
    None while there is no log yet."""
    try:
        return read_log(run_dir / LOG_NAME)
    except OSError:
        return None


def _error_tail(log_path: Path, lines: int = 15) -> str:
    try:
        text = log_path.read_text(errors="replace").rstrip().splitlines()
    except FileNotFoundError:
        return "(no worker log)"
    return "\n".join(text[-lines:])


@dataclass
class _Active:
    spec: RunSpec
    process: subprocess.Popen
    started: float
    log: Any
    slot: int
    epochs_seen: int = 0


def run_sweep(
    preset: Preset | dict[str, Any],
    out: str | Path,
    *,
    jobs: int = 1,
    only: list[str] | None = None,
    stream: TextIO | None = None,
    poll_seconds: float = 0.5,
) -> SweepSummary:
    """Run every unfinished run of ``preset`` (filtered by ``only``) with ``jobs`` workers.

    Args:
        preset: a :class:`~dropcluster.experiments.presets.Preset` (see
            :func:`~dropcluster.experiments.presets.load_preset`) or its JSON form.
        out: the sweep's output folder.
        jobs: runs trained at once. On a machine with several GPUs and a CUDA device in the
            preset ("auto" or "cuda"), job i uses GPU i; on the CPU the cores are shared out.
        only: filters (see :func:`~dropcluster.experiments.presets.filter_runs`).
        stream: progress display (default stderr).

    Returns:
        A :class:`SweepSummary`. KeyboardInterrupt stops the workers (each keeps its last
        checkpoint) and marks their runs pending again before it propagates.

    Raises:
        ValueError: a bad preset or ``jobs``, a missing ``corrupted_from`` folder, another sweep
            running in ``out``, or ``out`` holding another preset's sweep.
    """
    preset = as_preset(preset)
    check_int("jobs", jobs, minimum=1)
    _check_corrupted_from(preset)
    stream = stream if stream is not None else sys.stderr
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sweep_lock = open(out / SWEEP_LOCK_NAME, "w")  # noqa: SIM115 - held until the sweep returns
    try:
        fcntl.flock(sweep_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sweep_lock.close()
        raise ValueError(
            f"another sweep is running in {out}: wait for it, or stop it (Ctrl-C) first"
        ) from None
    try:
        return _run_locked(preset, out, jobs, list(only or []), stream, poll_seconds)
    finally:
        sweep_lock.close()


def _check_corrupted_from(preset: Preset) -> None:
    """The released corrupted files are read at the end of each evaluated run: check the folder
    is there before the first run trains."""
    settings = _corruption_settings(preset)
    if settings is not None and settings.corrupted_from is not None:
        if not Path(settings.corrupted_from).is_dir():
            raise ValueError(
                f"preset {preset.name}: corrupted_from {settings.corrupted_from} is no folder"
            )


def _run_locked(
    preset: Preset,
    out: Path,
    jobs: int,
    only: list[str],
    stream: TextIO,
    poll_seconds: float,
) -> SweepSummary:
    prepare_folder(preset, out)
    specs, store = plan(preset, out, only)
    summary = SweepSummary(total=len(specs))
    start = time.perf_counter()
    evaluate = _corruption_settings(preset)
    with store:
        interrupted = store.reset_interrupted()
        if interrupted:
            stream.write(
                f"resuming {len(interrupted)} interrupted run(s): {', '.join(interrupted)}\n"
            )
        status = {r.run_id: r for r in store.runs()}
        todo = [s for s in specs if status[s.run_id].status != FINISHED]
        for spec in todo:
            if status[spec.run_id].status == FAILED:
                stream.write(
                    f"retrying {spec.run_id} (failed before: "
                    f"{(status[spec.run_id].error or '').splitlines()[-1:]})\n"
                )
        summary.finished = len(specs) - len(todo)
        stream.write(
            f"sweep {preset.name} in {out}: {len(specs)} runs, {summary.finished} finished, "
            f"{len(todo)} to run, {jobs} at a time\n"
        )
        devices = _job_devices(preset, jobs)
        threads = _threads_per_job(jobs)
        rates = measured_rates(store)
        estimates = {s.run_id: estimate_seconds(s, rates, evaluate) for s in todo}
        queue = list(todo)
        active: list[_Active] = []
        display = _Display(stream)
        try:
            while queue or active:
                free_slots = [i for i in range(jobs) if i not in {a.slot for a in active}]
                while queue and free_slots:
                    spec = queue.pop(0)
                    active.append(_launch(spec, out, evaluate, free_slots.pop(0), devices, threads))
                    store.mark_running(spec.run_id)
                time.sleep(poll_seconds)
                for job in list(active):
                    run_dir = out / RUNS_FOLDER / job.spec.run_id
                    history = _logged_history(run_dir)
                    if history is not None and len(history) != job.epochs_seen:
                        # Copied as they come, so `dropcluster results` shows runs in progress.
                        job.epochs_seen = len(history)
                        store.record_epochs(job.spec.run_id, history)
                    code = job.process.poll()
                    if code is None:
                        continue
                    active.remove(job)
                    job.log.close()
                    display.clear()
                    _record_exit(store, job, code, run_dir, summary, estimates, stream)
                display.show(_status_line(summary, active, queue, estimates, start, jobs))
        except BaseException:
            display.clear()
            for job in active:
                _stop(job.process)
                job.log.close()
            store.reset_interrupted()
            raise
        display.clear()
    summary.seconds = time.perf_counter() - start
    return summary


def _record_exit(
    store: ResultsStore,
    job: _Active,
    code: int,
    run_dir: Path,
    summary: SweepSummary,
    estimates: dict[str, float],
    stream: TextIO,
) -> None:
    """Record a worker's end: the run's results in one transaction, or its failure."""
    run_id = job.spec.run_id
    seconds = time.perf_counter() - job.started
    if code == 0:
        try:
            results = collect_results(run_dir)
        except (OSError, ValueError, KeyError) as error:
            store.mark_failed(run_id, f"unreadable results: {error}")
            summary.failed.append(run_id)
            return
        store.record_finished(run_id, seconds=seconds, **results)
        _rescale_estimates(estimates, run_id, seconds)
        summary.finished += 1
        summary.ran.append(run_id)
        stream.write(
            f"finished {run_id}: top-1 {results['top1']:.2f}% top-5 {results['top5']:.2f}% "
            f"({format_duration(seconds)})\n"
        )
        return
    error = _error_tail(run_dir / WORKER_LOG_NAME)
    store.mark_failed(run_id, f"exit status {code}\n{error}")
    summary.failed.append(run_id)
    last = error.splitlines()[-1] if error else ""
    stream.write(
        f"FAILED {run_id} (exit {code}): {last}\n  full log: {run_dir / WORKER_LOG_NAME}\n"
    )


def _job_devices(preset: Preset, jobs: int) -> list[str | None]:
    """The device of each job slot (None: the config's own): with several GPUs and a device
    that names none of them ("auto", "cuda"), job i uses GPU i."""
    device = resolve_device(preset.base.get("device", "cpu"))
    if device.type == "cuda" and device.index is None:
        import torch

        count = torch.cuda.device_count()
        if count > 1:
            return [f"cuda:{slot % count}" for slot in range(jobs)]
    return [None] * jobs


def _threads_per_job(jobs: int) -> int | None:
    """CPU threads per worker: the cores shared out when several runs train at once."""
    if jobs == 1:
        return None
    return max(1, (os.cpu_count() or 1) // jobs)


def _launch(
    spec: RunSpec,
    out: Path,
    evaluate: CorruptionSettings | None,
    slot: int,
    devices: list[str | None],
    threads: int | None,
) -> _Active:
    run_dir = out / RUNS_FOLDER / spec.run_id
    settings = evaluate.to_dict() if evaluate and spec.evaluate_corruptions else None
    write_job(run_dir, spec.config.to_dict(), settings)
    env = dict(os.environ)
    if devices[slot] is not None:
        env["DROPCLUSTER_DEVICE"] = devices[slot]
    if threads is not None:
        env["DROPCLUSTER_THREADS"] = str(threads)
    log = open(run_dir / WORKER_LOG_NAME, "a")  # noqa: SIM115 - closed when the job ends
    log.write(f"--- attempt started {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n")
    log.flush()
    process = subprocess.Popen(
        [sys.executable, "-m", "dropcluster.experiments.worker", str(run_dir)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    return _Active(spec, process, time.perf_counter(), log, slot)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _phase(job: _Active) -> str:
    epochs = job.spec.config.epochs
    if job.epochs_seen < epochs:
        return f"epoch {job.epochs_seen + 1}/{epochs}"
    return "corrupted test sets" if job.spec.evaluate_corruptions else "finishing"


def _rescale_estimates(estimates: dict[str, float], run_id: str, seconds: float) -> None:
    """Scale the remaining estimates by how long a finished run took against its estimate."""
    estimate = estimates.pop(run_id, float("nan"))
    if estimate > 0 and seconds > 0:
        ratio = seconds / estimate
        for key in estimates:
            estimates[key] *= ratio


def _status_line(
    summary: SweepSummary,
    active: list[_Active],
    queue: list[RunSpec],
    estimates: dict[str, float],
    start: float,
    jobs: int,
) -> str:
    elapsed = time.perf_counter() - start
    left = sum(estimates.get(s.run_id, 0.0) for s in queue)
    for job in active:
        done = job.epochs_seen / max(1, job.spec.config.epochs)
        left += estimates.get(job.spec.run_id, 0.0) * (1.0 - done)
    left /= max(1, jobs)
    running = ", ".join(f"{j.spec.run_id} {_phase(j)}" for j in active)
    failed = f", {len(summary.failed)} failed" if summary.failed else ""
    return (
        f"[{summary.finished}/{summary.total} done{failed}] {running or 'idle'} | "
        f"elapsed {format_duration(elapsed)}, about {format_duration(left)} left"
    )


class _Display:
    """A status line redrawn in place on a terminal; on a file, written when it changes."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.interactive = stream.isatty()
        self.last = ""
        self.last_time = 0.0

    def show(self, line: str) -> None:
        if self.interactive:
            self.stream.write("\r" + line[:160].ljust(len(self.last[:160])))
            self.stream.flush()
            self.last = line
            return
        # On a file (CI logs), one line per change of state, at most every 30 s otherwise.
        stem = line.split(" | ")[0]
        now = time.perf_counter()
        if stem != self.last.split(" | ")[0] or now - self.last_time > 30:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last, self.last_time = line, now

    def clear(self) -> None:
        if self.interactive and self.last:
            self.stream.write("\r" + " " * len(self.last[:160]) + "\r")
            self.stream.flush()
            self.last = ""
