"""Experiment presets (JSON data in ``presets/``) and their expansion into a grid of runs.

A preset holds a base :class:`~dropcluster.train.config.TrainConfig` (as a mapping), one or more
*grids* (each the product regularizer x p x training fraction x seed; the union of the grids is
the sweep), which runs are evaluated on corrupted test sets, and what the report needs (scale,
the paper's table to compare with, K for "averaged over the last K epochs"). Presets are data:
``demo`` (the embedded default), ``paper-cifar100`` and ``paper-tiny-imagenet`` ship with the
package, and any JSON file of the same shape can be given by path.
"""

from __future__ import annotations

import copy
import fnmatch
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from dropcluster.nn import REGULARIZERS
from dropcluster.train.config import TrainConfig

DEFAULT_PRESET = "demo"
GRID_KEYS = ("regularizer", "p", "train_fraction", "seed")
_REQUIRED = ("name", "scale", "description", "dataset", "base", "grids")


def preset_names() -> list[str]:
    """The presets shipped with the package."""
    folder = resources.files("dropcluster.experiments") / "presets"
    return sorted(
        entry.name[: -len(".json")] for entry in folder.iterdir() if entry.name.endswith(".json")
    )


def load_preset(name_or_path: str | Path) -> dict[str, Any]:
    """A preset by name (see :func:`preset_names`) or from a JSON file, validated.

    Raises:
        ValueError: unknown name (the message lists the valid ones) or a malformed preset.
    """
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        text = path.read_text()
        origin = str(path)
    else:
        names = preset_names()
        if str(name_or_path) not in names:
            raise ValueError(
                f"unknown preset {str(name_or_path)!r}; valid presets are {', '.join(names)} "
                f"(or the path of a preset .json file)"
            )
        folder = resources.files("dropcluster.experiments") / "presets"
        text = (folder / f"{name_or_path}.json").read_text()
        origin = f"preset {name_or_path}"
    try:
        preset = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{origin} is not valid JSON: {error}") from error
    validate_preset(preset, origin)
    return preset


def validate_preset(preset: dict[str, Any], origin: str = "preset") -> None:
    """Raise ValueError naming what is missing or wrong in ``preset``."""
    if not isinstance(preset, dict):
        raise ValueError(f"{origin} should be a JSON object, but got {type(preset).__name__}")
    missing = [key for key in _REQUIRED if key not in preset]
    if missing:
        raise ValueError(f"{origin} lacks the keys {missing}; a preset needs {list(_REQUIRED)}")
    if preset["scale"] not in ("demo", "paper"):
        raise ValueError(f"{origin}: scale should be 'demo' or 'paper', got {preset['scale']!r}")
    if not isinstance(preset["grids"], list) or not preset["grids"]:
        raise ValueError(f"{origin}: grids should be a non-empty list of grids")
    for index, grid in enumerate(preset["grids"]):
        missing = [key for key in GRID_KEYS if key not in grid]
        extra = sorted(set(grid) - set(GRID_KEYS))
        if missing or extra:
            raise ValueError(
                f"{origin}: grid {index} should have exactly the keys {list(GRID_KEYS)}; "
                f"missing {missing}, unknown {extra}"
            )
        for key in GRID_KEYS:
            if not isinstance(grid[key], list) or not grid[key]:
                raise ValueError(f"{origin}: grid {index} {key} should be a non-empty list")
        unknown = [r for r in grid["regularizer"] if r not in REGULARIZERS]
        if unknown:
            raise ValueError(
                f"{origin}: grid {index} has unknown regularizers {unknown}; valid: "
                f"{', '.join(REGULARIZERS)}"
            )
    _validate_evaluate(preset, origin)
    # Every run's config must be valid: build one per grid to fail now, not hours later.
    for grid in preset["grids"]:
        TrainConfig.from_dict(
            {
                **preset["base"],
                "regularizer": grid["regularizer"][0],
                "p": grid["p"][0],
                "train_fraction": grid["train_fraction"][0],
                "seed": grid["seed"][0],
            }
        )


EVALUATE_KEYS = ("train_fraction", "corruptions", "severities", "limit", "seed", "jpeg_quality",
                 "family", "corrupted_from")  # fmt: skip


def _validate_evaluate(preset: dict[str, Any], origin: str) -> None:
    evaluate = preset.get("evaluate")
    if evaluate is None:
        return
    if not isinstance(evaluate, dict):
        raise ValueError(f"{origin}: evaluate should be an object or null, got {evaluate!r}")
    unknown = sorted(set(evaluate) - set(EVALUATE_KEYS))
    if unknown or "train_fraction" not in evaluate:
        raise ValueError(
            f"{origin}: evaluate needs train_fraction and takes only {list(EVALUATE_KEYS)}; "
            f"unknown {unknown}"
        )
    fractions = {f for grid in preset["grids"] for f in grid["train_fraction"]}
    missing = [f for f in evaluate["train_fraction"] if f not in fractions]
    if missing:
        raise ValueError(
            f"{origin}: evaluate.train_fraction {missing} is in no grid (grids have "
            f"{sorted(fractions)})"
        )
    from dropcluster.experiments.corruption_eval import CorruptionSettings

    # Raises ValueError naming a bad corruption, severity, limit or JPEG quality.
    CorruptionSettings(**{k: v for k, v in evaluate.items() if k != "train_fraction"})
    if evaluate.get("corrupted_from") is not None:
        if preset["base"].get("dataset") not in ("cifar100", "tiny-imagenet"):
            raise ValueError(
                f"{origin}: corrupted_from reads released CIFAR-100-C / Tiny-ImageNet-C files, "
                f"but the data set is {preset['base'].get('dataset')!r}"
            )
        if not Path(evaluate["corrupted_from"]).is_dir():
            raise ValueError(f"{origin}: corrupted_from {evaluate['corrupted_from']} is no folder")


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its id, its full config and whether it gets corruption evaluation."""

    run_id: str
    config: TrainConfig
    evaluate_corruptions: bool

    @property
    def regularizer(self) -> str:
        return self.config.regularizer

    @property
    def p(self) -> float:
        return self.config.p

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def train_fraction(self) -> float:
        return self.config.train_fraction


def run_id(regularizer: str, p: float, train_fraction: float, seed: int) -> str:
    """A readable, unique id: ``dropcluster-p0.1-f1-s0``."""
    return f"{regularizer}-p{p:g}-f{train_fraction:g}-s{seed}"


def apply_overrides(preset: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``preset`` whose base config has ``overrides`` (``--set key=value``) applied."""
    result = copy.deepcopy(preset)
    result["base"] = {**result["base"], **overrides}
    if "average_last" in overrides:
        result["average_last"] = overrides["average_last"]
    validate_preset(result, f"preset {preset['name']} with {overrides}")
    return result


def expand_grid(preset: dict[str, Any]) -> list[RunSpec]:
    """Every run of the preset, once, in a stable order (grid order, then product order)."""
    evaluate = preset.get("evaluate") or None
    evaluated_fractions = set(evaluate["train_fraction"]) if evaluate else set()
    specs: dict[str, RunSpec] = {}
    for grid in preset["grids"]:
        for regularizer in grid["regularizer"]:
            # A run without a regularizer has no rate: one run, whatever the p list says.
            rates = [0.0] if regularizer == "none" else grid["p"]
            for p in rates:
                for fraction in grid["train_fraction"]:
                    for seed in grid["seed"]:
                        identifier = run_id(regularizer, p, fraction, seed)
                        if identifier in specs:
                            continue
                        config = TrainConfig.from_dict(
                            {
                                **preset["base"],
                                "regularizer": regularizer,
                                "p": float(p),
                                "train_fraction": float(fraction),
                                "seed": int(seed),
                            }
                        )
                        specs[identifier] = RunSpec(
                            identifier, config, float(fraction) in evaluated_fractions
                        )
    return list(specs.values())


def filter_runs(specs: list[RunSpec], only: list[str]) -> list[RunSpec]:
    """Keep the runs matching every filter in ``only``.

    A filter is ``key=value[,value...]`` with key one of regularizer, p, train_fraction (or
    fraction), seed; or a shell pattern on the run id (``dropcluster-*``).
    """
    kept = specs
    for expression in only:
        key, sep, values = expression.partition("=")
        key = key.strip()
        if not sep:
            kept = [s for s in kept if fnmatch.fnmatchcase(s.run_id, expression)]
            continue
        key = "train_fraction" if key == "fraction" else key
        if key not in GRID_KEYS:
            raise ValueError(
                f"--only {expression!r}: key should be one of {', '.join(GRID_KEYS)} (or a run "
                f"id pattern such as 'dropcluster-*'), but got {key!r}"
            )
        wanted = [v.strip() for v in values.split(",") if v.strip()]
        if key == "regularizer":
            kept = [s for s in kept if s.regularizer in wanted]
        else:
            try:
                numbers = [float(v) for v in wanted]
            except ValueError as error:
                raise ValueError(
                    f"--only {expression!r}: {key} values should be numbers"
                ) from error
            kept = [s for s in kept if any(abs(getattr(s, key) - n) < 1e-9 for n in numbers)]
    return kept


def parse_overrides(assignments: list[str]) -> dict[str, Any]:
    """``["stem=cifar", "epochs=10"]`` -> ``{"stem": "cifar", "epochs": 10}`` (JSON values)."""
    overrides: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, but got {assignment!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        overrides[key.strip()] = value
    return overrides
