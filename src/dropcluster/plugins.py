"""Your regularizer, model or data set under a name of its own: plugins.

A plugin is a Python module that registers names when it is imported (or a function
``module:function`` that registers them when called)::

    from dropcluster.plugins import register_regularizer
    register_regularizer("gaussian_dropout", GaussianDropout2d, placement="stem",
                         display_name="Gaussian dropout")

Once registered, a name works wherever a built-in one does: ``TrainConfig.regularizer``,
``build_regularizer``, ``place_regularizer``, a preset's grids, the report (with its display
name, in a colour of its own). Plugins are loaded from three places:

- ``--plugin MODULE`` on ``dropcluster train``, ``sweep``, ``reproduce`` and ``evaluate``;
- a config's or a preset's ``"plugins": ["my_pkg.methods"]`` (a run records the plugins it
  needs, so that sweep workers, ``--resume`` and ``evaluate --checkpoint`` import them again);
- the ``dropcluster.plugins`` entry-point group of installed packages, loaded once, the first
  time a name is not found among the built-in and registered ones.

Built-in names cannot be registered; a name registered by a plugin can be registered again
only with ``replace=True``. Factories are checked for the call the project makes
(``factory(p, **options)``, ``factory(n_classes, in_channels, stem=None)``,
``loader(split, root)``); every problem is one ``ValueError`` line that names the plugin module.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

__all__ = [
    "KINDS",
    "PLUGIN_GROUP",
    "REGISTRY",
    "DatasetEntry",
    "Registry",
    "RegularizerEntry",
    "load_installed_plugins",
    "load_plugins",
    "plugin_dataset",
    "plugin_display_name",
    "plugin_model",
    "plugin_names",
    "plugin_regularizer",
    "register_dataset",
    "register_model",
    "register_regularizer",
]


#: The entry-point group installed packages declare their plugins in.
PLUGIN_GROUP = "dropcluster.plugins"
#: What a plugin can register.
KINDS = ("regularizer", "model", "dataset")
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*\Z")
_SPEC = re.compile(r"[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?\Z")


@dataclass(frozen=True)
class RegularizerEntry:
    """A registered regularizer.

    Attributes:
        factory: ``factory(p, **options) -> nn.Module``.
        placement: a :class:`~dropcluster.models.Placement` for every data set, a mapping data
            set (or family) -> Placement holding the ``"cifar100"`` row, or None (the runs
            name a ``slot`` in their ``regularizer_options``).
        display_name: its name in reports.
        module: the plugin module that registered it.
    """

    factory: Callable[..., Any]
    placement: Any
    display_name: str
    module: str


@dataclass(frozen=True)
class DatasetEntry:
    """A registered data set.

    Attributes:
        loader: ``loader(split, root) -> ImageDataset`` (split "train" or "test"; root the
            config's ``data_dir``, None by default).
        augment: its training augmentation and normalisation (an ``AugmentConfig``).
        family: the row of the placement table its runs use (``"cifar100"``: small images;
            ``"tiny-imagenet"``: 64x64 images).
        module: the plugin module that registered it.
    """

    loader: Callable[..., Any]
    augment: Any
    family: str
    module: str


@dataclass
class Registry:
    """Everything plugins registered, and which plugins were loaded."""

    regularizers: dict[str, RegularizerEntry] = field(default_factory=dict)
    models: dict[str, tuple[Callable[..., Any], str]] = field(default_factory=dict)
    datasets: dict[str, DatasetEntry] = field(default_factory=dict)
    #: Plugin specs imported (``"pkg.mod"``, ``"pkg.mod:register"``), in order.
    loaded: list[str] = field(default_factory=list)
    #: The plugin being loaded (named by the errors of what it registers).
    current: str | None = None
    installed_loaded: bool = False


#: The process's registry (tests swap in a fresh one).
REGISTRY = Registry()


# ---------------------------------------------------------------------------------------------
# Registering


def register_regularizer(
    name: str,
    factory: Callable[..., Any],
    *,
    placement: Any = None,
    display_name: str | None = None,
    replace: bool = False,
) -> None:
    """Register a regularizer under ``name``.

    Args:
        name: lower-case letters, digits, ``-``, ``_``, ``.`` (it goes into run ids).
        factory: called as ``factory(p, **options)`` (p the drop rate in [0, 1), options the
            run's ``regularizer_options``); returns an ``nn.Module`` mapping a tensor to one of
            the same shape. A module class whose first argument is ``p`` will do.
        placement: where it goes in the models of :mod:`dropcluster.models`: a slot name
            (``"stem"``, ``"group4"``, ``"group4_inner"``, ``"residual"``, ...), a
            :class:`~dropcluster.models.Placement` (slot and default options), or a mapping
            data set (or family) -> Placement that holds the ``"cifar100"`` row (the one used
            for data sets without a row). None: each run names its ``slot``.
        display_name: its name in reports (default: ``name``).
        replace: replace a name an earlier plugin registered (built-in names never).

    Raises:
        ValueError: a built-in or already registered name, a factory that cannot be called
            as ``factory(p)``, or a bad placement; the message names the plugin module.
    """
    from dropcluster.nn.registry import REGULARIZERS

    origin = _origin(factory)
    _check_name("regularizer", name, REGULARIZERS, REGISTRY.regularizers, replace, origin)
    _check_signature("regularizer", name, factory, (0.1,), {}, "factory(p, **options)", origin)
    checked = _check_placement(name, placement, origin)
    if display_name is not None and (not isinstance(display_name, str) or not display_name):
        raise ValueError(
            f"{origin}: display_name of regularizer {name!r} should be a non-empty string, "
            f"but got {display_name!r}"
        )
    REGISTRY.regularizers[name] = RegularizerEntry(factory, checked, display_name or name, origin)


def register_model(name: str, factory: Callable[..., Any], *, replace: bool = False) -> None:
    """Register a model under ``name``.

    Args:
        name: as for :func:`register_regularizer`.
        factory: called as ``factory(n_classes, in_channels, stem=None)``; returns a
            :class:`~dropcluster.models.SlottedModel` (its slots are where regularizers go:
            see docs/own-model.md).
        replace: replace a name an earlier plugin registered (built-in names never).

    Raises:
        ValueError: a built-in or already registered name, or a factory that cannot be called
            so; the message names the plugin module.
    """
    from dropcluster.models import MODELS

    origin = _origin(factory)
    _check_name("model", name, MODELS, REGISTRY.models, replace, origin)
    _check_signature(
        "model",
        name,
        factory,
        (10, 3),
        {"stem": None},
        "factory(n_classes, in_channels, stem=None)",
        origin,
    )
    REGISTRY.models[name] = (factory, origin)


def register_dataset(
    name: str,
    loader: Callable[..., Any],
    *,
    augment: Any,
    family: str = "cifar100",
    replace: bool = False,
) -> None:
    """Register a data set under ``name``.

    Args:
        name: as for :func:`register_regularizer`.
        loader: called as ``loader(split, root)`` with split ``"train"`` or ``"test"`` and root
            the config's ``data_dir`` (None when not given); returns an
            :class:`~dropcluster.data.ImageDataset` (uint8 images (N, C, H, W), int64 labels).
        augment: the training augmentation and normalisation, an
            :class:`~dropcluster.data.AugmentConfig` (its ``for_evaluation()`` is the test
            pipeline).
        family: the row of :data:`~dropcluster.models.PAPER_PLACEMENTS` its runs use:
            ``"cifar100"`` (small images) or ``"tiny-imagenet"`` (64x64).
        replace: replace a name an earlier plugin registered (built-in names never).

    Raises:
        ValueError: a built-in or already registered name, a loader that cannot be called as
            ``loader(split, root)``, a bad augmentation or family; the message names the
            plugin module.
    """
    from dropcluster.data.augment import AugmentConfig
    from dropcluster.data.datasets import DATASET_NAMES
    from dropcluster.models.placement import PAPER_PLACEMENTS

    origin = _origin(loader)
    _check_name("dataset", name, DATASET_NAMES, REGISTRY.datasets, replace, origin)
    _check_signature("dataset", name, loader, ("train", None), {}, "loader(split, root)", origin)
    if not isinstance(augment, AugmentConfig):
        raise ValueError(
            f"{origin}: augment of data set {name!r} should be an AugmentConfig, but got "
            f"{type(augment).__name__}"
        )
    if family not in PAPER_PLACEMENTS:
        raise ValueError(
            f"{origin}: family of data set {name!r} should be one of "
            f"{', '.join(map(repr, PAPER_PLACEMENTS))}, but got {family!r}"
        )
    REGISTRY.datasets[name] = DatasetEntry(loader, augment, family, origin)


def _origin(factory: Any) -> str:
    """How errors name the plugin: the one being loaded, else the factory's module."""
    if REGISTRY.current is not None:
        return f"plugin {REGISTRY.current!r}"
    module = getattr(factory, "__module__", None)
    return f"plugin {module!r}" if module else "plugin"


def _check_name(
    kind: str,
    name: Any,
    builtins: Iterable[str],
    registered: Mapping[str, Any],
    replace: bool,
    origin: str,
) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"{origin}: a {kind} name should be lower-case letters, digits, '-', '_' and '.', "
            f"but got {name!r}"
        )
    if name in builtins:
        raise ValueError(f"{origin}: {kind} {name!r} is built in and cannot be replaced")
    if name in registered and not replace:
        entry = registered[name]
        owner = entry[1] if isinstance(entry, tuple) else entry.module
        raise ValueError(
            f"{origin}: {kind} {name!r} is already registered (by {owner}); pass replace=True "
            f"to replace it"
        )


def _check_signature(
    kind: str,
    name: str,
    factory: Any,
    args: tuple,
    kwargs: dict[str, Any],
    expected: str,
    origin: str,
) -> None:
    if not callable(factory):
        raise ValueError(
            f"{origin}: the {kind} {name!r} should be registered with a callable, "
            f"{expected}, but got {type(factory).__name__}"
        )
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return  # a builtin without a signature: its first call will tell
    try:
        signature.bind(*args, **kwargs)
    except TypeError as error:
        title = getattr(factory, "__qualname__", type(factory).__name__)
        raise ValueError(
            f"{origin}: {kind} {name!r}: {title}{signature} cannot be called as {expected} "
            f"({error})"
        ) from None


def _check_placement(name: str, placement: Any, origin: str) -> Any:
    from dropcluster.models.placement import DEFAULT_FAMILY, Placement

    if placement is None or isinstance(placement, Placement):
        return placement
    if isinstance(placement, str):
        return Placement(placement)
    if (
        isinstance(placement, Mapping)
        and all(isinstance(value, Placement) for value in placement.values())
        and DEFAULT_FAMILY in placement
    ):
        return dict(placement)
    raise ValueError(
        f"{origin}: placement of regularizer {name!r} should be a slot name, a Placement, or a "
        f"mapping of data sets to Placements with a {DEFAULT_FAMILY!r} row, but got "
        f"{placement!r}"
    )


# ---------------------------------------------------------------------------------------------
# Looking up


def plugin_names(kind: str, wanted: str | None = None) -> tuple[str, ...]:
    """The names plugins registered of ``kind`` (one of :data:`KINDS`), in order.

    Given ``wanted``, a name that is not registered yet, the installed plugins (the entry
    points) are loaded first (once per process).
    """
    table = _table(kind)
    if wanted is not None and wanted not in table:
        load_installed_plugins()
        table = _table(kind)
    return tuple(table)


def _table(kind: str) -> Mapping[str, Any]:
    return {
        "regularizer": REGISTRY.regularizers,
        "model": REGISTRY.models,
        "dataset": REGISTRY.datasets,
    }[kind]


def plugin_regularizer(name: str) -> RegularizerEntry | None:
    """The registered regularizer ``name`` (None: not a plugin's)."""
    plugin_names("regularizer", name)
    return REGISTRY.regularizers.get(name)


def plugin_model(name: str) -> Callable[..., Any] | None:
    """The factory of the registered model ``name`` (None: not a plugin's)."""
    plugin_names("model", name)
    entry = REGISTRY.models.get(name)
    return None if entry is None else entry[0]


def plugin_dataset(name: str) -> DatasetEntry | None:
    """The registered data set ``name`` (None: not a plugin's)."""
    plugin_names("dataset", name)
    return REGISTRY.datasets.get(name)


def plugin_display_name(name: str) -> str | None:
    """The display name a plugin gave regularizer ``name`` (None: not a plugin's)."""
    entry = REGISTRY.regularizers.get(name)
    return None if entry is None else entry.display_name


# ---------------------------------------------------------------------------------------------
# Loading


def load_plugins(specs: Iterable[str]) -> list[str]:
    """Import each plugin not imported yet: ``"pkg.module"`` (registers when imported) or
    ``"pkg.module:function"`` (the function is called with no arguments and registers).

    Returns:
        The specs imported by this call.

    Raises:
        ValueError: one line naming the plugin: not a module name, failed to import (the
            exception's type and message), or what it registered was refused.
    """
    if isinstance(specs, str):
        raise ValueError(f"plugins should be a list of module names, but got {specs!r}")
    done = []
    for spec in specs:
        if not isinstance(spec, str) or not _SPEC.match(spec):
            raise ValueError(
                f"a plugin should be a module name (my_pkg.methods) or module:function, but "
                f"got {spec!r}"
            )
        if spec in REGISTRY.loaded:
            continue
        module_name, _, attribute = spec.partition(":")
        with _loading(spec):
            try:
                module = importlib.import_module(module_name)
            except ValueError:
                raise
            except ModuleNotFoundError as error:
                if error.name and module_name.startswith(error.name):
                    raise ValueError(
                        f"plugin {spec!r} is not importable here ({error}): install its package "
                        f"(pip install -e PATH) or add its folder to PYTHONPATH"
                    ) from None
                raise ValueError(f"plugin {spec!r} failed to import: {_one_line(error)}") from None
            except Exception as error:  # noqa: BLE001 - any failure of a user's module
                raise ValueError(f"plugin {spec!r} failed to import: {_one_line(error)}") from None
            if attribute:
                _call_register(spec, getattr(module, attribute, None))
        REGISTRY.loaded.append(spec)
        done.append(spec)
    return done


def load_installed_plugins() -> list[str]:
    """Load the plugins of the ``dropcluster.plugins`` entry-point group (once per process).

    An entry point names a module (``mydrop = "mydrop"``) or a function that registers
    (``mydrop = "mydrop:register"``).

    Returns:
        The entry points' values loaded by this call.

    Raises:
        ValueError: as :func:`load_plugins`, naming the entry point and its package.
    """
    if REGISTRY.installed_loaded:
        return []
    REGISTRY.installed_loaded = True
    done = []
    for point in entry_points(group=PLUGIN_GROUP):
        if point.value in REGISTRY.loaded:
            continue
        distribution = getattr(getattr(point, "dist", None), "name", None)
        label = f"{point.value} (entry point {point.name!r}" + (
            f" of {distribution})" if distribution else ")"
        )
        with _loading(label):
            try:
                loaded = point.load()
            except ValueError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure of a user's module
                raise ValueError(f"plugin {label!r} failed to import: {_one_line(error)}") from None
            if callable(loaded) and not inspect.ismodule(loaded):
                _call_register(label, loaded)
        REGISTRY.loaded.append(point.value)
        done.append(point.value)
    return done


class _loading:
    """Names ``spec`` in the errors of what it registers; turns them into one line."""

    def __init__(self, spec: str) -> None:
        self.spec = spec

    def __enter__(self) -> None:
        self.previous, REGISTRY.current = REGISTRY.current, self.spec

    def __exit__(self, kind, error, traceback) -> bool:
        REGISTRY.current = self.previous
        if isinstance(error, ValueError) and not str(error).startswith("plugin "):
            raise ValueError(f"plugin {self.spec!r}: {_one_line(error)}") from None
        return False


def _call_register(spec: str, function: Any) -> None:
    if not callable(function):
        raise ValueError(f"plugin {spec!r}: the function after ':' is not in the module")
    try:
        function()
    except ValueError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of a user's function
        raise ValueError(f"plugin {spec!r}: registering failed: {_one_line(error)}") from None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if not isinstance(error, ValueError) else text
