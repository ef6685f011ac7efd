"""What dropcluster keeps reading from older versions, in one place.

Each entry names the version whose format or call it reads, and the release that may drop it.
Everything else in the package handles the current format only. Depends on torch only (the
layers use it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["old_call_form"]

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
