"""Training one run: ``train(TrainConfig(...), out)`` returns a :class:`RunResult`.

The names are loaded on first use, so importing a submodule (``dropcluster.train.config``,
which the experiments and the command line read without training) does not load the loop.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dropcluster.train.config import TrainConfig
    from dropcluster.train.loop import RunResult, train

_SOURCES = {"TrainConfig": "config", "RunResult": "loop", "train": "loop"}

__all__ = ["RunResult", "TrainConfig", "train"]


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_SOURCES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
