"""Experiment presets (JSON data in ``presets/``) and their expansion into a grid of runs.

A :class:`Preset` holds a base :class:`~dropcluster.train.config.TrainConfig` (as a mapping), one
or more :class:`Grid` (each the product regularizer x p x training fraction x seed; the union of
the grids is the sweep), which runs are evaluated on corrupted test sets
(:class:`EvaluateSettings`), and what the report needs (scale, the paper's table to compare
with, K for "averaged over the last K epochs"), and optionally per-regularizer options,
variants (named settings compared side by side), the assumptions (settings the paper does not
state) and the analysis ``reproduce`` runs. Presets are data: ``demo`` (the embedded default),
``evidence``, ``paper-cifar100``, ``paper-tiny-imagenet``, their ``-ours`` variants and
``paper-figures`` ship with the package (:func:`preset_names`), and any JSON file of the same
shape can be given by path (:func:`load_preset`).

Precedence in a run's config: the grid's ``options`` over the preset's ``options`` (for
``regularizer_options``) over the ``base`` (where ``--set`` goes) over the defaults.
"""

from __future__ import annotations

import copy
import fnmatch
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from dropcluster.experiments.corruption_eval import CorruptionSettings
from dropcluster.experiments.paper_results import PAPER_DATASETS
from dropcluster.nn.registry import regularizer_names
from dropcluster.plugins import load_plugins
from dropcluster.train.config import TrainConfig, parse_assignments
from dropcluster.validation import (
    check_choice,
    check_fields,
    check_int,
    check_name,
    check_type,
)

__all__ = [
    "ANALYZE_RUNS",
    "DEFAULT_PRESET",
    "EVALUATE_KEYS",
    "GRID_KEYS",
    "GRID_OPTIONAL_KEYS",
    "REQUIRED_KEYS",
    "SCALES",
    "AnalyzeSettings",
    "EvaluateSettings",
    "Grid",
    "Preset",
    "RunSpec",
    "apply_overrides",
    "arm_name",
    "as_preset",
    "check_variant",
    "expand_grid",
    "filter_runs",
    "load_preset",
    "parse_overrides",
    "preset_names",
    "run_id",
    "with_corrupted_from",
    "with_plugins",
]


DEFAULT_PRESET = "demo"
#: "demo": small and fast, not comparable with the paper; "paper": the paper's protocol.
SCALES = ("demo", "paper")
GRID_KEYS = ("regularizer", "p", "train_fraction", "seed")
#: Data sets released as corrupted files (CIFAR-100-C, Tiny-ImageNet-C).
_RELEASED_CORRUPTED = ("cifar10", "cifar100", "tiny-imagenet")


#: Optional keys of a grid: a variant name and config values for its runs.
GRID_OPTIONAL_KEYS = ("variant", "options")
_VARIANT_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def check_variant(variant: str | None) -> None:
    """A variant name is lower-case letters, digits, ``-``, ``_`` and ``.`` (it goes into run
    ids and folder names); None means no variant."""
    if variant is None:
        return
    check_type("variant", variant, str)
    if not variant or not set(variant) <= _VARIANT_CHARACTERS:
        raise ValueError(
            f"variant should be a non-empty name of a-z, 0-9, '-', '_' and '.', but got {variant!r}"
        )


@dataclass(frozen=True)
class Grid:
    """One product of runs: every regularizer x p x training fraction x seed.

    A run without a regularizer (``"none"``) has no rate: it is one run per training fraction
    and seed, whatever ``p`` lists.

    Attributes:
        regularizer, p, train_fraction, seed: the lists whose product are the runs.
        variant: a name for this grid's settings (e.g. ``"ours"``): its runs are compared as
            ``regularizer:variant`` in the report, and their ids carry it. None: the preset's.
        options: ``TrainConfig`` values of this grid's runs, over the preset's ``base``;
            its ``regularizer_options`` are merged over the preset's ``options`` for the
            regularizer.
    """

    regularizer: list[str]
    p: list[float]
    train_fraction: list[float]
    seed: list[int]
    variant: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self)
        for key in GRID_KEYS:
            if not getattr(self, key):
                raise ValueError(f"{key} should be a non-empty list")
        unknown = [r for r in self.regularizer if r not in regularizer_names(r)]
        if unknown:
            valid = ", ".join(regularizer_names())
            raise ValueError(f"unknown regularizers {unknown}; valid: {valid}")
        check_variant(self.variant)
        check_type(
            "options.regularizer_options",
            self.options.get("regularizer_options", {}),
            dict[str, Any],
        )
        reserved = sorted(set(self.options) & {*GRID_KEYS, "variant"})
        if reserved:
            raise ValueError(f"a grid's options cannot set {reserved}: the grid itself sets them")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Grid:
        """A grid from its JSON form: the keys of :data:`GRID_KEYS`, each a list, and optionally
        ``variant`` (a name) and ``options`` (config values)."""
        check_type("a grid", values, dict[str, Any])
        missing = [key for key in GRID_KEYS if key not in values]
        extra = sorted(set(values) - set(GRID_KEYS) - set(GRID_OPTIONAL_KEYS))
        if missing or extra:
            raise ValueError(
                f"a grid should have the keys {list(GRID_KEYS)} and may have "
                f"{list(GRID_OPTIONAL_KEYS)}; missing {missing}, unknown {extra}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {key: list(getattr(self, key)) for key in GRID_KEYS}
        if self.variant is not None:
            values["variant"] = self.variant
        if self.options:
            values["options"] = copy.deepcopy(self.options)
        return values


#: The keys of a preset's ``evaluate`` block: the training fractions, then CorruptionSettings'.
EVALUATE_KEYS = ("train_fraction", *(f.name for f in fields(CorruptionSettings)))


@dataclass(frozen=True)
class EvaluateSettings:
    """Which runs of a sweep are evaluated on corrupted test sets, and how.

    Attributes:
        train_fraction: the runs with these training fractions are evaluated.
        corruption: the corrupted test sets they are evaluated on.
    """

    train_fraction: list[float]
    corruption: CorruptionSettings

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.train_fraction:
            raise ValueError("evaluate.train_fraction should be a non-empty list")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EvaluateSettings:
        """From the JSON form: ``train_fraction`` and any of CorruptionSettings' fields."""
        check_type("evaluate", values, dict[str, Any])
        unknown = sorted(set(values) - set(EVALUATE_KEYS))
        if unknown or "train_fraction" not in values:
            raise ValueError(
                f"evaluate needs train_fraction and takes only {list(EVALUATE_KEYS)}; "
                f"unknown {unknown}"
            )
        # CorruptionSettings raises ValueError naming a bad corruption, severity, limit, ...
        corruption = CorruptionSettings(
            **{key: value for key, value in values.items() if key != "train_fraction"}
        )
        return cls(values["train_fraction"], corruption)

    def to_dict(self) -> dict[str, Any]:
        return {"train_fraction": list(self.train_fraction), **self.corruption.to_dict()}


#: Which finished runs of a sweep ``reproduce`` analyses (``dropcluster analyze``).
ANALYZE_RUNS = ("best-dropcluster", "all")


@dataclass(frozen=True)
class AnalyzeSettings:
    """The cluster analysis ``dropcluster reproduce`` runs after a sweep.

    Attributes:
        runs: ``"best-dropcluster"`` (the DropCluster run the report shows) or ``"all"``
            (every finished run: the figures presets).
        epoch: analyse the checkpoint kept after this many epochs (the runs'
            ``keep_checkpoints`` must hold it); None: the last checkpoint.
        unstructured: the rule for runs without a fitted DropCluster layer (``"rena"``, the
            paper's, or ``"dead"``); None: ``dropcluster analyze``'s default.
        sample_images: test images whose activations are clustered.
    """

    runs: str = "best-dropcluster"
    epoch: int | None = None
    unstructured: str | None = None
    sample_images: int = 256

    def __post_init__(self) -> None:
        check_fields(self)
        check_choice("analyze.runs", self.runs, ANALYZE_RUNS)
        check_choice("analyze.unstructured", self.unstructured, (None, "rena", "dead"))
        if self.epoch is not None:
            check_int("analyze.epoch", self.epoch, minimum=1)
        check_int("analyze.sample_images", self.sample_images, minimum=2)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AnalyzeSettings:
        check_type("analyze", values, dict[str, Any])
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            names = [f.name for f in fields(cls)]
            raise ValueError(f"analyze takes only {names}; unknown {unknown}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


#: Keys a preset's JSON form has to have; the others default to None.
REQUIRED_KEYS = ("name", "scale", "description", "dataset", "base", "grids")


@dataclass(frozen=True)
class Preset:
    """A sweep: a base config, the grids of runs, and what the report needs.

    Build one with :meth:`from_dict` (the JSON form of a preset file) or :func:`load_preset`;
    :meth:`to_dict` gives the JSON form back (a sweep writes it as ``preset.json``). Every run's
    config is checked when the preset is made, so a bad value fails now, not hours into a sweep.

    Attributes:
        name: the preset's name (a sweep folder holds the runs of one preset); a plain name,
            since the default output folder is ``runs/<name>``.
        scale: "demo" (small, not comparable with the paper) or "paper".
        description: one paragraph, shown at the top of the report.
        dataset: the data set the report names.
        base: ``TrainConfig`` values shared by every run; the grids set regularizer, p,
            train_fraction and seed.
        grids: the runs, as the union of the grids' products.
        evaluate: which runs get the corrupted-test evaluation (None: none).
        paper: the data set whose paper numbers the report shows ("cifar100",
            "tiny-imagenet"; None: none).
        paper_command: the command of the paper-scale sweep, quoted by demo-scale reports.
        average_last: K of the report's "mean over the last K epochs" (None: give it to the
            report).
        options: regularizer name -> its ``regularizer_options`` in every run of that
            regularizer (e.g. the paper's DropCluster layer, the paper's DropBlock package).
        variant: the variant name of every grid that names none (see :class:`Grid`).
        assumptions: the settings the paper does not state, with the value chosen here (shown
            by the dry run and the report, so that no guess passes for the paper's).
        analyze: the cluster analysis ``reproduce`` runs after the sweep (None: the DropCluster
            run the report shows, with ``dropcluster analyze``'s defaults).
        unstated: the config fields the paper does not state, marked by the dry run (None:
            :data:`dropcluster.experiments.sweep.PAPER_UNSTATED` for a paper-scale preset).
        plugins: plugin modules imported before the grids are read (e.g. the one that
            registers a method compared with the paper's, :mod:`dropcluster.plugins`); every
            run records them in its ``plugins``, so that its worker imports them too.
    """

    name: str
    scale: str
    description: str
    dataset: str
    base: dict[str, Any]
    grids: list[Grid]
    evaluate: EvaluateSettings | None = None
    paper: str | None = None
    paper_command: str | None = None
    average_last: int | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    variant: str | None = None
    assumptions: list[str] = field(default_factory=list)
    analyze: AnalyzeSettings | None = None
    unstated: list[str] | None = None
    plugins: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_fields(self)
        load_plugins(self.plugins)
        check_name("name", self.name)  # the default output folder is runs/<name>
        check_choice("scale", self.scale, SCALES)
        check_type(
            "base.regularizer_options", self.base.get("regularizer_options", {}), dict[str, Any]
        )
        check_variant(self.variant)
        unknown = sorted(name for name in self.options if name not in regularizer_names(name))
        if unknown:
            raise ValueError(f"options of unknown regularizers {unknown}")
        check_choice("paper", self.paper, (None, *PAPER_DATASETS))
        if self.average_last is not None:
            check_int("average_last", self.average_last, minimum=1)
        if not self.grids:
            raise ValueError("grids should be a non-empty list of grids")
        if self.evaluate is not None:
            self._check_evaluate(self.evaluate)
        if self.analyze is not None and self.analyze.epoch is not None:
            epoch = self.analyze.epoch
            for spec in _run_specs(self):
                if epoch not in spec.config.keep_checkpoints:
                    raise ValueError(
                        f"analyze.epoch is {epoch}, but run {spec.run_id} does not keep that "
                        f"epoch's checkpoint (keep_checkpoints {spec.config.keep_checkpoints})"
                    )
        _run_specs(self)  # builds (and so checks) every run's TrainConfig

    def _check_evaluate(self, evaluate: EvaluateSettings) -> None:
        fractions = {f for grid in self.grids for f in grid.train_fraction}
        missing = [f for f in evaluate.train_fraction if f not in fractions]
        if missing:
            raise ValueError(
                f"evaluate.train_fraction {missing} is in no grid (grids have {sorted(fractions)})"
            )
        dataset = self.base.get("dataset")
        if evaluate.corruption.corrupted_from is not None and dataset not in _RELEASED_CORRUPTED:
            raise ValueError(
                f"corrupted_from reads released CIFAR-10-C / CIFAR-100-C / Tiny-ImageNet-C files, "
                f"but the "
                f"data set is {dataset!r}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], origin: str = "preset") -> Preset:
        """A preset from its JSON form, validated.

        Args:
            values: the keys of :data:`REQUIRED_KEYS`, and optionally ``evaluate``, ``paper``,
                ``paper_command``, ``average_last``, ``options``, ``variant``,
                ``assumptions``, ``unstated``, ``analyze`` and ``plugins``; ``grids`` is a list of
                grid objects (see :class:`Grid`), ``evaluate`` an object (see
                :class:`EvaluateSettings`) or null, ``analyze`` one (:class:`AnalyzeSettings`).
            origin: how error messages name the preset (a file, a preset name).

        Raises:
            ValueError: a missing or unknown key, or a bad value; the message starts with
                ``origin``.
        """
        try:
            return cls._from_dict(values)
        except ValueError as error:
            raise ValueError(f"{origin}: {error}") from error

    @classmethod
    def _from_dict(cls, values: Mapping[str, Any]) -> Preset:
        if not isinstance(values, Mapping):
            raise ValueError(f"a preset should be a JSON object, but got {type(values).__name__}")
        values = copy.deepcopy(dict(values))  # the caller's lists stay theirs
        missing = [key for key in REQUIRED_KEYS if key not in values]
        if missing:
            raise ValueError(f"lacks the keys {missing}; a preset needs {list(REQUIRED_KEYS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown keys {unknown}; a preset takes {sorted(known)}")
        check_type("plugins", values.get("plugins", []), list[str])
        load_plugins(values.get("plugins", []))  # they may register the grids' regularizers
        check_type("grids", values["grids"], list[dict[str, Any]])
        grids = []
        for index, grid in enumerate(values["grids"]):
            try:
                grids.append(Grid.from_dict(grid))
            except ValueError as error:
                raise ValueError(f"grid {index}: {error}") from error
        evaluate = values.get("evaluate")
        analyze = values.get("analyze")
        return cls(
            **{
                **values,
                "grids": grids,
                "evaluate": None if evaluate is None else EvaluateSettings.from_dict(evaluate),
                "analyze": None if analyze is None else AnalyzeSettings.from_dict(analyze),
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (what :meth:`from_dict` reads)."""
        return {
            "name": self.name,
            "scale": self.scale,
            "description": self.description,
            "dataset": self.dataset,
            "paper": self.paper,
            "paper_command": self.paper_command,
            "base": copy.deepcopy(self.base),
            "grids": [grid.to_dict() for grid in self.grids],
            "evaluate": None if self.evaluate is None else self.evaluate.to_dict(),
            "average_last": self.average_last,
            "options": copy.deepcopy(self.options),
            "variant": self.variant,
            "assumptions": list(self.assumptions),
            "analyze": None if self.analyze is None else self.analyze.to_dict(),
            "unstated": None if self.unstated is None else list(self.unstated),
            "plugins": list(self.plugins),
        }


def as_preset(preset: Preset | Mapping[str, Any]) -> Preset:
    """``preset`` itself, or the :class:`Preset` of its JSON form (validated)."""
    return preset if isinstance(preset, Preset) else Preset.from_dict(preset)


def preset_names() -> list[str]:
    """The presets shipped with the package."""
    folder = resources.files("dropcluster.experiments") / "presets"
    return sorted(
        entry.name[: -len(".json")] for entry in folder.iterdir() if entry.name.endswith(".json")
    )


def load_preset(name_or_path: str | Path) -> Preset:
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
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{origin} is not valid JSON: {error}") from error
    return Preset.from_dict(values, origin)


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


def run_id(
    regularizer: str, p: float, train_fraction: float, seed: int, variant: str | None = None
) -> str:
    """A readable, unique id: ``dropcluster-p0.1-f1-s0``, ``dropcluster-ours-p0.1-f1-s0``."""
    name = regularizer if variant is None else f"{regularizer}-{variant}"
    return check_name("run id", f"{name}-p{p:g}-f{train_fraction:g}-s{seed}")


def arm_name(regularizer: str, variant: str | None) -> str:
    """What a report compares: ``"dropcluster"``, or ``"dropcluster:ours"`` for a variant."""
    return regularizer if not variant else f"{regularizer}:{variant}"


def apply_overrides(preset: Preset | Mapping[str, Any], overrides: dict[str, Any]) -> Preset:
    """A copy of ``preset`` whose base config has ``overrides`` (``--set key=value``) applied."""
    preset = as_preset(preset)
    try:
        return replace(
            preset,
            base={**preset.base, **overrides},
            average_last=overrides.get("average_last", preset.average_last),
        )
    except ValueError as error:
        raise ValueError(f"preset {preset.name} with {overrides}: {error}") from error


def with_corrupted_from(preset: Preset, folder: str) -> Preset:
    """A copy of ``preset`` that reads the released corrupted files in ``folder``."""
    if preset.evaluate is None:
        raise ValueError(f"preset {preset.name} evaluates no corruptions")
    corruption = replace(preset.evaluate.corruption, corrupted_from=folder)
    try:
        return replace(preset, evaluate=replace(preset.evaluate, corruption=corruption))
    except ValueError as error:
        raise ValueError(f"preset {preset.name} with --corrupted-from: {error}") from error


def with_plugins(preset: Preset, plugins: list[str]) -> Preset:
    """A copy of ``preset`` that also imports ``plugins`` (``--plugin``), recorded in its runs."""
    added = [name for name in plugins if name not in preset.plugins]
    if not added:
        return preset
    try:
        return replace(preset, plugins=[*preset.plugins, *added])
    except ValueError as error:
        raise ValueError(f"preset {preset.name} with --plugin {added}: {error}") from error


def expand_grid(preset: Preset | Mapping[str, Any]) -> list[RunSpec]:
    """Every run of the preset, once, in a stable order (grid order, then product order)."""
    return _run_specs(as_preset(preset))


def _run_specs(preset: Preset) -> list[RunSpec]:
    evaluated = set(preset.evaluate.train_fraction) if preset.evaluate else set()
    specs: dict[str, RunSpec] = {}
    for index, grid in enumerate(preset.grids):
        variant = grid.variant if grid.variant is not None else preset.variant
        for regularizer in grid.regularizer:
            values = _grid_config(preset, grid, regularizer, variant)
            # A run without a regularizer has no rate: one run, whatever the p list says.
            rates = [0.0] if regularizer == "none" else grid.p
            for p in rates:
                for fraction in grid.train_fraction:
                    for seed in grid.seed:
                        identifier = run_id(regularizer, p, fraction, seed, variant)
                        try:
                            config = TrainConfig.from_dict(
                                {
                                    **values,
                                    "p": float(p),
                                    "train_fraction": float(fraction),
                                    "seed": int(seed),
                                }
                            )
                        except ValueError as error:
                            raise ValueError(f"grid {index}, run {identifier}: {error}") from error
                        if identifier in specs:
                            # Overlapping grids name the same run once; other settings under
                            # one id would be lost: they need a variant of their own.
                            if not specs[identifier].config.same_run_as(config):
                                raise ValueError(
                                    f"grid {index} makes run {identifier} with other settings "
                                    f"than an earlier grid: give one of them a variant"
                                )
                            continue
                        specs[identifier] = RunSpec(identifier, config, fraction in evaluated)
    return list(specs.values())


def _grid_config(
    preset: Preset, grid: Grid, regularizer: str, variant: str | None
) -> dict[str, Any]:
    """The config values of a grid's runs of ``regularizer``, before p, fraction and seed."""
    options = {
        **preset.base.get("regularizer_options", {}),
        **preset.options.get(regularizer, {}),
        **grid.options.get("regularizer_options", {}),
    }
    values = {
        **preset.base,
        **grid.options,
        "regularizer": regularizer,
        "regularizer_options": options if regularizer != "none" else {},
    }
    if regularizer == "none":
        # No rate to schedule: `--set drop_schedule=...` on a preset leaves the baseline as is.
        values.pop("drop_schedule", None)
    if preset.plugins:
        # Recorded in every run, so that its worker (a Ray task, a Slurm job) imports them.
        base_plugins = values.get("plugins", [])
        base_plugins = base_plugins if isinstance(base_plugins, list) else [base_plugins]
        values["plugins"] = list(dict.fromkeys([*preset.plugins, *base_plugins]))
    if variant is not None:
        values["variant"] = variant
    return values


def filter_runs(specs: list[RunSpec], only: list[str]) -> list[RunSpec]:
    """Keep the runs matching every filter in ``only``.

    A filter is ``key=value[,value...]`` with key one of regularizer, p, train_fraction (or
    fraction), seed, variant (``variant=none`` for the runs without one); or a shell pattern
    on the run id (``dropcluster-*``, which also matches ``dropcluster-ours-...``).
    """
    kept = specs
    for expression in only:
        key, sep, values = expression.partition("=")
        key = key.strip()
        if not sep:
            kept = [s for s in kept if fnmatch.fnmatchcase(s.run_id, expression)]
            continue
        key = "train_fraction" if key == "fraction" else key
        if key == "variant":
            wanted = {v.strip() for v in values.split(",") if v.strip()}
            kept = [s for s in kept if (s.config.variant or "none") in wanted]
            continue
        if key not in GRID_KEYS:
            raise ValueError(
                f"--only {expression!r}: key should be one of {', '.join(GRID_KEYS)}, variant "
                f"(or a run id pattern such as 'dropcluster-*'), but got {key!r}"
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
    """``["stem=cifar", "epochs=10"]`` -> ``{"stem": "cifar", "epochs": 10}`` (JSON values), the
    same ``--set KEY=VALUE`` syntax as ``dropcluster train``."""
    return parse_assignments(assignments, "--set")
