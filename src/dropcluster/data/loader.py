"""A batch iterator over a data set held whole on the device, with exact resume.

As in the fast CIFAR trainers (airbench, hlb-CIFAR10), the uint8 images sit on the device
once; each batch is an index gather plus the batched augmentation of
:func:`dropcluster.data.augment.augment_batch`, so no worker processes or host copies are
involved. Every random number (the epoch's permutation, then each batch's augmentation) comes
from one ``torch.Generator`` on the device, whose position :meth:`DeviceLoader.state_dict`
records.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from dropcluster.data.augment import AugmentConfig, augment_batch
from dropcluster.validation import check_int

__all__ = [
    "DeviceLoader",
]


class DeviceLoader:
    """Iterate over shuffled, augmented minibatches of a device-resident uint8 data set.

    Each pass (``for images, labels in loader``) yields the rest of the current epoch and then
    moves to the next one: a complete pass is one epoch, and a pass broken off (or a loader
    restored with :meth:`load_state_dict` mid-epoch) continues where the last batch left off.
    An epoch draws a permutation of the examples from ``generator`` (when ``shuffle``), then
    each batch draws its augmentation from the same generator.

    Args:
        images (Tensor[N, C, H, W], uint8): the data set, moved to ``device`` once.
        labels (Tensor[N], integer): class indices, moved to ``device`` as int64.
        batch_size: examples per batch.
        shuffle: a new random order each epoch (else the stored order).
        augment: the augmentation and normalisation applied to each batch; None yields
            float32 pixels in [0, 1].
        generator: the source of randomness, on ``device``. None: a new generator seeded
            from the global RNG (so ``torch.manual_seed`` fixes it).
        drop_last: drop the last, incomplete batch of each epoch.
        device: where the data and batches live; None is the device of ``images``.
        rank, world: under distributed training, this process yields its share of each batch
            (``batch_size / world`` examples; ``batch_size`` is the global batch). Every
            process draws the same order and augments the whole batch from the same
            generator before taking its share, so ``world`` processes see exactly the batches
            one process would, and the position (``state_dict``) is the same on all of them.

    Yields:
        ``(images, labels)``: Tensor[B, C, H, W] float32 and Tensor[B] int64 on ``device``.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        augment: AugmentConfig | None = None,
        generator: torch.Generator | None = None,
        drop_last: bool = True,
        device: torch.device | str | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(
                f"images should be a 4 dimensional uint8 tensor (N, C, H, W), but got shape "
                f"{tuple(images.shape)} and dtype {images.dtype}"
            )
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"labels should have shape ({images.shape[0]},) to match the images, but got "
                f"{tuple(labels.shape)}"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels should hold integers, but got dtype {labels.dtype}")
        check_int("batch_size", batch_size, minimum=1)
        check_int("world", world, minimum=1)
        check_int("rank", rank, minimum=0, maximum=world - 1)
        if batch_size % world:
            raise ValueError(
                f"batch_size {batch_size} (the global batch) should be a multiple of the "
                f"{world} processes, so each takes an equal share"
            )
        if drop_last and images.shape[0] < batch_size:
            raise ValueError(
                f"with drop_last=True, {images.shape[0]} examples make no batch of "
                f"{batch_size}: lower batch_size or pass drop_last=False"
            )
        device = images.device if device is None else torch.device(device)
        if generator is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
            generator = torch.Generator(device).manual_seed(seed)
        elif generator.device.type != device.type:
            raise ValueError(
                f"generator should be on the loader's device {device}, but is on {generator.device}"
            )
        self.images = images.to(device)
        self.labels = labels.to(device, torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.generator = generator
        self.drop_last = drop_last
        self.device = device
        self.rank, self.world = rank, world
        # Position: the epoch, the next batch in it, and the generator's state when the
        # epoch began (the epoch's permutation is redrawn from it to resume mid-epoch).
        self.epoch = 0
        self._next_batch = 0
        self._epoch_start_state = generator.get_state()

    def __len__(self) -> int:
        """Batches per epoch."""
        n_examples = self.images.shape[0]
        if self.drop_last:
            return n_examples // self.batch_size
        return -(-n_examples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self._epoch_order()
        n_batches = len(self)
        for batch in range(self._next_batch, n_batches):
            index = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            images = self.images[index]
            if self.augment is None:
                batch_images = images.to(torch.float32).div_(255)
            else:
                batch_images = augment_batch(images, self.augment, self.generator)
            # Advance the position before yielding, so a state_dict taken while the consumer
            # holds this batch resumes with the next one.
            if batch + 1 == n_batches:
                self.epoch += 1
                self._next_batch = 0
            else:
                self._next_batch = batch + 1
            labels = self.labels[index]
            if self.world > 1:  # this process's share of the global batch
                batch_images = batch_images.tensor_split(self.world)[self.rank]
                labels = labels.tensor_split(self.world)[self.rank]
            yield batch_images, labels

    def _epoch_order(self) -> Tensor:
        """The current epoch's order, drawn from the generator when the epoch begins.

        Mid-epoch (after :meth:`load_state_dict` or a broken-off pass) the order is redrawn
        from the generator's state at the start of the epoch, and the generator is put back
        where the last yielded batch left it.
        """
        resuming = self._next_batch > 0
        if resuming:
            state_now = self.generator.get_state()
            self.generator.set_state(self._epoch_start_state)
        else:
            self._epoch_start_state = self.generator.get_state()
        n_examples = self.images.shape[0]
        if self.shuffle:
            order = torch.randperm(n_examples, generator=self.generator, device=self.device)
        else:
            order = torch.arange(n_examples, device=self.device)
        if resuming:
            self.generator.set_state(state_now)
        return order

    def state_dict(self) -> dict[str, Any]:
        """The position in the data stream: epoch, next batch and generator states (CPU)."""
        return {
            "epoch": self.epoch,
            "next_batch": self._next_batch,
            "epoch_start_generator_state": self._epoch_start_state.clone(),
            "generator_state": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the next batches are the ones that followed it."""
        next_batch = int(state["next_batch"])
        if not 0 <= next_batch < max(len(self), 1):
            raise ValueError(
                f"state's next_batch {next_batch} is outside this loader's {len(self)} batches "
                f"per epoch: it belongs to another data set or batch size"
            )
        self.epoch = int(state["epoch"])
        self._next_batch = next_batch
        # Checkpoints loaded with map_location="cuda" move these byte tensors; states live on
        # the CPU.
        self._epoch_start_state = state["epoch_start_generator_state"].detach().cpu().clone()
        self.generator.set_state(state["generator_state"].detach().cpu())

    def __repr__(self) -> str:
        shape = tuple(self.images.shape)
        return (
            f"{type(self).__name__}(images={shape}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, drop_last={self.drop_last}, device={self.device}, "
            f"augment={self.augment})"
        )
