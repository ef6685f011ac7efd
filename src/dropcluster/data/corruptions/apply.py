"""``corrupt``: one corruption at one severity on a batch, chunk after chunk."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from dropcluster.data.corruptions import colour, elastic, jpeg, noise_blur, weather
from dropcluster.data.corruptions.filters import TRUNCATION_SLACK
from dropcluster.data.corruptions.names import CORRUPTIONS, FAMILIES, family_for_size
from dropcluster.validation import check_choice, check_int, check_tensor

__all__ = ["CHUNK_ELEMENTS", "SEVERITY_PARAMETERS", "check_corruption", "corrupt"]

_MODULES = (noise_blur, weather, colour, elastic, jpeg)

#: family -> corruption -> the parameters of severities 1 to 5 (what each means: the table of
#: the module that implements it).
SEVERITY_PARAMETERS: dict[str, dict[str, tuple]] = {
    family: {
        name: table
        for module in _MODULES
        for name, table in module.PARAMETERS.get(family, {}).items()
    }
    for family in FAMILIES
}
_FUNCTIONS: dict[str, Callable[[Tensor, Any, torch.Generator | None], Tensor]] = {
    name: function for module in _MODULES for name, function in module.FUNCTIONS.items()
}
#: Corruptions that also have a uint8 -> uint8 version (same results, fewer passes).
_LEVEL_FUNCTIONS: dict[str, Callable[[Tensor, Any, torch.Generator | None], Tensor]] = {
    name: function
    for module in _MODULES
    for name, function in getattr(module, "LEVEL_FUNCTIONS", {}).items()
}
_UINT8_SLACK: dict[str, float] = {
    name: slack for module in _MODULES for name, slack in module.UINT8_SLACK.items()
}
_CHECKS: dict[str, Callable[[Any, int, int, int], None]] = {
    name: check for module in _MODULES for name, check in getattr(module, "CHECKS", {}).items()
}

#: Images per chunk are ``max(1, CHUNK_ELEMENTS // (C * H * W))``: 16 MiB of float32 pixels,
#: a few times that in temporaries. Fixed (not device-dependent) because it decides how the
#: random stream is split between images.
CHUNK_ELEMENTS = 2**22


def corrupt(
    images: Tensor,
    corruption: str,
    severity: int,
    *,
    family: str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Apply one corruption at one severity to a batch of images.

    Args:
        images (Tensor[N, C, H, W]): uint8 in [0, 255] or floating in [0, 1], on any device.
            Any number of channels works (each corruption treats channels as the reference
            treats RGB; the reference scripts only ever see C = 3, and a grey image behaves as
            the reference would on that image converted to RGB).
        corruption: one of :data:`~dropcluster.data.corruptions.names.CORRUPTIONS`.
        severity: 1 to 5.
        family: which script's table to use, one of
            :data:`~dropcluster.data.corruptions.names.FAMILIES`; None picks it from the image
            size with :func:`~dropcluster.data.corruptions.names.family_for_size`.
        generator: source of every random number, on the device of ``images``; None uses the
            global generator of that device (then only ``torch.manual_seed`` makes it
            repeatable).

    Returns:
        Tensor[N, C, H, W] of the dtype and device of ``images``: uint8 quantised as the
        reference stores it (see the package docstring), floating in [0, 1].

    Raises:
        ValueError: for an unknown corruption or family, a severity outside 1..5, images that
            are not a 4-D uint8 or floating tensor (or floating values outside [0, 1]), images
            too small for the corruption or with channels it cannot treat, or a generator on
            another device.
        FileNotFoundError: frost's images are not at hand (see
            :mod:`dropcluster.data.corruptions.weather`).
        TypeError: ``images`` is not a tensor.
    """
    check_choice("corruption", corruption, CORRUPTIONS)
    _check_images(images)
    severity = check_int("severity", severity, minimum=1, maximum=5)
    check_choice("family", family, (None, *FAMILIES))
    if generator is not None and generator.device.type != images.device.type:
        raise ValueError(
            f"generator should be on the images' device {images.device}, but is on "
            f"{generator.device}"
        )
    if family is None:
        family = family_for_size(images.shape[-2], images.shape[-1])
    if images.numel() == 0:
        return images.clone()
    parameter = SEVERITY_PARAMETERS[family][corruption][severity - 1]
    _check_applicable(corruption, parameter, images.shape)
    function = _FUNCTIONS[corruption]
    # Most references truncate to uint8; those that get their result back from an 8-bit image
    # (ImageMagick's PNG, PIL) round (see "Quantisation" in the package docstring).
    slack = _UINT8_SLACK.get(corruption, TRUNCATION_SLACK)
    level_function = _LEVEL_FUNCTIONS.get(corruption)
    if images.dtype == torch.uint8 and level_function is not None:
        return _levels_in_chunks(
            images, lambda levels, gen: level_function(levels, parameter, gen), generator
        )
    return _corrupt_in_chunks(
        images, lambda pixels, gen: function(pixels, parameter, gen), slack, generator
    )


def check_corruption(
    corruption: str, severity: int, shape: Sequence[int], *, family: str | None = None
) -> None:
    """Check, without corrupting anything, that :func:`corrupt` can apply ``corruption`` at
    ``severity`` to images of ``shape`` (N, C, H, W): the name, the severity, the family, and
    what the corruption needs of the images (channels, size, frost's image files).

    For a long evaluation: every corruption it will make is checked before the first is made.

    Raises:
        ValueError, FileNotFoundError: as :func:`corrupt` would.
    """
    check_choice("corruption", corruption, CORRUPTIONS)
    severity = check_int("severity", severity, minimum=1, maximum=5)
    check_choice("family", family, (None, *FAMILIES))
    if len(shape) != 4:
        raise ValueError(f"images should be (N, C, H, W), but got shape {tuple(shape)}")
    if family is None:
        family = family_for_size(shape[-2], shape[-1])
    _check_applicable(corruption, SEVERITY_PARAMETERS[family][corruption][severity - 1], shape)


def _check_applicable(corruption: str, parameter, shape: Sequence[int]) -> None:
    check = _CHECKS.get(corruption)
    if check is not None:
        check(parameter, shape[-3], shape[-2], shape[-1])


def _levels_in_chunks(
    images: Tensor,
    apply: Callable[[Tensor, torch.Generator | None], Tensor],
    generator: torch.Generator | None,
) -> Tensor:
    """``apply`` to uint8 images chunk after chunk, as :func:`_corrupt_in_chunks` splits them."""
    n, c, h, w = images.shape
    images_per_chunk = max(1, CHUNK_ELEMENTS // (c * h * w))
    corrupted_images = torch.empty_like(images)
    with torch.no_grad():
        for start in range(0, n, images_per_chunk):
            chunk = images[start : start + images_per_chunk]
            corrupted_images[start : start + images_per_chunk] = apply(chunk, generator)
    return corrupted_images


def _corrupt_in_chunks(
    images: Tensor,
    apply: Callable[[Tensor, torch.Generator | None], Tensor],
    slack: float,
    generator: torch.Generator | None,
) -> Tensor:
    """``apply`` to pixels in [0, 1], chunk after chunk of images (see "Randomness").

    Args:
        images (Tensor[N, C, H, W]): uint8 or floating in [0, 1], N >= 1.
        apply: the corruption at one severity, as ``f(pixels, generator)``.
        slack: added to ``255 y`` before truncating a uint8 output.

    Returns:
        Tensor[N, C, H, W] of the dtype of ``images``.
    """
    work_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    n, c, h, w = images.shape
    images_per_chunk = max(1, CHUNK_ELEMENTS // (c * h * w))
    corrupted_images = torch.empty_like(images)
    with torch.no_grad():
        for start in range(0, n, images_per_chunk):
            chunk = images[start : start + images_per_chunk]
            if images.dtype == torch.uint8:
                pixels = chunk.to(work_dtype).div_(255)
            else:
                pixels = chunk.to(work_dtype)
            corrupted = apply(pixels, generator).clamp(0, 1)
            if images.dtype == torch.uint8:
                # quantise's floor(255 y + slack) clamped to 0..255, in place: for y in
                # [0, 1] the value is in [0, 256), where the cast to uint8 truncates, i.e.
                # floors, and the clamp never acts.
                corrupted = corrupted.mul_(255).add_(slack)
            corrupted_images[start : start + images_per_chunk] = corrupted
    return corrupted_images


def _check_images(images: Tensor) -> None:
    """The input rule of :func:`corrupt`: 4-D, uint8 or floating in [0, 1]."""
    check_tensor("images", images, 4, "(N, C, H, W)")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"images should be uint8 or floating, but got dtype {images.dtype}")
    if images.is_floating_point() and images.numel() > 0:
        low, high = torch.aminmax(images)
        if not (float(low) >= 0 and float(high) <= 1):
            raise ValueError(
                "floating images should have values in [0, 1], but got values in "
                f"[{float(low)}, {float(high)}]"
            )
