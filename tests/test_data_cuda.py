"""Tests of the data pipeline on a CUDA device (skipped without one): the same contracts as
on the CPU, with the generator, the data and the batches on the GPU."""

from __future__ import annotations

import pytest
import torch

from dropcluster.data import (
    CIFAR_AUGMENT,
    TINY_IMAGENET_AUGMENT,
    AugmentConfig,
    DeviceLoader,
    augment_batch,
    normalize,
    stratified_subset,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_generator(seed: int = 0) -> torch.Generator:
    return torch.Generator("cuda").manual_seed(seed)


def test_augment_on_cuda_is_deterministic_and_stays_on_the_device():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device="cuda")
    first = augment_batch(images, CIFAR_AUGMENT, cuda_generator(3))
    again = augment_batch(images, CIFAR_AUGMENT, cuda_generator(3))
    assert first.device.type == "cuda" and first.dtype == torch.float32
    assert torch.equal(first, again)


@pytest.mark.parametrize("config", [TINY_IMAGENET_AUGMENT, CIFAR_AUGMENT])
def test_an_augmented_batch_makes_no_synchronising_call(config):
    # A blocking host-to-device copy (a tensor built from host numbers) stops the host until
    # the GPU is idle, every batch; the sync debug mode turns it into an error.
    images = torch.randint(0, 256, (256, 3, 64, 64), dtype=torch.uint8, device="cuda")
    generator = cuda_generator(5)
    augment_batch(images, config, generator)  # the first batch caches the normalisation
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):  # the mode sees such a copy
            torch.tensor([1.0, 2.0], device="cuda")
        for _ in range(3):
            output = augment_batch(images, config, generator)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert output.shape == images.shape and torch.isfinite(output).all()


def test_cuda_crop_and_flip_give_windows_of_the_padded_image():
    image = (torch.arange(3 * 8 * 8) % 251 + 1).to(torch.uint8).view(1, 3, 8, 8)
    images = image.expand(100, -1, -1, -1).contiguous().cuda()
    config = AugmentConfig(crop_padding=2, flip=True)
    output = (augment_batch(images, config, cuda_generator()) * 255).round().to(torch.uint8)
    padded = torch.nn.functional.pad(image[0], (2, 2, 2, 2))
    windows = torch.stack([padded[:, y : y + 8, x : x + 8] for y in range(5) for x in range(5)])
    windows = torch.cat([windows, windows.flip(3)]).cuda()
    matches = (output.unsqueeze(1) == windows.unsqueeze(0)).flatten(2).all(2)
    assert (matches.sum(1) == 1).all()


def test_cpu_generator_for_cuda_images_is_rejected():
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="generator should be on the images' device"):
        augment_batch(images, CIFAR_AUGMENT, torch.Generator())


def test_normalize_on_cuda_matches_the_cpu():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    on_cuda = normalize(images.cuda(), CIFAR_AUGMENT.mean, CIFAR_AUGMENT.std)
    torch.testing.assert_close(
        on_cuda.cpu(), normalize(images, CIFAR_AUGMENT.mean, CIFAR_AUGMENT.std)
    )


def test_stratified_subset_is_the_same_on_cuda():
    labels = torch.randint(0, 7, (500,), generator=torch.Generator().manual_seed(0))
    on_cuda = stratified_subset(labels.cuda(), 0.3, seed=4)
    assert on_cuda.device.type == "cuda"
    assert torch.equal(on_cuda.cpu(), stratified_subset(labels, 0.3, seed=4))


def test_cuda_loader_covers_every_index_and_resumes_from_a_cuda_checkpoint(tmp_path):
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(50)

    def make(seed):
        return DeviceLoader(
            images,
            labels,
            8,
            augment=CIFAR_AUGMENT,
            drop_last=False,
            generator=cuda_generator(seed),
            device="cuda",
        )

    loader = make(0)
    seen = torch.cat([y for _, y in loader])
    assert seen.device.type == "cuda"
    assert sorted(seen.tolist()) == list(range(50))
    for step, _ in enumerate(loader, start=1):
        if step == 3:
            break
    torch.save(loader.state_dict(), tmp_path / "loader.pt")
    expected = [(x.clone(), y.clone()) for x, y in loader]
    resumed = make(99)
    resumed.load_state_dict(torch.load(tmp_path / "loader.pt", map_location="cuda"))
    actual = list(resumed)
    assert len(actual) == len(expected) == 4
    for (xa, ya), (xb, yb) in zip(expected, actual, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
