"""Tests of `dropcluster.data.augment`: batched crop, flip, rotation, scale and normalisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dropcluster.data import DATASET_NAMES
from dropcluster.data.augment import (
    AUGMENT_PRESETS,
    CIFAR_AUGMENT,
    FASHION_MNIST_AUGMENT,
    TINY_IMAGENET_AUGMENT,
    AugmentConfig,
    augment_batch,
    channel_mean_std,
    normalize,
)

#: No normalisation: outputs are pixels / 255, so they can be compared with the input.
PLAIN = AugmentConfig(crop_padding=0, flip=False)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hand_made_batch(n: int = 64, channels: int = 3, size: int = 8) -> torch.Tensor:
    """``n`` copies of one image whose pixels all differ (so any window is identifiable)."""
    image = torch.arange(channels * size * size, dtype=torch.int64).view(channels, size, size)
    return (image % 251 + 1).to(torch.uint8).expand(n, -1, -1, -1).contiguous()


def as_pixels(output: torch.Tensor) -> torch.Tensor:
    return (output * 255).round().to(torch.uint8)


@pytest.mark.parametrize(
    "config, shape",
    [
        (CIFAR_AUGMENT, (5, 3, 32, 32)),
        (TINY_IMAGENET_AUGMENT, (5, 3, 64, 64)),
        (FASHION_MNIST_AUGMENT, (5, 1, 28, 28)),
    ],
)
def test_presets_keep_shape_and_give_float32(config, shape):
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=seeded())
    output = augment_batch(images, config, seeded())
    assert output.shape == shape
    assert output.dtype == torch.float32
    assert torch.isfinite(output).all()


def test_every_data_set_has_a_preset():
    assert set(AUGMENT_PRESETS) == set(DATASET_NAMES)


def test_same_seed_same_batch_other_seed_other_batch():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=seeded(1))
    first = augment_batch(images, CIFAR_AUGMENT, seeded(7))
    again = augment_batch(images, CIFAR_AUGMENT, seeded(7))
    other = augment_batch(images, CIFAR_AUGMENT, seeded(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_explicit_generator_leaves_the_global_rng_alone():
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    state = torch.get_rng_state()
    augment_batch(images, CIFAR_AUGMENT, seeded())
    assert torch.equal(torch.get_rng_state(), state)


def test_flip_gives_the_image_or_its_mirror():
    images = hand_made_batch()
    output = as_pixels(augment_batch(images, AugmentConfig(crop_padding=0, flip=True), seeded()))
    unchanged = (output == images).flatten(1).all(1)
    mirrored = (output == torch.flip(images, dims=[3])).flatten(1).all(1)
    assert (unchanged ^ mirrored).all()  # the image has no symmetry: exactly one holds
    assert 10 < int(mirrored.sum()) < 54  # about half of 64


def padded_windows(image: torch.Tensor, padding: int) -> torch.Tensor:
    """Every window of the zero-padded image: Tensor[(2p+1)^2, C, H, W]."""
    channels, height, width = image.shape
    padded = F.pad(image, (padding,) * 4)
    span = 2 * padding + 1
    return torch.stack(
        [padded[:, y : y + height, x : x + width] for y in range(span) for x in range(span)]
    )


@pytest.mark.parametrize("flip", [False, True])
def test_crop_is_a_window_of_the_zero_padded_image(flip):
    images = hand_made_batch(n=200)
    windows = padded_windows(images[0], padding=3)  # (49, C, H, W)
    if flip:
        windows = torch.cat([windows, torch.flip(windows, dims=[3])])
    config = AugmentConfig(crop_padding=3, flip=flip)
    output = as_pixels(augment_batch(images, config, seeded(2)))
    matches = (output.unsqueeze(1) == windows.unsqueeze(0)).flatten(2).all(2)  # (200, 49 or 98)
    assert (matches.sum(1) == 1).all()  # every output is exactly one window
    used = matches.any(0)
    assert int(used.sum()) > 0.6 * len(windows)  # and offsets (and flips) vary


def test_rotation_zero_and_scale_one_are_the_identity():
    images = torch.randint(0, 256, (6, 3, 16, 12), dtype=torch.uint8, generator=seeded())
    config = AugmentConfig(crop_padding=0, flip=False, rotation_degrees=0.0, scale_range=(1, 1))
    output = augment_batch(images, config, seeded())
    torch.testing.assert_close(output, images.float() / 255, atol=1e-4, rtol=0)


def disk(size: int = 32, radius: float = 10.0) -> torch.Tensor:
    coords = torch.arange(size) - (size - 1) / 2
    inside = coords.view(-1, 1) ** 2 + coords.view(1, -1) ** 2 <= radius**2
    return (inside * 200).to(torch.uint8).view(1, 1, size, size)


def test_rotation_keeps_a_centred_disk_and_turns_a_bar():
    config = AugmentConfig(crop_padding=0, flip=False, rotation_degrees=90.0)
    images = disk().expand(32, 1, -1, -1)
    output = augment_batch(images, config, seeded())
    reference = images.float() / 255
    # Only the anti-aliased rim of the disk may change.
    assert (output - reference).abs().mean() < 0.02
    bar = torch.zeros(32, 1, 32, 32, dtype=torch.uint8)
    bar[..., 14:18, :] = 200
    turned = augment_batch(bar, config, seeded())
    assert (turned - bar.float() / 255).abs().flatten(1).mean(1).max() > 0.05


def test_zoom_in_stays_inside_the_image_and_zoom_out_shows_the_border():
    flat = torch.full((32, 3, 16, 16), 200, dtype=torch.uint8)
    zoom_in = AugmentConfig(crop_padding=0, flip=False, scale_range=(0.5, 0.9))
    output = augment_batch(flat, zoom_in, seeded())
    torch.testing.assert_close(output, torch.full_like(output, 200 / 255), atol=1e-4, rtol=0)
    zoom_out = AugmentConfig(crop_padding=0, flip=False, scale_range=(1.5, 1.5))
    shrunk = augment_batch(flat, zoom_out, seeded())
    # The image covers 1 / 1.5^2 of the output; the rest is the zero border.
    border = (shrunk < 0.01).flatten(1).float().mean(1)
    assert ((border > 0.4) & (border < 0.65)).all()


def test_zoom_in_by_half_halves_the_slope_of_a_ramp():
    ramp = (torch.arange(16) * 8).to(torch.uint8).expand(16, 3, 16, 16).contiguous()
    config = AugmentConfig(crop_padding=0, flip=False, scale_range=(0.5, 0.5))
    output = augment_batch(ramp, config, seeded()) * 255
    # Bilinear resampling of a linear ramp is exact: a window of half the side, stretched
    # to the full width, rises 4 per pixel instead of 8, and stays constant down the rows.
    torch.testing.assert_close(
        output.diff(dim=3), torch.full((16, 3, 16, 15), 4.0), atol=1e-3, rtol=0
    )
    torch.testing.assert_close(output.diff(dim=2), torch.zeros(16, 3, 15, 16), atol=1e-3, rtol=0)
    left_edge = output[:, 0, 0, 0]
    assert (left_edge >= -1e-3).all() and (left_edge <= 8 * 7.5 + 1e-3).all()
    assert left_edge.std() > 5  # the window's position varies


def resampled_as_release_0_6_0(
    pixels: torch.Tensor,
    degrees: float,
    scale_range: tuple[float, float] | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """The rotation and scale of release 0.6.0, kept as the reference: it built the window's
    bounds as a tensor of host numbers in every batch (a host-to-device copy on a GPU)."""
    n, _, h, w = pixels.shape
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(degrees)
    if scale_range is not None:
        low, high = scale_range
        scale = low + torch.rand(n, generator=generator) * (high - low)
        inner = torch.tensor([1 - 1 / w, 1 - 1 / h])
        reach = (1 - scale).abs().unsqueeze(1) * inner
        shift = (torch.rand((n, 2), generator=generator) * 2 - 1) * reach
    else:
        scale = torch.ones(n)
        shift = torch.zeros((n, 2))
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack(
        [
            torch.stack([cos, -sin * (h / w), shift[:, 0]], dim=1),
            torch.stack([sin * (w / h), cos, shift[:, 1]], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@pytest.mark.parametrize(
    "shape, degrees, scale_range",
    [
        ((128, 3, 64, 64), 0.0, (0.8, 1.0)),  # Tiny ImageNet's scale
        ((128, 3, 24, 40), 15.0, (0.5, 1.5)),  # H != W, rotation, zoom in and out
        ((128, 3, 32, 32), 15.0, None),  # CIFAR's rotation alone
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_rotation_and_scale_are_bit_identical_to_release_0_6_0(shape, degrees, scale_range, seed):
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=seeded(seed + 10))
    config = AugmentConfig(
        crop_padding=0, flip=False, rotation_degrees=degrees, scale_range=scale_range
    )
    output = augment_batch(images, config, seeded(seed))
    # Normalised with mean 0 and std 1: the library multiplies by float32(1 / 255).
    reference = resampled_as_release_0_6_0(images.float(), degrees, scale_range, seeded(seed))
    reference = reference * torch.tensor(1 / 255, dtype=torch.float64).to(torch.float32)
    assert torch.equal(output, reference)


class HostDataRecorder(TorchFunctionMode):
    """Records the torch calls that turn host data into a tensor or move a tensor to a device:
    on a GPU each is a host-to-device copy, which blocks the host until the device is idle."""

    FROM_HOST = (torch.tensor, torch.as_tensor, torch.asarray, torch.from_numpy)
    FROM_HOST += (torch.Tensor.new_tensor,)
    MOVES = (torch.Tensor.to, torch.Tensor.cuda)

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FROM_HOST:
            self.calls.append(func.__name__)
        elif func in self.MOVES:
            targets = [*args[1:], kwargs.get("device")]
            moves = func is not torch.Tensor.to or any(
                isinstance(target, (torch.device, str, torch.Tensor)) for target in targets
            )
            if moves:
                self.calls.append(f"Tensor.{func.__name__}")
        return func(*args, **kwargs)


@pytest.mark.parametrize(
    "config",
    [
        TINY_IMAGENET_AUGMENT,
        CIFAR_AUGMENT,
        AugmentConfig(crop_padding=2, rotation_degrees=10.0, scale_range=(0.7, 1.3)),
    ],
)
def test_an_augmented_batch_copies_nothing_from_the_host(config):
    images = torch.randint(0, 256, (8, 3, 24, 20), dtype=torch.uint8, generator=seeded())
    augment_batch(images, config, seeded())  # the first batch caches the normalisation
    with HostDataRecorder() as recorder:
        augment_batch(images, config, seeded(1))
    assert recorder.calls == []
    with HostDataRecorder() as recorder:  # the recorder sees what it looks for
        torch.tensor([1.0]).to("cpu")
    assert recorder.calls == ["tensor", "Tensor.to"]


def test_normalize_is_per_channel_standardisation():
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8, generator=seeded())
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
        std
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(images, mean, std), expected)
    # One value applies to every channel.
    torch.testing.assert_close(normalize(images, [0.5], [0.25]), (images.float() / 255 - 0.5) * 4)


def test_evaluation_config_only_normalises():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=seeded())
    evaluation = CIFAR_AUGMENT.for_evaluation()
    assert not evaluation.is_random
    expected = normalize(images, CIFAR_AUGMENT.mean, CIFAR_AUGMENT.std)
    assert torch.equal(augment_batch(images, evaluation), expected)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="4 dimensional"):
        augment_batch(torch.zeros(3, 8, 8, dtype=torch.uint8), PLAIN)
    with pytest.raises(ValueError, match="dtype uint8"):
        augment_batch(torch.zeros(1, 3, 8, 8), PLAIN)
    with pytest.raises(ValueError, match="fit neither 1 nor the 1 channels"):
        normalize(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), (0.5,) * 3, (0.2,) * 3)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"crop_padding": -1}, "crop_padding should be an integer >= 0, but got -1"),
        ({"crop_padding": 1.5}, "crop_padding should be an integer, but got 1.5"),
        ({"rotation_degrees": 200.0}, "rotation_degrees should be a number >= 0.0 and <= 180.0"),
        ({"scale_range": (0.9, 0.8)}, "0 < low <= high"),
        ({"scale_range": (0.0, 1.0)}, "0 < low <= high"),
        ({"mean": (0.5, 0.5), "std": (0.2,)}, "same length"),
        ({"std": (0.0,)}, "std should be > 0"),
    ],
)
def test_config_rejects_invalid_values(changes, message):
    with pytest.raises(ValueError, match=message):
        AugmentConfig(**changes)


def test_config_from_lists_equals_config_from_tuples():
    from_json = AugmentConfig(scale_range=[0.8, 1.0], mean=[0.5], std=[0.25])
    assert from_json == AugmentConfig(scale_range=(0.8, 1.0), mean=(0.5,), std=(0.25,))
    hash(from_json)


def test_channel_mean_std_of_a_two_valued_image():
    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    images[0] = 255
    mean, std = channel_mean_std(images, batch_size=1)
    assert mean == pytest.approx((0.5,))
    assert std == pytest.approx((0.5,))
