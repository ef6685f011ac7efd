"""Batched data augmentation on the device: a few tensor ops per batch, no per-image Python.

The paper's protocol (section "Experimental protocol"): CIFAR-100 gets a random horizontal
flip, a random rotation and a 32x32 random crop after 4-pixel padding, then normalisation;
Tiny ImageNet gets a flip, a random scale and a random crop, then normalisation; test images
are only normalised. CIFAR-10 (the paper's Figure 1) gets CIFAR-100's augmentation with its
own statistics. :func:`augment_batch` does all of it for a whole uint8 batch:

1. crop after zero padding and horizontal flip: one ``torch.gather`` on the uint8 batch with
   per-image offsets (a flipped image reads its window's columns backwards);
2. rotation and scale: one ``F.affine_grid`` + ``F.grid_sample`` call with a 2x3 matrix per
   image (bilinear, zeros outside the image, as torchvision's ``RandomRotation`` fills 0);
3. normalisation ``(x / 255 - mean) / std`` as one multiply and one subtract in float32.

Every random number comes from an explicit ``torch.Generator`` on the images' device, in a
fixed order, so a seed fixes the augmented batch. A batch copies nothing from the host (on a
GPU such a copy blocks until the device is idle): constants are Python floats, or tensors
cached per device (the normalisation's, made at the first batch).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dropcluster.validation import check_float, check_int, check_tensor

__all__ = [
    "AUGMENT_PRESETS",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR10_AUGMENT",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR_AUGMENT",
    "FASHION_MNIST_AUGMENT",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "SYNTHETIC_AUGMENT",
    "SYNTHETIC_MEAN",
    "SYNTHETIC_STD",
    "TINY_IMAGENET_AUGMENT",
    "TINY_IMAGENET_MEAN",
    "TINY_IMAGENET_STD",
    "AugmentConfig",
    "augment_batch",
    "channel_mean_std",
    "normalize",
]


#: Per-channel mean and standard deviation of the pixels in [0, 1] of each training set.
#: CIFAR-100 and Fashion-MNIST: computed over the whole training set (the values in
#: common use). Tiny ImageNet: the values in common use for its 100 000 training images.
#: Synthetic: rough values for :func:`dropcluster.data.datasets.make_synthetic`.
#: CIFAR-10: mean and standard deviation over all pixels of its 50 000 training images (what
#: :func:`channel_mean_std` gives), the values in common use. Not the std (0.2023, 0.1994,
#: 0.2010) that also circulates, which is not the pixels' (it matches the mean of per-image
#: standard deviations).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
TINY_IMAGENET_MEAN = (0.4802, 0.4481, 0.3975)
TINY_IMAGENET_STD = (0.2770, 0.2691, 0.2821)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
SYNTHETIC_MEAN = (0.5,)
SYNTHETIC_STD = (0.22,)


@dataclass(frozen=True)
class AugmentConfig:
    """What :func:`augment_batch` does to a training batch.

    Attributes:
        crop_padding: pad each side with this many zero pixels, then crop a random window of
            the original size (0: no crop).
        flip: flip each image horizontally with probability 1/2.
        rotation_degrees: rotate each image by an angle drawn uniformly from
            [-rotation_degrees, rotation_degrees] (0: no rotation).
        scale_range: ``(low, high)``: each image shows a square window whose side is a
            fraction s ~ U(low, high) of the image's, at a random position inside the image,
            resized to the full size (Tiny ImageNet's "scale + random crop"; s > 1 zooms out).
            None: no scaling.
        mean, std: per-channel statistics of pixels in [0, 1] used for normalisation; one value
            applies to every channel. The defaults leave pixels in [0, 1].
    """

    crop_padding: int = 4
    flip: bool = True
    rotation_degrees: float = 0.0
    scale_range: tuple[float, float] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        # Lists (from JSON or YAML) become tuples so configs stay hashable and comparable.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.scale_range is not None:
            object.__setattr__(self, "scale_range", tuple(float(v) for v in self.scale_range))
        check_int("crop_padding", self.crop_padding, minimum=0)
        check_float("rotation_degrees", self.rotation_degrees, minimum=0.0, maximum=180.0)
        if self.scale_range is not None:
            if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
                raise ValueError(
                    "scale_range should be None or (low, high) with 0 < low <= high, but got "
                    f"{self.scale_range!r}"
                )
        if not self.mean or len(self.mean) != len(self.std):
            raise ValueError(
                f"mean and std should be non-empty and of the same length, but got "
                f"mean={self.mean} and std={self.std}"
            )
        if min(self.std) <= 0:
            raise ValueError(f"std should be > 0 in every channel, but got {self.std}")

    @property
    def is_random(self) -> bool:
        """Whether :func:`augment_batch` draws random numbers (else it only normalises)."""
        return (
            self.crop_padding > 0
            or self.flip
            or self.rotation_degrees > 0
            or self.scale_range is not None
        )

    def for_evaluation(self) -> AugmentConfig:
        """The same normalisation with no random transformation (the test-time pipeline)."""
        return dataclasses.replace(
            self, crop_padding=0, flip=False, rotation_degrees=0.0, scale_range=None
        )


#: CIFAR-100 (paper): 4-pixel padding + 32x32 crop, flip, rotation. The paper does not give the
#: angle; 15 degrees is the ``RandomRotation(15)`` of the widely used PyTorch CIFAR-100
#: training recipes (e.g. weiaicunzai/pytorch-cifar100), which pair it with these statistics.
CIFAR_AUGMENT = AugmentConfig(
    crop_padding=4, flip=True, rotation_degrees=15.0, mean=CIFAR100_MEAN, std=CIFAR100_STD
)
#: CIFAR-10 (the paper's Figure 1, LeNet-5): the same 32x32 natural images as CIFAR-100, so
#: CIFAR-100's augmentation, with CIFAR-10's own statistics.
CIFAR10_AUGMENT = dataclasses.replace(CIFAR_AUGMENT, mean=CIFAR10_MEAN, std=CIFAR10_STD)
#: Tiny ImageNet (paper: flip, scale, random crop): a window of 80-100 % of the side at a
#: random position, resized to 64x64. Its test pipeline (a single 64x64 crop) is the whole
#: image, i.e. ``TINY_IMAGENET_AUGMENT.for_evaluation()``.
TINY_IMAGENET_AUGMENT = AugmentConfig(
    crop_padding=0,
    flip=True,
    scale_range=(0.8, 1.0),
    mean=TINY_IMAGENET_MEAN,
    std=TINY_IMAGENET_STD,
)
#: Fashion-MNIST (the CPU demo; not in the paper): 2-pixel padding + 28x28 crop and flip.
FASHION_MNIST_AUGMENT = AugmentConfig(
    crop_padding=2, flip=True, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD
)
#: Synthetic set: its classes survive flips and shifts by construction.
SYNTHETIC_AUGMENT = AugmentConfig(crop_padding=2, flip=True, mean=SYNTHETIC_MEAN, std=SYNTHETIC_STD)
#: The training augmentation of each data set, by the names of ``load_dataset``.
AUGMENT_PRESETS = {
    "cifar10": CIFAR10_AUGMENT,
    "cifar100": CIFAR_AUGMENT,
    "tiny-imagenet": TINY_IMAGENET_AUGMENT,
    "fashion-mnist": FASHION_MNIST_AUGMENT,
    "synthetic": SYNTHETIC_AUGMENT,
}


def augment_batch(
    images: Tensor, config: AugmentConfig, generator: torch.Generator | None = None
) -> Tensor:
    """Randomly crop, flip, rotate and scale a uint8 batch, then normalise it.

    Args:
        images (Tensor[N, C, H, W], uint8): the batch, on any device.
        config: what to do; see :class:`AugmentConfig`.
        generator: source of every random number, on the device of ``images``; None uses the
            global generator of that device. Needed only when ``config.is_random``.

    Returns:
        Tensor[N, C, H, W] float32, normalised, on the device of ``images``.

    Raises:
        ValueError: images not 4-dimensional uint8, a channel count that ``config.mean`` does
            not fit, or a generator on another device.
    """
    _check_images(images, config.mean)
    if generator is not None and generator.device.type != images.device.type:
        raise ValueError(
            f"generator should be on the images' device {images.device}, but is on "
            f"{generator.device}"
        )
    if config.crop_padding > 0 or config.flip:
        images = _crop_and_flip(images, config.crop_padding, config.flip, generator)
    pixels = images.to(torch.float32)
    if config.rotation_degrees > 0 or config.scale_range is not None:
        pixels = _rotate_and_scale(pixels, config.rotation_degrees, config.scale_range, generator)
    return _normalize_float(pixels, config.mean, config.std)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(images / 255 - mean) / std`` per channel, in float32: the evaluation pipeline.

    Args:
        images (Tensor[N, C, H, W], uint8): the batch.
        mean, std: C values (or one for every channel) for pixels in [0, 1].

    Returns:
        Tensor[N, C, H, W] float32 on the device of ``images``.
    """
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if not mean or len(mean) != len(std) or min(std) <= 0:
        raise ValueError(
            f"mean and std should have the same non-zero length and std > 0, but got "
            f"mean={mean} and std={std}"
        )
    _check_images(images, mean)
    return _normalize_float(images.to(torch.float32), mean, std)


def channel_mean_std(images: Tensor, batch_size: int = 4096) -> tuple[tuple[float, ...], ...]:
    """Per-channel mean and standard deviation of uint8 images scaled to [0, 1].

    Sums are accumulated in float64 batch by batch, so 100 000 images need little memory.

    Args:
        images (Tensor[N, C, H, W], uint8): a training set.
        batch_size: images per step.

    Returns:
        ``(mean, std)``, two tuples of C floats, ready for :class:`AugmentConfig`.
    """
    _check_images(images, (0.0,))
    total = torch.zeros(images.shape[1], dtype=torch.float64, device=images.device)
    total_sq = torch.zeros_like(total)
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size].to(torch.float64) / 255
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def _check_images(images: Tensor, mean: tuple[float, ...]) -> None:
    """The input rule of the public functions: (N, C, H, W) uint8 whose C ``mean`` fits."""
    check_tensor("images", images, 4, "(N, C, H, W)")
    if images.dtype != torch.uint8:
        raise ValueError(f"images should have dtype uint8, but got {images.dtype}")
    if len(mean) not in (1, images.shape[1]):
        raise ValueError(
            f"mean and std have {len(mean)} values, which fit neither 1 nor the "
            f"{images.shape[1]} channels of the images"
        )


def _crop_and_flip(
    images: Tensor, padding: int, flip: bool, generator: torch.Generator | None
) -> Tensor:
    """Random window of the zero-padded images, read backwards for flipped images."""
    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    padded_w = w + 2 * padding
    if padding:
        top = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator, device=device)
        left = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator, device=device)
    else:
        top = left = torch.zeros((n, 1, 1), dtype=torch.int64, device=device)
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    if flip:
        flipped = torch.rand((n, 1, 1), generator=generator, device=device) < 0.5
        cols = torch.where(flipped, w - 1 - cols, cols)
    index = ((top + rows) * padded_w + left + cols).view(n, 1, h * w).expand(n, c, h * w)
    windows = torch.gather(padded.reshape(n, c, -1), 2, index)
    return windows.view(n, c, h, w)


def _rotate_and_scale(
    pixels: Tensor,
    degrees: float,
    scale_range: tuple[float, float] | None,
    generator: torch.Generator | None,
) -> Tensor:
    """One bilinear resampling of the batch with a random similarity transform per image."""
    n, _, h, w = pixels.shape
    device = pixels.device
    angle = (torch.rand(n, generator=generator, device=device) * 2 - 1) * math.radians(degrees)
    if scale_range is not None:
        low, high = scale_range
        scale = low + torch.rand(n, generator=generator, device=device) * (high - low)
        # The window's outermost sampling points (pixel centres) stay within the image's
        # outermost pixel centres, at 1 - 1/size in the [-1, 1] coordinates of affine_grid, so
        # no zero padding leaks in when zooming in. Python floats, not a tensor of them: a
        # tensor built from host numbers per batch is a blocking host-to-device copy on a GPU
        # (a float32 tensor times a Python float rounds the float to float32 first, so the
        # result is bit for bit that of a float32 tensor of the two bounds).
        slack = (1 - scale).abs()
        reach = torch.stack([slack * (1 - 1 / w), slack * (1 - 1 / h)], dim=1)
        shift = (torch.rand((n, 2), generator=generator, device=device) * 2 - 1) * reach
    else:
        scale = torch.ones(n, device=device)
        shift = torch.zeros((n, 2), device=device)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    # affine_grid maps the output's [-1, 1]^2 to the input's; the aspect factors make the
    # rotation a true rotation in pixels when H != W.
    theta = torch.stack(
        [
            torch.stack([cos, -sin * (h / w), shift[:, 0]], dim=1),
            torch.stack([sin * (w / h), cos, shift[:, 1]], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _normalize_float(pixels: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """``(pixels / 255 - mean) / std`` in place on a float32 tensor of values in [0, 255]."""
    scale, offset = _normalization_constants(mean, std, pixels.device)
    return pixels.mul_(scale).sub_(offset)


@functools.lru_cache(maxsize=32)
def _normalization_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[Tensor, Tensor]:
    """(1, C, 1, 1) multipliers ``1 / (255 std)`` and offsets ``mean / std``, cached per device
    so a training step makes no host-to-device copy for them."""
    std_tensor = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * std_tensor)).to(torch.float32)
    offset = (torch.tensor(mean, dtype=torch.float64) / std_tensor).to(torch.float32)
    return scale.view(1, -1, 1, 1).to(device), offset.view(1, -1, 1, 1).to(device)
