"""matplotlib, imported only when a figure is drawn (it is an optional extra)."""

from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the file-only Agg backend, or a clear error when it is missing."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "figures need matplotlib, an optional extra: pip install 'dropcluster[plot]'"
        ) from error
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt
