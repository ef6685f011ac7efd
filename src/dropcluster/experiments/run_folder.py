"""A sweep's run folder, read and checked before anything of it is recorded.

A run folder (``OUT/runs/<run id>/``) is the truth about its run, so what goes from it into the
results database is checked first: the folder must hold the run its name says (its config is
the config the preset gives that run id), and its files must parse with the types the database
stores. A folder that fails raises :class:`RunFolderError`, whose message is the reason; the
sweep and ``dropcluster collect`` list it and record nothing of it.
"""

from __future__ import annotations

import json
import math
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from dropcluster.compat import is_0_1_config
from dropcluster.errors import DropClusterError, RunBusyError
from dropcluster.experiments.corruption_eval import CORRUPTIONS_NAME, CorruptionSettings
from dropcluster.experiments.presets import GRID_KEYS, RunSpec, run_id
from dropcluster.experiments.worker import JOB_NAME
from dropcluster.files import FolderLock
from dropcluster.train.config import TrainConfig
from dropcluster.train.loop import LOG_NAME, RESULT_NAME, RUN_LOCK_NAME, read_log

__all__ = [
    "CONFIG_NAME",
    "RunFolderError",
    "check_named_run",
    "check_run",
    "finished_results",
    "identify",
    "read_results",
    "run_folder_config",
]


CONFIG_NAME = "config.json"


class RunFolderError(DropClusterError, ValueError):
    """A run folder that cannot be recorded: a damaged or wrongly typed file, or a run other
    than the one its name says. The message is the reason, without the folder's name."""


def run_folder_config(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A run folder's config (a ``TrainConfig`` dict) and corruption settings (None: none), from
    its ``job.json`` (written by a sweep), else its ``config.json`` (``dropcluster train``).

    Raises:
        FileNotFoundError: neither file is there (a run not started yet).
        RunFolderError: the file is not valid JSON or not of the expected shape.
    """
    path = run_dir / JOB_NAME
    if not path.is_file():
        path = run_dir / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir} has neither {JOB_NAME} nor {CONFIG_NAME}")
        return _json_object(path), None
    job = _json_object(path)
    config, evaluate = job.get("config"), job.get("evaluate")
    if not isinstance(config, dict) or not (evaluate is None or isinstance(evaluate, dict)):
        raise RunFolderError(
            f"{JOB_NAME} should hold an object with a 'config' object and an 'evaluate' object "
            f"or null, but holds {_shape(job)}"
        )
    return config, evaluate


def check_run(run_dir: Path, spec: RunSpec, specs: dict[str, RunSpec] | None = None) -> None:
    """Raise :class:`RunFolderError` unless the folder holds the run ``spec`` describes: every
    grid key stated, and equal in every setting that changes results (the device, the
    evaluation batch size and the checkpoint schedule may differ).

    Args:
        run_dir: the run folder; a folder without a config (not started) passes.
        spec: the run the folder's name stands for.
        specs: every run of the preset by id: a mismatching folder then says whose config it
            holds (a copy of another run).
    """
    try:
        config = _train_config(run_dir)
    except FileNotFoundError:
        return
    differences = spec.config.run_differences(config)
    if not differences:
        return
    shown = "; ".join(
        f"{key} {theirs!r} here, {mine!r} in the preset"
        for key, (mine, theirs) in sorted(differences.items())
    )
    raise RunFolderError(
        f"it holds another run than the preset's {spec.run_id} ({shown}){_copy_of(config, specs)}"
    )


def check_named_run(run_dir: Path) -> None:
    """Raise :class:`RunFolderError` when the folder's config is of another run than its name
    says (a renamed copy, a foreign run): the run id its config makes must be the name. A folder
    without a config passes."""
    try:
        config = _train_config(run_dir)
    except FileNotFoundError:
        return
    made = run_id(config.regularizer, config.p, config.train_fraction, config.seed, config.variant)
    if made != run_dir.name:
        raise RunFolderError(f"it holds run {made}, not {run_dir.name}")


def identify(run_dir: Path, specs: dict[str, RunSpec]) -> str:
    """Why a folder whose name is no run id of the preset is not recorded (naming the run
    whose config it holds, if any)."""
    try:
        config = _train_config(run_dir)
    except FileNotFoundError:
        return "its name is no run id of the preset, and it holds no config"
    except RunFolderError as error:
        return f"its name is no run id of the preset ({error})"
    return f"its name is no run id of the preset{_copy_of(config, specs)}"


def _copy_of(config: TrainConfig, specs: dict[str, RunSpec] | None) -> str:
    for name, spec in (specs or {}).items():
        if spec.config.same_run_as(config):
            return f"; its config is that of run {name}: a copy of it?"
    return ""


def _train_config(run_dir: Path) -> TrainConfig:
    """The folder's config as a checked ``TrainConfig`` (RunFolderError: why it is not one)."""
    config, _ = run_folder_config(run_dir)
    missing = [key for key in ("dataset", "model", *GRID_KEYS) if key not in config]
    if missing:
        raise RunFolderError(f"its config lacks {missing}")
    if is_0_1_config(config):
        raise RunFolderError(
            "it was trained by dropcluster 0.1, whose ResNets had another stem: its results do "
            "not compare with this version's"
        )
    try:
        return TrainConfig.from_dict(config)
    except ValueError as error:
        raise RunFolderError(f"its config is not valid: {error}") from None


def read_results(run_dir: Path) -> dict[str, Any]:
    """A finished run's files as the arguments of ``ResultsStore.record_finished``, checked.

    Raises:
        FileNotFoundError: no ``result.json`` or no log.
        RunFolderError: a file is not valid JSON, or a value has the wrong type.
    """
    history = read_log(run_dir / LOG_NAME)
    result = _json_object(run_dir / RESULT_NAME)
    for key in ("top1", "top5"):
        _metric(RESULT_NAME, key, result.get(key), required=True)
    _count(RESULT_NAME, "average_last", result.get("average_last"), minimum=1)
    for record in history:
        _count(LOG_NAME, "epoch", record["epoch"], minimum=0)
        for key, value in record.items():
            if key in _LOG_METRICS:
                _metric(LOG_NAME, f"epoch {record['epoch']}: {key}", value)
    return {
        "history": history,
        "top1": result["top1"],
        "top5": result["top5"],
        "average_last": int(result["average_last"]),
        "corruptions": _corruption_rows(run_dir),
        "clusters": _cluster_rows(history),
    }


#: Logged per-epoch values the database keeps as numbers.
_LOG_METRICS = (
    "loss",
    "train_top1",
    "top1",
    "top5",
    "lr",
    "seconds",
    "images_per_s",
    "refit_seconds",
    "eval_seconds",
)


def _corruption_rows(run_dir: Path) -> list[dict[str, Any]] | None:
    path = run_dir / CORRUPTIONS_NAME
    if not path.is_file():
        return None
    document = _json_object(path)
    source, rows = document.get("source", "generated"), document.get("rows")
    if source not in ("generated", "released") or not isinstance(rows, list):
        raise RunFolderError(
            f"{CORRUPTIONS_NAME} should hold 'rows' (a list) and a 'source' of 'generated' or "
            f"'released', but holds {_shape(document)}"
        )
    checked = []
    for index, row in enumerate(rows):
        where = f"{CORRUPTIONS_NAME}: row {index}"
        if not isinstance(row, dict) or not isinstance(row.get("corruption"), str):
            raise RunFolderError(f"{where} should be an object naming its corruption")
        _count(CORRUPTIONS_NAME, f"row {index}: severity", row.get("severity"), minimum=0)
        for key in ("top1", "top5"):
            _metric(CORRUPTIONS_NAME, f"row {index}: {key}", row.get(key), required=True)
        checked.append(
            {
                **{key: row[key] for key in ("corruption", "severity", "top1", "top5")},
                "source": source,
            }
        )
    return checked


def _cluster_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The refit records of the log as rows of the database's cluster table."""
    rows = []
    for record in history:
        if "structured" not in record:
            continue
        structured, channels = record["structured"], record.get("channels")
        names = record.get("layers") or [f"layer{i}" for i in range(_length(structured))]
        if not (
            _int_list(structured)
            and _int_list(channels)
            and isinstance(names, list)
            and all(isinstance(name, str) for name in names)
            and len(structured) == len(channels) == len(names)
        ):
            raise RunFolderError(
                f"{LOG_NAME}: epoch {record['epoch']}: structured, channels and layers should be "
                f"lists of one length (integers, integers, names)"
            )
        for name, n_structured, n_channels in zip(names, structured, channels, strict=True):
            rows.append(
                {
                    "epoch": record["epoch"],
                    "layer": name,
                    "channels": n_channels,
                    "structured": n_structured,
                    "refit_seconds": record.get("refit_seconds"),
                }
            )
    return rows


def finished_results(
    run_dir: Path,
    spec: RunSpec | None = None,
    evaluate: CorruptionSettings | None = None,
    specs: dict[str, RunSpec] | None = None,
) -> dict[str, Any] | None:
    """The checked results of a finished run folder (see :func:`read_results`); None while its
    run is not finished, or while a process writes it.

    Finished: ``result.json`` counts the config's epochs, the log holds them all, and, when the
    corrupted test sets are asked for, ``corruptions.json`` scored the finished model with those
    settings.

    Args:
        run_dir: the run folder.
        spec: the run it should hold (checked with :func:`check_run`); None: no check.
        evaluate: the corrupted test sets the run needs (with ``spec``: the preset's, for an
            evaluated run); None without ``spec``: the folder's own job says.
        specs: every run of the preset, for :func:`check_run`'s message.

    Raises:
        RunFolderError: another run than ``spec``, or a damaged or wrongly typed file.
    """
    if spec is not None:
        check_run(run_dir, spec, specs)
    try:
        config, job_evaluate = run_folder_config(run_dir)
        if not (run_dir / RESULT_NAME).is_file():
            return None
    except FileNotFoundError:
        return None
    if spec is None and job_evaluate is not None:
        evaluate = CorruptionSettings(**job_evaluate)
    epochs = config.get("epochs")
    result = _json_object(run_dir / RESULT_NAME)
    if result.get("epochs", epochs) != epochs:
        return None
    if evaluate is not None:
        path = run_dir / CORRUPTIONS_NAME
        stored = _json_object(path) if path.is_file() else {}
        scored = stored.get("settings") == evaluate.to_dict() and (
            stored.get("checkpoint_epochs") == epochs
        )
        if not scored or "corruptions" not in result:
            return None
    lock = FolderLock(run_dir, RUN_LOCK_NAME, "training run")
    try:
        lock.acquire()
    except RunBusyError:
        return None
    except OSError:
        pass  # a read-only folder: nobody writes it either
    try:
        results = read_results(run_dir)
    except FileNotFoundError:
        return None
    finally:
        lock.release()
    return results if len(results["history"]) == epochs else None


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (FileNotFoundError when absent; RunFolderError when it is
    not valid JSON or not an object)."""
    try:
        document = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise RunFolderError(f"{path.name} is not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise RunFolderError(f"{path.name} should hold an object, but holds {_shape(document)}")
    return document


def _metric(file: str, key: str, value: Any, *, required: bool = False) -> None:
    """A stored metric: a number (NaN allowed), or None unless ``required``."""
    if value is None and not required:
        return
    try:
        number = float(value) if isinstance(value, Real) and not isinstance(value, bool) else None
    except OverflowError:  # an integer of hundreds of digits
        number = None
    if number is None or math.isinf(number):
        raise RunFolderError(f"{file}: {key} should be a number, but got {value!r}")


#: The largest count a run's files hold (epochs, severities, averaged epochs): far beyond any
#: real run, and far inside SQLite's 64-bit integers.
_MAX_COUNT = 2**31 - 1


def _count(file: str, key: str, value: Any, *, minimum: int) -> None:
    """A stored count: an integer in ``[minimum, 2**31 - 1]``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, Integral)
        or not (minimum <= value <= _MAX_COUNT)
    ):
        raise RunFolderError(
            f"{file}: {key} should be an integer from {minimum} to {_MAX_COUNT}, but got {value!r}"
        )


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, Integral) and not isinstance(item, bool) and 0 <= item <= _MAX_COUNT
        for item in value
    )


def _length(value: Any) -> int:
    return len(value) if isinstance(value, list) else 0


def _shape(value: Any) -> str:
    """A short description of a JSON value for a message: its type, and an object's keys."""
    if isinstance(value, dict):
        return f"an object with the keys {sorted(value)}"
    names = {list: "a list", str: "a string", bool: "true or false", type(None): "null"}
    return names.get(type(value), "a number")
