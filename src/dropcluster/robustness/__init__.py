"""Robustness to common corruptions of any classifier: CIFAR-10-C, CIFAR-100-C, Tiny-ImageNet-C.

``evaluate_model(model, "cifar100-c", data_dir=...)`` scores an ``nn.Module`` on the released
files (or on corrupted copies generated here) and returns a :class:`RobustnessResult` with the
rows, the per-corruption errors and the mCE; :mod:`~dropcluster.robustness.metrics` holds the
metrics (mCE, CE and relative CE against a baseline such as AlexNet's ImageNet-C errors).
``dropcluster evaluate --model MODULE:FACTORY`` is the same from the command line.
"""

from __future__ import annotations

from dropcluster.robustness.evaluate import CORRUPTED_DATASETS, evaluate_model
from dropcluster.robustness.loading import ModelLoadError, build_model, load_weights
from dropcluster.robustness.metrics import (
    ALEXNET_IMAGENET_C_ERRORS,
    ALEXNET_IMAGENET_CLEAN_ERROR,
    corruption_errors,
    mean_corruption_error,
    relative_corruption_errors,
)
from dropcluster.robustness.result import RobustnessResult

__all__ = [
    "ALEXNET_IMAGENET_CLEAN_ERROR",
    "ALEXNET_IMAGENET_C_ERRORS",
    "CORRUPTED_DATASETS",
    "ModelLoadError",
    "RobustnessResult",
    "build_model",
    "corruption_errors",
    "evaluate_model",
    "load_weights",
    "mean_corruption_error",
    "relative_corruption_errors",
]
