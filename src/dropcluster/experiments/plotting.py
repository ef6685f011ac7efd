"""matplotlib, imported only when a figure is drawn (it is an optional extra), and figure files."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from dropcluster.files import atomic_write

__all__ = [
    "DPI",
    "pyplot",
    "save_figure",
]


#: Resolution of every figure the package writes.
DPI = 110


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the file-only Agg backend, or a clear error when it is missing."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "figures need matplotlib, an optional extra: pip install -e '.[plot]' (in the "
            "dropcluster checkout)"
        ) from error
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: str | Path, **options: Any) -> Path:
    """Write ``figure`` to ``path`` (format from the suffix, PNG by default) atomically, so a
    reader never sees half an image, then close it; ``options`` go to ``savefig``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    file_format = path.suffix.lstrip(".") or "png"
    try:
        atomic_write(
            path, lambda stream: figure.savefig(stream, format=file_format, dpi=DPI, **options)
        )
    finally:
        pyplot().close(figure)
    return path
