"""What dropcluster keeps reading from older versions, in one place.

Each entry names the version whose format or call it reads, and the release that may drop it.
Everything else in the package handles the current format only. Depends on torch only (the
layers use it).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "STEM_CHANGE",
    "error_reason",
    "is_0_1_config",
    "legacy_dropcluster_state",
    "loaded_drop_rate",
    "old_call_form",
    "pickled_defaults",
    "rank_rng_state",
    "refuse_0_1_checkpoint",
    "refuse_0_1_run",
    "variant_from_run_id",
]

#: What changed in 0.2 that makes 0.1's models and results incomparable.
STEM_CHANGE = (
    "dropcluster 0.1's ResNet stem was a bare conv and its stem slot read the first conv before "
    "its ReLU; since 0.2 the stem is conv -> batch norm -> ReLU (the paper's reference network) "
    "and DropCluster reads the ReLU's output"
)

_Function = TypeVar("_Function", bound=Callable[..., Any])


def old_call_form(
    max_positional: int, old_keywords: frozenset[str], new_form: str
) -> Callable[[_Function], _Function]:
    """Refuse a call in a functional form's 0.3 shape with a message naming the 0.4 one.

    Reads: calls written for dropcluster 0.3 (``drop_cluster2d(x, labels, n_clusters, p,
    structured, ...)``, ``drop_block2d(x, p, block_size, inplace, eps, training, gamma=...,
    mode=...)``). May go in 0.6. Costs one length check and one set test per call.

    Args:
        max_positional: positional arguments the new form takes at most.
        old_keywords: keywords only the old form had.
        new_form: the new call, shown in the message.
    """

    def decorate(function: _Function) -> _Function:
        @functools.wraps(function)
        def checked(*args: Any, **kwargs: Any) -> Any:
            old = old_keywords & kwargs.keys()
            if len(args) > max_positional or old:
                given = f"keywords {sorted(old)}" if old else f"{len(args)} positional arguments"
                raise TypeError(
                    f"{function.__name__} has a new form since dropcluster 0.4: {new_form} "
                    f"(this call gives {given}, as 0.3 did; see the changelog)"
                )
            return function(*args, **kwargs)

        return checked  # type: ignore[return-value]

    return decorate


# -- dropcluster 0.1 (may go in 0.6) -------------------------------------------------------------


def pickled_defaults(instance: object, defaults: dict[str, Any]) -> None:
    """Give an unpickled object the attributes later versions added, with their old meaning.

    Reads: pickled ``DropBlock2d`` of 0.1-0.2 (no ``mode``: exact) and attach hooks of 0.2-0.3
    (no ``after``: no name). May go in 0.6.
    """
    for name, value in defaults.items():
        if not hasattr(instance, name):
            setattr(instance, name, value)


def is_0_1_config(config: dict[str, Any]) -> bool:
    """Whether a stored run config is 0.1's (every config since 0.2 has ``weight_decay_on``)."""
    return "weight_decay_on" not in config


def refuse_0_1_run(path: Path, run_id: str, config: dict[str, Any]) -> None:
    """Raise ValueError when ``config``, stored in the database ``path``, is a run of 0.1.

    Reads: results databases of 0.1. May go in 0.6.
    """
    if is_0_1_config(config):
        raise ValueError(
            f"run {run_id!r} in {path} was made by dropcluster 0.1: {STEM_CHANGE}, so its "
            f"results do not compare with this version's; sweep into a new --out folder"
        )


def refuse_0_1_checkpoint(checkpoint: dict[str, Any], path: str | Path, current: int) -> None:
    """Raise CheckpointError for a checkpoint of 0.1 (``model_revision`` below ``current``).

    Reads: checkpoints of 0.1 (no ``model_revision``; a LeNet-5's even has today's keys). May
    go in 0.6.
    """
    from dropcluster.errors import CheckpointError

    if checkpoint.get("model_revision", 1) < current:
        raise CheckpointError(
            f"{path} was written by dropcluster 0.1: {STEM_CHANGE}, so the run cannot continue "
            f"with this version: train it again"
        )


def legacy_dropcluster_state(
    state_dict: dict[str, Any],
    keys: dict[str, str],
    layer_tables: tuple[Tensor, ...],
    n_clusters: int,
) -> None:
    """A DropCluster2d state of 0.1 (tables as wide as the largest cluster count, no
    ``is_fitted``) written over in today's form, in the copied state_dict torch passes to
    loading.

    Reads: DropCluster2d state dicts of 0.1. May go in 0.6.

    Args:
        state_dict: the state_dict being loaded (changed in place).
        keys: the layer's key of each buffer name.
        layer_tables: the layer's own (labels, structured, cluster_counts, cluster_sizes), kept
            by an unfitted 0.1 layer's state.
        n_clusters: the layer's table width.
    """
    from dropcluster.nn.clusters import fixed_tables

    names = ("labels", "structured", "cluster_counts", "cluster_sizes")
    fitted = state_dict[keys["labels"]].numel() > 0
    if fitted:
        tables = fixed_tables(*(state_dict[keys[name]] for name in names), n_clusters)
    else:  # an unfitted 0.1 layer: nothing to load, the layer keeps its (empty) tables
        tables = tuple(table.clone() for table in layer_tables)
    for name, value in zip(names, tables, strict=True):
        state_dict[keys[name]] = value
    state_dict[keys["is_fitted"]] = torch.tensor(fitted)


def loaded_drop_rate(state_dict: dict[str, Any], key: str, allow_one: bool) -> float | None:
    """The drop rate a state_dict holds under ``key`` (None: none), refused out of range.

    Reads: state dicts of 0.1, which saved ``p`` (a setting since, not state). A NaN or
    out-of-range ``p`` would otherwise fail far from its cause (a garbage cluster count, an
    index error on the CPU, a device-side assert on CUDA). May go in 0.6.
    """
    stored = state_dict.get(key)
    if stored is None:
        return None
    if not isinstance(stored, Tensor) or stored.numel() != 1:
        shape = tuple(stored.shape) if isinstance(stored, Tensor) else type(stored).__name__
        raise ValueError(f"cannot load {key!r}: expected a 1-element tensor, got {shape}")
    if stored.is_meta:
        return None
    if stored.is_complex() or stored.dtype == torch.bool:
        raise ValueError(
            f"cannot load {key!r}: the drop rate should be a real number in [0, 1), but the "
            f"state_dict holds a {stored.dtype} tensor"
        )
    value = float(stored)
    if not (0.0 <= value <= 1.0 if allow_one else 0.0 <= value < 1.0):
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(
            f"cannot load {key!r}: the drop rate should be a finite number in {interval}, but "
            f"the state_dict holds {value}"
        )
    return value


# -- dropcluster 0.2 (may go in 0.6) -------------------------------------------------------------


def rank_rng_state(state: dict[str, Any], rank: int) -> dict[str, Any]:
    """This process's random state in a checkpoint.

    Reads: checkpoints written before distributed training (only ``rng``, no ``rng_ranks``).
    May go in 0.6.
    """
    return state["rng_ranks"][rank] if "rng_ranks" in state else state["rng"]


def variant_from_run_id(
    run_id: str, regularizer: str, p: float, train_fraction: float, seed: int
) -> str | None:
    """The variant in a run id of the form ``presets.run_id`` makes (``"ours"`` in
    ``dropcluster-ours-p0.1-f1-s0``); None for any other id.

    Reads: run records stored before configs kept their ``variant`` (0.2). May go in 0.6.
    """
    from dropcluster.experiments.presets import run_id as make_run_id

    suffix = make_run_id(regularizer, p, train_fraction, seed)[len(regularizer) :]
    prefix = f"{regularizer}-"
    variant = run_id[len(prefix) : -len(suffix)]
    if variant and run_id == f"{prefix}{variant}{suffix}":
        return variant
    return None


# -- dropcluster 0.3 (may go in 0.6) -------------------------------------------------------------


def error_reason(error: str | None) -> str:
    """The reason a failed run's stored error gives: its first line (what follows is context,
    such as the last lines of the worker's log).

    Reads: errors stored by 0.3, which began with ``exit status N`` and ended with the
    worker's last line (given then). May go in 0.6.
    """
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    if not lines:
        return "(no error message)"
    if re.fullmatch(r"exit status -?\d+", lines[0]):
        return lines[-1]
    return lines[0]
