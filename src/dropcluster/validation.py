"""Checks of values that enter the package from outside: function arguments, configs, CLI flags.

One place for the rules and their messages, so every boundary says the same thing the same way:
what was expected, and what was given. Inside the package values are trusted.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any

__all__ = [
    "MAX_SEED",
    "check_choice",
    "check_fields",
    "check_float",
    "check_int",
    "check_name",
    "check_tensor",
    "check_type",
    "first_few",
    "int_argument",
    "path_argument",
]


def check_int(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """``value`` as an int (a bool is refused), within ``[minimum, maximum]`` when given."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} should be an integer, but got {value!r}")
    value = int(value)
    _check_range(name, value, minimum, maximum, "an integer")
    return value


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> float:
    """``value`` as a finite float (ints accepted, bools and NaN/inf refused).

    ``minimum``/``maximum`` are inclusive bounds, ``above``/``below`` exclusive ones.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} should be a number, but got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} should be a finite number, but got {value!r}")
    _check_range(name, value, minimum, maximum, "a number")
    if above is not None and not value > above:
        raise ValueError(f"{name} should be a number > {above}, but got {value!r}")
    if below is not None and not value < below:
        raise ValueError(f"{name} should be a number < {below}, but got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        valid = ", ".join(repr(choice) for choice in choices)
        raise ValueError(f"{name} should be one of {valid}, but got {value!r}")
    return value


def _check_range(name: str, value: float, minimum, maximum, kind: str) -> None:
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        low = "" if minimum is None else f">= {minimum}"
        high = "" if maximum is None else f"<= {maximum}"
        bounds = " and ".join(part for part in (low, high) if part)
        raise ValueError(f"{name} should be {kind} {bounds}, but got {value!r}")


def check_type(name: str, value: Any, hint: Any) -> None:
    """Raise ValueError unless ``value`` fits the type annotation ``hint``.

    Understands what configs use: ``str``, ``int`` (not bool), ``float`` (int accepted, not
    bool, finite), ``bool``, ``X | None``, ``list[T]`` and ``dict[str, T]``.
    """
    if not _fits(value, hint):
        raise ValueError(
            f"{name} should be {_describe(hint)}, but got {value!r} ({type(value).__name__})"
        )


def _fits(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, Integral) and not isinstance(value, bool)
    if hint is float:
        return (
            isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))
        )
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(
            _fits(k, key) and _fits(v, item) for k, v in value.items()
        )
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if origin is dict:
        return "a mapping"
    names = {str: "a string", int: "an integer", float: "a finite number", bool: "true or false"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_fields(instance: Any) -> None:
    """Check every field of a dataclass instance against its annotation (see check_type)."""
    import dataclasses

    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        check_type(field.name, getattr(instance, field.name), hints[field.name])


def check_name(name: str, value: Any) -> str:
    """``value`` if it can be a file or folder name: a non-empty string without a path
    separator, not ``.`` or ``..`` and not hidden (a leading ``.``). Names that become paths
    (preset names, run ids) are checked with it, so none can point outside its folder."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} should be a non-empty name, but got {value!r}")
    bad = [char for char in ("/", "\\", "\0") if char in value]
    if bad or value.startswith(".") or value != value.strip():
        raise ValueError(
            f"{name} should be a plain name (it becomes a folder name: no '/', '\\', leading "
            f"'.' or surrounding spaces), but got {value!r}"
        )
    return value


def path_argument(text: str):
    """An ``argparse`` type: a path, refusing the empty string (``Path("")`` is the current
    folder, which no one means by ``--out ""``)."""
    import argparse
    from pathlib import Path

    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, but got an empty string")
    return Path(text)


path_argument.__name__ = "path"


def int_argument(minimum: int, maximum: int | None = None):
    """An ``argparse`` type: an integer in ``[minimum, maximum]`` (a bad value ends in a usage
    error)."""
    import argparse

    expected = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, but got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, but got {value}")
        return value

    parse.__name__ = expected.removeprefix("an ")
    return parse


#: The largest seed: 2**32 - 1, as numpy's. Seeds derived from it (one per process of a
#: distributed run, one per corrupted chunk) stay far inside the 64-bit range torch and SQLite
#: store.
MAX_SEED = 2**32 - 1


def check_tensor(name: str, value: Any, dims: int | tuple[int, ...], layout: str) -> None:
    """Raise unless ``value`` is a ``torch.Tensor`` with ``dims`` dimensions (one of them, for a
    tuple); ``layout`` names the dimensions in the message, e.g. ``"(N, C, H, W)"``.

    Raises:
        TypeError: ``value`` is not a tensor.
        ValueError: it has another number of dimensions.
    """
    import torch

    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} should be a torch.Tensor {layout}, but got {type(value).__name__}")
    allowed = (dims,) if isinstance(dims, int) else dims
    if value.dim() not in allowed:
        expected = " or ".join(str(count) for count in allowed)
        raise ValueError(
            f"{name} should be {expected} dimensional {layout}, but got shape {tuple(value.shape)}"
        )


def first_few(items: list[str], shown: int = 4) -> str:
    """``"a, b, c, d and 3 more"``: the first ``shown`` items of a list for a one-line message."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more
