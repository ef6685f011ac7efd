"""Put finished runs into a sweep's database without training: collect and merge.

A run's folder is the truth about it; the database is an index of the folders that one process
writes. :func:`collect` records every finished run folder of a sweep that the database lacks:
runs a Slurm ``--no-wait`` sweep left on the cluster, a database that was lost or deleted, runs
the database never heard of. It reads files only (no data set is loaded) and is idempotent: a
run's rows are replaced, never added twice, and runs the database has as finished are left
alone.

Nothing is recorded unchecked (:mod:`dropcluster.experiments.run_folder`): a folder is recorded
only when its name is a run id of the sweep's preset, its config is the config the preset gives
that run, and its files parse with the types the database stores. Any other folder is listed
with its reason and skipped; one bad folder never stops the others. Rows the database holds
that fail the same checks (recorded by an older version, or edited by hand) are removed, and
recorded again when their folder passes.

With ``sources``, it first merges: the finished runs of other sweep folders of the same preset
and settings (runs of one grid made on different machines or clusters) are copied into this
one, after the same checks. A finished run here is never replaced, an unfinished run is never
copied, and symbolic links are resolved (or the run refused) before anything is copied.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from dropcluster.compat import refuse_0_1_run, variant_from_run_id
from dropcluster.errors import RunBusyError
from dropcluster.experiments.corruption_eval import CorruptionSettings
from dropcluster.experiments.presets import Preset, RunSpec, expand_grid, load_preset
from dropcluster.experiments.run_folder import (
    RunFolderError,
    check_named_run,
    check_run,
    finished_results,
    identify,
)
from dropcluster.experiments.store import (
    DATABASE_NAME,
    FINISHED,
    ResultsStore,
)
from dropcluster.experiments.sweep import (
    PRESET_NAME,
    RUNS_FOLDER,
    changed_settings,
    identity_base,
    prepare_folder,
    sweep_lock,
)
from dropcluster.files import FolderLock
from dropcluster.train.config import TrainConfig
from dropcluster.train.loop import RUN_LOCK_NAME

__all__ = [
    "CollectSummary",
    "collect",
]


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
        skipped: run folders not recorded, with the reason (not a run of the preset, another
            run's config, a damaged or wrongly typed file, a link to nothing).
        removed: rows removed from the database, with the reason (they failed the same checks).
        copied: runs copied from other sweep folders, with the folder each came from.
        not_copied: finished runs of other folders not copied, with the reason.
    """

    recorded: list[str] = field(default_factory=list)
    registered: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    removed: dict[str, str] = field(default_factory=dict)
    copied: dict[str, Path] = field(default_factory=dict)
    not_copied: dict[str, str] = field(default_factory=dict)


def collect(
    out: str | Path,
    sources: list[str | Path] | tuple = (),
    stream: TextIO | None = None,
    *,
    drop_mismatched: bool = False,
) -> CollectSummary:
    """Record the finished runs of the sweep folder ``out`` in its database, after copying in
    those of ``sources`` (see the module docstring).

    Args:
        out: a sweep folder (it needs a ``preset.json``, unless ``sources`` give one).
        sources: other sweep folders of the same preset and settings.
        stream: where the account of what was done goes (default stderr).
        drop_mismatched: remove the rows of the preset's runs whose stored config, or whose
            folder's config, is not the preset's (without it, such rows stop the collect before
            anything changes: they may mean that ``preset.json`` was edited).

    Returns:
        A :class:`CollectSummary`.

    Raises:
        ValueError: ``out`` or a source is no sweep folder, a source holds another preset or
            other settings, a sweep is running in ``out``, or rows disagree with the preset
            (see ``drop_mismatched``).
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
        grid = _Grid(preset)
        for source, _ in source_presets:
            _copy_finished_runs(source, out, grid, summary, stream)
        _record_folders(out, grid, [s for s, _ in source_presets], summary, drop_mismatched)
    _report(out, summary, stream)
    return summary


class _Grid:
    """The runs of a preset by id, and what a finished folder of each must hold."""

    def __init__(self, preset: Preset) -> None:
        self.preset = preset
        self.specs = {spec.run_id: spec for spec in expand_grid(preset)}
        self._evaluate = preset.evaluate.corruption if preset.evaluate else None

    def finished(self, run_dir: Path) -> dict | None:
        """The checked results of the folder of the run its name says (None: unfinished).

        Raises:
            RunFolderError: not a folder, not a run of the preset, or not recordable.
        """
        spec = self.specs.get(run_dir.name)
        if not run_dir.is_dir():
            what = "a link to nothing" if run_dir.is_symlink() else "not a folder"
            raise RunFolderError(f"it is {what}")
        if spec is None:
            raise RunFolderError(identify(run_dir, self.specs))
        return finished_results(run_dir, spec, self.evaluate(spec), self.specs)

    def evaluate(self, spec: RunSpec) -> CorruptionSettings | None:
        return self._evaluate if spec.evaluate_corruptions else None


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


def _run_entries(folder: Path) -> list[Path]:
    """The entries of a sweep's ``runs`` folder, by name (hidden ones, being copied, left out;
    links and files included, to be listed)."""
    runs = folder / RUNS_FOLDER
    if not runs.is_dir():
        return []
    return sorted(p for p in runs.iterdir() if not p.name.startswith("."))


def _copy_finished_runs(
    source: Path, out: Path, grid: _Grid, summary: CollectSummary, stream: TextIO
) -> None:
    """Copy the checked finished runs of ``source`` that ``out`` lacks or has unfinished."""
    for entry in _run_entries(source):
        run_id = entry.name
        key = f"{source}:{run_id}"
        try:
            if grid.finished(entry) is None:
                continue
        except RunFolderError as error:
            summary.not_copied[key] = str(error)
            continue
        target = out / RUNS_FOLDER / run_id
        try:
            here = None if not target.exists() else grid.finished(target)
        except RunFolderError as error:
            summary.not_copied[key] = f"{target} holds what cannot be replaced ({error})"
            continue
        if run_id in summary.copied or here is not None:
            summary.not_copied[key] = "finished here already"
            continue
        try:
            _replace_folder(entry.resolve(), target)
        except RunBusyError:
            summary.not_copied[key] = f"a process is writing {target}"
            continue
        except RunFolderError as error:
            summary.not_copied[key] = str(error)
            continue
        summary.copied[run_id] = source
        stream.write(f"copied {run_id} from {source}\n")


def _replace_folder(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target``, replacing an unfinished run folder there.

    The copy is made under a hidden name beside ``target`` and renamed into place, so a crash
    leaves either the old folder or the complete new one (plus a hidden leftover, which the
    next copy of that run removes); any failure removes the copy and keeps the old folder.

    Raises:
        RunBusyError: a process is writing ``target``.
        RunFolderError: ``source`` holds a link to nothing or to a folder, ``target`` is a
            link, or the copy failed (the reason says why).
    """
    _check_links(source)
    if target.is_symlink():
        raise RunFolderError(
            f"{target} is a symbolic link: collect replaces folders only; remove the link"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    incoming = target.with_name(f".incoming-{target.name}")
    shutil.rmtree(incoming, ignore_errors=True)
    try:
        shutil.copytree(source, incoming, ignore=shutil.ignore_patterns(*_NOT_COPIED))
        if not target.exists():
            incoming.rename(target)
            return
        with FolderLock(target, RUN_LOCK_NAME, "training run"):
            replaced = target.with_name(f".replaced-{target.name}")
            shutil.rmtree(replaced, ignore_errors=True)
            target.rename(replaced)
            try:
                incoming.rename(target)
            except BaseException:
                replaced.rename(target)
                raise
        shutil.rmtree(replaced, ignore_errors=True)
    except shutil.Error as error:
        reasons = "; ".join(str(why) for _, _, why in error.args[0][:3])
        raise RunFolderError(f"copying {source} failed: {reasons}") from None
    finally:
        shutil.rmtree(incoming, ignore_errors=True)


def _check_links(folder: Path) -> None:
    """Refuse a run folder holding a symbolic link to nothing or to a folder (a copy would
    fail half-way, or follow a loop); links to files are copied as the files."""
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            path = Path(root) / name
            if not path.is_symlink():
                continue
            if not path.exists():
                raise RunFolderError(
                    f"{path} is a symbolic link to {os.readlink(path)}, which does not exist"
                )
            if path.is_dir():
                raise RunFolderError(f"{path} is a symbolic link to a folder; copy it by hand")


def _record_folders(
    out: Path, grid: _Grid, sources: list[Path], summary: CollectSummary, drop_mismatched: bool
) -> None:
    """Repair the database, then record every checked finished run folder of ``out`` that the
    database lacks as finished."""
    seconds = _source_seconds(sources)
    with ResultsStore.in_folder(out) as store:
        _repair(store, out, grid, summary, drop_mismatched)
        known = {record.run_id: record for record in store.runs()}
        for entry in _run_entries(out):
            run_id = entry.name
            record = known.get(run_id)
            if record is not None and record.status == FINISHED:
                summary.already.append(run_id)
                continue
            try:
                results = grid.finished(entry)
            except RunFolderError as error:
                summary.skipped[run_id] = str(error)
                continue
            if results is None:
                summary.unfinished.append(run_id)
                continue
            spec = grid.specs[run_id]
            if record is None:
                store.add_run(
                    run_id,
                    identity_base(spec.config.to_dict()),
                    preset=grid.preset.name,
                    regularizer=spec.regularizer,
                    p=spec.p,
                    seed=spec.seed,
                    train_fraction=spec.train_fraction,
                )
                summary.registered.append(run_id)
            store.record_finished(run_id, seconds=seconds.get(run_id), **results)
            summary.recorded.append(run_id)


def _repair(
    store: ResultsStore, out: Path, grid: _Grid, summary: CollectSummary, drop_mismatched: bool
) -> None:
    """Remove the rows the evidence shows to be wrong; refuse (changing nothing) when rows
    disagree with the preset and ``drop_mismatched`` is not given.

    Wrong for sure: a row that cannot be read, and a row whose folder holds another run than
    the row's id names (a renamed copy, a foreign run). A row of the preset's grid whose stored
    config, or whose folder's config, is not the preset's may instead mean that ``preset.json``
    was edited: the same refusal as the sweep's, unless ``drop_mismatched``.
    """
    removals = dict(store.unreadable_runs())
    mismatched: dict[str, str] = {}
    for record in store.runs():
        folder = out / RUNS_FOLDER / record.run_id
        try:
            if folder.is_dir():
                check_named_run(folder)
        except RunFolderError as error:
            removals[record.run_id] = f"its folder is not run {record.run_id}: {error}"
            continue
        problem = _mismatch(store, grid, record, folder)
        if problem is not None:
            mismatched[record.run_id] = problem
    if mismatched and not drop_mismatched:
        shown = "; ".join(f"{run_id}: {problem}" for run_id, problem in mismatched.items())
        raise ValueError(
            f"{len(mismatched)} run(s) of {store.path} disagree with {out / PRESET_NAME} "
            f"({shown}); nothing was changed. If preset.json was edited, restore it; if it is "
            f"right, `dropcluster collect {out} --drop-mismatched` removes these rows (their "
            f"folders stay, and are skipped)"
        )
    removals.update(mismatched)
    for run_id, reason in removals.items():
        store.delete_run(run_id)
        summary.removed[run_id] = reason


def _mismatch(store: ResultsStore, grid: _Grid, record, folder: Path) -> str | None:
    """How a readable row of the grid, or its folder, disagrees with the preset (None: it
    agrees, or is no run of the grid)."""
    spec = grid.specs.get(record.run_id)
    if spec is None:
        return None
    stored = dict(record.config)
    refuse_0_1_run(store.path, record.run_id, stored)
    if "variant" not in stored:  # recorded before configs kept their variant
        stored["variant"] = variant_from_run_id(
            record.run_id, record.regularizer, record.p, record.train_fraction, record.seed
        )
    try:
        differences = spec.config.run_differences(TrainConfig.from_dict(stored))
    except ValueError as error:
        return f"its stored config is not valid ({error})"
    if differences:
        shown = "; ".join(
            f"{key} {theirs!r} stored, {mine!r} in the preset"
            for key, (mine, theirs) in sorted(differences.items())
        )
        return f"recorded with another config than the preset's ({shown})"
    try:
        check_run(folder, spec)
    except RunFolderError as error:
        return f"its folder is not the preset's run: {error}"
    return None


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
    if summary.skipped:
        parts.append(f"{len(summary.skipped)} skipped")
    stream.write(f"{out / DATABASE_NAME}: {'; '.join(parts)}\n")
    for run_id, reason in summary.removed.items():
        stream.write(f"removed from the database: {run_id} ({reason})\n")
    for run_id, reason in summary.skipped.items():
        stream.write(f"skipped: {out / RUNS_FOLDER / run_id} ({reason})\n")
    for run, reason in summary.not_copied.items():
        stream.write(f"not copied: {run} ({reason})\n")
