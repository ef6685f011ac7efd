"""The corruptions' names, the named sets of them, and the severity families.

Hendrycks & Dietterich (2019) define 15 benchmark corruptions in four groups (noise, blur,
weather, digital) and 4 extra ones held out for validation. The paper this project reproduces
reports 7 of them (the noises and blurs). A *spec* names corruptions for the command line and
the APIs: a set name (``paper``, ``benchmark``, ``extra``, ``all``), or corruption names and set
names separated by commas.
"""

from __future__ import annotations

from dropcluster.validation import check_int

__all__ = [
    "BENCHMARK",
    "CORRUPTIONS",
    "CORRUPTION_SETS",
    "EXTRA",
    "FAMILIES",
    "PAPER",
    "corruption_names",
    "family_for_size",
]

#: The paper's seven (its Table 5 and Figures 9-10), in the order of its tables.
PAPER: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
)

#: The 15 benchmark corruptions: noise, blur, weather, digital, in the order of the released
#: sets and of published mCE tables. mCE is the mean over these.
BENCHMARK: tuple[str, ...] = (
    *PAPER,
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)

#: The 4 extra corruptions of the released sets (held out for validation in the original work).
EXTRA: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")

#: Every corruption this package implements: the benchmark's 15, then the extra 4.
CORRUPTIONS: tuple[str, ...] = (*BENCHMARK, *EXTRA)

#: Set name -> its corruptions.
CORRUPTION_SETS: dict[str, tuple[str, ...]] = {
    "paper": PAPER,
    "benchmark": BENCHMARK,
    "extra": EXTRA,
    "all": CORRUPTIONS,
}

#: One severity table per reference script: CIFAR-10/100-C (32 px), Tiny-ImageNet-C (64 px),
#: ImageNet-C (224 px).
FAMILIES: tuple[str, ...] = ("cifar", "tiny-imagenet", "imagenet")


def corruption_names(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The corruptions a spec names, each once, in the order of :data:`CORRUPTIONS`.

    Args:
        spec: a set name (``"paper"``, ``"benchmark"``, ``"extra"``, ``"all"``), a corruption
            name, several of either separated by commas (``"benchmark,speckle_noise"``), or a
            list of them.

    Returns:
        The named corruptions (at least one).

    Raises:
        ValueError: an unknown name, or a spec that names nothing.
    """
    if isinstance(spec, str):
        parts = spec.split(",")
    elif isinstance(spec, (list, tuple)) and all(isinstance(part, str) for part in spec):
        parts = list(spec)
    else:
        raise ValueError(
            f"corruptions should be a set name, corruption names or a list of them, but got "
            f"{spec!r} ({type(spec).__name__})"
        )
    chosen: set[str] = set()
    for part in (part.strip() for part in parts):
        if part in CORRUPTION_SETS:
            chosen.update(CORRUPTION_SETS[part])
        elif part in CORRUPTIONS:
            chosen.add(part)
        else:
            raise ValueError(
                f"unknown corruption {part!r}: expected a set ({', '.join(CORRUPTION_SETS)}) or "
                f"one of {', '.join(CORRUPTIONS)}"
            )
    if not chosen:
        raise ValueError(f"corruptions should name at least one corruption, but got {spec!r}")
    return tuple(name for name in CORRUPTIONS if name in chosen)


def family_for_size(height: int, width: int) -> str:
    """The severity table for images of this size: the reference script made for that size.

    Images of at most 32 pixels a side use the CIFAR table (so 28x28 Fashion-MNIST does too),
    at most 64 the Tiny ImageNet table, anything larger the ImageNet (224 px) table.

    Args:
        height, width: image size in pixels (>= 1).

    Returns:
        One of :data:`FAMILIES`.
    """
    side = max(check_int("height", height, minimum=1), check_int("width", width, minimum=1))
    if side <= 32:
        return "cifar"
    if side <= 64:
        return "tiny-imagenet"
    return "imagenet"
