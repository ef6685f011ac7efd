"""The resumable sweep: run every run of a preset's grid that is not finished yet.

Layout of the output folder ``OUT``::

    OUT/preset.json         the preset the sweep runs (with --set overrides applied)
    OUT/results.sqlite      the results database (runs, epochs, corruptions, clusters)
    OUT/runs/<run id>/      one folder per run: job.json, config.json, checkpoint.pt, log.jsonl,
                            result.json, corruptions.json, worker.log (and TensorBoard's
                            event files under --set tracker=tensorboard)

Each run is trained by a worker process (:mod:`dropcluster.experiments.worker`) that resumes
from the run's own checkpoint, so the sweep can be killed at any moment and started again with
the same command: finished runs are never repeated, an interrupted run continues from its last
finished epoch, and a failed run (its error is kept in the database) is retried. Only this
process writes the database, each run's results in one transaction.

Where the workers run is a backend's business (:mod:`dropcluster.experiments.backends`):
processes on this machine (the default, ``jobs`` at a time: one per visible GPU unless told),
Ray tasks or Slurm jobs. Whatever the backend, a run writes only its own folder, and this
process records its results from there (:mod:`~dropcluster.experiments.run_folder` reads and
checks them); a run found finished in its folder (a Slurm job that ended after a ``--no-wait``
submission, a worker that finished after its sweep died) is recorded without training again.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from dropcluster.compat import error_reason
from dropcluster.experiments.backends import (
    WORKER_LOG_NAME,
    Backend,
    BackendSettings,
    Finished,
    LocalBackend,
    RunTask,
    cluster_backend,
    start_worker,
    worker_command,
)
from dropcluster.experiments.corruption_eval import CorruptionSettings
from dropcluster.experiments.presets import (
    Preset,
    RunSpec,
    as_preset,
    expand_grid,
    filter_runs,
    load_preset,
)
from dropcluster.experiments.run_folder import RunFolderError, finished_results, read_results
from dropcluster.experiments.store import (
    DATABASE_NAME,
    FAILED,
    FINISHED,
    ResultsStore,
)
from dropcluster.experiments.worker import write_job
from dropcluster.files import atomic_write_json
from dropcluster.train.config import (
    ADDED_FIELDS,
    DEFAULT_DEVICE,
    NOT_IDENTITY,
    describe_device,
    resolve_device,
)
from dropcluster.train.loop import LOG_NAME, read_log
from dropcluster.validation import check_int

__all__ = [
    "CPU_IMAGES_PER_SECOND",
    "DATASET_SIZES",
    "DEFAULT_OUT_PARENT",
    "PAPER_UNSTATED",
    "PRESET_NAME",
    "RUNS_FOLDER",
    "SWEEP_LOCK_NAME",
    "SweepSummary",
    "changed_settings",
    "default_jobs",
    "dry_run",
    "estimate_seconds",
    "failure_reason",
    "format_duration",
    "format_settings",
    "identity_base",
    "machine_note",
    "measured_rates",
    "never_fitted_note",
    "plan",
    "prepare_folder",
    "run_sweep",
    "sweep_lock",
]


PRESET_NAME = "preset.json"
SWEEP_LOCK_NAME = ".sweep.lock"
#: The folder of a sweep's run folders: ``OUT/runs/<run id>/``.
RUNS_FOLDER = "runs"
#: Where sweeps go when no output folder is given: ``runs/<preset name>`` in the working folder.
DEFAULT_OUT_PARENT = Path("runs")

#: Training set and test set sizes, for cost estimates.
DATASET_SIZES = {
    "cifar10": (50_000, 10_000),
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
    """What a sweep invocation did.

    Attributes:
        total: runs selected.
        finished: of them, finished (before or during this invocation).
        failed: runs that failed in this invocation.
        ran: runs trained (or finished training) in this invocation.
        collected: runs found finished in their folders and recorded without training.
        submitted: runs left queued or running on the cluster (Slurm ``--no-wait``).
        seconds: wall time of the invocation.
    """

    total: int = 0
    finished: int = 0
    failed: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    collected: list[str] = field(default_factory=list)
    submitted: list[str] = field(default_factory=list)
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
        changed = changed_settings(existing, preset)
        if changed:
            raise ValueError(
                f"{out} holds a sweep of {preset.name!r} with other settings ({changed} "
                f"differ): rerun with the same --set/--stem/--corrupted-from options, or choose "
                f"another --out"
            )
    atomic_write_json(path, preset.to_dict())


def changed_settings(first: Preset, second: Preset) -> list[str]:
    """The base config keys (and "evaluate") whose values differ between two presets, leaving
    out those that do not change results (device, evaluation batch size)."""
    old_base, new_base = identity_base(first.base), identity_base(second.base)
    changed = sorted(k for k in set(old_base) | set(new_base) if old_base.get(k) != new_base.get(k))
    if first.evaluate != second.evaluate:
        changed.append("evaluate")
    return changed


@contextmanager
def sweep_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s sweep lock: one process at a time runs or collects a sweep folder (the
    database has one writer).

    Raises:
        ValueError: another process holds it.
    """
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / SWEEP_LOCK_NAME, "w")  # noqa: SIM115 - held until the block ends
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"another sweep is running in {out}: wait for it, or stop it (Ctrl-C) first"
            ) from None
        yield
    finally:
        handle.close()


def identity_base(base: dict[str, Any]) -> dict[str, Any]:
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
            identity_base(spec.config.to_dict()),
            preset=preset.name,
            regularizer=spec.regularizer,
            p=spec.p,
            seed=spec.seed,
            train_fraction=spec.train_fraction,
        )
    return specs, store


#: Settings of the paper presets that the paper does not state: marked in the dry run's listing.
PAPER_UNSTATED = frozenset(
    {
        "epochs",
        "batch_size",
        "stem",
        "weight_decay_on",
        "cluster_images",
        "amp",
        "amp_dtype",
        "keep_checkpoints",
    }
)
#: Fields a grid sets for each run: shown with the grids, not with the shared settings.
_PER_RUN = ("regularizer", "p", "train_fraction", "seed", "regularizer_options", "variant")


def format_settings(preset: Preset) -> str:
    """Every setting of the preset's runs, the per-regularizer options, the grids and the
    assumptions, as the dry run prints them (settings the paper does not state are marked)."""
    specs = expand_grid(preset)
    # Every setting, including those to_dict leaves out while they hold their default.
    configs = [
        {**spec.config.to_dict(), **{name: getattr(spec.config, name) for name in ADDED_FIELDS}}
        for spec in specs
    ]
    unstated = (
        set(preset.unstated)
        if preset.unstated is not None
        else (PAPER_UNSTATED if preset.scale == "paper" else set())
    )
    mark = bool(unstated)
    lines = [
        "settings of every run"
        + (" (* not stated by the paper: an assumption)" if mark else "")
        + ":"
    ]
    for name, value in configs[0].items():
        if name in _PER_RUN:
            continue
        values = {json.dumps(config.get(name), sort_keys=True) for config in configs}
        shown = json.dumps(value) if len(values) == 1 else "set per grid (below)"
        star = "*" if name in unstated else " "
        lines.append(f"  {star} {name} = {shown}")
    if preset.options:
        lines.append("regularizer options (every run of the regularizer):")
        for regularizer, options in preset.options.items():
            lines.append(f"    {regularizer}: {json.dumps(options, sort_keys=True)}")
    lines.append("grids:")
    for index, grid in enumerate(preset.grids):
        variant = grid.variant if grid.variant is not None else preset.variant
        text = (
            f"    {index}. {', '.join(grid.regularizer)} p={grid.p} "
            f"fractions={grid.train_fraction} seeds={grid.seed}"
        )
        if variant:
            text += f" variant={variant}"
        if grid.options:
            text += f" options={json.dumps(grid.options, sort_keys=True)}"
        lines.append(text)
    if preset.assumptions:
        lines.append("assumptions (the paper does not state these; values chosen here):")
        lines += [f"    - {assumption}" for assumption in preset.assumptions]
    return "\n".join(lines) + "\n"


def never_fitted_note(specs: list[RunSpec]) -> str:
    """One warning line per (cluster_every, epochs) under which DropCluster runs would never be
    fitted (e.g. ``--set epochs=40`` on a paper preset, which refits every 50), else ""."""
    reasons: dict[str, int] = {}
    for spec in specs:
        reason = spec.config.refit_warning()
        if reason is not None:
            reasons[reason] = reasons.get(reason, 0) + 1
    return "".join(
        f"warning: {count} DropCluster run(s): {reason}\n" for reason, count in reasons.items()
    )


def _base_device(preset: Preset) -> str:
    return preset.base.get("device", DEFAULT_DEVICE)


def default_jobs(device: str, procs: int = 1) -> int:
    """Runs at once on this machine when ``jobs`` is not given: one per visible CUDA device
    (``procs`` of them per run: the devices // ``procs``) for a device that names no single GPU
    ("auto" on a machine with CUDA, "cuda"); 1 on a CPU machine or for "cuda:N". The visible
    devices are those ``CUDA_VISIBLE_DEVICES`` leaves."""
    import torch

    if device not in ("auto", "cuda") or not torch.cuda.is_available():
        return 1
    return max(1, torch.cuda.device_count() // procs)


def machine_note(
    preset: Preset, jobs: int | None = None, backend: BackendSettings | None = None
) -> str:
    """What the sweep would choose on this machine, as the dry run prints it: the device in
    force, the runs at a time, and under several GPUs per run the batch norm choice (with a
    warning when each process would normalise over fewer than
    :data:`~dropcluster.train.config.SMALL_BATCH_PER_PROCESS` images)."""
    settings = backend if backend is not None else BackendSettings()
    device = _base_device(preset)
    procs = settings.procs_per_run
    if settings.name == "local":
        lines = ["on this machine:"]
        try:
            lines.append(f"    {describe_device(device, procs)}")
        except ValueError as error:
            lines.append(f"    device: not available here: {error}")
        chosen = jobs if jobs is not None else default_jobs(device, procs)
        how = "--jobs" if jobs is not None else "one per visible GPU, 1 without one; --jobs sets it"
        lines.append(f"    runs at a time: {chosen} ({how})")
    else:  # the cluster's nodes have the devices: nothing to say about this machine's
        lines = [f"where the runs train: {_where(settings, jobs)}"]
    if procs > 1:
        config = expand_grid(preset)[0].config  # the batch settings are the base's
        sync = "on" if config.sync_batchnorm else "off"
        lines.append(
            f"    processes per run: {procs} (DistributedDataParallel), "
            f"{config.batch_size // procs} images each per step; sync-batchnorm {sync}"
        )
        warning = config.batch_norm_warning(procs)
        if warning is not None:
            lines.append(f"warning: models with batch norm: {warning}")
    return "\n".join(lines) + "\n"


def dry_run(
    preset: Preset | dict[str, Any],
    out: Path,
    only: list[str],
    stream: TextIO,
    *,
    jobs: int | None = None,
    backend: BackendSettings | None = None,
) -> list[RunSpec]:
    """Print the grid, each run's status, the estimated cost and the choices made for this
    machine (:func:`machine_note`); write nothing.

    ``preset`` is a :class:`~dropcluster.experiments.presets.Preset` or its JSON form; ``jobs``
    and ``backend`` as :func:`run_sweep` takes them.
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
    stream.write(f"preset {preset.name} ({preset.scale} scale): {len(specs)} runs\n")
    stream.write(format_settings(preset))
    stream.write(machine_note(preset, jobs, backend))
    stream.write(never_fitted_note(specs))
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
        f"{format_duration(total)}, still to run {format_duration(remaining)} (the speed of "
        f"this sweep's own runs replaces the reference once some have finished)\n"
    )
    return specs


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
    """A run handed to the backend: what the progress display and the records need."""

    spec: RunSpec
    run_dir: Path
    started: float
    epochs_seen: int = 0
    #: (modification time, size) of the log when last read; None: no log yet.
    log_state: tuple[int, int] | None = None


def run_sweep(
    preset: Preset | dict[str, Any],
    out: str | Path,
    *,
    jobs: int | None = None,
    only: list[str] | None = None,
    stream: TextIO | None = None,
    poll_seconds: float | None = None,
    backend: BackendSettings | None = None,
) -> SweepSummary:
    """Run every unfinished run of ``preset`` (filtered by ``only``) on ``backend``.

    Args:
        preset: a :class:`~dropcluster.experiments.presets.Preset` (see
            :func:`~dropcluster.experiments.presets.load_preset`) or its JSON form.
        out: the sweep's output folder; with Ray or Slurm, on a filesystem every node sees.
        jobs: runs in flight at once. None: on this machine one per visible GPU when the
            preset's device names no single GPU ("auto", "cuda"; :func:`default_jobs`), else
            one; every pending run on Ray or Slurm, whose scheduler queues them. On a machine
            with several GPUs, local job i uses GPU i (GPUs i*N to i*N+N-1 with N GPUs per run;
            round robin when there are more jobs than GPUs); on the CPU the cores are shared
            out.
        only: filters (see :func:`~dropcluster.experiments.presets.filter_runs`).
        stream: progress display (default stderr).
        poll_seconds: time between two looks at the runs (default 0.5 s here, 2 s on a
            cluster).
        backend: where the runs train (default: :class:`BackendSettings`, this machine).

    Returns:
        A :class:`SweepSummary`. KeyboardInterrupt stops the runs in flight (each keeps its last
        checkpoint) and marks them pending again before it propagates.

    Raises:
        ValueError: a bad preset, ``jobs`` or backend setting, a missing ``corrupted_from``
            folder, another sweep running in ``out``, or ``out`` holding another preset's sweep.
        ImportError: the backend's engine (Ray, submitit) is not installed.
    """
    preset = as_preset(preset)
    if jobs is not None:
        check_int("jobs", jobs, minimum=1)
    settings = backend if backend is not None else BackendSettings()
    if not settings.wait and jobs is not None:
        raise ValueError("--no-wait submits every pending run at once: leave out --jobs")
    if poll_seconds is None:
        poll_seconds = 0.5 if settings.name == "local" else 2.0
    _check_corrupted_from(preset)
    if settings.name == "slurm":  # before anything is written
        from dropcluster.experiments.backends.slurm import check_slurm_settings

        check_slurm_settings(settings)
    stream = stream if stream is not None else sys.stderr
    out = Path(out)
    if jobs is None and settings.name == "local":
        jobs = default_jobs(_base_device(preset), settings.procs_per_run)
    with sweep_lock(out):
        return _run_locked(preset, out, jobs, list(only or []), stream, poll_seconds, settings)


def _check_corrupted_from(preset: Preset) -> None:
    """The released corrupted files are read at the end of each evaluated run: check the folder
    is there before the first run trains."""
    settings = _corruption_settings(preset)
    if settings is not None and settings.corrupted_from is not None:
        if not Path(settings.corrupted_from).is_dir():
            raise ValueError(
                f"preset {preset.name}: corrupted_from {settings.corrupted_from} is no folder"
            )


@dataclass
class _Context:
    """What one sweep invocation works with: its folder and database, the corrupted test sets
    of its evaluated runs, where the runs train, and the account of what it did."""

    out: Path
    store: ResultsStore
    evaluate: CorruptionSettings | None
    settings: BackendSettings
    summary: SweepSummary
    stream: TextIO
    poll_seconds: float
    start: float


def _run_locked(
    preset: Preset,
    out: Path,
    jobs: int | None,
    only: list[str],
    stream: TextIO,
    poll_seconds: float,
    settings: BackendSettings,
) -> SweepSummary:
    prepare_folder(preset, out)
    specs, store = plan(preset, out, only)
    summary = SweepSummary(total=len(specs))
    context = _Context(
        out,
        store,
        _corruption_settings(preset),
        settings,
        summary,
        stream,
        poll_seconds,
        time.perf_counter(),
    )
    with store:
        interrupted = store.reset_interrupted()
        if interrupted:
            stream.write(
                f"resuming {len(interrupted)} interrupted run(s): {', '.join(interrupted)}\n"
            )
        todo = _record_finished_folders(context, specs)
        summary.finished = len(specs) - len(todo) - len(summary.failed)
        stream.write(
            f"sweep {preset.name} in {out}: {len(specs)} runs, {summary.finished} finished, "
            f"{len(todo)} to run, {_where(settings, jobs)}\n"
        )
        if todo:
            engine = _make_engine(settings, preset, out, jobs)
            try:
                _drive(engine, context, todo)
            except BaseException:
                engine.stop()
                store.reset_interrupted()
                raise
            finally:
                engine.close()
    summary.seconds = time.perf_counter() - context.start
    return summary


def _record_finished_folders(context: _Context, specs: list[RunSpec]) -> list[RunSpec]:
    """Record the runs the database does not have as finished but whose folders do; returns
    the runs left to train (failed runs are retried, with a word). A folder that holds another
    run, or damaged files, fails its run with the reason and is left alone."""
    store, out, summary, stream = context.store, context.out, context.summary, context.stream
    status = {r.run_id: r for r in store.runs()}
    by_id = {spec.run_id: spec for spec in specs}
    todo = []
    for spec in specs:
        record = status[spec.run_id]
        if record.status == FINISHED:
            continue
        evaluate = context.evaluate if spec.evaluate_corruptions else None
        try:
            results = finished_results(out / RUNS_FOLDER / spec.run_id, spec, evaluate, by_id)
        except RunFolderError as error:
            # Another run's folder, or damaged files: never trained over, never recorded.
            store.mark_failed(spec.run_id, f"its folder cannot be recorded: {error}")
            summary.failed.append(spec.run_id)
            stream.write(
                f"FAILED {spec.run_id}: its folder {out / RUNS_FOLDER / spec.run_id} cannot be "
                f"recorded ({error}); move it away and rerun\n"
            )
            continue
        if results is not None:
            store.record_finished(spec.run_id, seconds=None, **results)
            summary.collected.append(spec.run_id)
            continue
        if record.status == FAILED:
            stream.write(f"retrying {spec.run_id} (failed before: {error_reason(record.error)})\n")
        todo.append(spec)
    if summary.collected:
        stream.write(
            f"recorded {len(summary.collected)} run(s) found finished in their folders: "
            f"{', '.join(summary.collected)}\n"
        )
    return todo


def _where(settings: BackendSettings, jobs: int | None) -> str:
    if settings.name == "local":
        return f"{jobs} at a time"
    limit = f"{jobs} at a time" if jobs else "all at once"
    return f"on {settings.name} ({limit}; the cluster schedules them)"


def _make_engine(settings: BackendSettings, preset: Preset, out: Path, jobs: int | None) -> Backend:
    """The backend; for this machine, with each job slot's device and share of the cores."""
    if settings.name != "local":
        return cluster_backend(settings, out, jobs)
    slots = jobs if jobs is not None else default_jobs(_base_device(preset), settings.procs_per_run)
    procs = settings.procs_per_run
    devices = _job_devices(preset, slots, procs)
    threads = _threads_per_job(slots, procs)

    def launch(task: RunTask, slot: int) -> subprocess.Popen:
        return _launch(task.spec, out, task.procs, slot, devices, threads)

    return LocalBackend(slots, launch)


def _drive(engine: Backend, context: _Context, todo: list[RunSpec]) -> None:
    """Hand the runs to ``engine`` as it has room, copy their epochs as they come, and record
    each run when it ends (the loop of :func:`run_sweep`)."""
    store, summary = context.store, context.summary
    rates = measured_rates(store)
    estimates = {s.run_id: estimate_seconds(s, rates, context.evaluate) for s in todo}
    queue = list(todo)
    active: dict[str, _Active] = {}
    display = _Display(context.stream)
    try:
        while queue or active:
            while queue and (engine.capacity is None or len(active) < engine.capacity):
                spec = queue.pop(0)
                task = _task(spec, context.out, context.evaluate, context.settings)
                engine.submit(task)
                store.mark_running(spec.run_id)
                active[spec.run_id] = _Active(spec, task.run_dir, time.perf_counter())
            if not context.settings.wait:
                summary.submitted = list(active)
                return
            time.sleep(context.poll_seconds)
            for job in active.values():
                _copy_new_epochs(store, job)
            for finished in engine.poll():
                job = active.pop(finished.task.run_id)
                display.clear()
                _record_exit(context, job, finished, estimates)
            display.show(
                _status_line(
                    summary, list(active.values()), queue, estimates, context.start, engine.capacity
                )
            )
    finally:
        display.clear()


def _task(
    spec: RunSpec, out: Path, evaluate: CorruptionSettings | None, settings: BackendSettings
) -> RunTask:
    """Write the run's job file and describe the run for the backend."""
    run_dir = out / RUNS_FOLDER / spec.run_id
    corruption = evaluate.to_dict() if evaluate and spec.evaluate_corruptions else None
    write_job(run_dir, spec.config.to_dict(), corruption)
    return RunTask(
        spec,
        run_dir.resolve(),
        settings.procs_per_run,
        settings.gpus_per_run,
        settings.cpus_per_run,
    )


def _copy_new_epochs(store: ResultsStore, job: _Active) -> None:
    """Copy a run's newly logged epochs into the database, so `dropcluster results` shows runs
    in progress (the log is read only when it changed: it may lie on a network filesystem)."""
    try:
        stat = (job.run_dir / LOG_NAME).stat()
    except OSError:
        return
    state = (stat.st_mtime_ns, stat.st_size)
    if state == job.log_state:
        return
    job.log_state = state
    history = _logged_history(job.run_dir)
    if history is not None and len(history) != job.epochs_seen:
        job.epochs_seen = len(history)
        store.record_epochs(job.spec.run_id, history)


def _record_exit(
    context: _Context, job: _Active, finished: Finished, estimates: dict[str, float]
) -> None:
    """Record a run's end: its results in one transaction, or its failure."""
    store, summary, stream = context.store, context.summary, context.stream
    run_id = job.spec.run_id
    run_dir = job.run_dir
    seconds = time.perf_counter() - job.started
    if finished.status == 0:
        try:
            results = read_results(run_dir)
        except (OSError, ValueError) as error:
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
    tail = _error_tail(run_dir / WORKER_LOG_NAME)
    reason = failure_reason(finished.status, finished.message, tail)
    store.mark_failed(run_id, f"{reason}\n--- last lines of {WORKER_LOG_NAME} ---\n{tail}")
    summary.failed.append(run_id)
    stream.write(f"FAILED {run_id}: {reason}\n  full log: {run_dir / WORKER_LOG_NAME}\n")


#: What the worker's exit statuses mean (see :mod:`dropcluster.experiments.worker`).
_WORKER_STATUSES = {
    1: "the worker stopped on an internal error",
    2: "the worker stopped on an error",
    3: "the task that started the worker ended, so the worker stopped",
}


def failure_reason(status: int | None, message: str, log_tail: str) -> str:
    """One line saying why a run's worker ended without results.

    Args:
        status: the worker's exit status (negative: killed by that signal, as Python reports
            it); None when the engine lost the task (``message`` says how).
        message: the engine's account (a Slurm job's final state, Ray's error), or "".
        log_tail: the last lines of the worker's log; its last line is the worker's own
            message when it stopped on an error (status 1 or 2), never the reason otherwise
            (a killed worker's last line is whatever it printed last).
    """
    if status is None:
        return message or "the engine lost the task"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        reason = f"the worker was killed by {name}"
        if -status == signal.SIGKILL:
            reason += " (kill -9, or the out-of-memory killer)"
        return f"{reason}: {message}" if message else reason
    last = log_tail.strip().splitlines()[-1] if log_tail.strip() else ""
    if status in (1, 2) and last:
        return last.removeprefix("dropcluster: error: ")
    return _WORKER_STATUSES.get(status, f"the worker exited with status {status}")


def _job_devices(preset: Preset, jobs: int, procs: int = 1) -> list[str | None]:
    """The device of each local job slot (None: the config's own): with several GPUs and a
    device that names none of them ("auto", "cuda"), job i uses GPU i; with ``procs`` GPUs per
    run, job i's first GPU is i * procs (see :func:`_launch`).

    Raises:
        ValueError: ``procs`` > 1 without enough CUDA devices for every slot.
    """
    device = resolve_device(_base_device(preset))
    if procs > 1:
        import torch

        count = torch.cuda.device_count() if device.type == "cuda" else 0
        if jobs * procs > count:
            raise ValueError(
                f"--gpus-per-run {procs} with {jobs} job(s) at a time needs {jobs * procs} CUDA "
                f"devices; this machine offers {count} to the preset's device "
                f"{_base_device(preset)!r}"
            )
        return [f"cuda:{slot * procs}" for slot in range(jobs)]
    if device.type == "cuda" and device.index is None:
        import torch

        count = torch.cuda.device_count()
        if count > 1:
            return [f"cuda:{slot % count}" for slot in range(jobs)]
    return [None] * jobs


def _threads_per_job(jobs: int, procs: int = 1) -> int | None:
    """CPU threads per worker process: the cores shared out when several train at once
    (``jobs`` runs of ``procs`` processes each)."""
    if jobs * procs == 1:
        return None
    return max(1, (os.cpu_count() or 1) // (jobs * procs))


def _launch(
    spec: RunSpec,
    out: Path,
    procs: int,
    slot: int,
    devices: list[str | None],
    threads: int | None,
) -> subprocess.Popen:
    """Start the worker of ``spec``'s run folder in local job slot ``slot``: on the slot's
    device, or under torchrun on the slot's ``procs`` GPUs, with ``threads`` torch threads in
    each process (None: torch's default)."""
    run_dir = out / RUNS_FOLDER / spec.run_id
    env = {}
    device = devices[slot]
    if device is not None and procs > 1:
        # Each rank takes the GPU of its local rank among the slot's GPUs.
        first = int(device.split(":")[1])
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(first + procs)]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[first : first + procs])
    elif device is not None:
        env["DROPCLUSTER_DEVICE"] = device
    if threads is not None:
        env["DROPCLUSTER_THREADS"] = str(threads)
    return start_worker(worker_command(run_dir, procs), run_dir, env)


def _phase(job: _Active) -> str:
    epochs = job.spec.config.epochs
    if job.log_state is None:
        return "starting"
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


#: Runs named on the status line; the others are counted.
_SHOWN_RUNS = 3


def _status_line(
    summary: SweepSummary,
    active: list[_Active],
    queue: list[RunSpec],
    estimates: dict[str, float],
    start: float,
    capacity: int | None,
) -> str:
    elapsed = time.perf_counter() - start
    left = sum(estimates.get(s.run_id, 0.0) for s in queue)
    for job in active:
        done = job.epochs_seen / max(1, job.spec.config.epochs)
        left += estimates.get(job.spec.run_id, 0.0) * (1.0 - done)
    left /= max(1, capacity or len(active))
    started = [job for job in active if job.log_state is not None]
    running = ", ".join(f"{j.spec.run_id} {_phase(j)}" for j in started[:_SHOWN_RUNS])
    if len(started) > _SHOWN_RUNS:
        running += f" and {len(started) - _SHOWN_RUNS} more"
    waiting = len(active) - len(started)
    if waiting:
        running += f"{', ' if running else ''}{waiting} starting or queued"
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
