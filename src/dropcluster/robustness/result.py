"""``RobustnessResult``: one model's accuracy on a corrupted test set, with its metrics."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

from dropcluster.data.corruptions import BENCHMARK
from dropcluster.files import atomic_write_json
from dropcluster.robustness.metrics import (
    ALEXNET_IMAGENET_C_ERRORS,
    ALEXNET_IMAGENET_CLEAN_ERROR,
    Errors,
    corruption_errors,
    errors_from_rows,
    mean_corruption_error,
    mean_error_by_corruption,
    relative_corruption_errors,
)

__all__ = ["FORMAT", "Baseline", "RobustnessResult", "baseline_errors"]

#: The ``format`` field of :meth:`RobustnessResult.to_json` documents.
FORMAT = "dropcluster.robustness/1"

#: What CE is normalised by: another result, ``"alexnet"`` (its published ImageNet-C errors),
#: or ``{corruption: error %}`` means over severities 1-5.
Baseline: TypeAlias = "RobustnessResult | str | Mapping[str, float]"


@dataclass(frozen=True)
class RobustnessResult:
    """Top-1/top-5 accuracy (%) of one model on the clean and corrupted test images.

    Attributes:
        dataset: ``"cifar10-c"``, ``"cifar100-c"`` or ``"tiny-imagenet-c"``.
        source: ``"released"`` (the published files) or ``"generated"`` (corrupted here from
            the clean test set with :func:`dropcluster.data.corruptions.corrupt`).
        rows: one dict per evaluation, ``{"corruption", "severity", "top1", "top5",
            "images"}``; the clean test set, when scored, is the row ``corruption == "clean"``
            (severity 0).
        settings: what was evaluated (corruptions, severities, limit, seed, family, ...).
        model: a description of the model (e.g. its ``MODULE:FACTORY``), or None.
    """

    dataset: str
    source: str
    rows: tuple[dict[str, Any], ...]
    settings: dict[str, Any] = field(default_factory=dict)
    model: str | None = None

    # ----------------------------------------------------------------- errors

    @property
    def errors(self) -> dict[str, dict[int, float]]:
        """``{corruption: {severity: top-1 error %}}``."""
        return errors_from_rows(self.rows)[0]

    @property
    def clean_error(self) -> float | None:
        """Top-1 error (%) on the clean test set, None when it was not scored."""
        return errors_from_rows(self.rows)[1]

    @property
    def error_by_corruption(self) -> dict[str, float]:
        """Each corruption's mean top-1 error over the severities evaluated."""
        return mean_error_by_corruption(self.errors)

    @property
    def mce(self) -> float | None:
        """The unnormalised mCE (mean error over the 15 benchmark corruptions x severities
        1-5, as CIFAR-10/100-C tables report it); None when any of those was not evaluated."""
        try:
            return mean_corruption_error(self.errors)
        except ValueError:
            return None

    def corruption_errors(self, baseline: Baseline) -> dict[str, float]:
        """CE (%) per benchmark corruption, normalised by ``baseline`` (see
        :func:`dropcluster.robustness.metrics.corruption_errors`)."""
        errors, _ = baseline_errors(baseline, self)
        return corruption_errors(self.errors, errors)

    def normalised_mce(self, baseline: Baseline) -> float:
        """mCE normalised by ``baseline``: the mean CE over the 15 benchmark corruptions."""
        values = self.corruption_errors(baseline)
        return sum(values.values()) / len(values)

    def relative_corruption_errors(self, baseline: Baseline) -> dict[str, float]:
        """Relative CE (%) per benchmark corruption against ``baseline``."""
        errors, clean = baseline_errors(baseline, self)
        if self.clean_error is None or clean is None:
            raise ValueError("relative CE needs the clean error of the model and of the baseline")
        return relative_corruption_errors(self.errors, self.clean_error, errors, clean)

    def relative_mce(self, baseline: Baseline) -> float:
        """The mean relative CE over the 15 benchmark corruptions."""
        values = self.relative_corruption_errors(baseline)
        return sum(values.values()) / len(values)

    # ----------------------------------------------------------------- files

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: the rows, the settings, and the metrics that can be computed."""
        document: dict[str, Any] = {
            "format": FORMAT,
            "dataset": self.dataset,
            "source": self.source,
            "model": self.model,
            "settings": dict(self.settings),
            "rows": [dict(row) for row in self.rows],
            "clean_error": self.clean_error,
            "error_by_corruption": self.error_by_corruption,
            "mce": self.mce,
        }
        return document

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` atomically (the folder must exist)."""
        path = Path(path)
        atomic_write_json(path, self.to_json())
        return path

    @classmethod
    def from_json(cls, document: Mapping[str, Any] | str | Path) -> RobustnessResult:
        """Read a result back from :meth:`to_json`'s dict or a file :meth:`save` wrote.

        Raises:
            ValueError: not such a document (one line, naming the file).
        """
        where = "the document"
        if isinstance(document, (str, Path)):
            where = str(document)
            try:
                document = json.loads(Path(document).read_text())
            except (OSError, ValueError) as error:
                raise ValueError(f"{where} is not a readable JSON file: {error}") from error
        if not isinstance(document, Mapping) or document.get("format") != FORMAT:
            raise ValueError(f"{where} is not a robustness result (no format {FORMAT!r})")
        rows = document.get("rows")
        if not isinstance(rows, list) or not all(
            isinstance(row, Mapping) and {"corruption", "severity", "top1"} <= set(row)
            for row in rows
        ):
            raise ValueError(f"{where}: rows should be a list of evaluation rows")
        return cls(
            dataset=str(document.get("dataset")),
            source=str(document.get("source")),
            rows=tuple(dict(row) for row in rows),
            settings=dict(document.get("settings") or {}),
            model=document.get("model"),
        )

    # ----------------------------------------------------------------- text

    def table(self) -> str:
        """A text table: top-1 error (%) per corruption and severity, the corruption's mean,
        then the clean error and the unnormalised mCE when they exist."""
        errors = self.errors
        severities = sorted({s for by in errors.values() for s in by})
        width = max([len("corruption")] + [len(name) for name in errors])
        lines = [
            "top-1 error (%)".ljust(width)
            + "".join(f"{'sev ' + str(s):>8}" for s in severities)
            + f"{'mean':>8}"
        ]
        for name, by in errors.items():
            cells = "".join(f"{by[s]:8.2f}" if s in by else f"{'-':>8}" for s in severities)
            lines.append(name.ljust(width) + cells + f"{sum(by.values()) / len(by):8.2f}")
        if self.clean_error is not None:
            lines.append(f"clean error: {self.clean_error:.2f}")
        mce = self.mce
        lines.append(
            f"mCE (unnormalised, {len(BENCHMARK)} benchmark corruptions x 5): {mce:.2f}"
            if mce is not None
            else "mCE: not computed (needs the 15 benchmark corruptions at severities 1-5)"
        )
        return "\n".join(lines)


def baseline_errors(
    baseline: Baseline, result: RobustnessResult | None = None
) -> tuple[Errors | Mapping[str, float], float | None]:
    """A baseline's errors and clean error, from any accepted form (see :data:`Baseline`).

    ``"alexnet"`` is AlexNet's published ImageNet-C errors and clean error; it fits only models
    evaluated on ImageNet-C-sized images with the ImageNet severity table, so it is refused for
    ``result`` on CIFAR-10-C, CIFAR-100-C or Tiny-ImageNet-C. A baseline result must be of the
    same data set as ``result``; another source (released or generated), subset or severity
    table only warns.
    """
    if result is not None:
        _check_comparable(baseline, result)
    if isinstance(baseline, RobustnessResult):
        return baseline.errors, baseline.clean_error
    if isinstance(baseline, str):
        if baseline.lower() == "alexnet":
            return ALEXNET_IMAGENET_C_ERRORS, ALEXNET_IMAGENET_CLEAN_ERROR
        raise ValueError(f"unknown baseline {baseline!r}: expected 'alexnet' or a result")
    if isinstance(baseline, Mapping) and all(
        isinstance(value, (int, float)) for value in baseline.values()
    ):
        return {str(key): float(value) for key, value in baseline.items()}, None
    raise ValueError(
        "baseline should be a RobustnessResult, 'alexnet' or {corruption: error %}, but got "
        f"{type(baseline).__name__}"
    )


#: The corrupted sets of small images: AlexNet's ImageNet-C errors do not normalise them.
_NOT_IMAGENET = ("cifar10-c", "cifar100-c", "tiny-imagenet-c")


def _check_comparable(baseline: Baseline, result: RobustnessResult) -> None:
    if isinstance(baseline, str) and baseline.lower() == "alexnet":
        if result.dataset in _NOT_IMAGENET:
            raise ValueError(
                f"AlexNet's errors are ImageNet-C numbers: they do not normalise a "
                f"{result.dataset} result; use another model's result on {result.dataset} as "
                f"the baseline (e.g. the same network trained without the regularizer)"
            )
        return
    if not isinstance(baseline, RobustnessResult):
        return
    if baseline.dataset != result.dataset:
        raise ValueError(
            f"the baseline was evaluated on {baseline.dataset}, this result on {result.dataset}: "
            f"CE compares errors on the same corrupted set"
        )
    differences = [
        f"{key} {baseline_value!r} vs {value!r}"
        for key, baseline_value, value in (
            ("source", baseline.source, result.source),
            *(
                (key, baseline.settings.get(key), result.settings.get(key))
                for key in ("limit", "family", "seed")
            ),
        )
        if baseline_value != value
    ]
    if differences:
        warnings.warn(
            f"the baseline and this result were evaluated differently ({', '.join(differences)}): "
            f"their CE mixes two protocols",
            stacklevel=4,
        )
