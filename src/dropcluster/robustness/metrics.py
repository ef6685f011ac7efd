"""Robustness metrics of Hendrycks & Dietterich (2019) over corruption x severity errors.

Notation: ``E[c, s]`` is a model's top-1 error (%) on corruption c at severity s, ``E_clean``
its error on the clean test set; ``B[c, s]`` and ``B_clean`` the same for a baseline model.

* **error of a corruption**: the mean of ``E[c, s]`` over the severities evaluated.
* **mCE, unnormalised** (what AugMix and most CIFAR-10/100-C tables report as "mCE"): the mean
  of ``E[c, s]`` over the 15 benchmark corruptions and severities 1-5.
* **CE** (corruption error, normalised): ``CE_c = sum_s E[c, s] / sum_s B[c, s]``, in %;
  **mCE** (normalised) is the mean of ``CE_c`` over the 15 benchmark corruptions. On ImageNet
  the baseline is AlexNet (:data:`ALEXNET_IMAGENET_C_ERRORS`), so AlexNet's mCE is 100.
* **relative CE**: ``sum_s (E[c, s] - E_clean) / sum_s (B[c, s] - B_clean)``, in %; the
  relative mCE is its mean over the benchmark corruptions. It measures the degradation a
  corruption causes, apart from the clean error.

Errors are kept per (corruption, severity) as a mapping ``{corruption: {severity: error}}``
(:data:`Errors`); a baseline known only as one mean per corruption (AlexNet's published
numbers) is a mapping ``{corruption: error}`` and is taken to cover severities 1-5, so the
model must have been evaluated at all five for CE against it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from dropcluster.data.corruptions import BENCHMARK
from dropcluster.validation import first_few

__all__ = [
    "ALEXNET_IMAGENET_CLEAN_ERROR",
    "ALEXNET_IMAGENET_C_ERRORS",
    "Errors",
    "corruption_errors",
    "errors_from_rows",
    "mean_corruption_error",
    "mean_error_by_corruption",
    "relative_corruption_errors",
]

#: AlexNet's top-1 error (%) on ImageNet-C per benchmark corruption, the mean over severities
#: 1-5: the normaliser of ImageNet-C's mCE (Hendrycks & Dietterich 2019; the values every
#: published ImageNet-C table divides by).
ALEXNET_IMAGENET_C_ERRORS: dict[str, float] = {
    "gaussian_noise": 88.6428,
    "shot_noise": 89.4468,
    "impulse_noise": 92.2640,
    "defocus_blur": 81.9880,
    "glass_blur": 82.6268,
    "motion_blur": 78.5948,
    "zoom_blur": 79.8360,
    "snow": 86.6816,
    "frost": 82.6572,
    "fog": 81.9324,
    "brightness": 56.4592,
    "contrast": 85.3204,
    "elastic_transform": 64.6056,
    "pixelate": 71.7840,
    "jpeg_compression": 60.6500,
}

#: AlexNet's clean top-1 error (%) on the ImageNet validation set, as the paper's Table 1 prints
#: it (one decimal): the clean term of the relative mCE against AlexNet.
ALEXNET_IMAGENET_CLEAN_ERROR = 43.5

#: ``{corruption: {severity: top-1 error in %}}``.
Errors = Mapping[str, Mapping[int, float]]

_ALL_SEVERITIES = (1, 2, 3, 4, 5)


def errors_from_rows(
    rows: Iterable[Mapping[str, Any]],
) -> tuple[dict[str, dict[int, float]], float | None]:
    """Per (corruption, severity) top-1 errors and the clean error from evaluation rows.

    Args:
        rows: dicts with ``corruption``, ``severity`` and ``top1`` (accuracy in %), as
            :func:`dropcluster.robustness.evaluate_model` and ``dropcluster evaluate`` write
            them; the clean row has ``corruption == "clean"``.

    Returns:
        (errors, clean error or None when there is no clean row).
    """
    errors: dict[str, dict[int, float]] = {}
    clean = None
    for row in rows:
        error = 100.0 - float(row["top1"])
        if row["corruption"] == "clean":
            clean = error
        else:
            errors.setdefault(row["corruption"], {})[int(row["severity"])] = error
    return errors, clean


def mean_error_by_corruption(errors: Errors) -> dict[str, float]:
    """Each corruption's mean error over the severities it was evaluated at."""
    return {name: sum(by.values()) / len(by) for name, by in errors.items() if by}


def mean_corruption_error(
    errors: Errors,
    corruptions: Iterable[str] = BENCHMARK,
    severities: Iterable[int] = _ALL_SEVERITIES,
) -> float:
    """The unnormalised mCE: the mean error over ``corruptions`` x ``severities`` (default: the
    15 benchmark corruptions x 1-5, as AugMix reports CIFAR-10/100-C).

    Raises:
        ValueError: an error the mean needs is missing (naming the first few).
    """
    corruptions, severities = tuple(corruptions), tuple(severities)
    _require(errors, corruptions, severities, "the mCE")
    values = [errors[c][s] for c in corruptions for s in severities]
    return sum(values) / len(values)


def corruption_errors(
    errors: Errors,
    baseline: Errors | Mapping[str, float],
    corruptions: Iterable[str] = BENCHMARK,
) -> dict[str, float]:
    """CE (%) per corruption against a baseline: ``100 sum_s E[c, s] / sum_s B[c, s]``.

    Args:
        errors: the model's errors, ``{corruption: {severity: error}}``.
        baseline: the baseline's errors in the same form, over the same severities; or one
            mean error per corruption (over severities 1-5, e.g.
            :data:`ALEXNET_IMAGENET_C_ERRORS`), in which case the model needs all five.
        corruptions: which corruptions (default: the 15 benchmark ones).

    Raises:
        ValueError: a corruption or severity missing from either side, or a zero baseline.
    """
    result = {}
    for name in corruptions:
        mine, theirs = _paired(errors, baseline, name, "CE")
        denominator = sum(theirs)
        if denominator <= 0:
            raise ValueError(f"the baseline's error on {name} is 0: CE is undefined")
        result[name] = 100.0 * sum(mine) / denominator
    return result


def relative_corruption_errors(
    errors: Errors,
    clean_error: float,
    baseline: Errors | Mapping[str, float],
    baseline_clean_error: float,
    corruptions: Iterable[str] = BENCHMARK,
) -> dict[str, float]:
    """Relative CE (%) per corruption: ``100 sum_s (E[c, s] - E_clean) / sum_s (B[c, s] -
    B_clean)`` (see :func:`corruption_errors` for the forms of ``baseline``).

    Raises:
        ValueError: missing errors, or a baseline that loses no accuracy on a corruption (the
            ratio is undefined).
    """
    result = {}
    for name in corruptions:
        mine, theirs = _paired(errors, baseline, name, "relative CE")
        denominator = sum(value - baseline_clean_error for value in theirs)
        if denominator <= 0:
            raise ValueError(
                f"the baseline loses no accuracy on {name} (its error there is not above its "
                f"clean error {baseline_clean_error:.2f}): relative CE is undefined"
            )
        result[name] = 100.0 * sum(value - clean_error for value in mine) / denominator
    return result


def _paired(
    errors: Errors, baseline: Errors | Mapping[str, float], name: str, what: str
) -> tuple[list[float], list[float]]:
    """The model's and the baseline's errors of one corruption, severity by severity."""
    if name not in errors or not errors[name]:
        raise ValueError(f"{what} needs the error on {name}, which was not evaluated")
    if name not in baseline:
        raise ValueError(f"{what} needs the baseline's error on {name}, which it does not have")
    severities = sorted(errors[name])
    entry = baseline[name]
    if isinstance(entry, Mapping):
        missing = [s for s in severities if s not in entry]
        if missing:
            raise ValueError(f"{what}: the baseline has no error on {name} at severities {missing}")
        return [errors[name][s] for s in severities], [float(entry[s]) for s in severities]
    if severities != list(_ALL_SEVERITIES):
        raise ValueError(
            f"{what} against a baseline given as one mean per corruption needs severities 1-5, "
            f"but {name} was evaluated at {severities}"
        )
    return [errors[name][s] for s in severities], [float(entry)] * 5


def _require(
    errors: Errors, corruptions: tuple[str, ...], severities: tuple[int, ...], what: str
) -> None:
    missing = [f"{c} {s}" for c in corruptions for s in severities if s not in errors.get(c, {})]
    if missing:
        raise ValueError(
            f"{what} needs {len(corruptions)} corruptions at severities {list(severities)}; "
            f"missing: {first_few(missing)}"
        )
