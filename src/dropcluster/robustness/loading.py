"""Building a user's model from ``MODULE:FACTORY`` and loading its weights, with one-line errors.

``MODULE`` is an importable module (``mypackage.models``; the current folder is searched
first, as ``python -m`` does) or the path of a Python file (``models/resnet.py``); ``FACTORY``
names a callable in it (dotted for attributes: ``Models.resnet18``) that returns an
``nn.Module``. Weights come from ``torch.load`` with ``weights_only=True``: a state dict, or a
checkpoint dict holding one under ``state_dict``, ``model_state_dict``, ``model`` or ``net``; a
``module.`` prefix (DistributedDataParallel) or ``_orig_mod.`` (``torch.compile``) is removed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dropcluster.validation import first_few

__all__ = ["ModelLoadError", "build_model", "load_weights", "state_dict_from"]

#: Keys of a checkpoint dict that commonly hold the model's state dict, tried in this order.
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net")
_PREFIXES = ("module.", "_orig_mod.")


class ModelLoadError(ValueError):
    """A model that cannot be built, or weights that do not fit it (the message is one line)."""


def build_model(spec: str, options: Mapping[str, Any] | None = None) -> nn.Module:
    """Call the factory ``spec`` names (``MODULE:FACTORY``) with ``options`` as keywords.

    Raises:
        ModelLoadError: a spec without ``:``, a module that does not import (its error named),
            a missing factory, a factory that fails or returns no ``nn.Module``.
    """
    module_name, colon, factory_name = spec.partition(":")
    if not colon or not module_name or not factory_name:
        raise ModelLoadError(
            f"--model should be MODULE:FACTORY (e.g. mymodels:resnet18 or models.py:resnet18), "
            f"but got {spec!r}"
        )
    module = _import(module_name)
    factory: Any = module
    for part in factory_name.split("."):
        if not hasattr(factory, part):
            raise ModelLoadError(f"{module_name} has no {factory_name!r} (from --model {spec})")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ModelLoadError(f"{spec}: {factory_name} is not callable")
    try:
        model = factory(**dict(options or {}))
    except Exception as error:  # the user's code: any failure is reported in one line
        raise ModelLoadError(
            f"{spec}({_describe_options(options)}) failed: {type(error).__name__}: {error}"
        ) from error
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"{spec} should return an nn.Module, but returned {type(model).__name__}"
        )
    return model


def state_dict_from(checkpoint: object, path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict inside what ``torch.load`` returned (see the module docstring)."""
    if isinstance(checkpoint, Mapping):
        for key in _STATE_KEYS:
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in checkpoint.values()
    ):
        raise ModelLoadError(
            f"{path} holds no state dict (expected a mapping of names to tensors, or a "
            f"checkpoint dict with one under {', '.join(_STATE_KEYS)})"
        )
    state = dict(checkpoint)
    for prefix in _PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load the weights file ``path`` into ``model`` (strictly: every key, every shape).

    Raises:
        FileNotFoundError: no file at ``path``.
        ModelLoadError: not a torch file, no state dict in it, or one that does not fit the
            model (the first missing and unexpected keys and shape mismatches named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors alike: the file is unreadable
        raise ModelLoadError(
            f"{path} is not a weights file torch.load reads with weights_only=True "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from error
    state = state_dict_from(checkpoint, path)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key} {tuple(state[key].shape)} in the file, {tuple(expected[key].shape)} in the model"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {first_few(missing, 3)}")
    if unexpected:
        problems.append(f"unexpected {first_few(unexpected, 3)}")
    if mismatched:
        problems.append(f"shapes differ: {first_few(mismatched, 3)}")
    if problems:
        raise ModelLoadError(f"the weights in {path} do not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state)


def _import(module_name: str):
    """Import a module by name (current folder first) or from a ``.py`` file path."""
    try:
        if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise ModelLoadError(f"no Python file at {path} (from --model)")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        return importlib.import_module(module_name)
    except ModelLoadError:
        raise
    except Exception as error:  # the user's module: report why it does not import, in a line
        raise ModelLoadError(
            f"cannot import {module_name} (from --model): {type(error).__name__}: {error}"
        ) from error


def _describe_options(options: Mapping[str, Any] | None) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in (options or {}).items())
