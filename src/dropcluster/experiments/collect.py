"""Put finished runs into a sweep's database without training: collect and merge.

A run's folder is the truth about it; the database is an index of the folders that one process
writes. :func:`collect` records every finished run folder of a sweep that the database lacks:
runs a Slurm ``--no-wait`` sweep left on the cluster, a database that was lost or deleted, runs
the database never heard of (registered from their ``job.json`` or ``config.json``). It reads
files only (no data set is loaded) and is idempotent: a run's rows are replaced, never added
twice, and runs the database has as finished are left alone.

With ``sources``, it first merges: the finished runs of other sweep folders of the same preset
and settings (runs of one grid made on different machines or clusters) are copied into this
one. A finished run here is never replaced, and an unfinished run is never copied.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from dropcluster.errors import RunBusyError
from dropcluster.experiments.presets import Preset, load_preset
from dropcluster.experiments.store import DATABASE_NAME, FINISHED, ResultsStore
from dropcluster.experiments.sweep import (
    PRESET_NAME,
    RUNS_FOLDER,
    changed_settings,
    finished_results,
    identity_base,
    prepare_folder,
    run_folder_config,
    sweep_lock,
)
from dropcluster.files import FolderLock
from dropcluster.train.loop import RUN_LOCK_NAME

#: Files of a run folder that stay behind when it is copied: its lock, temporary files.
_NOT_COPIED = (RUN_LOCK_NAME, ".*.tmp")


@dataclass
class CollectSummary:
    """What :func:`collect` did.

    Attributes:
        recorded: finished runs written to the database now.
        registered: of them, runs the database did not know.
        already: runs the database had as finished (left alone).
        unfinished: run folders whose run is not finished (or is being written).
        copied: runs copied from other sweep folders, with the folder each came from.
        not_copied: finished runs of other folders not copied, with the reason.
    """

    recorded: list[str] = field(default_factory=list)
    registered: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    copied: dict[str, Path] = field(default_factory=dict)
    not_copied: dict[str, str] = field(default_factory=dict)


def collect(
    out: str | Path, sources: list[str | Path] | tuple = (), stream: TextIO | None = None
) -> CollectSummary:
    """Record the finished runs of the sweep folder ``out`` in its database, after copying in
    those of ``sources`` (see the module docstring).

    Args:
        out: a sweep folder (it needs a ``preset.json``, unless ``sources`` give one).
        sources: other sweep folders of the same preset and settings.
        stream: where the account of what was done goes (default stderr).

    Returns:
        A :class:`CollectSummary`.

    Raises:
        ValueError: ``out`` or a source is no sweep folder, a source holds another preset or
            other settings, or a sweep is running in ``out``.
    """
    out = Path(out)
    stream = stream if stream is not None else sys.stderr
    source_presets = [(Path(source), _sweep_preset(Path(source))) for source in sources]
    if not (out / PRESET_NAME).is_file() and not source_presets:
        raise ValueError(f"{out} has no {PRESET_NAME}: is it a sweep's output folder?")
    summary = CollectSummary()
    with sweep_lock(out):
        if not (out / PRESET_NAME).is_file():
            prepare_folder(source_presets[0][1], out)
        preset = load_preset(out / PRESET_NAME)
        for source, source_preset in source_presets:
            _check_same_sweep(out, preset, source, source_preset)
        for source, _ in source_presets:
            _copy_finished_runs(source, out, summary, stream)
        _record_folders(out, preset, source_presets, summary)
    _report(out, summary, stream)
    return summary


def _sweep_preset(folder: Path) -> Preset:
    path = folder / PRESET_NAME
    if not path.is_file():
        raise ValueError(f"{folder} has no {PRESET_NAME}: is it a sweep's output folder?")
    return load_preset(path)


def _check_same_sweep(out: Path, preset: Preset, source: Path, source_preset: Preset) -> None:
    """Refuse to merge runs made from another preset or with other settings."""
    if source.resolve() == out.resolve():
        raise ValueError(f"--from {source} is the folder collected into")
    if source_preset.name != preset.name:
        raise ValueError(
            f"{source} holds a sweep of preset {source_preset.name!r}, {out} one of "
            f"{preset.name!r}: merge only sweeps of one preset"
        )
    changed = changed_settings(preset, source_preset)
    if changed:
        raise ValueError(
            f"{source} holds a sweep of {preset.name!r} with other settings than {out} "
            f"({changed} differ): its runs would not be comparable"
        )


def _run_folders(folder: Path) -> list[Path]:
    """The run folders of a sweep folder, by name (hidden ones, being copied, left out)."""
    runs = folder / RUNS_FOLDER
    if not runs.is_dir():
        return []
    return sorted(p for p in runs.iterdir() if p.is_dir() and not p.name.startswith("."))


def _copy_finished_runs(source: Path, out: Path, summary: CollectSummary, stream: TextIO) -> None:
    """Copy the finished runs of ``source`` that ``out`` lacks or has unfinished."""
    for run_dir in _run_folders(source):
        run_id = run_dir.name
        if finished_results(run_dir) is None:
            continue
        target = out / RUNS_FOLDER / run_id
        if run_id in summary.copied or finished_results(target) is not None:
            summary.not_copied[f"{source}:{run_id}"] = "finished here already"
            continue
        try:
            _replace_folder(run_dir, target)
        except RunBusyError:
            summary.not_copied[f"{source}:{run_id}"] = f"a process is writing {target}"
            continue
        summary.copied[run_id] = source
        stream.write(f"copied {run_id} from {source}\n")


def _replace_folder(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target``, replacing an unfinished run folder there.

    The copy is made under a hidden name beside ``target`` and renamed into place, so a crash
    leaves either the old folder or the complete new one (plus a hidden leftover).

    Raises:
        RunBusyError: a process is writing ``target``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    incoming = target.with_name(f".incoming-{target.name}")
    shutil.rmtree(incoming, ignore_errors=True)
    shutil.copytree(source, incoming, ignore=shutil.ignore_patterns(*_NOT_COPIED))
    if not target.exists():
        incoming.rename(target)
        return
    with FolderLock(target, RUN_LOCK_NAME, "training run"):
        replaced = target.with_name(f".replaced-{target.name}")
        shutil.rmtree(replaced, ignore_errors=True)
        target.rename(replaced)
        incoming.rename(target)
    shutil.rmtree(replaced)


def _record_folders(
    out: Path,
    preset: Preset,
    sources: list[tuple[Path, Preset]],
    summary: CollectSummary,
) -> None:
    """Record every finished run folder of ``out`` that the database lacks as finished."""
    seconds = _source_seconds([source for source, _ in sources])
    with ResultsStore.in_folder(out) as store:
        known = {record.run_id: record for record in store.runs()}
        for run_dir in _run_folders(out):
            run_id = run_dir.name
            record = known.get(run_id)
            if record is not None and record.status == FINISHED:
                summary.already.append(run_id)
                continue
            results = finished_results(run_dir)
            if results is None:
                summary.unfinished.append(run_id)
                continue
            if record is None:
                config, _ = run_folder_config(run_dir)
                store.add_run(
                    run_id,
                    identity_base(config),
                    preset=preset.name,
                    regularizer=config["regularizer"],
                    p=config["p"],
                    seed=config["seed"],
                    train_fraction=config["train_fraction"],
                )
                summary.registered.append(run_id)
            store.record_finished(run_id, seconds=seconds.get(run_id), **results)
            summary.recorded.append(run_id)


def _source_seconds(sources: list[Path]) -> dict[str, float]:
    """The recorded wall time of the finished runs in the sources' databases (the first
    source that has a run wins), so merged runs keep it."""
    seconds: dict[str, float] = {}
    for source in sources:
        if not (source / DATABASE_NAME).is_file():
            continue
        with ResultsStore.in_folder(source, readonly=True) as store:
            for record in store.runs(status=FINISHED):
                if record.seconds is not None:
                    seconds.setdefault(record.run_id, record.seconds)
    return seconds


def _report(out: Path, summary: CollectSummary, stream: TextIO) -> None:
    parts: list[str] = [f"{len(summary.recorded)} run(s) recorded"]
    if summary.registered:
        parts.append(f"{len(summary.registered)} of them new to the database")
    if summary.copied:
        parts.append(f"{len(summary.copied)} copied from other sweeps")
    parts.append(f"{len(summary.already)} finished before")
    if summary.unfinished:
        parts.append(f"{len(summary.unfinished)} not finished ({', '.join(summary.unfinished)})")
    stream.write(f"{out / DATABASE_NAME}: {'; '.join(parts)}\n")
    for run, reason in summary.not_copied.items():
        stream.write(f"not copied: {run} ({reason})\n")
