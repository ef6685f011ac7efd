"""Tests of `dropcluster.data.loader`: epochs, determinism and exact resume."""

from __future__ import annotations

import pytest
import torch

from dropcluster.data.augment import AugmentConfig
from dropcluster.data.loader import DeviceLoader

AUGMENT = AugmentConfig(crop_padding=2, flip=True, rotation_degrees=10.0, mean=(0.5,), std=(0.25,))


def toy_data(n: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose first pixel is their index (mod 256), labels equal to the index."""
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator())
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return images, torch.arange(n)


def make_loader(seed: int = 0, **options) -> DeviceLoader:
    images, labels = toy_data()
    options.setdefault("augment", AUGMENT)
    return DeviceLoader(images, labels, 8, generator=torch.Generator().manual_seed(seed), **options)


def batches(loader, count=None):
    out = []
    for images, labels in loader:
        out.append((images.clone(), labels.clone()))
        if count is not None and len(out) == count:
            break
    return out


def test_every_index_once_per_epoch_without_drop_last():
    loader = make_loader(drop_last=False)
    assert len(loader) == 7  # 50 = 6 * 8 + 2
    for _ in range(3):
        seen = torch.cat([labels for _, labels in batches(loader)])
        assert sorted(seen.tolist()) == list(range(50))
    assert loader.epoch == 3


def test_drop_last_gives_full_batches_of_distinct_indices():
    loader = make_loader()
    assert len(loader) == 6
    epoch = batches(loader)
    assert [len(labels) for _, labels in epoch] == [8] * 6
    seen = torch.cat([labels for _, labels in epoch])
    assert len(set(seen.tolist())) == 48


def test_batches_are_float32_with_the_right_labels():
    images, labels = toy_data()
    loader = DeviceLoader(
        images,
        labels,
        10,
        shuffle=True,
        drop_last=False,
        generator=torch.Generator().manual_seed(0),
    )
    for batch_images, batch_labels in loader:
        assert batch_images.dtype == torch.float32 and batch_labels.dtype == torch.int64
        # Without augmentation the batch is the images in [0, 1], in the order of the labels.
        torch.testing.assert_close(batch_images, images[batch_labels].float() / 255)


def test_shuffle_changes_order_between_epochs_and_no_shuffle_keeps_it():
    loader = make_loader(drop_last=False)
    first, second = (torch.cat([y for _, y in batches(loader)]) for _ in range(2))
    assert not torch.equal(first, second)
    ordered = make_loader(shuffle=False, augment=None, drop_last=False)
    assert torch.equal(torch.cat([y for _, y in batches(ordered)]), torch.arange(50))


def test_same_seed_same_stream_other_seed_other_stream():
    first = batches(make_loader(seed=1))
    again = batches(make_loader(seed=1))
    other = batches(make_loader(seed=2))
    for (xa, ya), (xb, yb) in zip(first, again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(first, other, strict=True))


def test_no_generator_follows_the_global_seed():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        first = DeviceLoader(*toy_data(), 8, augment=AUGMENT)
        torch.manual_seed(11)
        again = DeviceLoader(*toy_data(), 8, augment=AUGMENT)
    assert all(
        torch.equal(xa, xb) for (xa, _), (xb, _) in zip(batches(first), batches(again), strict=True)
    )


def assert_same_batches(expected, actual):
    assert len(expected) == len(actual)
    for (xa, ya), (xb, yb) in zip(expected, actual, strict=True):
        assert torch.equal(ya, yb)
        assert torch.equal(xa, xb)


def test_resume_at_an_epoch_boundary_gives_the_same_next_epoch():
    reference = make_loader()
    batches(reference)
    state = reference.state_dict()
    expected = batches(reference) + batches(reference)

    resumed = make_loader(seed=99)  # another seed: the state must override it
    resumed.load_state_dict(state)
    assert resumed.epoch == 1
    assert_same_batches(expected, batches(resumed) + batches(resumed))


@pytest.mark.parametrize("stop_after", [1, 3, 5])
def test_resume_mid_epoch_gives_the_remaining_batches(stop_after):
    reference = make_loader()
    batches(reference)  # one full epoch first
    batches(reference, count=stop_after)
    state = reference.state_dict()
    expected = batches(reference) + batches(reference)  # rest of epoch 1, then epoch 2
    assert len(expected) == 6 - stop_after + 6

    resumed = make_loader(seed=99)
    resumed.load_state_dict(state)
    assert_same_batches(expected, batches(resumed) + batches(resumed))


def test_state_dict_taken_while_holding_the_last_batch_points_to_the_next_epoch():
    loader = make_loader()
    for step, _ in enumerate(loader, start=1):
        if step == len(loader):
            state = loader.state_dict()
    assert state["epoch"] == 1 and state["next_batch"] == 0


def test_interrupted_pass_continues_where_it_stopped():
    whole = batches(make_loader())
    loader = make_loader()
    assert_same_batches(whole, batches(loader, count=2) + batches(loader))


def test_state_survives_a_round_trip_through_torch_save(tmp_path):
    loader = make_loader()
    batches(loader, count=2)
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    expected = batches(loader)
    resumed = make_loader(seed=5)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt"))
    assert_same_batches(expected, batches(resumed))


def test_state_of_another_batch_size_is_rejected():
    loader = make_loader()
    batches(loader, count=5)
    images, labels = toy_data()
    other = DeviceLoader(images, labels, 25, generator=torch.Generator())
    with pytest.raises(ValueError, match="next_batch 5 is outside this loader's 2 batches"):
        other.load_state_dict(loader.state_dict())


def test_bad_arguments_are_rejected():
    images, labels = toy_data()
    with pytest.raises(ValueError, match="4 dimensional uint8"):
        DeviceLoader(images.float(), labels, 8)
    with pytest.raises(ValueError, match=r"shape \(50,\)"):
        DeviceLoader(images, labels[:3], 8)
    with pytest.raises(ValueError, match="batch_size should be an integer >= 1, but got 0"):
        DeviceLoader(images, labels, 0)
    with pytest.raises(ValueError, match="pass drop_last=False"):
        DeviceLoader(images, labels, 64)
    assert len(DeviceLoader(images, labels, 64, drop_last=False)) == 1
