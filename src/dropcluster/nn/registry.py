"""Build any regularizer by name: ``build_regularizer("dropblock", p=0.1, block_size=5)``.

The built-in names are :data:`REGULARIZERS`; plugins add theirs with
:func:`dropcluster.plugins.register_regularizer` (see :func:`regularizer_names`).
"""

from __future__ import annotations

from torch import nn

from dropcluster.nn.drop_rate import check_drop_rate
from dropcluster.plugins import plugin_names, plugin_regularizer
from dropcluster.validation import check_choice

__all__ = [
    "REGULARIZERS",
    "build_regularizer",
    "regularizer_names",
]


REGULARIZERS = (
    "none",
    "dropout",
    "spatial_dropout",
    "dropblock",
    "dropcluster",
    "stochastic_depth",
)


def regularizer_names(wanted: str | None = None) -> tuple[str, ...]:
    """The built-in names, then those registered by plugins.

    Given ``wanted``, a name not known yet, the installed plugins (entry points) are loaded
    first (see :func:`dropcluster.plugins.plugin_names`).
    """
    wanted = None if wanted in REGULARIZERS else wanted
    return REGULARIZERS + plugin_names("regularizer", wanted)


def build_regularizer(name: str, p: float = 0.0, **options) -> nn.Module:
    """A regularizer module by name.

    Args:
        name: one of :data:`REGULARIZERS`, or a name registered by a plugin (built by its
            factory, ``factory(p, **options)``). ``"dropout"`` and ``"spatial_dropout"`` are torch's
            ``nn.Dropout`` and ``nn.Dropout2d``; ``"none"`` is ``nn.Identity``.
        p: drop rate in [0, 1) ([0, 1] for stochastic depth).
        **options: keyword arguments of the module (e.g. ``block_size`` for DropBlock2d,
            ``n_clusters``/``per_sample`` for DropCluster2d, ``mode`` for StochasticDepth).

    Raises:
        ValueError: unknown name (the message lists the valid ones), bad p, or options the
            module does not take.
    """
    check_choice("regularizer", name, regularizer_names(name))
    check_drop_rate(p, allow_one=name == "stochastic_depth")
    if name not in REGULARIZERS:
        return _build_plugin(name, p, options)
    if name == "none":
        _no_options(name, options)
        return nn.Identity()
    if name in ("dropout", "spatial_dropout"):
        _no_options(name, options)
        return nn.Dropout(p) if name == "dropout" else nn.Dropout2d(p)
    if name == "dropblock":
        from dropcluster.nn.dropblock import DropBlock2d as module_class
    elif name == "dropcluster":
        from dropcluster.nn.dropcluster import DropCluster2d as module_class
    else:
        from dropcluster.nn.stochastic_depth import StochasticDepth as module_class
    try:
        return module_class(p, **options)
    except TypeError as error:
        raise ValueError(f"bad options for {name!r}: {error}") from error


def _build_plugin(name: str, p: float, options: dict) -> nn.Module:
    entry = plugin_regularizer(name)
    try:
        module = entry.factory(p, **options)
    except TypeError as error:
        raise ValueError(f"bad options for {name!r} ({entry.module}): {error}") from error
    if not isinstance(module, nn.Module):
        raise ValueError(
            f"the factory of regularizer {name!r} ({entry.module}) should return an nn.Module, "
            f"but returned {type(module).__name__}"
        )
    return module


def _no_options(name: str, options: dict) -> None:
    if options:
        raise ValueError(f"{name!r} takes no options besides p, but got {sorted(options)}")
